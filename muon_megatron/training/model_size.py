"""Total and active parameter counts of the training entry's model, from its flags alone.

The count follows megatron-core's `GPTModel` layer by layer (GQA attention, dense or SwiGLU
MLP, MoE with router, routed and shared experts, norms with or without bias, tied or untied
output layer); `tests/unit_tests/test_model_size.py` checks it against a built model.
"Active" counts `--moe-router-topk` routed experts per token instead of all of them.
`examples/count_params.py` prints both for a launch script's flags.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from muon_megatron.training.args import model_dims, moe_layer_pattern

__all__ = ["ParamCount", "count_parameters"]


@dataclass(frozen=True)
class ParamCount:
    total: int
    active: int
    embedding: int
    """Input embedding plus (untied) output layer."""
    muon: int
    """2-D hidden weights (Muon's share; the rest stays on AdamW)."""


def count_parameters(args: argparse.Namespace) -> ParamCount:
    """Parameters of the model the flags describe (all ranks together)."""
    d = model_dims(args)
    h, bias = args.hidden_size, not args.disable_bias_linear
    glu = 2 if args.swiglu else 1
    norm = h * (2 if args.normalization == "LayerNorm" else 1)
    q, kv = args.num_attention_heads * d["kv_channels"], d["num_query_groups"] * d["kv_channels"]

    def linear(n_in: int, n_out: int) -> tuple[int, int]:
        """(weight, bias) sizes."""
        return n_in * n_out, n_out if bias else 0

    def mlp(ffn: int) -> tuple[int, int]:
        """(Muon matrices, AdamW rest) of one (possibly gated) MLP."""
        w1, b1 = linear(h, glu * ffn)
        w2, b2 = linear(ffn, h)
        return w1 + w2, b1 + b2

    qkv_w, qkv_b = linear(h, q + 2 * kv)
    proj_w, proj_b = linear(q, h)
    attention_muon, attention_rest = qkv_w + proj_w, qkv_b + proj_b + 2 * norm

    embedding = args.vocab_size * h
    if args.untie_embeddings_and_output_weights:
        embedding *= 2
    if args.position_embedding_type == "learned_absolute":
        embedding += (args.max_position_embeddings or args.seq_length) * h

    total_muon = active_muon = 0
    rest = embedding + norm  # final norm
    for is_moe in moe_layer_pattern(args):
        total_muon += attention_muon
        active_muon += attention_muon
        rest += attention_rest
        if not is_moe:
            m, r = mlp(d["ffn_hidden_size"])
            total_muon, active_muon, rest = total_muon + m, active_muon + m, rest + r
            continue
        expert_m, expert_r = mlp(d["moe_ffn_hidden_size"])
        total_muon += args.num_experts * expert_m
        active_muon += args.moe_router_topk * expert_m
        rest += args.num_experts * (expert_r + h + (1 if bias else 0))  # biases, router
        if args.moe_shared_expert_intermediate_size:
            m, r = mlp(args.moe_shared_expert_intermediate_size)
            total_muon, active_muon, rest = total_muon + m, active_muon + m, rest + r
    # Active AdamW params: routed-expert biases of unused experts are inactive too.
    inactive_rest = 0
    if args.num_experts is not None and bias:
        unused = args.num_experts - args.moe_router_topk
        inactive_rest = sum(moe_layer_pattern(args)) * unused * mlp(d["moe_ffn_hidden_size"])[1]
    return ParamCount(
        total=total_muon + rest,
        active=active_muon + rest - inactive_rest,
        embedding=embedding,
        muon=total_muon,
    )
