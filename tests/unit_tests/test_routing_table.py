"""Routing by name pattern (`--muon-include` / `--muon-exclude`), the reasons the routing table
gives (`routing.rules.route_reason`) and the table's lines (`optimizer.routing_table`)."""

from __future__ import annotations

import argparse

import pytest
import torch

from muon_megatron.config import MuonConfig
from muon_megatron.megatron_lm.arguments import muon_config_from_args, muon_extra_args_provider
from muon_megatron.optimizer.routing_table import ParamRoute, routing_table_lines
from muon_megatron.routing.rules import is_muon_param, muon_param_rule, route_reason

LAYER = "decoder.layers.0"
MATRIX, VECTOR = torch.zeros(4, 4), torch.zeros(4)
# (name, 2-D?, reason under the default config)
NAMES = [
    (f"{LAYER}.self_attention.linear_qkv.weight", True, "hidden weight"),
    (f"{LAYER}.self_attention.linear_kv_down_proj.weight", True, "hidden weight"),
    (f"{LAYER}.mlp.experts.linear_fc2.weight7", True, "hidden weight"),
    (f"{LAYER}.mlp.experts.local_experts.3.linear_fc1.weight", True, "hidden weight"),
    (f"{LAYER}.mlp.experts.weight2", True, "hidden weight"),
    (f"{LAYER}.mlp.custom_gate.weight", True, "unrecognised 2-D weight: Muon by the default rule"),
    ("embedding.word_embeddings.weight", True, "embedding"),
    ("output_layer.weight", True, "output layer"),
    (f"{LAYER}.mlp.router.weight", True, "MoE router (--muon-router-optimizer adamw)"),
    (f"{LAYER}.mlp.shared_experts.gate_weight", True, "shared-expert gate (one row)"),
    (f"{LAYER}.self_attention.linear_qkv.layer_norm_weight", False, "norm"),
    (f"{LAYER}.self_attention.linear_proj.bias", False, "bias"),
    (f"{LAYER}.self_attention.core_attention.softmax_offset", False, "1-D"),
]


@pytest.mark.parametrize("name, matrix, why", NAMES, ids=[n.split(".", 3)[-1] for n, _, _ in NAMES])
def test_reasons_agree_with_the_rule(name: str, matrix: bool, why: str) -> None:
    """route_reason decides as is_muon_param does, with or without `module.` prefixes, and
    says why."""
    param = MATRIX if matrix else VECTOR
    for prefix in ("", "module.module."):
        on_muon, reason = route_reason(prefix + name, param, MuonConfig())
        assert on_muon == is_muon_param(name, param) and reason == why


def test_router_on_muon_is_its_own_reason() -> None:
    cfg = MuonConfig(muon_router_optimizer="muon")
    assert route_reason(f"{LAYER}.mlp.router.weight", MATRIX, cfg) == (
        True, "MoE router (--muon-router-optimizer muon)"
    )


def test_patterns_route_both_ways_and_win_over_the_defaults() -> None:
    cfg = MuonConfig(
        muon_include=("embedding.*",), muon_exclude=("*.linear_kv_down_proj.weight",)
    )
    rule = muon_param_rule(cfg)
    kv_down = f"{LAYER}.self_attention.linear_kv_down_proj.weight"
    assert route_reason("module." + kv_down, MATRIX, cfg) == (
        False, "--muon-exclude '*.linear_kv_down_proj.weight'"
    )
    assert route_reason("embedding.word_embeddings.weight", MATRIX, cfg) == (
        True, "--muon-include 'embedding.*'"
    )
    assert not rule(kv_down, MATRIX) and rule("embedding.word_embeddings.weight", MATRIX)
    # Everything the patterns do not match keeps the default rule.
    for name, matrix, _ in NAMES:
        if "kv_down" not in name and "embedding" not in name:
            param = MATRIX if matrix else VECTOR
            assert rule(name, param) == is_muon_param(name, param), name


def test_a_parameter_matched_both_ways_is_refused_naming_both_patterns() -> None:
    cfg = MuonConfig(muon_include=("*.linear_*",), muon_exclude=("*.linear_proj.weight",))
    with pytest.raises(ValueError, match=r"--muon-include '\*\.linear_\*'.*--muon-exclude"):
        muon_param_rule(cfg)(f"{LAYER}.self_attention.linear_proj.weight", MATRIX)


def test_including_a_vector_is_refused_naming_the_pattern() -> None:
    cfg = MuonConfig(muon_include=("*norm*",))
    with pytest.raises(ValueError, match=r"--muon-include '\*norm\*' matches .* shape \(4,\)"):
        route_reason("decoder.final_layernorm.weight", VECTOR, cfg)


def test_the_same_pattern_both_ways_is_refused_when_the_config_is_built() -> None:
    with pytest.raises(ValueError, match=r"muon_include=\('a\*',\).*drop it from one"):
        MuonConfig(muon_include=("a*",), muon_exclude=("a*",))


def test_flags_repeat_into_the_config() -> None:
    parser = muon_extra_args_provider(argparse.ArgumentParser(allow_abbrev=False))
    args = parser.parse_args(
        ["--muon-exclude", "*.linear_kv_down_proj.weight", "--muon-exclude", "*.router.weight",
         "--muon-include", "embedding.*", "--muon-print-routing"]
    )
    cfg = muon_config_from_args(args)
    assert cfg.muon_exclude == ("*.linear_kv_down_proj.weight", "*.router.weight")
    assert cfg.muon_include == ("embedding.*",) and cfg.muon_print_routing
    assert parser.parse_args([]).muon_exclude == ()


def _row(
    name: str, optimizer: str, kind: str, why: str, matrices: int = 0, tp: str = ""
) -> ParamRoute:
    return ParamRoute(name, (4, 4), optimizer, why, kind, matrices, tp)


ROWS = [
    _row("e.weight", "AdamW", "embedding.word_embeddings.weight", "embedding",
         tp="TP dim 0 / 2 (V)"),
    _row("l0.qkv", "Muon", "linear_qkv.weight: Q,K,V", "hidden weight", 3, "TP dim 0 / 2 (C)"),
    _row("l0.odd", "Muon", "odd.weight: whole",
         "unrecognised 2-D weight: Muon by the default rule", 1, "TP whole (torch.nn.Linear)"),
    _row("l1.qkv", "Muon", "linear_qkv.weight: Q,K,V", "hidden weight", 3, "TP dim 0 / 2 (C)"),
    _row("l1.norm", "AdamW", "input_layernorm.weight", "norm"),
]


def test_table_has_one_line_per_kind_with_counts() -> None:
    lines = routing_table_lines(ROWS)
    assert lines[0].endswith(
        "3 Muon params (7 logical matrices), 2 AdamW params (this rank's pipeline stage and "
        "experts)"
    )
    body = [line.split("]", 1)[1] for line in lines[1:]]
    assert len(body) == 4  # qkv x2 grouped; odd; embedding; norm
    # Muon first, the unrecognised weights at the top of Muon's lines.
    assert "unrecognised" in body[0] and "1 x odd.weight: whole" in body[0]
    assert "2 x linear_qkv.weight: Q,K,V" in body[1] and "6 matrices" in body[1]
    assert body[2].split()[0] == body[3].split()[0] == "AdamW"
    assert "<- norm" in body[3] and "TP" not in body[3]


def test_per_param_lines_follow_the_table() -> None:
    lines = routing_table_lines(ROWS, per_param=True)
    per_param = lines[-len(ROWS):]
    assert [line.split()[3] for line in per_param] == [r.name for r in ROWS]
    assert "(3 matrices)" in per_param[1] and "(1 matrix)" in per_param[2]
