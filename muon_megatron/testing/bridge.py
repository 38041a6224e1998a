"""Megatron-Bridge's training modules in the CPU test harness.

`import_bridge_training()` imports Megatron-Bridge's `training.optim` and
`training.checkpointing` in a test rank, with the two shims the CPU harness needs for them:

* Python 3.11: megatron-core's `megatron.training.models` (which Bridge imports) does
  `from typing import override`, new in Python 3.12. On 3.11 `typing.override` is set to
  `typing_extensions.override`, the same decorator (it only sets `__override__`); nothing
  else of Bridge or megatron-core needs 3.12.
* No GPU: Bridge's `save_checkpoint` reads `torch.cuda.get_rng_state()` for the "cuda_rng_state"
  entry of its RNG state (checkpointing.py `get_rng_state`) and `load_checkpoint` calls
  `torch.cuda.set_rng_state`. Inside that one module (its `torch` global becomes a view, as
  `muon_megatron.runtime.cpu_shims` does for megatron-core's RNG) both are routed to the CPU
  generator, the generator CPU runs draw from.

Both are applied only where needed (Python < 3.12; `torch.cuda.is_available()` false). The
tests run these ranks under the Transformer Engine stand-in (`tests/te_stand_in`), since
Bridge imports Transformer Engine at import time.
"""

from __future__ import annotations

import sys
import types

import torch

from muon_megatron.runtime.cpu_shims import _patching

__all__ = ["import_bridge_training"]

_CPU_RNG = {
    "get_rng_state": _patching._mark(lambda device="cuda": torch.get_rng_state()),
    "set_rng_state": _patching._mark(
        lambda new_state, device="cuda": torch.set_rng_state(new_state)),
}


def import_bridge_training() -> tuple[types.ModuleType, types.ModuleType]:
    """Megatron-Bridge's `training.optim` and `training.checkpointing` modules, imported with
    the shims above in place."""
    if sys.version_info < (3, 12):
        import typing

        import typing_extensions

        if not hasattr(typing, "override"):
            typing.override = typing_extensions.override
    from megatron.bridge.training import checkpointing, optim

    if not torch.cuda.is_available():
        _patching._view_torch_in(checkpointing, {"cuda": _patching._TorchView(torch.cuda, _CPU_RNG)})
    return optim, checkpointing
