"""The routing table of a built optimizer, routing by name pattern end to end, and the refusal
of a 2-D Muon weight whose TP layout no known module determines (gloo, CPU)."""

from __future__ import annotations

import pytest
import torch

from muon_megatron.config import MuonConfig
from muon_megatron.runtime.launch import spawn
from muon_megatron.testing import tiny
from muon_megatron.tools.verify import VerifySpec, run_verify

MYSTERY = "decoder.layers.0.mlp.linear_fc2.weight"


def _mystery_worker(rank: int, world: int, exclude: tuple[str, ...]) -> object:
    """TP2: layer 0's fc2 (a RowParallelLinear) turned into a module class megatron-core does
    not have, then the optimizer built."""
    from muon_megatron.optimizer.routing_table import routing_rows

    layout = tiny.Layout(tp=2)
    tiny.initialize_parallel(layout, 0)
    model = tiny.build_model(tiny.ModelSpec(), layout)
    fc2 = tiny.unwrap(model[0]).decoder.layers[0].mlp.linear_fc2
    fc2.__class__ = type("MysteryLinear", (torch.nn.Module,), {})
    cfg = MuonConfig(muon_exclude=exclude)
    try:
        optimizer = tiny.build_optimizer(model, tiny.optimizer_config(), cfg)
    except ValueError as error:
        return str(error)
    return {r.name: r for r in routing_rows(optimizer, model, cfg)}


def test_unknown_module_under_tp_is_refused_and_a_pattern_routes_it_to_adamw() -> None:
    refused = spawn(_mystery_worker, 2, ())
    for message in refused:
        assert isinstance(message, str), message
        assert f"{MYSTERY} (MysteryLinear)" in message and "--muon-exclude" in message
    rows = spawn(_mystery_worker, 2, (MYSTERY,))[0]
    assert rows[MYSTERY].optimizer == "AdamW"
    assert rows[MYSTERY].why == f"--muon-exclude {MYSTERY!r}"


def _moe_rows(rank: int, world: int) -> dict:
    from muon_megatron.optimizer.routing_table import routing_rows, routing_table_lines

    spec, layout = tiny.ModelSpec(num_experts=4), tiny.Layout()
    tiny.initialize_parallel(layout, 0)
    model = tiny.build_model(spec, layout)
    cfg = MuonConfig(muon_exclude=("decoder.layers.1.self_attention.linear_proj.weight",))
    optimizer = tiny.build_optimizer(model, tiny.optimizer_config(), cfg)
    rows = routing_rows(optimizer, model, cfg)
    return {"rows": rows, "lines": routing_table_lines(rows)}


def test_routing_table_of_a_moe() -> None:
    """Every trainable parameter has one row; the kinds and counts of a 2-layer MoE with 4
    SequentialMLP experts; the excluded linear_proj is AdamW, saying why."""
    out = spawn(_moe_rows, 1)[0]
    rows, lines = out["rows"], out["lines"]
    kinds = {}
    for row in rows:
        kinds.setdefault((row.optimizer, row.kind, row.why), []).append(row)

    def count(optimizer: str, kind: str, why: str = "hidden weight") -> tuple[int, int]:
        group = kinds[(optimizer, kind, why)]
        return len(group), sum(r.matrices for r in group)

    assert count("Muon", "linear_qkv.weight: Q,K,V") == (2, 6)
    assert count("Muon", "linear_proj.weight: whole") == (1, 1)
    assert count("Muon", "experts.linear_fc1.weight: gate,up") == (8, 16)
    assert count("Muon", "experts.linear_fc2.weight: whole") == (8, 8)
    assert count("AdamW", "linear_proj.weight",
                 "--muon-exclude 'decoder.layers.1.self_attention.linear_proj.weight'") == (1, 0)
    assert count("AdamW", "router.weight", "MoE router (--muon-router-optimizer adamw)")[0] == 2
    assert lines[0].startswith("[muon routing] 19 Muon params (31 logical matrices)")
    assert len(lines) == 1 + len(kinds)
    experts = next(line for line in lines if "experts.linear_fc1" in line)
    assert "8 x" in experts and "16 matrices" in experts
    assert "TP dim 0 / 1 (ColumnParallelLinear)" in experts


def test_patterns_route_the_reference_and_the_optimizer_alike() -> None:
    """`--muon-exclude` / `--muon-include` reach both the distributed optimizer and verify's
    reference: the embedding (tied with the output layer) on Muon, every linear_proj on AdamW,
    and the two still agree (DP2, the noise-derived fp32 tolerance)."""
    cfg = MuonConfig(
        muon_ns_dtype="fp32",
        muon_include=("embedding.word_embeddings.weight",),
        muon_exclude=("*.linear_proj.weight",),
    )
    result = run_verify(VerifySpec(dp=2, steps=3), cfg)
    assert result["within_tolerance"], (result["family_diffs"], result["tolerances"])
    planned = {name for per_rank in result["planned_matrices_per_rank"] for _, name, _ in per_rank}
    assert "embedding.word_embeddings.weight" in planned
    assert not any(name.endswith("linear_proj.weight") for name in planned)
    assert len(set().union(*result["planned_matrices_per_rank"])) == result["ref_logical_matrices"]


@pytest.fixture(scope="module")
def te_dense_rows(te_stand_in) -> dict:
    return te_stand_in.in_te_process(_te_rows)


def _te_rows() -> dict:
    return spawn(_te_rows_worker, 2)[0]


def _te_rows_worker(rank: int, world: int) -> dict:
    from muon_megatron.optimizer.routing_table import routing_rows

    spec = tiny.ModelSpec(transformer_impl="transformer_engine")
    layout = tiny.Layout(tp=2, sequence_parallel=True)
    tiny.initialize_parallel(layout, 0)
    model = tiny.build_model(spec, layout)
    cfg = MuonConfig()
    optimizer = tiny.build_optimizer(model, tiny.optimizer_config(), cfg)
    return {r.name: r for r in routing_rows(optimizer, model, cfg)}


def test_routing_table_of_a_te_gpt_names_te_layers(te_dense_rows: dict) -> None:
    qkv = te_dense_rows["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert qkv.kind == "linear_qkv.weight: Q,K,V" and qkv.matrices == 3
    assert qkv.tp == "TP dim 0 / 2 (TELayerNormColumnParallelLinear)"
    proj = te_dense_rows["decoder.layers.0.self_attention.linear_proj.weight"]
    assert proj.tp == "TP dim 1 / 2 (TERowParallelLinear)"
    norm = te_dense_rows["decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"]
    assert (norm.optimizer, norm.why) == ("AdamW", "norm")
