"""The convergence benchmark's arithmetic on synthetic logs: smoothing, steps-to-target and
the ratios it reports (benchmarks/convergence.py; docs/performance.md quotes them)."""

from __future__ import annotations

from benchmarks.convergence import steps_to_reach, summarize, trailing_mean


def _log(losses: list[float]) -> dict:
    return {"iterations": [{"iteration": i + 1, "loss": v} for i, v in enumerate(losses)],
            "validation": []}


def test_trailing_mean_averages_the_last_window_values() -> None:
    assert trailing_mean([4.0, 2.0, 6.0, 8.0], 2) == [4.0, 3.0, 4.0, 7.0]
    assert trailing_mean([1.0, 2.0, 3.0], 10) == [1.0, 1.5, 2.0]


def test_steps_to_reach_is_the_first_iteration_at_or_below_target() -> None:
    assert steps_to_reach([1, 2, 3, 4], [5.0, 3.0, 2.0, 1.0], 2.0) == 3
    assert steps_to_reach([1, 2], [5.0, 3.0], 2.0) is None


def test_summary_ratios_on_known_curves() -> None:
    # AdamW falls linearly from 10 to 1 over 10 iterations; Muon twice as fast, then flat.
    adam = [10.0 - i for i in range(10)]
    muon = [max(10.0 - 2 * i, 0.5) for i in range(10)]
    summary = summarize({"muon": {1: _log(muon), 2: _log(muon)},
                         "adam": {1: _log(adam), 2: _log(adam)}}, smooth=1)
    row = summary["per_seed"][1]
    assert row["adam_final_train"] == 1.0 and row["muon_final_train"] == 0.5
    # Muon is at 2.0 at iteration 5 and at 0.5 (<= AdamW's final 1.0) at iteration 6 of 10.
    assert row["muon_steps_to_adam_final_train"] == 6 and row["ratio_train"] == 0.6
    assert summary["mean_curve_ratio_train"] == 0.6
    assert summary["ratio_train"]["mean"] == 0.6 and summary["ratio_train"]["std"] == 0.0
    assert summary["final_train"]["muon"]["mean"] == 0.5
