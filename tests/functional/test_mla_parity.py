"""Multi-latent attention (MLA): ZeRO-1 Muon vs the single-device reference.

A tiny MLA GPT (megatron-core's MLASelfAttention on the local layers) at DP2, TP2 and
TP2 x EP2 (MLA + MoE, sequence parallel), through `tools.verify.run_verify` like every other
layout. Under the local spec every MLA projection is column-parallel: TP splits
linear_q_down_proj, linear_kv_down_proj (their latent outputs, gathered in the forward)
and linear_q_up_proj / linear_q_proj / linear_kv_up_proj (their heads), so each TP rank
holds rows of each and the owner must reassemble the whole matrix before Newton-Schulz. A
wrong reassembly or split moves the Muon family by 1e-2 or more (verify.py), a hundred
times the fp32 tolerance. The DP2 and TP2 layouts also run `--muon-split-mla` (K-nope / V
and q-nope / q-rope orthogonalized apart), which under TP takes each part of every head of
every rank.
"""

from __future__ import annotations

from collections import Counter

import pytest

from muon_megatron.config import MuonConfig
from muon_megatron.testing import tiny
from muon_megatron.tools.verify import (
    FP32_TOLERANCE,
    NOISE_CEILING,
    VerifySpec,
    run_verify,
)

STEPS = 3
# Two layers, one with a q LoRA (linear_q_down_proj / linear_q_up_proj) in one model and
# without (linear_q_proj) in the other; q/kv latent norms on, which stay on AdamW.
MLA = {
    "multi_latent_attention": True,
    "kv_lora_rank": 16,
    "qk_head_dim": 16,
    "qk_pos_emb_head_dim": 8,
    "v_head_dim": 16,
    "qk_layernorm": True,
}


def _spec(tp: int, dp: int, ep: int = 1, **model) -> VerifySpec:
    return VerifySpec(
        layout=tiny.Layout(tp=tp, ep=ep), dp=dp, model=tiny.ModelSpec(**MLA, **model), steps=STEPS
    )


FP32 = MuonConfig(muon_ns_dtype="fp32")
LAYOUTS: dict[str, tuple[VerifySpec, MuonConfig]] = {
    "dp2-q-lora": (_spec(1, 2, q_lora_rank=24), FP32),
    "dp2-split-mla": (_spec(1, 2), MuonConfig(muon_ns_dtype="fp32", muon_split_mla=True)),
    "ep2xdp2-moe": (_spec(1, 2, ep=2, num_experts=4), FP32),
}
# megatron-core's local MLA computes a wrong gradient under TP (the k-rope rows of
# linear_kv_down_proj, test_tp2_kv_down_gradient_matches_tp1), so these fail before the
# optimizer is involved (measured after 3 steps: Muon family 6.2e-2 at TP2, 7.4e-2 at
# TP2xEP2, worst tensor linear_kv_down_proj). Strict: they start passing, and must be
# moved to LAYOUTS, when the gradient is right.
TP_LAYOUTS: dict[str, tuple[VerifySpec, MuonConfig]] = {
    "tp2-q-lora": (_spec(2, 1, q_lora_rank=24), FP32),
    "tp2xep2-moe": (_spec(2, 2, ep=2, num_experts=4), FP32),
}
MLA_PROJECTIONS = ("linear_q_proj", "linear_q_up_proj", "linear_kv_down_proj", "linear_kv_up_proj")


@pytest.fixture(scope="module", params=list(LAYOUTS))
def mla_run(request) -> dict:
    spec, cfg = LAYOUTS[request.param]
    return run_verify(spec, cfg)


def test_mla_parity_with_reference(mla_run: dict) -> None:
    """Each family within NOISE_GAIN x the run's own measured fp32 noise (floor
    FP32_TOLERANCE, ceiling NOISE_CEILING; verify.py justifies both)."""
    assert mla_run["within_tolerance"], (
        mla_run["layout"],
        mla_run["family_diffs"],
        mla_run["tolerances"],
        mla_run["worst_param"],
    )
    for family in mla_run["family_diffs"]:
        assert FP32_TOLERANCE <= mla_run["tolerances"][family] <= NOISE_CEILING, family


