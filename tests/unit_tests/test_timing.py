"""Muon's timer names in Megatron-LM's timer log (`optimizer.timing`, `megatron_lm.metrics`)."""

from __future__ import annotations

import pytest

from muon_megatron.megatron_lm.metrics import logging_muon_timers
from muon_megatron.optimizer.timing import (
    MUON_TIMERS,
    PhaseTimer,
    muon_timer_names,
    with_muon_timers,
)

# The head of Megatron-LM's level-1 list in training_log (core_v0.16.1 training.py 1828-1841).
TRAINING_LOG = ["forward-backward", "optimizer-inner-step", "optimizer", "batch-generator"]
PHASES = ["muon-momentum", "muon-gather", "muon-newton-schulz", "muon-scatter"]


def test_names_follow_megatron_levels() -> None:
    assert muon_timer_names(0) == []
    assert muon_timer_names(1) == ["muon-step"]
    assert muon_timer_names(2) == ["muon-step", *PHASES]
    assert set(MUON_TIMERS) == {"muon-step", *PHASES}


@pytest.mark.parametrize("level", [1, 2])
def test_training_log_list_gains_muon_timers_after_optimizer(level: int) -> None:
    names = with_muon_timers(TRAINING_LOG, level)
    at = TRAINING_LOG.index("optimizer") + 1
    assert names == TRAINING_LOG[:at] + muon_timer_names(level) + TRAINING_LOG[at:]
    assert with_muon_timers(names, level) == names  # once only


def test_other_timer_lists_are_left_alone() -> None:
    assert with_muon_timers(["load-checkpoint"], 2) == ["load-checkpoint"]
    assert with_muon_timers(("evaluate",), 2) == ["evaluate"]


def test_timers_log_and_write_see_the_extended_list() -> None:
    """`logging_muon_timers` wraps `Timers.log` / `Timers.write` as `install()` does: the
    names argument grows by the run's level, every other argument passes through."""
    seen = []

    class Timers:
        _log_level = 2

        def log(self, names, normalizer=1.0, reset=True, barrier=False):
            seen.append((list(names), normalizer, reset))

        def write(self, names, writer, iteration, normalizer=1.0, reset=False):
            seen.append((list(names), writer, iteration, normalizer))

    Timers.log = logging_muon_timers(Timers.log)
    Timers.write = logging_muon_timers(Timers.write)
    Timers().log(TRAINING_LOG, normalizer=10, reset=False)
    Timers().write(TRAINING_LOG, "tb", 7, normalizer=10)
    expected = with_muon_timers(TRAINING_LOG, 2)
    assert seen == [(expected, 10, False), (expected, "tb", 7, 10)]


def test_phase_timer_without_timers_is_a_no_op_and_stops_on_error() -> None:
    with PhaseTimer(None)("muon-step"):
        pass
    events = []

    class Timer:
        def __init__(self, name):
            self.name = name

        def start(self, barrier=False):
            events.append(("start", self.name, barrier))

        def stop(self):
            events.append(("stop", self.name))

    timer = PhaseTimer(lambda name, log_level=None: Timer(name), barrier=True)
    with pytest.raises(RuntimeError):
        with timer("muon-gather"):
            raise RuntimeError("phase failed")
    with timer("muon-step"):
        pass
    assert events == [("start", "muon-gather", False), ("stop", "muon-gather"),
                      ("start", "muon-step", True), ("stop", "muon-step")]
