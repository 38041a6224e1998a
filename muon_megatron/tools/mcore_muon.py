"""megatron-core's own Muon, run by `muon-megatron bench` beside ours (benchmark only).

megatron-core 0.16.1's Muon (`megatron.core.optimizer.muon`: TensorParallelMuon inside a
LayerWiseDistributedOptimizer) needs the emerging-optimizers package. Its 0.3.0 release
declares Python >= 3.12 and pulls a CUDA torch, so the benchmark's extra installs it with

    pip install --no-deps --ignore-requires-python emerging-optimizers==0.3.0 absl-py

and `enable()` bridges the rest, in the benchmark process only (the optimizer never
imports this module):
- Python 3.11 has no `typing.override`: typing_extensions' is put there;
- without triton, `emerging_optimizers.triton_kernels` (which imports triton) is replaced
  by an empty module saying it has no triton kernels, so the plain matmul path runs;
- megatron-core 0.16.1 calls emerging-optimizers with older keyword names:
  `use_nesterov` (now `nesterov`) and `mode` (now `tp_mode`); both are renamed on the way;
- megatron-core never passes `coefficient_type`, so emerging-optimizers' own default runs,
  which in 0.3.0 is a 5-step tuned schedule ("quintic" there), not Keller Jordan's fixed
  quintic that Moonlight and we use ("simple" there): `MATCHING` passes "simple";
- gloo's all_gather needs equal sizes, and the layer-wise optimizer all-gathers each rank's
  updated params, whose sizes differ: `padded_all_gather()` pads them (CPU runs only).

`MATCHING` and `OURS_MATCHING` are the one configuration in which both run the same
algorithm (tested at fp32 round-off in tests/functional/test_bench.py): spectral scale
sqrt(max(A, B)) times 0.2 (= our 'moonlight' scale), Keller's coefficients, 5 steps, EMA
momentum 0.95 with Nesterov, decoupled weight decay, TP 'duplicated' (each TP rank
gathers the whole matrix), Q/K/V split, and our `muon_split_fc1` off (theirs has none).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
import types
import typing
from collections.abc import Iterator
from typing import Any

from muon_megatron.config import MuonConfig

__all__ = ["MATCHING", "OURS_MATCHING", "INSTALL", "enable", "status", "build", "padded_all_gather"]

INSTALL = "pip install --no-deps --ignore-requires-python emerging-optimizers==0.3.0 absl-py"

MATCHING: dict[str, Any] = {
    "muon_momentum": 0.95,
    "muon_use_nesterov": True,
    "muon_scale_mode": "spectral",
    "muon_extra_scale_factor": 0.2,
    "muon_num_ns_steps": 5,
    "muon_tp_mode": "duplicated",
    "muon_split_qkv": True,
    "muon_fp32_matmul_prec": "highest",
}
"""megatron-core OptimizerConfig fields of the matching configuration (plus
coefficient_type='simple', which megatron-core has no field for)."""
COEFFICIENT_TYPE = "simple"

OURS_MATCHING = MuonConfig(
    muon_momentum=0.95,
    muon_nesterov=True,
    muon_scale_mode="moonlight",
    muon_matched_adamw_rms=0.2,
    muon_coefficients="quintic",
    muon_ns_steps=5,
    muon_ns_dtype="fp32",
    muon_comm_dtype="fp32",
    muon_split_qkv=True,
    muon_split_fc1=False,
)

_enabled: list[str] = []


def status() -> tuple[bool, str]:
    """Whether megatron-core's Muon can run here (after `enable()`), and if not, why."""
    try:
        enable()
    except ImportError as error:
        return False, (
            f"megatron-core's Muon needs emerging-optimizers ({error}); install it with "
            f"`{INSTALL}`."
        )
    return True, "megatron-core's Muon runs (emerging-optimizers 0.3.0, adapters in tools/mcore_muon)"


def enable() -> None:
    """Make megatron-core's Muon importable and callable here (idempotent)."""
    if _enabled:
        return
    if not hasattr(typing, "override"):
        from typing_extensions import override

        typing.override = override
    try:
        import triton  # noqa: F401
    except ImportError:
        stub = types.ModuleType("emerging_optimizers.triton_kernels")
        stub.HAS_TRITON_340 = False
        sys.modules["emerging_optimizers.triton_kernels"] = stub
    import emerging_optimizers.orthogonalized_optimizers as eo  # raises ImportError if absent
    from megatron.core.optimizer import muon

    if not muon.HAVE_EMERGING_OPTIMIZERS:
        muon = importlib.reload(muon)
    _rename_keyword(eo.OrthogonalizedOptimizer, "__init__", "use_nesterov", "nesterov")
    newton_schulz_tp = muon.newton_schulz_tp

    @functools.wraps(newton_schulz_tp)
    def renamed_newton_schulz_tp(*args: Any, mode: str | None = None, **kwargs: Any) -> Any:
        if mode is not None:
            kwargs["tp_mode"] = mode
        return newton_schulz_tp(*args, **kwargs)

    muon.newton_schulz_tp = renamed_newton_schulz_tp
    base = muon.TensorParallelMuon

    class KellerTensorParallelMuon(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("coefficient_type", COEFFICIENT_TYPE)
            super().__init__(*args, **kwargs)

    muon.TensorParallelMuon = KellerTensorParallelMuon
    _enabled.append("ok")


def _rename_keyword(cls: type, method: str, old: str, new: str) -> None:
    original = getattr(cls, method)

    @functools.wraps(original)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if old in kwargs:
            kwargs[new] = kwargs.pop(old)
        return original(self, *args, **kwargs)

    setattr(cls, method, wrapper)


@contextlib.contextmanager
def padded_all_gather() -> Iterator[None]:
    """`torch.distributed.all_gather` with unequal sizes over gloo: pad to the largest."""
    import torch
    import torch.distributed as dist

    original = dist.all_gather

    def all_gather(tensor_list, tensor, group=None, async_op=False):
        sizes = [t.numel() for t in tensor_list]
        if len(set(sizes)) == 1 or dist.get_backend(group) != "gloo":
            return original(tensor_list, tensor, group=group, async_op=async_op)
        width = max(sizes)
        padded = [torch.empty(width, dtype=tensor.dtype, device=tensor.device) for _ in sizes]
        src = torch.zeros(width, dtype=tensor.dtype, device=tensor.device)
        src[: tensor.numel()] = tensor.reshape(-1)
        original(padded, src, group=group)
        for out, got, n in zip(tensor_list, padded, sizes):
            out.view(-1).copy_(got[:n])
        return None

    dist.all_gather = all_gather
    try:
        yield
    finally:
        dist.all_gather = original


def build(config, model_chunks: list) -> Any:
    """megatron-core's Muon (layer-wise distributed) for `model_chunks`, in the matching
    configuration; `config` is the benchmark's OptimizerConfig (lr, wd, bf16, clip)."""
    import dataclasses

    enable()
    from megatron.core.optimizer.muon import get_megatron_muon_optimizer

    muon_config = dataclasses.replace(
        config, optimizer="muon", use_distributed_optimizer=False, **MATCHING
    )
    return get_megatron_muon_optimizer(
        muon_config, model_chunks, layer_wise_distributed_optimizer=True
    )
