"""`muon_megatron.routing.rules`: which parameters are Muon matrices and how fused Megatron
weights split into logical matrices, at TP 1 and across TP ranks. Every comparison is of
copied values, so all of them are exact (rtol=0, atol=0)."""

from __future__ import annotations

import pytest
import torch

from muon_megatron.config import MuonConfig
from muon_megatron.routing import rules
from muon_megatron.routing.rules import is_muon_param, param_kind
from muon_megatron.routing.splits import (
    combine_tp_pieces,
    extract_pieces,
    insert_pieces,
    matrix_split,
    split_tp_matrix,
)

# A small GQA model: 4 query groups of 2 heads each, head dim 3.
HEADS, GROUPS, HEAD_DIM, HIDDEN, FFN, EXPERTS = 8, 4, 3, 10, 6, 3
HEADS_PER_GROUP = HEADS // GROUPS
SHAPE_KW = dict(
    num_attention_heads=HEADS,
    num_query_groups=GROUPS,
    kv_channels=HEAD_DIM,
    gated_linear_unit=True,
    hidden_size=HIDDEN,
    moe_ffn_hidden_size=FFN,
)
LAYER = "decoder.layers.0"
QKV = f"{LAYER}.self_attention.linear_qkv.weight"
FC1 = f"{LAYER}.mlp.linear_fc1.weight"
W1 = f"{LAYER}.mlp.experts.weight1"
W2 = f"{LAYER}.mlp.experts.weight2"


def _split(name: str, shape, tp_size: int = 1, tp_dim: int | None = None, **cfg):
    return matrix_split(
        name,
        shape,
        tp_size=tp_size,
        tp_partition_dim=tp_dim,
        muon_config=MuonConfig(**cfg),
        **SHAPE_KW,
    )


