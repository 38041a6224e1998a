"""The layout checks of the training entry's flags that concern one feature each: context
parallelism (`context_parallel_errors`) and multi-latent attention (`mla_errors`), and
whether the model gets Transformer Engine's layers (`uses_transformer_engine`)."""

from __future__ import annotations

import argparse

import torch

__all__ = ["context_parallel_errors", "mla_errors", "uses_transformer_engine"]


def uses_transformer_engine(args: argparse.Namespace) -> bool:
    """Whether the model gets Transformer Engine's layers: `--transformer-impl`, else TE when
    it imports and CUDA is there."""
    if args.transformer_impl is not None:
        return args.transformer_impl == "transformer_engine"
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def context_parallel_errors(args: argparse.Namespace, tp: int, cp: int) -> list[str]:
    """Context parallelism: megatron-core's local attention refuses it (only Transformer
    Engine's attention splits the sequence), and each rank's share of the sequence is two of
    its 2 x cp equal chunks (`step.forward_backward`)."""
    errors = []
    if not uses_transformer_engine(args):
        errors.append(
            f"--context-parallel-size {cp} needs Transformer Engine's attention "
            "(megatron-core's local DotProductAttention refuses context parallelism): use "
            "--transformer-impl transformer_engine on a GPU node with TE, or "
            "--context-parallel-size 1"
        )
    if args.seq_length % (2 * cp):
        errors.append(f"--seq-length {args.seq_length} is not divisible by 2 x cp = {2 * cp} "
                      "(each context-parallel rank holds two equal chunks)")
    elif args.sequence_parallel and (args.seq_length // cp) % tp:
        errors.append(f"--seq-length {args.seq_length} / cp={cp} is not divisible by tp={tp} "
                      "(sequence parallel splits each context-parallel rank's share)")
    return errors


def mla_errors(args: argparse.Namespace, tp: int) -> list[str]:
    """MLA's shapes under TP: every projection is column-parallel in the local layers, so
    each output dim must split evenly (megatron-core does not check it)."""
    errors = []
    latent = args.kv_lora_rank + args.qk_pos_emb_head_dim
    if latent % tp:
        errors.append(f"--kv-lora-rank + --qk-pos-emb-head-dim = {latent} is not divisible "
                      f"by tp={tp} (linear_kv_down_proj is column-parallel)")
    if args.q_lora_rank is not None and args.q_lora_rank % tp:
        errors.append(f"--q-lora-rank {args.q_lora_rank} is not divisible by tp={tp}")
    for flag in ("kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim"):
        if getattr(args, flag) < 1:
            errors.append(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be >= 1")
    if args.position_embedding_type != "rope":
        errors.append("--multi-latent-attention applies its own RoPE: drop "
                      "--position-embedding-type learned_absolute")
    if args.group_query_attention:
        errors.append("--multi-latent-attention has one key head per query head: drop "
                      "--group-query-attention")
    return errors
