"""Transformer Engine's layers (megatron-core's TE layer specs, on the CPU stand-in of
tests/te_stand_in) against the single-device reference, and the TP layout of every Muon
matrix read from the module that owns it (routing/tp_layout.py).

Each run goes through `tools.verify.run_verify` like every other parity test, in a child
process whose `import transformer_engine` is the stand-in (`in_te_process`): the
distributed run and the one-process reference both build megatron-core's
`get_gpt_layer_with_transformer_engine_spec` (TELayerNormColumnParallelLinear,
TERowParallelLinear, TEDotProductAttention, TENorm; MLA's duplicated TELinear down
projections; TEGroupedMLP's grouped experts).

Layouts, and what the parameters' own attributes (TE's) would have made of them:
* dense TP2 with SP: column / row layers are marked right; a guard.
* MLA TP2 with SP: linear_q_down_proj / linear_kv_down_proj are TELinear(parallel_mode=
  "duplicated"), whole on every TP rank but marked split on dim 0: joined from the TP
  ranks' identical copies, a [2r, c] matrix was orthogonalized.
* MoE TP2 x EP2, expert-TP2 (TEGroupedMLP): the row-parallel fc2 experts, split along dim 1,
  are marked dim 0 (explicit expert comm): their pieces were joined along the wrong dim.
* MoE TP2 x EP2, expert-TP1 (alltoall): experts whole, dense TP2; a guard.
MLA runs with sequence parallelism: without it megatron-core 0.16.1's TE MLA keeps on each
TP rank only its own heads' share of the shared k-rope's gradient in the duplicated
linear_kv_down_proj (multi_latent_attention.py L616-622 reduces it only under SP), a
megatron-core flaw no optimizer can undo (measured at TP2 without SP, after this fix: Muon
family 6.6e-2, worst linear_kv_down_proj 0.31).

Measured after 3 steps, fp32 Newton-Schulz (family relative update difference, Muon /
AdamW; the tolerance is verify's, from the run's own noise):

  layout                      TP layout from the attributes     from the module
  dense TP2 + SP              3.1e-6 / 1.4e-6  pass             the same
  MLA TP2 + SP                9.2e-2 / 2.3e-2  FAIL (tol 1e-4;  3.6e-6 / 5.5e-7
                              linear_q_down_proj 0.30)
  MoE TP2xEP2, expert-TP2     0.38 / 3.4e-2    FAIL (tol 6e-5;  3.8e-6 / 3.1e-6
                              experts.linear_fc2.weight3 0.62)
  MoE TP2xEP2, expert-TP1     5.1e-6 / 2.9e-6  pass             the same
"""

from __future__ import annotations

from collections import Counter

import pytest

from muon_megatron.config import MuonConfig
from muon_megatron.testing import tiny
from muon_megatron.tools.verify import VerifySpec, run_verify

STEPS = 3
TE = "transformer_engine"
MLA = {
    "multi_latent_attention": True,
    "kv_lora_rank": 16,
    "qk_head_dim": 16,
    "qk_pos_emb_head_dim": 8,
    "v_head_dim": 16,
    "qk_layernorm": True,
    "q_lora_rank": 24,
}
MOE = {"num_experts": 4, "moe_grouped_gemm": True}


def _spec(layout: tiny.Layout, dp: int, **model) -> VerifySpec:
    return VerifySpec(
        layout=layout, dp=dp, model=tiny.ModelSpec(transformer_impl=TE, **model), steps=STEPS
    )


# With TP > 1 and MoE, verify turns sequence parallelism on (megatron requires it).
LAYOUTS: dict[str, VerifySpec] = {
    "dense-tp2-sp": _spec(tiny.Layout(tp=2, sequence_parallel=True), 1),
    "mla-tp2-sp": _spec(tiny.Layout(tp=2, sequence_parallel=True), 1, **MLA),
    "moe-tp2xep2-etp2": _spec(tiny.Layout(tp=2, ep=2, etp=2), 2, **MOE),
    "moe-tp2xep2-etp1-alltoall": _spec(
        tiny.Layout(tp=2, ep=2, etp=1), 2, moe_token_dispatcher_type="alltoall", **MOE
    ),
}
FP32 = MuonConfig(muon_ns_dtype="fp32")


@pytest.fixture(scope="module", params=list(LAYOUTS))
def te_run(request, te_stand_in) -> dict:
    return te_stand_in.in_te_process(run_verify, LAYOUTS[request.param], FP32)


def test_te_parity_with_reference(te_run: dict, assert_fp32_parity) -> None:
    """Each family within NOISE_GAIN x the run's own measured fp32 noise (floor
    FP32_TOLERANCE, ceiling NOISE_CEILING: verify.py says why)."""
    assert_fp32_parity(te_run)


def test_every_logical_matrix_orthogonalized_exactly_once(te_run: dict) -> None:
    """Across all ranks of all grids, Newton-Schulz runs once per logical matrix per step,
    and the plan has as many logical matrices as the reference counts on one device."""
    counted: Counter = Counter()
    for per_rank in te_run["ns_counts_per_rank"]:
        counted.update(per_rank)
    planned = set().union(*te_run["planned_matrices_per_rank"])
    assert len(planned) == te_run["ref_logical_matrices"]
    assert counted == Counter({key: te_run["steps"] for key in planned})


