"""`muon-megatron plan` against the optimizer it plans, where both run: on CPU, over gloo.

For each layout, the same command line (`testing.tiny.megatron_argv`) is given to the
planner (one rank per stage, in a fake world, on the meta device) and to a real spawned
run of the training entry's builder. The plan's owners, buckets, Newton-Schulz FLOPs per
rank, bytes every rank sends and receives in Muon's all-to-alls (counted by the bench's
`CollectiveCounter` around one real step) and the step's peak transient bytes (what
`run_pipeline` measures) must be equal: the same integers, since both are the optimizer's
own plan. At CP2 the real run builds megatron-core's TE spec on the CPU stand-in (local
attention refuses CP) and the planner its local layers without CP in the model config (CP
changes no parameter): the grids, over DP x CP, and every figure must still be equal. A
second test reads `run_pipeline`'s own trace at world 4 and checks that the
event model plays the same issue order.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from muon_megatron.config import MuonConfig
from muon_megatron.runtime.launch import spawn
from muon_megatron.testing.tiny import Layout, ModelSpec, megatron_argv

# ~1.5k fp32 elements per owner and bucket: several buckets even in the tiny model.
BUCKET_MB = 0.006
DENSE = ModelSpec(num_layers=4)
MOE = ModelSpec(num_layers=2, num_experts=4)
LAYOUTS = {
    "dp2": (2, DENSE, Layout()),
    "dp4": (4, DENSE, Layout()),
    "tp2xdp2": (4, DENSE, Layout(tp=2, sequence_parallel=True)),
    "ep2xdp2": (4, MOE, Layout(ep=2)),
    "pp2xdp2": (4, ModelSpec(num_layers=6), Layout(pp=2)),
    # Two model chunks per rank: the plan of each stage covers both chunks' matrices.
    "pp2xvpp2xdp2": (4, DENSE, Layout(pp=2, vpp=2)),
    # The grid over DP x CP. The real run builds megatron-core's TE spec (on the CPU stand-in:
    # the local attention refuses CP), the planner its local layers: the same parameters, in
    # the same order and sizes in the DDP buffer.
    "cp2xdp2": (4, ModelSpec(num_layers=4, transformer_impl="transformer_engine"), Layout(cp=2)),
}


def _real_rank(rank: int, world: int, spec: ModelSpec, layout: Layout) -> dict:
    import torch.distributed as dist

    from muon_megatron.optimizer.builder import muon_optimizers
    from muon_megatron.testing import tiny
    from muon_megatron.tools.comm_counter import CollectiveCounter
    from muon_megatron.tools.observe import recording_pipeline

    tiny.initialize_parallel(layout, seed=0)
    model = tiny.build_model(spec, layout)
    cfg = MuonConfig(muon_owner_bucket_mb=BUCKET_MB)
    optimizer = tiny.build_optimizer(model, tiny.optimizer_config(), cfg)
    tiny.forward_backward(model, tiny.global_batch(0, spec, 8, seed=0), spec, 1)
    counter = CollectiveCounter()
    with counter.installed(), recording_pipeline() as pipeline:
        counter.start()
        assert optimizer.step()[0]
        records = counter.stop()
    # Muon's exchanges are its only point-to-point transfers.
    a2a = [r for r in records if r.op in ("isend", "irecv")]
    members = muon_optimizers(optimizer)
    return {
        "rank": dist.get_rank(),
        "grids": {
            ("expert" if m.expert else "dense"): {
                "ranks": list(m.grid.ranks) or [dist.get_rank()],
                "owners": {x.name: x.owner for x in m._matrices},
                "bucket_names": [[x.name for x in b.matrices] for b in m._buckets],
            }
            for m in members
        },
        "ns_flops": sum(m.owner_loads()[m.grid.rank] for m in members),
        "sent": sum(r.sent for r in a2a),
        "received": sum(r.received for r in a2a),
        "transient": max(pipeline.peaks),
    }


def _plan(tmp_path, world: int, spec: ModelSpec, layout: Layout) -> dict:
    from muon_megatron.planner import run

    path = tmp_path / "plan.json"
    argv = megatron_argv(spec, layout) + [
        f"--muon-owner-bucket-mb={BUCKET_MB}", f"--world-size={world}", f"--json={path}"
    ]
    assert run.main(argv) == 0
    return json.loads(path.read_text())


def _spawn_real(world: int, spec: ModelSpec, layout: Layout) -> list[dict]:
    return spawn(_real_rank, world, spec, layout)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_plan_equals_the_built_optimizer(tmp_path, name: str, te_stand_in) -> None:
    world, spec, layout = LAYOUTS[name]
    plan = _plan(tmp_path, world, spec, layout)
    if spec.transformer_impl == "transformer_engine":
        real = te_stand_in.in_te_process(_spawn_real, world, spec, layout, timeout_s=600)
    else:
        real = _spawn_real(world, spec, layout)
    planned_ranks = {int(r): v for s in plan["stages"] for r, v in s["per_rank"].items()}
    assert sorted(planned_ranks) == list(range(world))
    for got in real:
        rank = got["rank"]
        stage = next(s for s in plan["stages"] if str(rank) in s["per_rank"])
        grids = {g["kind"]: g for g in stage["grids"]}
        assert sorted(grids) == sorted(got["grids"]), (rank, sorted(grids))
        for kind, expect in got["grids"].items():
            # The plan lists the stage's first rank's grids; the other expert grids (other
            # EP ranks) have the same plan on other ranks (their per-rank figures below).
            if rank in grids[kind]["ranks"]:
                assert grids[kind]["ranks"] == expect["ranks"], (rank, kind)
            assert grids[kind]["owners"] == expect["owners"], (rank, kind)
            assert grids[kind]["bucket_names"] == expect["bucket_names"], (rank, kind)
        figures = planned_ranks[rank]
        # Integers in both: FLOPs are sums of integer costs, bytes of element counts.
        assert figures["ns_flops"] == got["ns_flops"], rank
        assert (figures["sent"], figures["received"]) == (got["sent"], got["received"]), rank
        assert figures["transient"] == got["transient"], rank
    # The layout has work for the comparison to check: several buckets, bytes on the wire.
    assert sum(len(g["bucket_names"]) for s in plan["stages"] for g in s["grids"]) > 2
    assert sum(r["sent"] for r in real) > 0


def _traced_rank(rank: int, world: int, spec: ModelSpec, layout: Layout) -> dict:
    from muon_megatron.optimizer import distributed
    from muon_megatron.optimizer.builder import muon_optimizers
    from muon_megatron.optimizer.pipeline import interleave
    from muon_megatron.testing import tiny

    tiny.initialize_parallel(layout, seed=0)
    model = tiny.build_model(spec, layout)
    cfg = MuonConfig(muon_owner_bucket_mb=BUCKET_MB)
    optimizer = tiny.build_optimizer(model, tiny.optimizer_config(), cfg)
    seen: list = []
    original = distributed.run_pipeline

    def recording(members, trace=None):
        trace = []
        peak = original(members, trace=trace)
        position = [members.index(opt) for opt, _ in interleave(members)]
        seen.append((trace, position, [len(m._buckets) for m in members]))
        return peak

    distributed.run_pipeline = recording
    try:
        tiny.forward_backward(model, tiny.global_batch(0, spec, 8, seed=0), spec, 1)
        assert optimizer.step()[0]
    finally:
        distributed.run_pipeline = original
    assert len(muon_optimizers(optimizer)) == 2
    return {"seen": seen}


def test_event_model_plays_run_pipelines_issue_order() -> None:
    from muon_megatron.costmodel.events import issue_order

    (result, *_) = spawn(_traced_rank, 4, ModelSpec(num_layers=4, num_experts=4), Layout(ep=2))
    ((trace, position, counts),) = result["seen"]
    assert min(counts) >= 2  # dense and expert members, interleaved
    assert issue_order(counts) == ([tuple(e) for e in trace], position)


def test_a_megatron_lm_launch_line_is_planned_as_it_stands() -> None:
    """`python -m muon_megatron.megatron_lm --plan pretrain_gpt.py <flags>`: the script and
    the flags the planner does not model (data, tokenizer) are taken, the latter listed."""
    argv = megatron_argv(DENSE, Layout(tp=2, sequence_parallel=True))
    extra = ["--data-path", "/data/corpus_text_document", "--tokenizer-type", "GPT2BPETokenizer"]
    done = subprocess.run(
        [sys.executable, "-m", "muon_megatron.megatron_lm", "--plan", "pretrain_gpt.py",
         *argv, *extra, "--world-size", "8"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("muon-megatron plan: 8 GPUs (1 nodes x 8), TP2 PP1 CP1 DP4")
    assert f"not modelled (ignored): {' '.join(extra)}" in done.stdout
    assert "\nverdict: fits" in done.stdout


def test_a_layout_that_cannot_run_is_refused_naming_the_flag() -> None:
    argv = megatron_argv(DENSE, Layout(tp=2, sequence_parallel=True))
    done = subprocess.run(
        [sys.executable, "-m", "muon_megatron.tools.cli", "plan", *argv, "--world-size", "5"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 2
    assert "world size 5 is not divisible by tp*pp*cp = 2*1*1" in done.stderr
