"""The Muon phases of a step dispatch torch operators per bucket and shape, not per matrix.

Issue 21. On a GPU the host's share of a step is mostly one Python call and one kernel
launch per torch operator, so the number of operators a step dispatches is its host cost;
on one CPU rank it is exact and free of timing noise. Counted here: every aten operator
dispatched inside `run_pipeline` (`tools.step_probe.counting_dispatch_in`), where
`MuonDistributedOptimizer.step_with_ready_grads` runs the Muon phases. Megatron's own
per-parameter work around it (torch AdamW's CPU loop over the non-Muon shards, the
grad-norm fallback) is left out: it is not Muon's, and an AdamW-only run of the same model
is no baseline to subtract, since Muon's parameters skip AdamW.

The model (`step_probe.tiny_moe_spec`): 2 layers of tiny matrices with 4, 16 and 64
experts (1x, 4x, 16x), megatron's SequentialMLP, so every expert is a Muon parameter of its
own (fc1 split into gate and up): 20, 68 and 260 Muon parameters with the same three
logical shapes at every scale.
"""

from __future__ import annotations

import pytest

from muon_megatron.config import MuonConfig
from muon_megatron.runtime.launch import spawn
from muon_megatron.testing.tiny import Layout

LAYERS = 2
EXPERTS = {"1x": 4, "4x": 16, "16x": 64}
# MiB of fp32 per owner and bucket (one rank owns everything): 1x (72 KiB of matrices) and
# 4x (216 KiB) fit one bucket, 16x (792 KiB) needs two, so the bound below meets a bucket
# count that grows, as buckets do.
BUCKET_MB = 0.5
STEPS = 3


def _phase_ops(rank: int, world_size: int, experts: int) -> dict:
    from muon_megatron.optimizer import distributed
    from muon_megatron.testing import tiny
    from muon_megatron.tools.step_probe import (
        PIPELINE,
        counting_dispatch_in,
        muon_shape_facts,
        tiny_moe_spec,
    )

    spec, layout = tiny_moe_spec(LAYERS, experts), Layout()
    tiny.initialize_parallel(layout, seed=0)
    model = tiny.build_model(spec, layout)
    cfg = MuonConfig(muon_ns_dtype="fp32", muon_owner_bucket_mb=BUCKET_MB)
    optimizer = tiny.build_optimizer(model, tiny.optimizer_config(), cfg)
    with counting_dispatch_in(distributed, PIPELINE) as calls:
        for step in range(STEPS):
            tiny.train_step(model, optimizer, tiny.global_batch(step, spec, 2, seed=0), spec,
                            layout, 2)
    return {"ops": [sum(c.values()) for c in calls], **muon_shape_facts(optimizer)}


@pytest.fixture(scope="module")
def counts() -> dict[str, dict]:
    return {scale: spawn(_phase_ops, 1, experts)[0] for scale, experts in EXPERTS.items()}


def _steady(run: dict) -> int:
    # Step 0 creates the momentum buffers; from step 1 on every step is alike.
    return max(run["ops"][1:])


def test_the_count_sees_the_muon_phases_of_every_step(counts) -> None:
    for scale, run in counts.items():
        assert len(run["ops"]) == STEPS and min(run["ops"]) > 0, (scale, run)
        assert run["params"] == LAYERS * (2 + 2 * EXPERTS[scale]), (scale, run)
    # The premises of the bound below: one bucket at 1x, the same shapes at every scale.
    assert counts["1x"]["buckets"] == 1, counts["1x"]
    assert len({run["shapes"] for run in counts.values()}) == 1, counts
    assert counts["16x"]["buckets"] > counts["1x"]["buckets"], counts


def test_muon_phase_operators_grow_with_buckets_not_with_matrices(counts) -> None:
    """ops(n) <= buckets(n) * ops(1x) at 4x and 16x the matrices.

    Why this bound: a step whose work is per bucket and per shape dispatches
    a + b*B + c*G operators, a per step, b per bucket (momentum and apply, foreach over the
    bucket; the two exchanges; the figures), c per batched Newton-Schulz, and G <= B*S
    batches (at most one per logical shape S in each of the B buckets). At 1x the step is
    one bucket holding all S shapes, ops(1x) = a + b + c*S, and the shapes are the same at
    every scale (checked above), so for any a, b, c >= 0:
        ops(n) <= a + B(n) * (b + c*S) <= B(n) * ops(1x).
    Any work per matrix breaks it: at 4x (one bucket) it allows no more operators than at
    1x for 3.4x the matrices; at 16x, twice 1x's for 13x the matrices.
    """
    one = _steady(counts["1x"])
    report = {
        scale: (run["params"], run["logical"], run["buckets"], _steady(run))
        for scale, run in counts.items()
    }
    for scale in ("4x", "16x"):
        run = counts[scale]
        assert _steady(run) <= run["buckets"] * one, (
            f"{scale}: {_steady(run)} operators in the Muon phases, bound "
            f"{run['buckets']} buckets x {one} (1x); (params, logical, buckets, ops) by "
            f"scale: {report}"
        )