# ---------------------------------------------------------------------------------------
# The TP layout of every Muon matrix of megatron-core's TE models, against the attributes
# ---------------------------------------------------------------------------------------

# Name suffix -> (split?, dim, megatron-core's TE class) as megatron-core 0.16.1 builds it.
EXPECTED = {
    "self_attention.linear_qkv.weight": (True, 0, "TELayerNormColumnParallelLinear"),
    "self_attention.linear_proj.weight": (True, 1, "TERowParallelLinear"),
    "mlp.linear_fc1.weight": (True, 0, "TELayerNormColumnParallelLinear"),
    "mlp.linear_fc2.weight": (True, 1, "TERowParallelLinear"),
    "self_attention.linear_q_down_proj.weight": (False, None, "TELinear"),
    "self_attention.linear_kv_down_proj.weight": (False, None, "TELinear"),
    "self_attention.linear_q_up_proj.weight": (True, 0, "TELayerNormColumnParallelLinear"),
    "self_attention.linear_kv_up_proj.weight": (True, 0, "TELayerNormColumnParallelLinear"),
    "mlp.experts.linear_fc1.weight": (True, 0, "TEColumnParallelGroupedLinear"),
    "mlp.experts.linear_fc2.weight": (True, 1, "TERowParallelGroupedLinear"),
    "mlp.router.weight": (False, None, "TopKRouter"),
}
# Where TE's attributes say otherwise: the duplicated down projections (marked split dim 0)
# and, under expert-TP > 1, the row-parallel grouped fc2 (marked dim 0).
DISAGREE = {
    "dense": set(),
    "mla": {
        "self_attention.linear_q_down_proj.weight",
        "self_attention.linear_kv_down_proj.weight",
    },
    "moe-etp2": {"mlp.experts.linear_fc2.weight"},
}


def _suffix(name: str) -> str:
    stripped = name.rstrip("0123456789")
    return next(s for s in EXPECTED if stripped.endswith(s))


def _layouts_worker(rank: int, world: int, spec: tiny.ModelSpec, layout: tiny.Layout) -> dict:
    from muon_megatron.routing.rules import is_muon_param, is_router_weight
    from muon_megatron.routing.tp_layout import TPLayouts, attribute_tp_layout

    tiny.initialize_parallel(layout, 0)
    model = tiny.build_model(spec, layout)
    layouts = TPLayouts(model, tp_size=layout.tp)
    out = {}
    for name, param in tiny.unwrap(model[0]).named_parameters():
        if is_muon_param(name, param) or is_router_weight(name):
            got = layouts.layout(param)
            module = (got.partitioned, got.partition_dim, got.layer)
            out[name] = (module, attribute_tp_layout(param))
    return out


def _layouts_of(spec: tiny.ModelSpec, layout: tiny.Layout, world: int) -> dict:
    from muon_megatron.runtime.launch import spawn

    return spawn(_layouts_worker, world, spec, layout)[0]


# name -> (model, layout, world size)
LAYOUT_MODELS = {
    "dense": (tiny.ModelSpec(transformer_impl=TE), tiny.Layout(tp=2, sequence_parallel=True), 2),
    "mla": (tiny.ModelSpec(transformer_impl=TE, **MLA), tiny.Layout(tp=2), 2),
    "moe-etp2": (tiny.ModelSpec(transformer_impl=TE, **MOE),
                 tiny.Layout(tp=2, ep=2, etp=2, sequence_parallel=True), 4),
}


@pytest.mark.parametrize("model", list(LAYOUT_MODELS))
def test_tp_layout_from_the_owning_te_module(te_stand_in, model: str) -> None:
    """Every Muon matrix (and the router) of megatron-core's TE models gets the layout its
    TE class was built with; the parameters' attributes disagree exactly where TE marks a
    layer that megatron-core handed `parallel_mode=None`."""
    found = te_stand_in.in_te_process(_layouts_of, *LAYOUT_MODELS[model])
    assert found
    disagree = set()
    for name, ((split, dim, layer), claimed) in found.items():
        want_split, want_dim, want_class = EXPECTED[_suffix(name)]
        assert (split, dim) == (want_split, want_dim), (name, layer)
        assert layer.startswith(want_class), (name, layer)
        if claimed != (split, dim):
            disagree.add(_suffix(name))
    assert disagree == DISAGREE[model]


def test_verify_cli_runs_the_te_spec(te_stand_in) -> None:
    """`muon-megatron verify --transformer-impl transformer_engine` (what README asks a user
    to run once with TE on a GPU node) builds megatron-core's TE spec and passes: MLA TP2 with
    sequence parallelism, 2 steps, under the stand-in."""
    from muon_megatron.tools import cli

    argv = ["verify", "--transformer-impl", "transformer_engine", "--tp", "2",
            "--sequence-parallel", "--mla", "--steps", "2"]
    assert te_stand_in.in_te_process(cli.main, argv) == 0
