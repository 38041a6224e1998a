"""megatron-core's own Muon beside ours: the matching configuration runs the same algorithm,
and `muon-megatron bench` times both in one launch.

Needs the benchmark's extra (`tools.mcore_muon.INSTALL`); skipped, saying so, without it.
"""

from __future__ import annotations

import pytest
import torch

from muon_megatron.runtime.launch import spawn
from muon_megatron.tools import mcore_muon
from muon_megatron.tools.verify import FP32_TOLERANCE

AVAILABLE, WHY = mcore_muon.status()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=WHY)
STEPS = 5


def _both(rank: int, world: int, layout_kw: dict) -> dict:
    from megatron.core import parallel_state

    from muon_megatron.testing import tiny
    from muon_megatron.training import step as training_step

    spec, layout = tiny.ModelSpec(num_layers=2), tiny.Layout(**layout_kw)
    out = {}
    for which in ("ours", "theirs"):
        tiny.initialize_parallel(layout, seed=0)
        config = tiny.optimizer_config()
        if which == "ours":
            model = tiny.build_model(spec, layout)
            optimizer = tiny.build_optimizer(model, config, mcore_muon.OURS_MATCHING)
        else:
            model = tiny.build_model(spec, layout, ddp_overrides={"use_distributed_optimizer": False})
            optimizer = mcore_muon.build(config, model)
            training_step.param_scheduler(
                optimizer, max_lr=config.lr, min_lr=config.lr, weight_decay=config.weight_decay
            )
        start = {n: p.detach().clone() for n, p in model[0].named_parameters()}
        for s in range(STEPS):
            optimizer.zero_grad()
            tiny.forward_backward(model, tiny.global_batch(s, spec, 8, seed=0), spec, 2)
            with mcore_muon.padded_all_gather():
                optimizer.step()
        out[which] = {
            n: (p.detach().clone(), start[n]) for n, p in model[0].named_parameters()
        }
        parallel_state.destroy_model_parallel()
    return out


@pytest.mark.parametrize("layout_kw", [{}, {"tp": 2}], ids=["dp2", "tp2"])
def test_megatron_core_muon_matches_ours_in_the_matching_configuration(layout_kw) -> None:
    # The two differ in summation order only (batched vs single matmuls, the layer-wise vs
    # ZeRO-1 gradient reduction): the verify harness's fp32 tolerance, on the total change
    # of every tensor over the steps.
    for rank in spawn(_both, 2, layout_kw):
        ours, theirs = rank["ours"], rank["theirs"]
        assert ours.keys() == theirs.keys()
        for name, (p_ours, start) in ours.items():
            p_theirs = theirs[name][0]
            assert torch.equal(start, theirs[name][1]), name  # same initial weights
            change = (p_theirs - start).norm()
            assert change > 0, name
            assert (p_ours - p_theirs).norm() / change <= FP32_TOLERANCE, name


def test_bench_reports_ours_over_megatron_core_muon_per_layout() -> None:
    from muon_megatron.testing.tiny import ModelSpec
    from muon_megatron.tools.bench import BenchConfig, run_bench

    model = ModelSpec(num_layers=2, hidden_size=64, ffn_hidden_size=128, seq_length=32)
    cfg = BenchConfig(
        layouts=("dp2", "tp2"), optimizers=("adamw", "muon_match", "mcore_muon"),
        model=model, warmup=1, steps=2,
    )
    result = run_bench(cfg)
    rows = {(r["layout"], r["optimizer"]): r for r in result["rows"]}
    for layout in ("dp2", "tp2"):
        ours, theirs = rows[layout, "muon_match"], rows[layout, "mcore_muon"]
        assert ours["step_time_ratio_vs_mcore_muon"] == ours["step_ms"] / theirs["step_ms"]
        assert ours["ns_count_check"]  # the matching configuration: fc1 whole, Q/K/V split
    check = result["checks"]["vs_mcore_muon"]
    assert set(check["ratios"]) == {"dp2", "tp2"} and check["ok"] in (True, False)
    assert result["machine"]["mcore_matching"]["megatron-core"]["coefficient_type"] == "simple"
