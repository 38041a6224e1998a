"""torch.cuda calls, CUDA RNG, `device='cuda'` literals and CUDA type names, on CPU."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch

from muon_megatron.runtime.cpu_shims._patching import (
    _cpu_for_cuda_device,
    _is_shim,
    _mark,
    _TorchView,
    _view_torch_in,
    _wrap_function,
    _wrap_method,
)

# --------------------------------------------------------------------------------------------
# torch.cuda calls that raise in a CPU-only build
# --------------------------------------------------------------------------------------------


class _InertEvent:
    """`torch.cuda.Event` stand-in: CPU ops are synchronous, so every event has completed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end_event: Any) -> float:
        return 0.0


class _InertStream:
    """`torch.cuda.Stream` stand-in: on CPU there is one implicit, synchronous stream."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: _InertEvent | None = None) -> _InertEvent:
        return event if event is not None else _InertEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_DEFAULT_STREAM = _InertStream()


def _install_torch_cuda_stand_ins() -> None:
    cuda = torch.cuda
    if _is_shim(cuda.current_device):
        return
    # param_and_grad_buffer.py 783/800/806, p2p_communication.py 190-321, moe/router.py:90,
    # moe/experts.py 184/192, tensor_parallel/layers.py ...: `device=torch.cuda.current_device()`.
    # A torch.device is accepted everywhere megatron passes this value as `device=`.
    cuda.current_device = _mark(lambda: torch.device("cpu"))
    # p2p_communication.py 242/398, DDP 588/611, dist_checkpointing: CPU work is synchronous.
    cuda.synchronize = _mark(lambda device=None: None)
    # moe/token_dispatcher.py 445 and 871-895 (all-to-all DtoH side stream), DDP 230 and
    # param_and_grad_buffer.py 417-529 (overlap_grad_reduce communication stream).
    cuda.Stream = _InertStream
    cuda.Event = _InertEvent
    cuda.current_stream = _mark(lambda device=None: _DEFAULT_STREAM)
    cuda.default_stream = _mark(lambda device=None: _DEFAULT_STREAM)
    cuda.stream = _mark(lambda stream=None: contextlib.nullcontext())
    # distrib_optimizer.py:1089 and dist_checkpointing/exchange_utils.py 336/499 move
    # tensors with `.cuda()` before a collective; on CPU the tensor is already where gloo
    # wants it.
    torch.Tensor.cuda = _mark(lambda self, *args, **kwargs: self)


# --------------------------------------------------------------------------------------------
# CUDA RNG -> CPU generator (tensor_parallel/random.py)
# --------------------------------------------------------------------------------------------


class _DropCpuRngWarning(logging.Filter):
    """`CudaRNGStatesTracker.fork` (random.py ~262) warns whenever the CPU RNG moves inside a
    fork. With the CUDA RNG routed to the CPU generator that is the expected behaviour."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _install_rng_routing() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    if _is_shim(mrandom._get_cuda_rng_state):
        return

    # random.py 41-111: `_get/_set_cuda_rng_state` read `torch.cuda.default_generators` and
    # defer the set through `torch.cuda._lazy_call`, which never runs without CUDA. Route
    # both to the CPU default generator: weights are initialised on CPU, so that is the
    # generator `fork()` must swap for TP/EP ranks to draw different values, as on GPU.
    def get_state(
        device: Any = "cuda", clone: bool = False, graph_safe: bool = False
    ) -> torch.Tensor:
        return torch.get_rng_state()

    def set_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
        torch.set_rng_state(new_state)

    mrandom._get_cuda_rng_state = _mark(get_state)
    mrandom._set_cuda_rng_state = _mark(set_state)

    # random.py 235-240 (`CudaRNGStatesTracker.add`) and 408 (`model_parallel_cuda_manual_seed`)
    # call `torch.cuda.get_rng_state` / `torch.cuda.manual_seed` directly. Seeding the
    # default generator object (not `torch.manual_seed`) avoids torch re-entering
    # `torch.cuda.manual_seed_all`.
    cuda_view = _TorchView(
        torch.cuda,
        {
            "get_rng_state": _mark(lambda device="cuda": torch.get_rng_state()),
            "set_rng_state": _mark(lambda new_state, device="cuda": torch.set_rng_state(new_state)),
            "manual_seed": _mark(lambda seed: torch.default_generator.manual_seed(int(seed))),
        },
    )
    _view_torch_in(mrandom, {"cuda": cuda_view})
    logging.getLogger(mrandom.__name__).addFilter(_DropCpuRngWarning())


# --------------------------------------------------------------------------------------------
# device='cuda' literals
# --------------------------------------------------------------------------------------------

_FACTORY_NAMES = (
    "tensor",
    "as_tensor",
    "zeros",
    "ones",
    "empty",
    "full",
    "arange",
    "eye",
    "rand",
    "randn",
    "randint",
    "zeros_like",
    "ones_like",
    "empty_like",
    "full_like",
)

