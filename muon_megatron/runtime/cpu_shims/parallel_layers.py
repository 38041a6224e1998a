"""MoE (grouped GEMM, uneven dim-0 collectives), the local norm under sequence parallelism,
and pipeline outputs that asynchronous gloo sends still read."""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable
from typing import Any

import torch

from muon_megatron.runtime.cpu_shims._patching import (
    _mark,
    _wrap_function,
    _wrap_method,
)

# --------------------------------------------------------------------------------------------
# MoE
# --------------------------------------------------------------------------------------------


class _GroupedGemmOps:
    """Pure-torch stand-in for the `grouped_gemm` CUDA extension's `ops.gmm`.

    `gmm(a, b, batch_sizes, trans_b)` multiplies consecutive row blocks of `a` (sizes
    `batch_sizes`) by the matching expert matrix `b[e]`; autograd gives the backward.
    """

    @staticmethod
    def gmm(
        a: torch.Tensor, b: torch.Tensor, batch_sizes: torch.Tensor, trans_b: bool = False
    ) -> torch.Tensor:
        outs = []
        for expert, rows in enumerate(a.split([int(n) for n in batch_sizes.tolist()])):
            w = b[expert].t() if trans_b else b[expert]
            outs.append(rows @ w)
        return torch.cat(outs)


