"""Multi-latent attention (MLA): ZeRO-1 Muon vs the single-device reference.

A tiny MLA GPT (megatron-core's MLASelfAttention on the local layers) at DP2, TP2 and
TP2 x EP2 (MLA + MoE, sequence parallel), through `tools.verify.run_verify` like every other
layout. The TP layouts rely on training/mla.py's two corrections of megatron-core's local
MLA gradients under TP, which `test_tp2_gradients_match_tp1` checks directly: every
parameter's gradient at TP2 (with and without sequence parallel) against TP1 from the same
weights. Under the local spec every MLA projection is column-parallel: TP splits
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
import torch

from muon_megatron.config import MuonConfig
from muon_megatron.testing import tiny
from muon_megatron.tools.verify import VerifySpec, run_verify

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
SPLIT = MuonConfig(muon_ns_dtype="fp32", muon_split_mla=True)
# The TP layouts need training/mla.py's two gradient fixes (megatron-core's local MLA under
# TP; test_tp2_gradients_match_tp1). Measured without them, after 3 steps: Muon family
# 6.2e-2 at TP2 (worst linear_kv_down_proj), 7.4e-2 at TP2 x EP2; with only the k-rope fix,
# 5e-4 / AdamW 1.1e-3 at TP2 (worst q_layernorm); with both 3.9e-6 / 6.6e-7 at TP2 and
# 2.8e-6 / 8.8e-7 at TP2 x EP2.
LAYOUTS: dict[str, tuple[VerifySpec, MuonConfig]] = {
    "dp2-q-lora": (_spec(1, 2, q_lora_rank=24), FP32),
    "dp2-split-mla": (_spec(1, 2), SPLIT),
    "ep2xdp2-moe": (_spec(1, 2, ep=2, num_experts=4), FP32),
    "tp2-q-lora": (_spec(2, 1, q_lora_rank=24), FP32),
    # With a q LoRA: without one (linear_q_proj) the TP2-initialized model is an unlucky
    # draw, its own reference noise 4.3e-5 (4e-6 at DP2), so the tolerance hits
    # NOISE_CEILING and TP2 lands at 1.0e-4..1.1e-4 with or without the split (its step-0
    # gradients match TP1 to 5e-7). TP2 x EP2 covers linear_q_proj under TP.
    "tp2-split-mla": (_spec(2, 1, q_lora_rank=24), SPLIT),
    "tp2xep2-moe": (_spec(2, 2, ep=2, num_experts=4), FP32),
}
MLA_PROJECTIONS = ("linear_q_proj", "linear_q_up_proj", "linear_kv_down_proj", "linear_kv_up_proj")


@pytest.fixture(scope="module", params=list(LAYOUTS))
def mla_run(request) -> dict:
    spec, cfg = LAYOUTS[request.param]
    return run_verify(spec, cfg)


def test_mla_parity_with_reference(mla_run: dict, assert_fp32_parity) -> None:
    """Each family within NOISE_GAIN x the run's own measured fp32 noise (floor
    FP32_TOLERANCE, ceiling NOISE_CEILING; verify.py justifies both)."""
    assert_fp32_parity(mla_run)


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
    _, cfg = LAYOUTS["tp2-split-mla"]
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


GRAD_SPEC = tiny.ModelSpec(**MLA, q_lora_rank=24)
KV_DOWN = "decoder.layers.{}.self_attention.linear_kv_down_proj.weight"
Q_NORM = "decoder.layers.{}.self_attention.q_layernorm.weight"
# fp32 gradients of the same weights and batch under TP2 and TP1 differ by reduction order
# only: measured 2e-7..7e-7 relative per linear_kv_down_proj row and per parameter, with and
# without sequence parallel. Without training/mla.py's fixes: 0.45..0.82 per k-rope row
# (each TP rank keeps only its own heads' share of the shared k-rope's gradient), 4e-4..1.6e-3
# per latent row of layer 0 (layer 1's wrong k-rope gradient reaches it through the hidden
# states), and q_layernorm's gradient x2 (relative error 1.0).
GRAD_RTOL = 1e-5


def _grads(rank: int, world_size: int, tp: int, sequence_parallel: bool, path: str):
    from muon_megatron.training.mla import fix_local_mla_gradients

    layout = tiny.Layout(tp=tp, sequence_parallel=sequence_parallel)
    tiny.initialize_parallel(layout, 0)
    model = tiny.build_model(GRAD_SPEC, layout)
    if tp == 2:
        tiny.save_model(model, path)
    else:
        tiny.load_model(model, path)
    tiny.forward_backward(model, tiny.global_batch(0, GRAD_SPEC, 4, 0), GRAD_SPEC, 2)
    gpt = tiny.unwrap(model[0])
    grads = {
        name: (p.main_grad.clone(), getattr(p, "tensor_model_parallel", False),
               getattr(p, "partition_dim", -1))
        for name, p in gpt.named_parameters()
    }
    return grads, fix_local_mla_gradients(gpt)  # idempotent: what build_model fixed


def _whole(name: str, shards: list) -> torch.Tensor:
    grad, split, dim = shards[0]
    if not split:
        return grad
    if "linear_fc1" in name and GRAD_SPEC.swiglu:  # each rank: [gate rows; up rows]
        halves = [shard[0].chunk(2, dim=0) for shard in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat([shard[0] for shard in shards], dim=dim)


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2-sp"])
def test_tp2_gradients_match_tp1(tmp_path, sequence_parallel: bool) -> None:
    """Every parameter's gradient under TP2 (and TP2 + SP) matches TP1 from the same weights;
    linear_kv_down_proj row by row (the k-rope rows are the last qk_pos_emb_head_dim)."""
    from muon_megatron.runtime.launch import spawn

    tp2 = spawn(_grads, 2, 2, sequence_parallel, str(tmp_path))
    (tp1, _), = spawn(_grads, 1, 1, False, str(tmp_path))
    errors = {}
    for name, (reference, _, _) in tp1.items():
        whole = _whole(name, [grads[name] for grads, _ in tp2])
        errors[name] = ((whole - reference).norm() / reference.norm()).item()
    for layer in range(GRAD_SPEC.num_layers):
        whole = _whole(KV_DOWN.format(layer), [grads[KV_DOWN.format(layer)] for grads, _ in tp2])
        reference = tp1[KV_DOWN.format(layer)][0]
        rows = ((whole - reference).norm(dim=1) / reference.norm(dim=1)).tolist()
        assert max(rows) < GRAD_RTOL, (layer, rows)
        assert errors[Q_NORM.format(layer)] < GRAD_RTOL, errors[Q_NORM.format(layer)]
    worst = max(errors, key=errors.get)
    assert errors[worst] < GRAD_RTOL, (worst, errors[worst])
    fixed = tp2[0][1]
    assert fixed["kv_rope_gather"] == GRAD_SPEC.num_layers, fixed
    # Under SP megatron's TP sum of the q norm's gradient is right: nothing to fix.
    assert fixed["q_norm_average"] == (0 if sequence_parallel else GRAD_SPEC.num_layers), fixed
