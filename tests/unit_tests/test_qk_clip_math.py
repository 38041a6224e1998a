"""QK-Clip's math (qk_clip/factors.py), its max-logit hook and its flags, on one process.

megatron-core's own `clip_qk` (MLASelfAttention, SelfAttention) is the outside reference where
the rules agree: MLA always, GQA with one query head per group (MHA).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.multi_latent_attention import MLASelfAttention
from megatron.core.transformer.transformer_config import TransformerConfig

from muon_megatron.qk_clip import factors as qc
from muon_megatron.qk_clip.clip import QKClip, qk_clip_from_args, record_max_logits
from muon_megatron.training.args import build_parser, validate_args

TAU, ALPHA = 1.0, 0.5


def test_gammas_clip_only_heads_above_the_threshold() -> None:
    s = torch.tensor([0.5, 1.0, 2.0, 8.0])
    assert qc.clip_gammas(s, TAU).tolist() == [1.0, 1.0, 0.5, 0.125]
    with pytest.raises(ValueError, match="threshold"):
        qc.clip_gammas(s, 0.0)


def test_mla_factors_match_megatron_core_clip_qk() -> None:
    """Bitwise megatron-core's MLASelfAttention._clip_q_proj_weight / _clip_kv_proj_weight
    (q-nope gamma^alpha, q-rope gamma, k-nope gamma^(1-alpha), v untouched)."""
    heads, nope, rope, v = 4, 6, 3, 5
    s = torch.tensor([0.3, 2.0, 5.0, 1.5])
    gammas = qc.clip_gammas(s, TAU)
    cfg = SimpleNamespace(qk_head_dim=nope, qk_pos_emb_head_dim=rope, v_head_dim=v,
                          qk_clip_alpha=ALPHA)
    fake = SimpleNamespace(num_attention_heads_per_partition=heads, config=cfg,
                           qk_clip_balancing_eta=gammas.view(heads, 1, 1))
    wq = torch.randn(heads * (nope + rope), 7)
    wkv = torch.randn(heads * (nope + v), 7)
    theirs_q = MLASelfAttention._clip_q_proj_weight(fake, wq.clone())
    theirs_kv = MLASelfAttention._clip_kv_proj_weight(fake, wkv.clone())
    qc.scale_rows_(wq, qc.mla_q_row_factors(gammas, nope, rope, ALPHA))
    qc.scale_rows_(wkv, qc.mla_kv_up_row_factors(gammas, nope, v, ALPHA))
    torch.testing.assert_close(wq, theirs_q, rtol=0, atol=0)
    torch.testing.assert_close(wkv, theirs_kv, rtol=0, atol=0)


def _fake_attention(heads: int, groups: int, hn: int) -> SimpleNamespace:
    return SimpleNamespace(
        num_query_groups_per_partition=groups,
        query_projection_size=heads * hn,
        kv_projection_size=groups * hn,
        config=SimpleNamespace(qk_clip_alpha=ALPHA),
    )


def test_mha_factors_match_megatron_core_clip_qk() -> None:
    """One query head per group: our per-head rule is megatron-core's, bitwise."""
    heads, hn = 4, 3
    gammas = qc.clip_gammas(torch.tensor([0.3, 2.0, 5.0, 1.5]), TAU)
    fake = _fake_attention(heads, heads, hn)
    fake.qk_clip_balancing_eta = gammas.view(heads, 1, 1)
    w = torch.randn(heads * 3 * hn, 5)
    theirs = SelfAttention._clip_linear_qkv(fake, w.clone())
    qc.scale_rows_(w, qc.gqa_qkv_row_factors(gammas, heads, hn, ALPHA))
    torch.testing.assert_close(w, theirs, rtol=0, atol=0)


