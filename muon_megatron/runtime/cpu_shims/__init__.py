"""Make megatron-core 0.16.1 run on a machine without a GPU (tests and CPU runs only).

megatron-core assumes CUDA in a few dozen places, grouped here by what they stand in for:
`cuda` (torch.cuda, CUDA RNG, device literals, type names), `parallel_layers` (MoE and the
sequence-parallel norm) and `checkpoint` (dist_checkpointing with torch's Adam).
`install_cpu_shims()` patches exactly those places, and only when `torch.cuda.is_available()`
is false, so a GPU run never sees any of this. Each shim names the megatron line (0.16.1)
that assumed CUDA, in its own docstring or comment: the modules here are the map.

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

import torch

from muon_megatron.runtime.cpu_shims.checkpoint import _install_checkpoint_shims
from muon_megatron.runtime.cpu_shims.cuda import (
    _install_device_literal_mapping,
    _install_rng_routing,
    _install_torch_cuda_stand_ins,
    _install_type_name_checks,
)
from muon_megatron.runtime.cpu_shims.parallel_layers import (
    _install_moe_shims,
    _install_pipeline_output_shim,
    _install_sequence_parallel_norm,
)

__all__ = ["install_cpu_shims", "shims_installed"]

_INSTALLED = False


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
    _install_pipeline_output_shim()
    _install_checkpoint_shims()
    _INSTALLED = True
    return True


def shims_installed() -> bool:
    """Whether `install_cpu_shims()` has patched this process."""
    return _INSTALLED
