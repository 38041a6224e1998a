"""A short convergence-parity check: Muon reaches a training loss at least as low as AdamW's.

The CI variant of `benchmarks/convergence.py` (issue 7): the same tiny MoE on byte-level
stdlib text, Moonlight's recipe (one lr, schedule and weight decay for both optimizers, Muon's
update RMS matched to AdamW's), one seed, `STEPS` iterations, both runs in parallel. Both
start from the same weights and see the same batches, so the comparison is paired. The
smoothed loss is the trailing mean over the last `SMOOTH` iterations.
"""

from __future__ import annotations

import pathlib

from benchmarks.convergence import run_pair, summarize

# Why 1000 and not a few hundred: on this recipe AdamW leads for the first ~600 iterations
# (its first updates are sign-like, RMS ~1 x lr, while Muon's are held at 0.2 x lr) and Muon
# overtakes it after. Measured smoothed final losses (Muon / AdamW), seed 1: 300 iterations
# 2.175 / 1.939, 600: 1.651 / 1.603, 1000: 1.353 / 1.400; seeds 2 and 3 at 1000:
# 1.388 / 1.422 and 1.366 / 1.398. A 300-iteration assertion would test the warm-up phase,
# not the claim.
STEPS = 1000
SMOOTH = 50
SEED = 1
# Budget (not asserted, the machine is shared): ~55 s on 2 idle cores.


def test_muon_final_smoothed_loss_is_at_most_adamw(tmp_path: pathlib.Path) -> None:
    logs = run_pair([SEED], STEPS, str(tmp_path), eval_interval=0, parallel=2)
    summary = summarize(logs, SMOOTH)
    row = summary["per_seed"][SEED]
    assert len(logs["muon"][SEED]["iterations"]) == len(logs["adam"][SEED]["iterations"]) == STEPS
    # Same initial weights and first batch: the first losses agree before any update.
    assert logs["muon"][SEED]["iterations"][0]["loss"] == logs["adam"][SEED]["iterations"][0]["loss"]
    assert row["muon_final_train"] <= row["adam_final_train"], row