def test_gqa_factors_per_head_q_and_per_group_k() -> None:
    """megatron's per-group layout [q heads | k | v]: each query head its own gamma^alpha,
    the group's K the smallest gamma^(1-alpha), V untouched; so every head's logit factor
    gamma_h^alpha gamma_g^(1-alpha) is at most gamma_h, and exactly gamma_h for the head
    that sets its group's max."""
    groups, per_group, hn = 2, 3, 2
    s = torch.tensor([0.5, 4.0, 2.0, 1.0, 0.9, 0.2])
    gammas = qc.clip_gammas(s, TAU)
    rows = qc.gqa_qkv_row_factors(gammas, groups, hn, ALPHA).view(groups, per_group + 2, hn)
    g = gammas.view(groups, per_group)
    torch.testing.assert_close(rows[:, :per_group, 0], g.pow(ALPHA), rtol=0, atol=0)
    k = g.min(dim=1).values.pow(1 - ALPHA)
    torch.testing.assert_close(rows[:, per_group, 0], k, rtol=0, atol=0)
    assert (rows[:, per_group + 1] == 1).all()
    assert (rows == rows[..., :1]).all()  # one factor per head, all its rows
    logit_factor = rows[:, :per_group, 0] * rows[:, per_group : per_group + 1, 0]
    assert (logit_factor * g.new_tensor(s.view(groups, per_group)) <= TAU * (1 + 1e-6)).all()
    assert math.isclose(float(logit_factor[0, 1]), 0.25, rel_tol=1e-6)
    assert (logit_factor[1] == 1).all()  # a group below tau is left alone


@pytest.mark.parametrize("span", [(0, 12), (5, 29), (17, 40), (40, 40)])
def test_a_shard_is_scaled_like_its_slice_of_the_whole_tensor(span) -> None:
    """ZeRO-1 shards are flat ranges of the TP-local tensor, cutting rows anywhere."""
    start, end = span
    rows = torch.tensor([0.5, 1.0, 0.25, 2.0, 0.125])
    whole = torch.randn(5, 8)
    shard = whole.view(-1)[start:end].clone()
    qc.scale_shard_(shard, rows, (5, 8), start, end)
    qc.scale_rows_(whole, rows)
    torch.testing.assert_close(shard, whole.view(-1)[start:end], rtol=0, atol=0)
    with pytest.raises(ValueError, match="shard"):
        qc.scale_shard_(torch.zeros(3), rows, (5, 8), 0, 4)


def _core(scale: float, mask_type=AttnMaskType.causal) -> SimpleNamespace:
    return SimpleNamespace(
        softmax_scale=scale, attn_mask_type=mask_type, layer_number=1,
        config=SimpleNamespace(apply_query_key_layer_scaling=False), qk_clip_max_logits=None,
    )


def test_hook_records_the_max_unmasked_scaled_logit_per_head() -> None:
    """Against a loop over batch, head, query and key positions; GQA keys repeated as
    megatron does; the causal mask excludes the future; maxima fold over forwards."""
    sq, b, heads, groups, hn = 5, 2, 4, 2, 3
    torch.manual_seed(0)
    q, k = torch.randn(sq, b, heads, hn), torch.randn(sq, b, groups, hn)
    core = _core(0.7)
    record_max_logits(core, (q, k, None, None), {})
    want = torch.full((heads,), -math.inf)
    for h in range(heads):
        g = h // (heads // groups)
        for i in range(b):
            for s in range(sq):
                for t in range(s + 1):
                    want[h] = max(want[h], 0.7 * float(q[s, i, h] @ k[t, i, g]))
    torch.testing.assert_close(core.qk_clip_max_logits, want, rtol=1e-6, atol=1e-6)
    # The last key, huge along the first query, is in every earlier query's future (and
    # the last query is zero): masked out. A second forward folds in by max.
    q2, k2 = q.clone(), k.clone()
    q2[-1] = 0.0
    k2[-1] = 100.0 * q[0].reshape(b, groups, -1, hn)[:, :, 0]
    record_max_logits(core, (q2, k2, None, None), {})
    torch.testing.assert_close(core.qk_clip_max_logits, want, rtol=1e-6, atol=1e-6)