def test_mla_projections_are_muon_matrices_and_latent_norms_adamw(mla_run: dict) -> None:
    """Every MLA projection was planned as a Muon matrix on some rank; the latent norms were
    not (they are compared in the AdamW family)."""
    planned = {name for per_rank in mla_run["planned_matrices_per_rank"] for _, name, _ in per_rank}
    for projection in ("linear_kv_down_proj", "linear_kv_up_proj", "linear_proj"):
        assert any(projection in name for name in planned), projection
    assert any(any(p in name for p in ("linear_q_proj", "linear_q_up_proj")) for name in planned)
    assert not any("layernorm" in name for name in planned)


def test_every_logical_matrix_orthogonalized_exactly_once(mla_run: dict) -> None:
    """Across all ranks, Newton-Schulz runs once per logical matrix per step, and the plan
    has as many logical matrices as the reference (with --muon-split-mla: two per q and kv
    up-projection)."""
    counted: Counter = Counter()
    for per_rank in mla_run["ns_counts_per_rank"]:
        counted.update(per_rank)
    planned = set().union(*mla_run["planned_matrices_per_rank"])
    assert len(planned) == mla_run["ref_logical_matrices"]
    assert counted == Counter({key: mla_run["steps"] for key in planned})


def test_split_mla_gives_two_matrices_per_up_projection() -> None:
    """Under TP2, linear_q_proj and linear_kv_up_proj each give two logical matrices
    (q-nope / q-rope, K-nope / V) with --muon-split-mla."""
    _, cfg = LAYOUTS["dp2-split-mla"]
    assert cfg.muon_split_mla and not LAYOUTS["dp2-q-lora"][1].muon_split_mla
    from muon_megatron.routing.splits import ModelShape, matrix_split

    shape = ModelShape(
        num_attention_heads=4, num_query_groups=4, kv_channels=16, gated_linear_unit=True,
        hidden_size=64, qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=16,
    )
    for name, rows, cols in (
        ("decoder.layers.0.self_attention.linear_q_proj.weight", 2 * 24, 64),
        ("decoder.layers.0.self_attention.linear_kv_up_proj.weight", 2 * 32, 16),
    ):
        split = matrix_split(
            name, (rows, cols), tp_size=2, tp_partition_dim=0, muon_config=cfg,
            **shape.__dict__,
        )
        assert len(split.logical_shapes()) == 2, name


@pytest.mark.xfail(strict=True, reason="megatron-core local MLA: wrong k-rope gradient under TP")
@pytest.mark.parametrize("name", list(TP_LAYOUTS))
def test_mla_tp_parity_with_reference(name: str) -> None:
    spec, cfg = TP_LAYOUTS[name]
    result = run_verify(spec, cfg)
    assert result["within_tolerance"], (result["family_diffs"], result["worst_param"])


GRAD_SPEC = tiny.ModelSpec(**MLA, q_lora_rank=24)
KV_DOWN = "decoder.layers.0.self_attention.linear_kv_down_proj.weight"
# fp32 gradients of the same weights and batch under TP2 and TP1 should differ by reduction
# order only; measured without latent norms: 1e-5..5e-5 per kv-latent row, but 0.45..0.73 per
# k-rope row (a missing share), and with the latent norms (qk_layernorm) 4e-4..1.2e-3 on the
# latent rows too.
GRAD_RTOL = 1e-3


def _kv_down_grad(rank: int, world_size: int, tp: int, path: str):
    layout = tiny.Layout(tp=tp)
    tiny.initialize_parallel(layout, 0)
    model = tiny.build_model(GRAD_SPEC, layout)
    if tp == 2:
        tiny.save_model(model, path)
    else:
        tiny.load_model(model, path)
    tiny.forward_backward(model, tiny.global_batch(0, GRAD_SPEC, 4, 0), GRAD_SPEC, 2)
    return dict(tiny.unwrap(model[0]).named_parameters())[KV_DOWN].main_grad.clone()


def _kv_down_row_errors(tmp_path) -> list[float]:
    import torch

    from muon_megatron.runtime.launch import spawn

    grad_tp2 = torch.cat(spawn(_kv_down_grad, 2, 2, str(tmp_path)), dim=0)
    grad_tp1 = spawn(_kv_down_grad, 1, 1, str(tmp_path))[0]
    return ((grad_tp2 - grad_tp1).norm(dim=1) / grad_tp1.norm(dim=1)).tolist()


@pytest.mark.xfail(strict=True, reason="megatron-core local MLA: k-rope rows miss the other "
                   "TP ranks' heads' gradient")
def test_tp2_kv_down_gradient_matches_tp1(tmp_path) -> None:
    errors = _kv_down_row_errors(tmp_path)
    assert max(errors) < GRAD_RTOL, errors
