"""The TE stand-in (tests/te_stand_in) marks its parameters exactly as Transformer Engine 2.11
does: one table row per TE layer class and configuration megatron-core builds, each citing
the TE v2.11 lines it checks (github.com/NVIDIA/TransformerEngine, tag v2.11,
transformer_engine/pytorch/...). These attributes are what muon-megatron's TP layouts must
not trust (routing/tp_layout.py), so the functional tests built on the stand-in only prove
something if the stand-in reproduces them.

The stand-in is loaded under another name (`load_stand_in_as`): no megatron-core module of
this process ever sees a `transformer_engine`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

ALIAS = "te_stand_in_under_test"
UNSET = "unset"
ATTRS = ("tensor_model_parallel", "partition_dim", "partition_stride", "sequence_parallel")


@pytest.fixture(scope="module")
def te(te_stand_in):
    return te_stand_in.load_stand_in_as(ALIAS)


def _attrs(tensor: torch.Tensor) -> dict[str, object]:
    return {a: getattr(tensor, a, UNSET) for a in ATTRS}


def _tp(dim: int) -> dict[str, object]:
    return {"tensor_model_parallel": True, "partition_dim": dim, "partition_stride": 1,
            "sequence_parallel": UNSET}


NOTHING = dict.fromkeys(ATTRS, UNSET)
SP_ONLY = {**NOTHING, "sequence_parallel": True}
SP_OFF = {**NOTHING, "sequence_parallel": False}

# (id, class, constructor kwargs, {param: expected attributes}, TE v2.11 lines)
TABLE = [
    ("linear-column", "Linear", dict(in_features=8, out_features=6, parallel_mode="column",
                                     tp_size=2, bias=True),
     {"weight": _tp(0), "bias": _tp(0)}, "module/linear.py L1325-1344"),
    ("linear-row-sp", "Linear", dict(in_features=8, out_features=6, parallel_mode="row",
                                     tp_size=2, sequence_parallel=True, bias=True),
     {"weight": _tp(1), "bias": SP_ONLY}, "module/linear.py L1138, L1325-1344"),
    # megatron-core's duplicated TELinear and explicit-expert-comm layers reach TE as
    # parallel_mode=None: the weight is still marked split along dim 0.
    ("linear-none", "Linear", dict(in_features=8, out_features=6, parallel_mode=None,
                                   bias=True),
     {"weight": _tp(0), "bias": NOTHING}, "module/linear.py L1329-1335"),
    ("layernorm-linear-column-sp", "LayerNormLinear",
     dict(in_features=8, out_features=6, parallel_mode="column", tp_size=2,
          sequence_parallel=True, normalization="LayerNorm", bias=False),
     {"layer_norm_weight": SP_ONLY, "layer_norm_bias": SP_ONLY, "weight": _tp(0)},
     "module/layernorm_linear.py L1209, L1437-1453"),
    # TP 1: `sequence_parallel` is (tp_size > 1) and sequence_parallel, so False.
    ("layernorm-linear-rms-tp1", "LayerNormLinear",
     dict(in_features=8, out_features=6, parallel_mode="column", tp_size=1,
          sequence_parallel=True, normalization="RMSNorm", bias=False),
     {"layer_norm_weight": SP_OFF, "weight": _tp(0)},
     "module/layernorm_linear.py L1209, L1437-1453"),
    # megatron-core's row-parallel grouped experts under explicit expert comm: None -> dim 0.
    ("grouped-none", "GroupedLinear", dict(num_gemms=3, in_features=8, out_features=6,
                                           parallel_mode=None, bias=False),
     {"weight0": _tp(0), "weight1": _tp(0), "weight2": _tp(0)},
     "module/grouped_linear.py L726-737"),
    ("grouped-row", "GroupedLinear", dict(num_gemms=2, in_features=8, out_features=6,
                                          parallel_mode="row", bias=True),
     {"weight0": _tp(1), "weight1": _tp(1), "bias0": SP_OFF, "bias1": SP_OFF},
     "module/grouped_linear.py L726-749"),
    ("layernorm-sp", "LayerNorm", dict(hidden_size=8, sequence_parallel=True),
     {"weight": SP_ONLY, "bias": SP_ONLY}, "module/layernorm.py L129-135"),
    ("layernorm-sp-none", "LayerNorm", dict(normalized_shape=8),
     {"weight": NOTHING, "bias": NOTHING}, "module/layernorm.py L133"),
    ("rmsnorm-sp-off", "RMSNorm", dict(hidden_size=8, sequence_parallel=False),
     {"weight": SP_OFF}, "module/rmsnorm.py L133-138"),
]


@pytest.mark.parametrize("cls, kwargs, expected, lines", [row[1:] for row in TABLE],
                         ids=[row[0] for row in TABLE])
def test_stand_in_marks_parameters_as_te_does(te, cls, kwargs, expected, lines) -> None:
    layer = getattr(te.pytorch, cls)(device="cpu", **kwargs)
    params = dict(layer.named_parameters())
    assert set(params) == set(expected), (lines, sorted(params))
    for name, attrs in expected.items():
        assert _attrs(params[name]) == attrs, (lines, name)


def test_sizes_divided_by_tp_as_te_does(te) -> None:
    """TE v2.11 linear.py L1133-1136: column divides out_features, row in_features, None
    neither (megatron-core then divides them itself for explicit expert comm)."""
    column = te.pytorch.Linear(8, 6, parallel_mode="column", tp_size=2, device="cpu")
    row = te.pytorch.Linear(8, 6, parallel_mode="row", tp_size=2, device="cpu")
    none = te.pytorch.Linear(8, 6, parallel_mode=None, tp_size=2, device="cpu")
    assert column.weight.shape == (3, 8) and row.weight.shape == (6, 4)
    assert none.weight.shape == (6, 8)


def test_rng_tracker_name_is_kept(te) -> None:
    """TE v2.11 linear.py L1110 / grouped_linear.py L630 keep `rng_tracker_name`: the one
    trace of megatron-core's parallel_mode="duplicated" once TE got None (megatron-core
    0.16.1 extensions/transformer_engine.py L594-599), which routing/tp_layout.py reads."""
    linear = te.pytorch.Linear(8, 6, parallel_mode=None, rng_tracker_name="data-parallel-rng",
                               device="cpu")
    grouped = te.pytorch.GroupedLinear(2, 8, 6, rng_tracker_name="expert-parallel-rng",
                                       bias=False, device="cpu")
    assert linear.rng_tracker_name == "data-parallel-rng"
    assert grouped.rng_tracker_name == "expert-parallel-rng"


def test_attribute_setter_refuses_a_marked_tensor(te) -> None:
    """TE v2.11 distributed.py L149-150 asserts the attributes are not set yet."""
    tensor = torch.zeros(2)
    te.pytorch.distributed.set_tensor_model_parallel_attributes(tensor, True, 0, 1)
    with pytest.raises(AssertionError):
        te.pytorch.distributed.set_tensor_model_parallel_attributes(tensor, True, 1, 1)


def test_attention_has_no_parameters_and_te_head_sizes(te) -> None:
    """Vanilla softmax: no `softmax_offset` parameter (TE v2.11 dot_product_attention.py
    L425-437); (k, v) channels and the default scale 1/sqrt(k) (L368-393)."""
    attention = te.pytorch.DotProductAttention(4, (16, 8), num_gqa_groups=2)
    assert list(attention.parameters()) == []
    assert attention.hidden_size_per_attention_head_k == 16
    assert attention.hidden_size_per_attention_head_v == 8
    assert attention.softmax_scale == pytest.approx(0.25)


def test_attention_matches_softmax_attention(te) -> None:
    """The stand-in's forward: causal softmax attention with grouped KV heads, [s, b, h*d]."""
    torch.manual_seed(0)
    attention = te.pytorch.DotProductAttention(4, 8, num_gqa_groups=2)
    q, k, v = torch.randn(5, 2, 4, 8), torch.randn(5, 2, 2, 8), torch.randn(5, 2, 2, 8)
    out = attention(q, k, v, attn_mask_type="causal")
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.permute(1, 2, 0, 3), k.repeat_interleave(2, 2).permute(1, 2, 0, 3),
        v.repeat_interleave(2, 2).permute(1, 2, 0, 3), is_causal=True,
    ).permute(2, 0, 1, 3).reshape(5, 2, 32)
    torch.testing.assert_close(out, expected)


