"""Make megatron-core 0.16.1 run on a machine without a GPU (tests and CPU runs only).

megatron-core assumes CUDA in a few dozen places. `install_cpu_shims()` patches exactly those
places, and only when `torch.cuda.is_available()` is false, so a GPU run never sees any of
this. Each shim names the megatron line (0.16.1) that assumed CUDA; the full map is in
`NOTES-megatron-cpu.md`.

Two rules keep the shims from changing what already works:

* Process-wide patches only replace what would otherwise fail on CPU or over gloo
  (`torch.cuda.current_device`, `torch.cuda.synchronize`, streams and events, `Tensor.cuda`,
  megatron's uneven dim-0 collectives, the local norm's sequence-parallel assert, the missing
  `grouped_gemm` extension). The one exception: GroupedMLP builds its activations without
  torch.compile (same math, no C++ toolchain run per process).
* Anything that would change an answer that does not fail (CUDA RNG calls, `device='cuda'`
  literals, `Tensor.type()` names) is scoped: either to the megatron module that needs it
  (the module's own `torch` global is replaced by a view that differs only in those names)
  or to the duration of the megatron function that needs it.

Beyond CUDA, megatron's distributed optimizer has three bugs that only show with torch's own
Adam (the fallback when neither apex nor Transformer Engine is installed, i.e. always on CPU):
checkpoint loading trips over Adam's per-param "step"; see `_install_checkpoint_shims`.

`install_cpu_shims()` imports the megatron modules it patches itself, so it may be called
before or after the caller imports megatron. Functions that megatron imports by name into
other modules are rebound in every loaded megatron module that holds them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ["install_cpu_shims", "shims_installed"]

_INSTALLED = False
# Marks a function this module produced, so a second install never wraps a wrapper.
_SHIM_MARK = "__muon_cpu_shim__"


def install_cpu_shims() -> bool:
    """Patch megatron-core so that it runs on CPU with the gloo backend.

    Idempotent. Returns False and changes nothing when CUDA is available; returns True when
    the shims are (or already were) in place.
    """
    global _INSTALLED
    if torch.cuda.is_available():
        return False
    if _INSTALLED:
        return True
    _install_torch_cuda_stand_ins()
    _install_rng_routing()
    _install_device_literal_mapping()
    _install_type_name_checks()
    _install_moe_shims()
    _install_sequence_parallel_norm()
    _install_checkpoint_shims()
    _INSTALLED = True
    return True


def shims_installed() -> bool:
    """Whether `install_cpu_shims()` has patched this process."""
    return _INSTALLED


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _mark(fn: Callable[..., Any]) -> Callable[..., Any]:
    setattr(fn, _SHIM_MARK, True)
    return fn


def _is_shim(obj: Any) -> bool:
    return getattr(obj, _SHIM_MARK, False)


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


def _cpu_for_cuda_device(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` with a `device='cuda'` keyword turned into `device='cpu'`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
            # Pinned host memory needs a CUDA driver; it only ever served the H2D copy.
            kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    return _mark(wrapper)


class _TorchView:
    """Stands in for the `torch` module inside one megatron module.

    Attribute lookups fall through to the real module except for the names in `overrides`.
    Replacing a module's `torch` global changes what every function *defined* in that module
    sees (functions look globals up in their defining module), including the functions other
    modules imported by name, and nothing else in the process.
    """

    def __init__(self, real: types.ModuleType, overrides: dict[str, Any]) -> None:
        self._real = real
        self._overrides = overrides

    def __getattr__(self, name: str) -> Any:
        try:
            return self._overrides[name]
        except KeyError:
            return getattr(self._real, name)

    def __repr__(self) -> str:
        return f"<CPU view of {self._real.__name__}: {sorted(self._overrides)}>"


def _view_torch_in(module: types.ModuleType, overrides: dict[str, Any]) -> None:
    """Replace `module.torch` by a `_TorchView` with `overrides` (merged if already a view)."""
    current = module.__dict__.get("torch")
    if isinstance(current, _TorchView):
        current._overrides.update(overrides)
    elif current is torch:
        module.torch = _TorchView(torch, dict(overrides))
    else:
        raise RuntimeError(f"{module.__name__}.torch is {current!r}, expected the torch module")


def _rebind_everywhere(owner: types.ModuleType, name: str, new: Callable[..., Any]) -> None:
    """Set `owner.name = new` and rebind every loaded megatron module that imported it by name."""
    old = getattr(owner, name)
    for mod_name, mod in list(sys.modules.items()):
        if mod is not None and mod_name.startswith("megatron.") and mod.__dict__.get(name) is old:
            setattr(mod, name, new)
    setattr(owner, name, new)


def _wrap_function(owner: types.ModuleType, name: str, make: Callable[..., Callable]) -> None:
    old = getattr(owner, name)
    if not _is_shim(old):
        _rebind_everywhere(owner, name, _mark(functools.wraps(old)(make(old))))


def _wrap_method(cls: type, name: str, make: Callable[..., Callable]) -> None:
    """Wrap `cls.name` (plain function, classmethod or staticmethod) once."""
    raw = cls.__dict__[name]
    for kind in (classmethod, staticmethod):
        if isinstance(raw, kind):
            if not _is_shim(raw.__func__):
                new = _mark(functools.wraps(raw.__func__)(make(raw.__func__)))
                setattr(cls, name, kind(new))
            return
    if not _is_shim(raw):
        setattr(cls, name, _mark(functools.wraps(raw)(make(raw))))


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


def _install_device_literal_mapping() -> None:
    import importlib

    factories = {name: _cpu_for_cuda_device(getattr(torch, name)) for name in _FACTORY_NAMES}
    for mod_name in _DEVICE_LITERAL_MODULES:
        module = importlib.import_module(mod_name)
        view = module.__dict__.get("torch")
        if isinstance(view, _TorchView) and "tensor" in view._overrides:
            continue
        _view_torch_in(module, factories)

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
    if dtype is None and not kwargs and self.device.type == "cpu":
        return "torch.cuda." + _TENSORBASE_TYPE(self)[len("torch.") :]
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
    from megatron.core.transformer.moe import experts, grouped_gemm_util, moe_utils

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

    # experts.py:81 (GroupedMLP) requires the `grouped_gemm` CUDA extension.
    if grouped_gemm_util.grouped_gemm is None:
        stand_in = types.SimpleNamespace(ops=_GroupedGemmOps())
        grouped_gemm_util.grouped_gemm = stand_in
        grouped_gemm_util.ops = stand_in.ops
    # experts.py 94/111 wrap GroupedMLP's activations in `jit_fuser` (torch.compile) at
    # construction time; on CPU that runs the inductor C++ toolchain in every process for a
    # fusion that only pays off on GPU.
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
# dist_checkpointing
# --------------------------------------------------------------------------------------------


def _install_checkpoint_shims() -> None:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    # exchange_utils.py 98/106: `sh_ten.init_data("cuda")` for the fully-parallel load
    # exchange buffers.
    def init_data(orig: Callable[..., None]) -> Callable[..., None]:
        def wrapper(self: ShardedTensor, device: Any, init_fn: Callable = torch.empty) -> None:
            return orig(self, "cpu" if _is_cuda_device(device) else device, init_fn)

        return wrapper

    _wrap_method(ShardedTensor, "init_data", init_data)

    # distrib_optimizer.py 936-940 copies every key of the *destination* state
    # ({"param", **optim_state}) from the loaded `tensors`. torch's Adam (the fallback without
    # apex/TE) keeps a per-param "step", which megatron restores from the param groups
    # (817-836; "the optimizer state of STEP is handled specifically", 1496): the
    # fully_reshardable loader leaves it out of `tensors` (KeyError 'step'), and the
    # dp_reshardable one hands back a placeholder that would reset it to 0. Copy the keys both
    # sides have, except "step"; the precision-aware path is left to megatron. The copy runs
    # under no_grad: for fp32 models the main param is a view of the model param, and the
    # dp_reshardable loader (1772) is not itself decorated with no_grad.
    def set_states(orig: Callable[..., None]) -> Callable[..., None]:
        def wrapper(
            self: DistributedOptimizer,
            model_param: torch.nn.Parameter,
            tensors: dict[str, torch.Tensor],
        ) -> None:
            if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
                return orig(self, model_param, tensors)
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            dst_tensors = {"param": main_param, **self.optimizer.state[main_param]}
            with torch.no_grad():
                for key, dst in dst_tensors.items():
                    if key != "step" and key in tensors:
                        dst.copy_(tensors[key])

        return wrapper

    _wrap_method(DistributedOptimizer, "_set_main_param_and_optimizer_states", set_states)

    # distrib_optimizer.py 639-642: without apex/TE, `state_dict()` reads the per-param "step"
    # of torch's Adam and asserts there is exactly one value; a fresh optimizer has none, so
    # `sharded_state_dict(is_loading=True)` (which calls `state_dict()`, 1264-1267) fails
    # before a checkpoint can be loaded into it. Give every param the state torch's Adam
    # would create lazily at its first step (step 0, zero moments): the next step is
    # bit-for-bit what it would have been.
    from megatron.core.optimizer import distrib_optimizer

    def state_dict(orig: Callable[..., dict]) -> Callable[..., dict]:
        def wrapper(self: DistributedOptimizer) -> dict:
            inner = self.optimizer
            if not distrib_optimizer.HAVE_APEX_OR_TE and isinstance(
                inner, (torch.optim.Adam, torch.optim.AdamW)
            ):
                _init_torch_adam_state(inner)
            return orig(self)

        return wrapper

    _wrap_method(DistributedOptimizer, "state_dict", state_dict)

    # distrib_optimizer.py 821-825 restores torch Adam's step by assigning *one* tensor to
    # every param's state. torch's foreach Adam increments the step tensors in place, once
    # per param, so after a load the shared step races ahead and the bias correction is
    # wrong from the first step on. Give each param its own copy.
    def load_state_dict(orig: Callable[..., None]) -> Callable[..., None]:
        def wrapper(self: DistributedOptimizer, state_dict: dict) -> None:
            orig(self, state_dict)
            inner = self.optimizer
            if not distrib_optimizer.HAVE_APEX_OR_TE and isinstance(
                inner, (torch.optim.Adam, torch.optim.AdamW)
            ):
                for state in inner.state.values():
                    if torch.is_tensor(state.get("step")):
                        state["step"] = state["step"].clone()

        return wrapper

    _wrap_method(DistributedOptimizer, "load_state_dict", load_state_dict)


def _init_torch_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Create, where missing, the per-param state torch's Adam(W) creates lazily (adam.py
    `_init_group`, non-fused, non-capturable)."""
    step_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state[param]
            if len(state) != 0:
                continue
            state["step"] = torch.tensor(0.0, dtype=step_dtype)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            if group.get("amsgrad", False):
                state["max_exp_avg_sq"] = torch.zeros_like(
                    param, memory_format=torch.preserve_format
                )