def _install_moe_shims() -> None:
    from megatron.core.transformer.moe import experts, moe_utils

    with contextlib.suppress(ImportError):
        import megatron.core.transformer.moe.token_dispatcher  # noqa: F401

    # moe_utils.py:1192 (router gating) reads `te_general_gemm`, which is only bound when
    # Transformer Engine imported: NameError without it.
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    # moe_utils.py:1093 only converts *CUDA* split-size tensors to numpy, so on CPU the
    # all-to-all dispatcher hands tensors to `all_to_all_single`, which wants sequences.
    # Convert CPU tensors exactly as the GPU path converts the copied-back ones.
    def move_to_cpu(orig: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
            if torch.is_tensor(tensor) and not tensor.is_cuda:
                return tensor.detach().clone().numpy() if as_numpy else tensor
            return orig(tensor, as_numpy=as_numpy, record_stream=record_stream)

        return wrapper

    _wrap_function(moe_utils, "maybe_move_tensor_to_cpu", move_to_cpu)
    _install_uneven_first_dim_collectives()

    # The legacy GroupedMLP (0.16-0.18; megatron-core 0.19 removed it, and with it
    # `grouped_gemm_util`) requires the `grouped_gemm` CUDA extension (experts.py:81).
    try:
        from megatron.core.transformer.moe import grouped_gemm_util
    except ImportError:
        grouped_gemm_util = None
    if grouped_gemm_util is not None and grouped_gemm_util.grouped_gemm is None:
        stand_in = types.SimpleNamespace(ops=_GroupedGemmOps())
        grouped_gemm_util.grouped_gemm = stand_in
        grouped_gemm_util.ops = stand_in.ops
    # experts.py 94/111 wrap GroupedMLP's activations in `jit_fuser` (torch.compile) at
    # construction time; on CPU that runs the inductor C++ toolchain in every process for a
    # fusion that only pays off on GPU.
    if hasattr(experts, "GroupedMLP") and hasattr(experts, "jit_fuser"):
        experts.jit_fuser = _mark(lambda fn: fn)


def _install_uneven_first_dim_collectives() -> None:
    from megatron.core.tensor_parallel import mappings

    # mappings.py 150/193: with split sizes, the gather / reduce-scatter along dim 0 use
    # list-of-tensors `all_gather` / `reduce_scatter` with *unequal* sizes, which NCCL accepts
    # and gloo rejects ("invalid tensor size"). The all-to-all dispatcher takes this path for
    # its TP gather when expert TP > 1. Same results with equal-size gloo collectives.
    def gather(orig: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def wrapper(
            input_: torch.Tensor,
            group: Any,
            output_split_sizes: Any = None,
            use_global_buffer: bool = False,
        ) -> torch.Tensor:
            if output_split_sizes is None or group.size() == 1:
                return orig(input_, group, output_split_sizes, use_global_buffer)
            sizes = [int(n) for n in output_split_sizes]
            padded = input_.new_zeros((max(sizes), *input_.shape[1:]))
            padded[: input_.shape[0]] = input_
            gathered = input_.new_empty((len(sizes) * max(sizes), *input_.shape[1:]))
            torch.distributed.all_gather_into_tensor(gathered, padded, group=group)
            chunks = gathered.split(max(sizes))
            return torch.cat([chunk[:n] for chunk, n in zip(chunks, sizes, strict=True)])

        return wrapper

    def reduce_scatter(orig: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def wrapper(
            input_: torch.Tensor,
            group: Any,
            input_split_sizes: Any = None,
            use_global_buffer: bool = False,
        ) -> torch.Tensor:
            if input_split_sizes is None or group.size() == 1:
                return orig(input_, group, input_split_sizes, use_global_buffer)
            total = input_.contiguous().clone()
            torch.distributed.all_reduce(total, group=group)
            sizes = [int(n) for n in input_split_sizes]
            return total.split(sizes)[group.rank()].clone()

        return wrapper

    _wrap_function(mappings, "_gather_along_first_dim", gather)
    _wrap_function(mappings, "_reduce_scatter_along_first_dim", reduce_scatter)


# --------------------------------------------------------------------------------------------
# Sequence parallel with the local (non-TE) norm
# --------------------------------------------------------------------------------------------


def _install_sequence_parallel_norm() -> None:
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    # torch_norm.py:32 asserts `not config.sequence_parallel`. A per-token norm is
    # indifferent to how the sequence is split; what SP needs is that its weight grads
    # (partial sums over the local sequence chunk) are all-reduced over TP, which
    # finalize_model_grads.py:354 does for params marked `sequence_parallel=True`. Build with
    # SP off and mark the params, exactly as TE's norm does on GPU.
    def make(orig_new: Callable[..., Any]) -> Callable[..., Any]:
        def new(cls: type, config: Any, *args: Any, **kwargs: Any) -> torch.nn.Module:
            if not config.sequence_parallel:
                return orig_new(cls, config, *args, **kwargs)
            config.sequence_parallel = False
            try:
                norm = orig_new(cls, config, *args, **kwargs)
            finally:
                config.sequence_parallel = True
            for param in norm.parameters():
                param.sequence_parallel = True
            return norm

        return new

    _wrap_method(WrappedTorchNorm, "__new__", make)


# --------------------------------------------------------------------------------------------
# Pipeline outputs
# --------------------------------------------------------------------------------------------


def _install_pipeline_output_shim() -> None:
    """Send a copy of a pipeline stage's output in the unbatched point-to-point path.

    With `deallocate_pipeline_outputs` (Megatron-LM's default) the schedules replace a sent
    output's storage by one element right after issuing its send (schedules.py 154-165,
    `out.data = torch.empty(1)`, which swaps the storage of the very tensor the send holds).
    The interleaved schedule's overlapped sends (`_p2p_ops`, p2p_communication.py 54-128)
    are asynchronous: on CUDA, NCCL has the old storage's address and the caching allocator
    keeps it alive until the stream is done; gloo's send reads the tensor when its thread
    runs, by then the one-element storage, and the next stage receives garbage. A copy taken
    when the send is issued holds the same values and is what the send then reads."""
    from megatron.core.pipeline_parallel import p2p_communication

    def copying_sends(p2p_ops: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(**kwargs: Any) -> Any:
            for key in ("tensor_send_prev", "tensor_send_next"):
                if kwargs.get(key) is not None:
                    kwargs[key] = kwargs[key].clone()
            return p2p_ops(**kwargs)

        return wrapper

    _wrap_function(p2p_communication, "_p2p_ops", copying_sends)
