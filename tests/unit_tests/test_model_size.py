"""`count_parameters` (used to state the Moonlight config's size) matches a built model."""

from __future__ import annotations

import pytest

from muon_megatron.runtime.launch import spawn
from muon_megatron.training.args import build_parser
from muon_megatron.training.model_size import count_parameters

# A dense first layer then MoE layers, GQA, untied output; one variant with LayerNorm and
# linear biases, one with RMSNorm and shared experts (megatron's shared experts take no bias):
# every term of the count is exercised.
FLAGS = [
    "--num-layers", "3", "--hidden-size", "32", "--ffn-hidden-size", "48",
    "--num-attention-heads", "4", "--group-query-attention", "--num-query-groups", "2",
    "--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "24",
    "--moe-layer-freq", "([0]*1+[1]*2)",
    "--swiglu", "--untie-embeddings-and-output-weights", "--seq-length", "16",
]
SHARED = ["--disable-bias-linear", "--normalization", "RMSNorm",
          "--moe-shared-expert-intermediate-size", "40"]


def _built_count(rank: int, world_size: int, flags: list[str]) -> int:
    from muon_megatron.training import model as gpt

    args = build_parser().parse_args(flags)
    gpt.initialize_parallel(args)
    return gpt.local_parameter_count(gpt.build_model(args))


@pytest.mark.parametrize("extra", [[], SHARED], ids=["biases", "shared_experts"])
def test_count_matches_a_built_single_rank_model(extra: list[str]) -> None:
    flags = FLAGS + extra
    built = spawn(_built_count, 1, flags)[0]
    assert count_parameters(build_parser().parse_args(flags)).total == built


def test_active_counts_topk_routed_experts() -> None:
    args = build_parser().parse_args(FLAGS + SHARED)
    count = count_parameters(args)
    per_expert = 32 * 2 * 24 + 24 * 32
    moe_layers = 2
    assert count.total - count.active == moe_layers * (4 - 2) * per_expert
