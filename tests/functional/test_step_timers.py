"""Muon's phases under Megatron's timers: the optimizer times its step with the `timers`
object on its config, as megatron-core's own optimizers do.

A stand-in for megatron-core's `Timers` records every start and stop. Like the real one, it
hands back a no-op timer for a log level above the run's `--timing-log-level`, and it
refuses to start a running timer or stop a stopped one.
"""

from __future__ import annotations

import pytest

from muon_megatron.config import MuonConfig
from muon_megatron.optimizer.timing import MUON_TIMERS
from muon_megatron.runtime.launch import spawn
from muon_megatron.testing.tiny import Layout, ModelSpec

SMALL_BUCKET_MB = 0.01  # a few matrices per bucket: several buckets per step


class RecordingTimers:
    """megatron-core's `Timers` call protocol: `timers(name, log_level=L).start(barrier=b)`
    and `timers(name).stop()`, recorded as ('start', name, level, barrier) / ('stop', name)."""

    def __init__(self, log_level: int) -> None:
        self.log_level = log_level
        self.events: list[tuple] = []
        self._levels: dict[str, int] = {}
        self._running: set[str] = set()

    def __call__(self, name: str, log_level: int | None = None) -> RecordingTimers._Timer:
        if log_level is not None:
            self._levels.setdefault(name, log_level)
        level = self._levels.get(name, 2)
        return self._Timer(self, name, level if level <= self.log_level else None)

    class _Timer:
        def __init__(self, owner: RecordingTimers, name: str, level: int | None) -> None:
            self.owner, self.name, self.level = owner, name, level

        def start(self, barrier: bool = False) -> None:
            if self.level is None:
                return
            assert self.name not in self.owner._running, f"{self.name} started twice"
            self.owner._running.add(self.name)
            self.owner.events.append(("start", self.name, self.level, barrier))

        def stop(self, barrier: bool = False) -> None:
            if self.level is None:
                return
            assert self.name in self.owner._running, f"{self.name} stopped while not running"
            self.owner._running.discard(self.name)
            self.owner.events.append(("stop", self.name))


def _timed_steps(rank: int, world: int, log_level: int) -> dict:
    from muon_megatron.optimizer.builder import muon_optimizers
    from muon_megatron.testing import tiny

    spec, layout = ModelSpec(num_layers=2), Layout()
    tiny.initialize_parallel(layout, seed=0)
    model = tiny.build_model(spec, layout)
    config = tiny.optimizer_config(barrier_with_L1_time=True)
    timers = RecordingTimers(log_level)
    config.timers = timers
    optimizer = tiny.build_optimizer(
        model, config, MuonConfig(muon_ns_dtype="fp32", muon_owner_bucket_mb=SMALL_BUCKET_MB))
    steps = 2
    for step in range(steps):
        optimizer.zero_grad()
        tiny.forward_backward(model, tiny.global_batch(step, spec, 8, seed=0), spec, 2)
        success, _, _ = optimizer.step()
        assert success
    return {"events": timers.events, "steps": steps,
            "buckets": sum(len(o._buckets) for o in muon_optimizers(optimizer))}


@pytest.fixture(scope="module")
def runs() -> dict[int, list[dict]]:
    return {level: spawn(_timed_steps, 2, level) for level in (1, 2)}


def _starts(events: list[tuple], name: str) -> list[tuple]:
    return [e for e in events if e[0] == "start" and e[1] == name]


def test_level_2_times_every_phase_per_bucket_inside_the_muon_step(runs) -> None:
    """--timing-log-level 2, DP 2: per step, 'muon-step' once at level 1 with the L1 barrier
    the config asks for; each phase timer at level 2 without a barrier, Newton-Schulz once per
    bucket; every phase start and stop falls inside a 'muon-step'; megatron-core's own
    'optimizer-inner-step' runs on the same timers object after the Muon step."""
    for out in runs[2]:
        events, steps, buckets = out["events"], out["steps"], out["buckets"]
        assert buckets >= 2, "the test needs several buckets per step"
        assert _starts(events, "muon-step") == [("start", "muon-step", 1, True)] * steps
        for name in ("muon-momentum", "muon-gather", "muon-newton-schulz", "muon-scatter"):
            starts = _starts(events, name)
            assert starts and {e[2:] for e in starts} == {(MUON_TIMERS[name], False)}, name
        assert len(_starts(events, "muon-newton-schulz")) == buckets * steps
        inside = False
        for event in events:
            if event[1] == "muon-step":
                inside = event[0] == "start"
            elif event[1].startswith("muon-"):
                assert inside, f"{event} outside muon-step"
        inner = [i for i, e in enumerate(events) if e[:2] == ("start", "optimizer-inner-step")]
        ends = [i for i, e in enumerate(events) if e[:2] == ("stop", "muon-step")]
        assert len(inner) == steps and all(m < i for m, i in zip(ends, inner))


def test_level_1_times_only_the_muon_step(runs) -> None:
    """--timing-log-level 1: the phase timers are Megatron's no-op; 'muon-step' still runs,
    started and stopped once per step."""
    for out in runs[1]:
        names = {e[1] for e in out["events"] if e[1].startswith("muon-")}
        assert names == {"muon-step"}
        assert len(_starts(out["events"], "muon-step")) == out["steps"]