def test_attention_keeps_the_context_parallel_attributes(te) -> None:
    """TE v2.11 dot_product_attention.py L363-366 / L529-567: the CP group, ranks, stream and
    comm type are kept; comm types the stand-in does not compute are refused."""
    attention = te.pytorch.DotProductAttention(4, 8, cp_comm_type="all_gather")
    assert (attention.cp_group, attention.cp_global_ranks, attention.cp_stream) == (None,) * 3
    assert attention.cp_comm_type == "all_gather"
    with pytest.raises(NotImplementedError, match="a2a"):
        attention.set_context_parallel_group(None, None, None, "a2a")


def test_context_parallel_positions_are_megatrons_load_balanced_chunks(te) -> None:
    """CP rank r holds chunks r and 2 x CP - 1 - r of the sequence (TE v2.11
    context_parallel.py L2882; megatron-core's get_batch_on_this_cp_rank splits the batch
    so): at CP2 with 8 positions per rank, rank 0 has 0-3 and 12-15, rank 1 has 4-11."""
    attention = importlib.import_module(f"{ALIAS}.pytorch.attention")
    assert attention._chunk_order(2) == [0, 3, 1, 2]
    assert attention._local_positions(8, 0, 2, "cpu").tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert attention._local_positions(8, 1, 2, "cpu").tolist() == list(range(4, 12))


def test_stand_in_is_not_importable_here() -> None:
    """The stand-in stays off this process's sys.path (tests/te_stand_in/run.py says why)."""
    spec = importlib.util.find_spec("transformer_engine")
    stand_in = Path(__file__).resolve().parents[1] / "te_stand_in"
    assert spec is None or stand_in not in Path(spec.origin).resolve().parents


def test_verify_refuses_te_where_te_is_not_installed() -> None:
    """`muon-megatron verify --transformer-impl transformer_engine` on a machine without TE
    stops at the flags, naming the way out (here: the stand-in stays off the path)."""
    from muon_megatron.tools import cli

    if importlib.util.find_spec("transformer_engine") is not None:
        pytest.skip("Transformer Engine is installed here")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["verify", "--transformer-impl", "transformer_engine"])
    assert exit_.value.code == 2