# Modules that create tensors with a literal `device='cuda'` (0.16.1 lines).
_DEVICE_LITERAL_MODULES = (
    "megatron.core.optimizer.optimizer",  # 473/481/485 (found_inf, overflow buf), 907
    "megatron.core.optimizer.clip_grads",  # 90/103/115/174/207 (grad norm, zero count)
    "megatron.core.optimizer.grad_scaler",  # 15/88/91/94 (fp16 loss scale)
    "megatron.core.utils",  # 1207 local_multi_tensor_l2_norm (clip_grads without apex/TE)
    "megatron.core.pipeline_parallel.schedules",  # 596/983/2138 total_num_tokens
    "megatron.core.rerun_state_machine",  # 261/265 _reduce_any
    "megatron.core.tensor_parallel.data",  # 37 broadcast_data
    "megatron.core.transformer.moe.moe_utils",  # 998 aux-loss logging tracker
    "megatron.core.dist_checkpointing.exchange_utils",  # 104/110/326 exchange buffers
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",  # 204 verify reuse
)


def _unpinned(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` without `pin_memory` (pinned host memory needs a CUDA driver; it only ever
    served an H2D copy)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    return wrapper


def _install_device_literal_mapping() -> None:
    import importlib

    factories = {name: _cpu_for_cuda_device(getattr(torch, name)) for name in _FACTORY_NAMES}
    for mod_name in _DEVICE_LITERAL_MODULES:
        module = importlib.import_module(mod_name)
        view = module.__dict__.get("torch")
        if isinstance(view, _TorchView) and "tensor" in view._overrides:
            continue
        _view_torch_in(module, factories)

    # models/common/embeddings/rope_utils.py 62 (get_pos_emb_on_this_cp_rank, context
    # parallelism): a pinned host tensor for the H2D copy of the CP rank's chunk indices.
    from megatron.core.models.common.embeddings import rope_utils

    _view_torch_in(rope_utils, {"tensor": _unpinned(torch.tensor)})

    # transformer/utils.py 35/40: the causal / sliding-window attention masks of the local
    # DotProductAttention (via fusions/fused_softmax.py). Rebound rather than viewed: that
    # module also holds torch.compile'd functions, which must keep seeing the real torch.
    from megatron.core.transformer import utils as tutils

    def causal_mask(orig: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        return lambda sq: torch.triu(torch.ones(sq, sq), diagonal=1).bool()

    def window_mask(orig: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def make(sq: int, skv: int, window_size: tuple[int, int]) -> torch.Tensor:
            m = torch.ones(sq, skv, dtype=torch.bool)
            mu = torch.triu(m, diagonal=skv - sq - window_size[0])
            return ~torch.tril(mu, diagonal=skv - sq + window_size[1])

        return make

    import megatron.core.fusions.fused_softmax  # noqa: F401  (holds both names by import)

    _wrap_function(tutils, "get_default_causal_mask", causal_mask)
    _wrap_function(tutils, "get_sliding_window_causal_mask", window_mask)


# --------------------------------------------------------------------------------------------
# `param.type() == 'torch.cuda.FloatTensor'` checks
# --------------------------------------------------------------------------------------------

_TENSORBASE_TYPE = torch._C.TensorBase.type


def _type_with_cuda_names(
    self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any
) -> Any:
    if dtype is None and not kwargs and self.device.type in ("cpu", "meta"):
        # 'torch.FloatTensor' (CPU) or 'torch.meta.FloatTensor' (the planner's meta params)
        return "torch.cuda." + _TENSORBASE_TYPE(self).rsplit(".", 1)[-1]
    return _TENSORBASE_TYPE(self, dtype, non_blocking, **kwargs)


@contextlib.contextmanager
def _cuda_type_names() -> Iterator[None]:
    """While active, a CPU tensor's `.type()` answers 'torch.cuda.FloatTensor' etc."""
    had_own = "type" in torch.Tensor.__dict__
    previous = torch.Tensor.__dict__.get("type")
    torch.Tensor.type = _type_with_cuda_names
    try:
        yield
    finally:
        if had_own:
            torch.Tensor.type = previous
        else:
            del torch.Tensor.type


def _under_cuda_type_names(fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _cuda_type_names():
            return fn(*args, **kwargs)

    return wrapper


def _install_type_name_checks() -> None:
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    # distrib_optimizer.py 582 (in __init__) and 361/420 (_build_model_and_main_param_groups):
    # a param whose type() is none of the CUDA names is rejected as unsupported.
    _wrap_method(DistributedOptimizer, "__init__", _under_cuda_type_names)
    _wrap_method(DistributedOptimizer, "_build_model_and_main_param_groups", _under_cuda_type_names)
    # optimizer.py 671/690: the same check in the non-distributed mixed-precision optimizer.
    _wrap_method(Float16OptimizerWithFloat16Params, "__init__", _under_cuda_type_names)
    # clip_grads.py 167: `assert param.grad.type() == 'torch.cuda.FloatTensor'`; imported by
    # name into optimizer.py (already loaded above, so it is rebound too).
    _wrap_function(clip_grads, "clip_grad_by_total_norm_fp32", _under_cuda_type_names)
