"""Moonlight's recipe flags reach the distributed optimizer through `get_muon_optimizer`'s
defaults: `--muon-router-optimizer muon` plans the router as a Muon matrix and
`--muon-norm-weight-decay` decays the norm gammas (not the biases); the single-device
reference follows the same rules, so parity holds with both on."""

from __future__ import annotations

from muon_megatron.config import MuonConfig
from muon_megatron.runtime.launch import spawn
from muon_megatron.testing.tiny import Layout, ModelSpec
from muon_megatron.tools.verify import VerifySpec, run_verify

RECIPE = MuonConfig(
    muon_ns_dtype="fp32", muon_router_optimizer="muon", muon_norm_weight_decay=True
)
MOE = ModelSpec(num_layers=2, num_experts=4)


def _groups(rank: int, world: int, cfg: MuonConfig) -> dict:
    from muon_megatron.optimizer.builder import muon_optimizers
    from muon_megatron.testing import tiny

    tiny.initialize_parallel(Layout(ep=2), seed=0)
    model = tiny.build_model(MOE, Layout(ep=2))
    optimizer = tiny.build_optimizer(model, tiny.optimizer_config(weight_decay=0.1), cfg)
    names = {p: n for n, p in model[0].named_parameters()}
    decay = {}
    for member in getattr(optimizer, "chained_optimizers", [optimizer]):
        for model_group in member.model_float16_groups + member.model_fp32_groups:
            for p in model_group:
                gi, _ = member.model_param_group_index_map[p]
                decay[names[p]] = member.optimizer.param_groups[gi]["weight_decay"]
    return {"muon": [n for o in muon_optimizers(optimizer) for n in o.muon_matrix_names],
            "decay": decay}


def test_router_on_muon_and_norm_gammas_decayed() -> None:
    # Each rank's groups hold the params it has a ZeRO-1 shard of: the union is every param.
    plain, recipe = ({"muon": [n for r in ranks for n in r["muon"]],
                      "decay": {k: v for r in ranks for k, v in r["decay"].items()}}
                     for ranks in (spawn(_groups, 2, cfg) for cfg in (MuonConfig(), RECIPE)))
    router = "decoder.layers.0.mlp.router.weight"
    assert not any(router in n for n in plain["muon"])
    assert any(router in n for n in recipe["muon"])
    gamma, bias = "decoder.layers.0.input_layernorm.weight", "decoder.layers.0.input_layernorm.bias"
    decay = {which: {k.removeprefix("module."): v for k, v in run["decay"].items()}
             for which, run in (("plain", plain), ("recipe", recipe))}
    assert decay["plain"][gamma] == 0.0 and decay["recipe"][gamma] == 0.1
    assert decay["plain"][bias] == decay["recipe"][bias] == 0.0


def test_recipe_flags_keep_parity_with_the_reference() -> None:
    spec = VerifySpec(layout=Layout(ep=2), dp=2, model=MOE, steps=3)
    result = run_verify(spec, RECIPE)
    assert result["within_tolerance"], result["family_diffs"]