def _assert_same(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


MUON_NAMES = [
    QKV,
    f"{LAYER}.self_attention.linear_proj.weight",
    FC1,
    f"{LAYER}.mlp.linear_fc2.weight",
    f"{LAYER}.mlp.experts.local_experts.3.linear_fc1.weight",
    f"{LAYER}.mlp.experts.local_experts.3.linear_fc2.weight",
    f"{LAYER}.mlp.experts.linear_fc1.weight0",
    W1,
    W2,
]
ADAMW_2D_NAMES = [
    "embedding.word_embeddings.weight",
    "embedding.position_embeddings.weight",
    "output_layer.weight",
    f"{LAYER}.mlp.router.weight",
    f"{LAYER}.mlp.linear_fc1.bias",
]
ADAMW_1D_NAMES = [
    f"{LAYER}.input_layernorm.weight",
    f"{LAYER}.self_attention.linear_qkv.layer_norm_weight",
    f"{LAYER}.self_attention.q_layernorm.weight",
    "decoder.final_layernorm.weight",
    f"{LAYER}.self_attention.linear_qkv.bias",
    f"{LAYER}.mlp.router.expert_bias",
    # A 1-D tensor never is a Muon matrix, whatever its name.
    f"{LAYER}.self_attention.linear_proj.weight",
]


@pytest.mark.parametrize("prefix", ["", "module.", "module.module."])
def test_is_muon_param_on_megatron_names(prefix: str) -> None:
    matrix, vector = torch.empty(4, 4), torch.empty(4)
    for name in MUON_NAMES:
        assert is_muon_param(prefix + name, matrix), name
    for name in ADAMW_2D_NAMES:
        assert not is_muon_param(prefix + name, matrix), name
    for name in ADAMW_1D_NAMES:
        assert not is_muon_param(prefix + name, vector), name


def test_param_kind() -> None:
    assert param_kind("module.module." + QKV) == "qkv"
    assert param_kind(FC1) == "fc1"
    assert param_kind(f"{LAYER}.mlp.experts.local_experts.3.linear_fc1.weight") == "fc1"
    assert param_kind(f"{LAYER}.mlp.experts.linear_fc1.weight12") == "fc1"
    assert param_kind(W1) == "grouped_fc1"
    assert param_kind(W2) == "grouped_fc2"
    assert param_kind(f"{LAYER}.mlp.linear_fc2.weight") == "plain"
    assert param_kind(f"{LAYER}.self_attention.linear_proj.weight") == "plain"


def _hand_built_qkv() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's fused QKV rows: per query group [its q heads, its k head, its v head]."""
    q = _rand(HEADS * HEAD_DIM, HIDDEN, seed=1)
    k = _rand(GROUPS * HEAD_DIM, HIDDEN, seed=2)
    v = _rand(GROUPS * HEAD_DIM, HIDDEN, seed=3)
    q_rows = HEADS_PER_GROUP * HEAD_DIM
    blocks = []
    for g in range(GROUPS):
        blocks += [q[g * q_rows : (g + 1) * q_rows], k[g * HEAD_DIM : (g + 1) * HEAD_DIM]]
        blocks += [v[g * HEAD_DIM : (g + 1) * HEAD_DIM]]
    return torch.cat(blocks), q, k, v


def _heads(x: torch.Tensor) -> list[torch.Tensor]:
    return list(x.split(HEAD_DIM))


def _per_head_order(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
    q_heads, k_heads, v_heads = _heads(q), _heads(k), _heads(v)
    out = []
    for g in range(GROUPS):
        out += q_heads[g * HEADS_PER_GROUP : (g + 1) * HEADS_PER_GROUP]
        out += [k_heads[g], v_heads[g]]
    return out


def test_qkv_split_gives_q_k_v_rows() -> None:
    qkv, q, k, v = _hand_built_qkv()
    split = _split(QKV, qkv.shape)
    _assert_same(extract_pieces(qkv, split), [q, k, v])
    assert split.logical_shapes() == [tuple(q.shape), tuple(k.shape), tuple(v.shape)]


def test_qkv_split_per_head() -> None:
    qkv, q, k, v = _hand_built_qkv()
    split = _split(QKV, qkv.shape, muon_split_qkv_per_head=True)
    pieces = extract_pieces(qkv, split)
    assert len(pieces) == HEADS + 2 * GROUPS
    _assert_same(pieces, _per_head_order(q, k, v))


def test_qkv_split_off_is_one_matrix() -> None:
    qkv, *_ = _hand_built_qkv()
    _assert_same(extract_pieces(qkv, _split(QKV, qkv.shape, muon_split_qkv=False)), [qkv])


def test_qkv_wrong_row_count_raises() -> None:
    with pytest.raises(ValueError, match="muon-split-qkv"):
        _split(QKV, (HEADS * HEAD_DIM, HIDDEN))


def test_swiglu_fc1_halves() -> None:
    gate, up = _rand(FFN, HIDDEN, seed=4), _rand(FFN, HIDDEN, seed=5)
    fc1 = torch.cat([gate, up])
    _assert_same(extract_pieces(fc1, _split(FC1, fc1.shape)), [gate, up])
    _assert_same(extract_pieces(fc1, _split(FC1, fc1.shape, muon_split_fc1=False)), [fc1])


def _hand_built_grouped() -> tuple[torch.Tensor, torch.Tensor, list, list, list]:
    """GroupedMLP weights: weight1 [hidden, E*2*ffn] read as view(E, hidden, 2*ffn) with
    [gate | up] columns per expert; weight2 [E*ffn, hidden] read as view(E, ffn, hidden)."""
    gates = [_rand(FFN, HIDDEN, seed=10 + e) for e in range(EXPERTS)]
    ups = [_rand(FFN, HIDDEN, seed=20 + e) for e in range(EXPERTS)]
    downs = [_rand(FFN, HIDDEN, seed=30 + e) for e in range(EXPERTS)]
    w1_ehw = torch.stack([torch.cat([g.T, u.T], dim=1) for g, u in zip(gates, ups)])
    weight1 = w1_ehw.reshape(HIDDEN, EXPERTS * 2 * FFN)  # same memory, Megatron's shape
    weight2 = torch.cat(downs)
    return weight1, weight2, gates, ups, downs


def test_grouped_mlp_split() -> None:
    weight1, weight2, gates, ups, downs = _hand_built_grouped()
    expected = [m for g, u in zip(gates, ups) for m in (g, u)]
    _assert_same(extract_pieces(weight1, _split(W1, weight1.shape)), expected)
    # weight2's pieces are taken [out, in] = [hidden, ffn] like every Linear weight.
    _assert_same(extract_pieces(weight2, _split(W2, weight2.shape)), [d.T for d in downs])
    no_glu = _split(W1, weight1.shape, muon_split_fc1=False)
    _assert_same(extract_pieces(weight1, no_glu), [torch.cat([g, u]) for g, u in zip(gates, ups)])


def test_grouped_mlp_needs_ffn_size() -> None:
    kw = dict(SHAPE_KW, moe_ffn_hidden_size=None)
    with pytest.raises(ValueError, match="moe_ffn_hidden_size"):
        matrix_split(
            W2,
            (EXPERTS * FFN, HIDDEN),
            tp_size=1,
            tp_partition_dim=None,
            muon_config=MuonConfig(),
            **kw,
        )


def test_matrix_split_rejects_non_matrix() -> None:
    with pytest.raises(ValueError, match="2-D"):
        _split(f"{LAYER}.self_attention.linear_proj.weight", (4, 4, 4))


@pytest.mark.parametrize(
    "name,cfg",
    [
        (QKV, {}),
        (QKV, {"muon_split_qkv_per_head": True}),
        (QKV, {"muon_split_qkv": False}),
        (FC1, {}),
        (W1, {}),
        (W2, {}),
        (f"{LAYER}.self_attention.linear_proj.weight", {}),
    ],
)
def test_insert_inverts_extract(name: str, cfg: dict) -> None:
    shapes = {
        QKV: (GROUPS * (HEADS_PER_GROUP + 2) * HEAD_DIM, HIDDEN),
        FC1: (2 * FFN, HIDDEN),
        W1: (HIDDEN, EXPERTS * 2 * FFN),
        W2: (EXPERTS * FFN, HIDDEN),
    }
    shape = shapes.get(name, (HIDDEN, 7))
    x = _rand(*shape, seed=7)
    split = _split(name, shape, **cfg)
    # Start from NaN so a row the pieces do not cover would show up.
    out = insert_pieces(torch.full_like(x, float("nan")), split, extract_pieces(x, split))
    torch.testing.assert_close(out, x, rtol=0, atol=0)


TP = 2


def _tp_round_trip(name: str, tp1: torch.Tensor, shards: list[torch.Tensor], tp_dim: int, **cfg):
    """Pieces of the TP shards combine into the TP1 logical matrices, and back."""
    split_tp1 = _split(name, tp1.shape, **cfg)
    split_tp = _split(name, shards[0].shape, tp_size=TP, tp_dim=tp_dim, **cfg)
    per_rank = [extract_pieces(shard, split_tp) for shard in shards]
    logical = combine_tp_pieces(per_rank, split_tp)
    _assert_same(logical, extract_pieces(tp1, split_tp1))
    assert split_tp.logical_shapes() == [tuple(m.shape) for m in logical]
    for rank_pieces, expected in zip(split_tp_matrix(logical, split_tp), per_rank):
        _assert_same(rank_pieces, expected)


@pytest.mark.parametrize("per_head", [False, True])
def test_qkv_tp2_combines_to_tp1(per_head: bool) -> None:
    qkv, *_ = _hand_built_qkv()
    # ColumnParallelLinear gives each TP rank a contiguous block of rows, i.e. whole query
    # groups (GROUPS / TP of them) with their q, k and v heads.
    shards = list(qkv.chunk(TP, dim=0))
    _tp_round_trip(QKV, qkv, shards, 0, muon_split_qkv_per_head=per_head)


def test_swiglu_fc1_tp2_combines_to_tp1() -> None:
    gate, up = _rand(FFN, HIDDEN, seed=4), _rand(FFN, HIDDEN, seed=5)
    fc1 = torch.cat([gate, up])
    # Megatron shards gate and up separately: TP rank t holds [gate_t; up_t].
    shards = [torch.cat([g, u]) for g, u in zip(gate.chunk(TP), up.chunk(TP))]
    _tp_round_trip(FC1, fc1, shards, 0)


def test_row_parallel_tp2_combines_to_tp1() -> None:
    proj = _rand(HIDDEN, 8, seed=8)
    _tp_round_trip(f"{LAYER}.self_attention.linear_proj.weight", proj, list(proj.chunk(TP, 1)), 1)


def test_grouped_mlp_tp2_combines_to_tp1() -> None:
    weight1, weight2, gates, ups, downs = _hand_built_grouped()
    w1_shards, w2_shards = [], []
    for t in range(TP):
        # Expert TP shards every expert's ffn dimension; gate and up are sharded separately.
        cols = [torch.cat([g.chunk(TP)[t].T, u.chunk(TP)[t].T], dim=1) for g, u in zip(gates, ups)]
        w1_shards.append(torch.stack(cols).reshape(HIDDEN, -1))
        w2_shards.append(torch.cat([d.chunk(TP)[t] for d in downs]))
    _tp_round_trip(W1, weight1, w1_shards, 1)
    _tp_round_trip(W2, weight2, w2_shards, 0)


# --- MLA -------------------------------------------------------------------------------------

_MLA_NAMES = {
    "decoder.layers.0.self_attention.linear_q_proj.weight": "mla_q",
    "decoder.layers.0.self_attention.linear_q_down_proj.weight": "plain",
    "decoder.layers.0.self_attention.linear_q_up_proj.weight": "mla_q",
    "decoder.layers.0.self_attention.linear_kv_down_proj.weight": "plain",
    "decoder.layers.0.self_attention.linear_kv_up_proj.weight": "mla_kv_up",
}


def test_mla_projections_are_muon_matrices_and_their_norms_adamw() -> None:
    from muon_megatron.routing.rules import is_muon_param, param_kind

    for name, kind in _MLA_NAMES.items():
        assert is_muon_param("module." + name, torch.zeros(8, 4)), name
        assert param_kind(name) == kind, name
    for norm in ("q_layernorm.weight", "kv_layernorm.weight", "linear_q_up_proj.layer_norm_weight"):
        assert not is_muon_param(f"decoder.layers.0.self_attention.{norm}", torch.zeros(8))


def _mla_split(name: str, rows: int, cols: int, tp: int, split: bool):
    from muon_megatron.config import MuonConfig
    from muon_megatron.routing.splits import matrix_split

    return matrix_split(
        name, (rows, cols), tp_size=tp, tp_partition_dim=0,
        muon_config=MuonConfig(muon_split_mla=split), num_attention_heads=4,
        num_query_groups=4, kv_channels=8, gated_linear_unit=True, hidden_size=32,
        qk_head_dim=8, qk_pos_emb_head_dim=4, v_head_dim=6,
    )


@pytest.mark.parametrize("tp", [1, 2])
def test_mla_whole_matrices_by_default_reassembled_over_tp(tp: int) -> None:
    """Every MLA projection is one logical matrix of the full logical shape, whatever TP."""
    for name, (rows, cols) in {
        "decoder.layers.0.self_attention.linear_kv_up_proj.weight": (4 * 14, 16),
        "decoder.layers.0.self_attention.linear_kv_down_proj.weight": (20, 32),
        "decoder.layers.0.self_attention.linear_q_proj.weight": (4 * 12, 32),
    }.items():
        split = _mla_split(name, rows // tp, cols, tp, split=False)
        assert split.logical_shapes() == [(rows, cols)], name


@pytest.mark.parametrize("tp", [1, 2])
def test_split_mla_takes_k_nope_and_v_of_every_head(tp: int) -> None:
    """With --muon-split-mla, kv_up's logical matrices are exactly the K-nope rows and the
    V rows of all heads in head order, on any TP (pieces of all ranks combined)."""
    from muon_megatron.routing.splits import combine_tp_pieces, extract_pieces

    heads, dk, dv, cols = 4, 8, 6, 16
    full = torch.arange(heads * (dk + dv) * cols, dtype=torch.float32).view(-1, cols)
    name = "decoder.layers.0.self_attention.linear_kv_up_proj.weight"
    split = _mla_split(name, full.shape[0] // tp, cols, tp, split=True)
    pieces = [extract_pieces(local, split) for local in full.chunk(tp, dim=0)]
    k_nope, v = combine_tp_pieces(pieces, split)
    per_head = full.view(heads, dk + dv, cols)
    assert torch.equal(k_nope, per_head[:, :dk].reshape(-1, cols))
    assert torch.equal(v, per_head[:, dk:].reshape(-1, cols))


def test_split_mla_refuses_rows_that_are_not_whole_heads() -> None:
    with pytest.raises(ValueError, match="--muon-split-mla"):
        _mla_split("decoder.layers.0.self_attention.linear_q_proj.weight", 13, 32, 1, True)


STACKED = "decoder.layers.0.mlp.experts.linear_fc1.weight"


def test_stacked_expert_weights_are_named_with_both_ways_out() -> None:
    """megatron-core's single grouped expert weight (3-D, [experts, out, in]) is refused by
    name; per-expert TEGroupedMLP weights and other 3-D tensors are not."""
    params = [
        ("module." + STACKED, torch.empty(4, 8, 6)),
        ("decoder.layers.0.mlp.experts.linear_fc2.weight", torch.empty(4, 6, 4)),
        ("decoder.layers.0.mlp.experts.linear_fc1.weight0", torch.empty(8, 6)),
        ("decoder.layers.0.self_attention.some_table", torch.empty(2, 3, 4)),
    ]
    (message,) = rules.stacked_expert_errors(params, MuonConfig())
    assert STACKED in message and "linear_fc2.weight" in message
    assert "weight0" not in message and "some_table" not in message
    assert "drop --moe-single-grouped-weight" in message and "--muon-exclude" in message
    assert rules.stacked_expert_errors(params[2:], MuonConfig()) == []


def test_stacked_expert_weights_excluded_by_pattern_pass() -> None:
    params = [(STACKED, torch.empty(4, 8, 6))]
    config = MuonConfig(muon_exclude=("*.experts.linear_fc*.weight",))
    assert rules.stacked_expert_errors(params, config) == []


def test_get_muon_optimizer_refuses_stacked_experts_before_building() -> None:
    """The refusal comes before megatron-core's optimizer is built (the chunk below has
    nothing megatron's builder could use)."""
    import types

    from megatron.core.optimizer import OptimizerConfig

    from muon_megatron.optimizer.builder import get_muon_optimizer

    chunk = types.SimpleNamespace(
        ddp_config=types.SimpleNamespace(),
        config=types.SimpleNamespace(context_parallel_size=1),
        named_parameters=lambda: iter([(STACKED, torch.empty(4, 8, 6))]),
    )
    config = OptimizerConfig(optimizer="muon", use_distributed_optimizer=True)
    with pytest.raises(ValueError, match="--moe-single-grouped-weight"):
        get_muon_optimizer(config, [chunk])
