"""Total and active parameter counts of the training entry's model, from its flags alone.

The count follows megatron-core's `GPTModel` layer by layer (GQA or multi-latent attention,
q/k norms, dense or SwiGLU MLP, MoE with router, routed and shared experts and the shared
experts' gate, norms with or without bias, tied or untied output layer); `tests/unit_tests/test_model_size.py` checks it against a built model.
"Active" counts `--moe-router-topk` routed experts per token instead of all of them.
`examples/count_params.py` prints both for a launch script's flags.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from muon_megatron.training.args import model_dims, moe_layer_pattern
from muon_megatron.training.indexed_data import model_vocab_size

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

    if args.multi_latent_attention:
        attention_muon, attention_rest = _mla_attention(args)
    else:
        qkv_w, qkv_b = linear(h, q + 2 * kv)
        proj_w, proj_b = linear(q, h)
        attention_muon, attention_rest = qkv_w + proj_w, qkv_b + proj_b + 2 * norm
        if args.qk_layernorm:
            attention_rest += 2 * _norm_size(args, d["kv_channels"])

    embedding = model_vocab_size(args) * h
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
            if args.moe_shared_expert_gate:
                rest += h  # gate_weight [1, hidden], on AdamW
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


def _norm_size(args: argparse.Namespace, width: int) -> int:
    return width * (2 if args.normalization == "LayerNorm" else 1)


def _mla_attention(args: argparse.Namespace) -> tuple[int, int]:
    """(Muon matrices, AdamW rest) of one MLA layer (megatron-core's MLASelfAttention: its
    q/kv projections take no bias; linear_proj does unless --disable-bias-linear), plus the
    layer's input and pre-MLP norms."""
    h, heads = args.hidden_size, args.num_attention_heads
    q_head = args.qk_head_dim + args.qk_pos_emb_head_dim
    if args.q_lora_rank is None:
        q_muon = h * heads * q_head  # linear_q_proj
        q_norm = 0
    else:
        q_muon = h * args.q_lora_rank + args.q_lora_rank * heads * q_head  # q down, q up
        q_norm = _norm_size(args, args.q_lora_rank) if args.qk_layernorm else 0
    kv_muon = h * (args.kv_lora_rank + args.qk_pos_emb_head_dim)  # linear_kv_down_proj
    kv_muon += args.kv_lora_rank * heads * (args.qk_head_dim + args.v_head_dim)  # kv up
    kv_norm = _norm_size(args, args.kv_lora_rank) if args.qk_layernorm else 0
    proj_muon = heads * args.v_head_dim * h
    proj_bias = 0 if args.disable_bias_linear else h
    layer_norms = 2 * _norm_size(args, h)
    return q_muon + kv_muon + proj_muon, q_norm + kv_norm + proj_bias + layer_norms