def test_hook_honours_an_explicit_mask() -> None:
    q, k = torch.ones(2, 1, 1, 1), torch.tensor([1.0, 9.0]).view(2, 1, 1, 1)
    core = _core(1.0, AttnMaskType.padding)
    mask = torch.tensor([[False, True], [False, True]]).view(1, 1, 2, 2)
    record_max_logits(core, (q, k, None, mask), {})
    assert core.qk_clip_max_logits.tolist() == [1.0]


def test_flags_take_megatron_lm_names_and_megatron_core_defaults() -> None:
    args = build_parser().parse_args([])
    assert not args.qk_clip and not args.log_max_attention_logit
    fields = TransformerConfig.__dataclass_fields__
    assert args.qk_clip_alpha == fields["qk_clip_alpha"].default == 0.5
    assert args.qk_clip_threshold == fields["qk_clip_threshold"].default == 100
    args = build_parser().parse_args(
        ["--qk-clip", "--qk-clip-alpha", "0.3", "--qk-clip-threshold", "30",
         "--log-max-attention-logit"]
    )
    assert (args.qk_clip, args.qk_clip_alpha, args.qk_clip_threshold) == (True, 0.3, 30.0)


def test_without_the_flags_nothing_is_hooked() -> None:
    args = build_parser().parse_args([])
    assert qk_clip_from_args(args, [torch.nn.Linear(2, 2)]) is None


def test_bad_values_are_refused_naming_the_flag() -> None:
    bad = (["--qk-clip", "--qk-clip-alpha", "1.5"], ["--qk-clip", "--qk-clip-threshold", "0"])
    for argv in bad:
        with pytest.raises(ValueError, match="--qk-clip"):
            validate_args(build_parser().parse_args(argv), 1)
    with pytest.raises(ValueError, match="alpha"):
        QKClip([], threshold=1.0, alpha=-0.1)


class _TECoreAttention(torch.nn.Module):
    """Stands in for megatron-core's TEDotProductAttention built with config.qk_clip: TE
    (>= 2.9) returns the per-head max logits and megatron-core keeps them, folded over
    micro-batches, in `current_max_attn_logits` (None after a clip)."""

    def __init__(self) -> None:
        super().__init__()
        self.current_max_attn_logits = None


class _Layer(torch.nn.Module):
    def __init__(self, core: torch.nn.Module, heads: int, hn: int) -> None:
        super().__init__()
        self.core_attention = core
        self.config = SimpleNamespace(window_size=None)
        self.num_query_groups_per_partition = heads
        self.hidden_size_per_attention_head = hn
        self.linear_qkv = torch.nn.Linear(8, 3 * heads * hn, bias=False)


def test_te_attention_max_logits_are_read_not_hooked() -> None:
    """With TE's attention QKClip installs no hook, reads TE's record, clips the heads over
    the threshold exactly as for the local attention, and clears TE's record."""
    heads, hn = 2, 3
    layer = _Layer(_TECoreAttention(), heads, hn)
    clip = QKClip([layer], threshold=TAU, alpha=ALPHA)
    assert clip._hooks == [] and not layer.core_attention._forward_pre_hooks
    with pytest.raises(RuntimeError, match="no forward recorded"):
        clip.max_logits()
    weight = layer.linear_qkv.weight.detach().clone()
    layer.core_attention.current_max_attn_logits = torch.tensor([4.0, 0.5])
    stats = clip.apply(optimizer=SimpleNamespace())
    assert (stats.max_attention_logit, stats.clipped_heads) == (4.0, 1)
    rows = qc.gqa_qkv_row_factors(torch.tensor([0.25, 1.0]), heads, hn, ALPHA)
    qc.scale_rows_(weight, rows)
    torch.testing.assert_close(layer.linear_qkv.weight, weight, rtol=0, atol=0)
    assert layer.core_attention.current_max_attn_logits is None


def test_an_attention_without_max_logits_is_refused_naming_the_ways_out() -> None:
    with pytest.raises(TypeError, match="--transformer-impl local"):
        QKClip([_Layer(torch.nn.Identity(), 2, 3)], threshold=TAU)
