"""Make Megatron-LM's training package (core_v0.16.1) run on a machine without a GPU.

`install_megatron_lm_cpu_shims()` first installs the megatron-core shims of `cpu_shims`, then
patches what `megatron.training` (Megatron-LM's `pretrain()`, `initialize_megatron`,
checkpointing, logging) assumes about CUDA, so that Megatron-LM's unmodified
`pretrain_gpt.py` trains over gloo (`--distributed-backend gloo`):

    torchrun --nproc-per-node 4 -m muon_megatron.megatron_lm pretrain_gpt.py \
        --distributed-backend gloo --transformer-impl local ...

(`muon_megatron.megatron_lm.main` calls this function when CUDA is absent; a GPU run never
loads this module.) The rules are those of `cpu_shims`: a process-wide patch only replaces
what fails on CPU (an nvcc build, `torch.cuda.set_device`, a `make` run of code the
megatron-core wheel ships prebuilt); anything that would change an answer that does not fail
(`torch.cuda.device_count()`, CUDA RNG state, `device='cuda'` literals) is scoped to the
Megatron-LM module that needs it, through that module's own `torch` global. Each shim names
the Megatron-LM line (core_v0.16.1) it stands in for. Two shims skip or change work that
would not fail, each saying why: the JIT-fusion warm-up and how the checkpoint writers'
result queue is started.

One difference from a GPU run remains, inherited from `cpu_shims` routing the CUDA generator
to the CPU one: what draws from the CPU generator (the DataLoader's base seed, drawn when a
run builds its data iterators, i.e. after a resume's load) also moves "the CUDA generator".
A resumed run's `torch_rng_state` / `cuda_rng_state` therefore differ from an uninterrupted
run's, and so would its dropout masks outside `get_cuda_rng_tracker().fork()` (hidden
dropout). Runs that compare a resume with an uninterrupted run turn dropout off.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
import types
from collections.abc import Callable
from typing import Any

import torch

from muon_megatron.runtime.cpu_shims import _patching, install_cpu_shims
from muon_megatron.runtime.cpu_shims.cuda import _FACTORY_NAMES

__all__ = ["install_megatron_lm_cpu_shims"]

_INSTALLED = False


def install_megatron_lm_cpu_shims() -> bool:
    """Patch megatron-core and Megatron-LM's `megatron.training` to train on CPU over gloo.

    Idempotent. Returns False and changes nothing when CUDA is available; returns True when
    the shims are (or already were) in place. Must run before `megatron.training` is first
    imported when triton is not installed (see `_stand_in_batch_invariant_kernels`).
    """
    global _INSTALLED
    if torch.cuda.is_available():
        return False
    if _INSTALLED:
        return True
    install_cpu_shims()
    _stand_in_batch_invariant_kernels()
    _reuse_prebuilt_dataset_helpers()
    _install_initialize_shims()
    _install_device_arch()
    _install_cuda_views()
    _install_checkpoint_writer_queue()
    _install_persistent_checkpoint_worker()
    _INSTALLED = True
    return True


# --------------------------------------------------------------------------------------------
# Imports that need GPU-only packages
# --------------------------------------------------------------------------------------------

_BATCH_INVARIANT = "megatron.core.transformer.custom_layers.batch_invariant_kernels"


def _stand_in_batch_invariant_kernels() -> None:
    """training/initialize.py:25 imports the batch-invariant kernels, whose module imports
    triton unconditionally (batch_invariant_kernels.py:15). They are triton GPU kernels,
    useless on CPU; without triton (about 1 GB) stand in a module that only refuses to
    enable them (`--batch-invariant-mode`, initialize.py:121-123)."""
    if _BATCH_INVARIANT in sys.modules or importlib.util.find_spec("triton") is not None:
        return

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("--batch-invariant-mode needs triton GPU kernels; it cannot run on CPU.")

    stand_in = types.ModuleType(_BATCH_INVARIANT, "CPU stand-in: triton is not installed.")
    stand_in.enable_batch_invariant_mode = _patching._mark(refuse)
    stand_in.set_batch_invariant_mode = _patching._mark(refuse)
    stand_in.disable_batch_invariant_mode = _patching._mark(lambda: None)
    stand_in.is_batch_invariant_mode_enabled = _patching._mark(lambda: False)
    stand_in.__all__ = [
        "set_batch_invariant_mode",
        "is_batch_invariant_mode_enabled",
        "disable_batch_invariant_mode",
        "enable_batch_invariant_mode",
    ]
    sys.modules[_BATCH_INVARIANT] = stand_in


def _install_checkpoint_writer_queue() -> None:
    """dist_checkpointing/strategies/filesystem_async.py:51-56 starts the writers' result
    queue in a *spawned* `multiprocessing.Manager`, so as not to fork a CUDA context. A
    spawned child first re-runs the parent's `__main__` (here Megatron-LM's pretrain_gpt.py)
    as `__mp_main__`, in a fresh interpreter with none of these shims, where pretrain_gpt.py's
    import of `megatron.training` fails without triton; and its first `put` then imports
    torch again to unpickle the write results (~5 s a rank on two cores). A CPU process has
    no CUDA context, and Megatron forks this same process for its writers
    (filesystem_async.py:266): start the Manager by fork too."""
    import multiprocessing as mp

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    def forked(orig: Callable[..., Any]) -> Callable[..., Any]:
        def queue(*args: Any, **kwargs: Any) -> Any:  # core_v0.19 adds mp_mode='spawn'
            if filesystem_async._results_queue is None:
                filesystem_async._results_queue = mp.get_context("fork").Manager().Queue()
            return filesystem_async._results_queue

        return queue

    # core_v0.19 made the function public (get_write_results_queue).
    for name in ("_get_write_results_queue", "get_write_results_queue"):
        if hasattr(filesystem_async, name):
            _patching._wrap_function(filesystem_async, name, forked)


def _install_persistent_checkpoint_worker() -> None:
    """`--async-save` needs `--use-persistent-ckpt-worker` in Megatron-LM (arguments.py:1138);
    the worker (dist_checkpointing/strategies/async_utils.py:289-512, `PersistentAsyncCaller`)
    is a *spawned* process (core_v0.19: forkserver), for the CUDA-context reason of `_install_checkpoint_writer_queue`,
    and on CPU it dies before its first save, leaving every rank blocked in
    `preload_q.join()` (async_utils.py:345): the spawned child re-runs pretrain_gpt.py as
    `__mp_main__` without these shims (ModuleNotFoundError: triton), and past that,
    `async_loop` calls `torch.cuda.set_device(rank % torch.cuda.device_count())` (488), a
    ZeroDivisionError with no device. Start the worker by fork, as Megatron already starts the
    writers under it (scoped to async_utils' own `mp` global), and give `async_loop` one
    device to select, a no-op on CPU (`_CUDA_OVERRIDES`); the worker then runs Megatron's loop
    unchanged, with this process's shims."""
    from megatron.core.dist_checkpointing.strategies import async_utils

    def get_context(method: str | None = None) -> Any:
        # core_v0.19's training/initialize.py:74 starts the worker with mp_mode='forkserver',
        # as fresh an interpreter as 'spawn'.
        fresh = method in ("spawn", "forkserver")
        return async_utils.mp._real.get_context("fork" if fresh else method)

    if not isinstance(async_utils.__dict__.get("mp"), _patching._TorchView):
        async_utils.mp = _patching._TorchView(async_utils.mp, {"get_context": _patching._mark(get_context)})
    _copy_at_preload()


def _copy_at_preload() -> None:
    """An async save hands the worker its tensors through `preload_tensors`
    (filesystem_async.py:212-231), the device-to-host copy that the rank waits for before it
    trains on. For a tensor already on the CPU, `tensor.to("cpu")` is that same tensor, not a
    copy: the worker would write the live parameters and optimizer state while the next steps
    change them (the checkpoint of core_v0.19 held later momentum values than the synchronous
    one). Copy CPU tensors there, as the GPU path does."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    def copying(orig: Callable[..., Any]) -> Callable[..., Any]:
        def preload_tensors(write_buckets: list, *args: Any, **kwargs: Any) -> Any:
            copied = [
                (file_name, key, (data, [(item, t.clone() if t.device.type == "cpu" else t) for item, t in tensors]))
                for file_name, key, (data, tensors) in write_buckets
            ]
            return orig(copied, *args, **kwargs)

        return preload_tensors

    _patching._wrap_method(FileSystemWriterAsync, "preload_tensors", copying)


# --------------------------------------------------------------------------------------------
# Compiled dependencies: dataset helpers (make) and fused kernels (nvcc)
# --------------------------------------------------------------------------------------------

_HELPERS = "megatron.core.datasets.helpers_cpp"


def _prebuilt_helpers_path() -> str | None:
    """The `helpers_cpp` extension that the megatron-core wheel ships, if installed."""
    try:
        files = importlib.metadata.distribution("megatron-core").files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        parts = file.parts
        if parts[:3] == ("megatron", "core", "datasets") and parts[-1].startswith("helpers_cpp."):
            return str(file.locate())
    return None


def _reuse_prebuilt_dataset_helpers() -> None:
    """initialize.py:186-189 runs `make` in megatron/core/datasets (compile_helpers,
    datasets/utils.py:20) to build `helpers_cpp`, which a Megatron-LM checkout does not ship
    but the megatron-core wheel does (built from the same helpers.cpp). Load the wheel's
    build under the checkout's package; then there is nothing to compile, and nothing is
    written into the checkout."""
    from megatron.core.datasets import utils as dataset_utils

    if _HELPERS not in sys.modules and importlib.util.find_spec(_HELPERS) is None:
        path = _prebuilt_helpers_path()
        if path is None:
            return  # Megatron-LM's own `make` stays in charge.
        spec = importlib.util.spec_from_file_location(_HELPERS, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[_HELPERS] = module
        import megatron.core.datasets as datasets

        datasets.helpers_cpp = module

    def skip_compile(orig: Callable[[], None]) -> Callable[[], None]:
        return lambda: None

    _patching._wrap_function(dataset_utils, "compile_helpers", skip_compile)


def _install_initialize_shims() -> None:
    from megatron.training import initialize, training  # noqa: F401  (imports the name)

    try:  # Megatron-LM core_v0.19 removed megatron/legacy and the fused-kernel build with it
        from megatron.legacy import fused_kernels
    except ImportError:
        fused_kernels = None

    # initialize.py:60-62 asserts CUDA unless `allow_no_cuda`; pretrain (training.py ~740)
    # never passes it.
    def allowing_no_cuda(orig: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            kwargs["allow_no_cuda"] = True
            return orig(*args, **kwargs)

        return wrapper

    # Rebinds training.py's and megatron/training/__init__.py's imported names too.
    _patching._wrap_function(initialize, "initialize_megatron", allowing_no_cuda)

    # initialize.py:234-240: legacy/fused_kernels/__init__.py:17 `load` runs nvcc -V (fails
    # without CUDA_HOME) and builds nothing else: the fused softmax it once built now comes
    # from Transformer Engine or Apex, and the local path falls back to torch's softmax.
    if fused_kernels is not None and not _patching._is_shim(fused_kernels.load):
        fused_kernels.load = _patching._mark(lambda args: None)

    # initialize.py:457-523 (`_warmup_jit_function`, called by `set_jit_fusion_options`,
    # training.py:792) runs the torch.compile'd bias-gelu / bias-swiglu / bias-dropout-add
    # fusions ten times each so that their GPU kernels are built before step 1. On CPU that
    # runs the inductor C++ toolchain (~18 s a process) for kernels a run with the fusions
    # off never calls (and one with them on compiles at first use). Skipping it changes no
    # result of the run's own steps; the warm-up's random inputs no longer draw from the
    # (CPU) generator before the model is built, which only shifts which deterministic
    # initial weights a CPU run gets.
    if not _patching._is_shim(initialize._warmup_jit_function):
        # core_v0.19 added a `tp_size` argument: take whatever the release passes.
        initialize._warmup_jit_function = _patching._mark(lambda *args, **kwargs: None)


# The GPU architecture Megatron-LM's argument checks take for a CPU process: Hopper (H100), the
# GPU these runs stand in for.
_CPU_AS_ARCH = 9


def _install_device_arch() -> None:
    """arguments.py:927-953 (validate_args) asks `get_device_arch_version()`
    (training/utils.py:446, `torch.cuda.get_device_properties`) whether the GPU predates
    Blackwell whenever TP or CP > 1, and that raises without CUDA. Answer Hopper's 9, so a CPU
    run takes the checks of the H100 path (with TP or CP: CUDA_DEVICE_MAX_CONNECTIONS=1, which
    `muon_megatron.testing.megatron_lm_run` sets). Only the name `arguments` imported is
    rebound; the function itself, and every other caller, are left as they are."""
    from megatron.training import arguments

    if not _patching._is_shim(arguments.get_device_arch_version):
        arguments.get_device_arch_version = _patching._mark(lambda: _CPU_AS_ARCH)


# --------------------------------------------------------------------------------------------
# torch.cuda and device='cuda' in Megatron-LM's training modules
# --------------------------------------------------------------------------------------------


def _cuda_view(overrides: dict[str, Any]) -> _patching._TorchView:
    return _patching._TorchView(torch.cuda, overrides)


_CPU_RNG = {
    # Routed to the CPU generator as cpu_shims routes megatron-core's CUDA RNG calls: that is
    # the generator CPU runs draw from, so checkpoints and reruns save and restore it.
    "get_rng_state": _patching._mark(lambda device="cuda": torch.get_rng_state()),
    "set_rng_state": _patching._mark(lambda new_state, device="cuda": torch.set_rng_state(new_state)),
}

# Megatron-LM module -> its `torch.cuda` overrides (core_v0.16.1 lines).
_CUDA_OVERRIDES: dict[str, dict[str, Any]] = {
    # initialize.py:319/422: with 0 devices, `_initialize_distributed` skips
    # `mpu.initialize_model_parallel` and `_set_random_seed` skips the TP RNG tracker; one
    # CPU "device" per process is what both need. 331: set_device has no CPU counterpart.
    "megatron.training.initialize": {
        "device_count": _patching._mark(lambda: 1),
        "set_device": _patching._mark(lambda device: None),
    },
    # checkpointing.py:343 (get_rng_state), 1866/1878 (set_rng_state).
    "megatron.training.checkpointing": dict(_CPU_RNG),
    # core rerun_state_machine.py:957/970: the RNG state saved around a rerun.
    "megatron.core.rerun_state_machine": dict(_CPU_RNG),
    # core dist_checkpointing/strategies/async_utils.py:488: the persistent checkpoint
    # worker selects `rank % device_count()` (see `_install_persistent_checkpoint_worker`).
    "megatron.core.dist_checkpointing.strategies.async_utils": {
        "device_count": _patching._mark(lambda: 1),
        "set_device": _patching._mark(lambda device: None),
    },
}

# Megatron-LM modules that create tensors with a literal device='cuda' (core_v0.16.1 lines).
# A tuple lists where the same code lives in other releases: the first that holds `torch`.
_DEVICE_LITERAL_MODULES: tuple[str | tuple[str, ...], ...] = (
    "megatron.training.training",  # 806/812 start times, 1816/2072 loss dict, 2373/3149 exit
    "megatron.training.checkpointing",  # 315 iteration check
    # 117-208 param norms (--log-params-norm); core_v0.19 made utils a package and moved
    # them to utils/common_utils.py.
    ("megatron.training.utils.common_utils", "megatron.training.utils"),
)


def _module_holding_torch(names: str | tuple[str, ...]) -> types.ModuleType:
    candidates = (names,) if isinstance(names, str) else names
    for name in candidates:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if module.__dict__.get("torch") is not None:
            return module
    raise RuntimeError(f"none of {candidates} imports torch: update _DEVICE_LITERAL_MODULES")


def _install_cuda_views() -> None:
    factories = {name: _patching._cpu_for_cuda_device(getattr(torch, name)) for name in _FACTORY_NAMES}
    for mod_names in _DEVICE_LITERAL_MODULES:
        module = _module_holding_torch(mod_names)
        view = module.__dict__.get("torch")
        if not (isinstance(view, _patching._TorchView) and "tensor" in view._overrides):
            _patching._view_torch_in(module, factories)
    for mod_name, overrides in _CUDA_OVERRIDES.items():
        module = importlib.import_module(mod_name)
        view = module.__dict__.get("torch")
        current = view._overrides.get("cuda") if isinstance(view, _patching._TorchView) else None
        if isinstance(current, _patching._TorchView):
            current._overrides.update(overrides)
        else:
            _patching._view_torch_in(module, {"cuda": _cuda_view(dict(overrides))})
