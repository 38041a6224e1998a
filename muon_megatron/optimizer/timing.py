"""Muon's phases under Megatron's timers (`--timing-log-level`).

megatron-core's optimizers time their parts with the `timers` object Megatron-LM puts on the
optimizer config (`config.timers = get_timers()`): `timers(name, log_level=L).start(...)`
and `timers(name).stop()`, names in kebab case, level 1 for the parts of a step
(`optimizer-inner-step`, with `barrier=config.barrier_with_L1_time`), level 2 for finer
ones. A timer above `--timing-log-level` is Megatron's no-op. Muon's step adds:

  muon-step            level 1  the Muon part of the step (all buckets, pipelined)
  muon-momentum        level 2  phase 1, local momentum and Newton-Schulz inputs
  muon-gather          level 2  phase 2, issuing and waiting for the gathers to the owners
  muon-newton-schulz   level 2  phase 3, orthogonalization
  muon-scatter         level 2  phase 4, issuing and waiting for the scatters, and the apply

Each level-2 timer is started and stopped once per bucket and accumulates, as Megatron's
timers do. On GPU Megatron's timers synchronize the device at every start and stop, so level
2 serializes the pipeline it measures (as it does for Megatron's own level-2 timers); level
1 measures the step as it runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

__all__ = ["MUON_TIMERS", "muon_timer_names", "PhaseTimer", "with_muon_timers"]

MUON_TIMERS = {
    "muon-step": 1,
    "muon-momentum": 2,
    "muon-gather": 2,
    "muon-newton-schulz": 2,
    "muon-scatter": 2,
}
"""Timer name -> Megatron log level."""


def muon_timer_names(log_level: int) -> list[str]:
    """The Muon timers that `--timing-log-level log_level` logs, in `MUON_TIMERS` order."""
    return [name for name, level in MUON_TIMERS.items() if level <= log_level]


class PhaseTimer:
    """`with phase_timer("muon-gather"): ...` times the block under Megatron's `timers`
    (start, then stop even if the block raises); a no-op when `timers` is None. Level-1
    timers start with `barrier`, as megatron-core's own level-1 optimizer timers do."""

    def __init__(self, timers: Callable[..., Any] | None, barrier: bool = False) -> None:
        self.timers = timers
        self.barrier = barrier

    @classmethod
    def of(cls, optimizer: Any) -> PhaseTimer:
        """The timers on `optimizer.config` (megatron-core's `OptimizerConfig.timers`,
        `barrier_with_L1_time`); a no-op timer when it has none."""
        config = getattr(optimizer, "config", None)
        return cls(getattr(config, "timers", None), getattr(config, "barrier_with_L1_time", False))

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.timers is None:
            yield
            return
        level = MUON_TIMERS[name]
        self.timers(name, log_level=level).start(barrier=self.barrier and level == 1)
        try:
            yield
        finally:
            self.timers(name).stop()


def with_muon_timers(names: Sequence[str], log_level: int) -> list[str]:
    """Megatron-LM's list of timers to log, plus Muon's of `log_level` after 'optimizer'
    when the list is the training log's (it holds 'optimizer'); any other list unchanged.
    Every rank extends the same list: Megatron's timer log gathers over all ranks by
    position, and a timer a rank never started reports 0 there."""
    names = list(names)
    if "optimizer" not in names:
        return names
    at = names.index("optimizer") + 1
    extra = [n for n in muon_timer_names(log_level) if n not in names]
    return names[:at] + extra + names[at:]
