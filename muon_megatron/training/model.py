"""The one model builder: process groups, TransformerConfig, GPTModel + DDP with ZeRO-1 buffers.

What Megatron-LM's `pretrain_gpt.py` + `training.py` do for a GPT/MoE, reduced to the parts
a run needs, from Megatron-LM-style arguments (an `argparse.Namespace` with Megatron-LM's
flag names, as `training.args.build_parser` makes): process groups, `GPTModel` with the local
or Transformer Engine layer specs (MoE per `--moe-layer-freq`; multi-latent attention,
`MLATransformerConfig`, with `--multi-latent-attention`), megatron DDP with ZeRO-1
buffers and the schedule hooks `training.py` sets. `training.step` builds the optimizer and
scheduler on it and runs megatron's forward-backward schedules.

The training entry, the tools and the test harness (`testing.tiny`, which turns its small
`ModelSpec` + `Layout` into these arguments) all build through this module, so what the
tests check is what a training run runs.
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer import MLATransformerConfig, TransformerConfig
from megatron.core.transformer.module import Float16Module

from muon_megatron.training.args import model_dims
from muon_megatron.training.interleaving import virtual_pipeline_size
from muon_megatron.training.layout_checks import uses_transformer_engine
from muon_megatron.training.indexed_data import model_vocab_size
from muon_megatron.training.mla import (
    fix_local_mla_gradients,
    te_stand_ins_off,
    use_local_mla_attention,
)
from muon_megatron.training.moonlight import gate_scaling_factor

__all__ = [
    "PARAMS_DTYPES",
    "device",
    "fusions",
    "initialize_parallel",
    "transformer_config",
    "build_model",
    "unwrap",
    "local_parameter_count",
]

PARAMS_DTYPES: dict[bool, torch.dtype] = {True: torch.bfloat16, False: torch.float32}
"""Params dtype by `--bf16` (fp16 is refused: Muon needs bf16 or fp32)."""


def device() -> torch.device:
    """This rank's compute device: where megatron keeps params, batches and the loss
    all-reduce (NCCL takes CUDA tensors only)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def initialize_parallel(
    args: argparse.Namespace, *, seed_per_stage: bool = True, gloo_groups: bool = True
) -> None:
    """Megatron's process groups for the layout, and every RNG seeded from `args.seed`.

    `seed_per_stage`: Megatron-LM's `_set_random_seed` (seed + 100 x pipeline rank); the
    test harness turns it off so that every layout starts every RNG from the same seed.
    `gloo_groups=False`: no gloo groups beside the main ones (the planner's fake world has
    no gloo to build them on).
    """
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_size(args),
        context_parallel_size=args.context_parallel_size,
        create_gloo_process_groups=gloo_groups,
    )
    seed = args.seed
    if seed_per_stage:
        seed += 100 * parallel_state.get_pipeline_model_parallel_rank()
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def transformer_config(args: argparse.Namespace) -> TransformerConfig:
    """megatron-core's `TransformerConfig` for the arguments (fused kernels: `fusions`)."""
    dims = model_dims(args)
    dtype = PARAMS_DTYPES[args.bf16]
    extra: dict[str, Any] = {}
    if args.num_experts is not None:
        extra = dict(
            num_moe_experts=args.num_experts,
            moe_router_topk=args.moe_router_topk,
            moe_ffn_hidden_size=dims["moe_ffn_hidden_size"],
            moe_shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size,
            moe_layer_freq=args.moe_layer_freq,
            moe_grouped_gemm=args.moe_grouped_gemm,
            moe_token_dispatcher_type=args.moe_token_dispatcher_type,
            moe_router_load_balancing_type=args.moe_router_load_balancing_type,
            moe_aux_loss_coeff=args.moe_aux_loss_coeff,
            moe_router_score_function=args.moe_router_score_function,
            moe_router_enable_expert_bias=args.moe_router_enable_expert_bias,
            moe_expert_capacity_factor=None,
        )
        # Only where set: the defaults stay megatron-core's own.
        if args.moe_router_enable_expert_bias:
            extra["moe_router_bias_update_rate"] = args.moe_router_bias_update_rate
        if args.moe_router_topk_scaling_factor is not None:
            extra["moe_router_topk_scaling_factor"] = _topk_scaling_factor(args)
        if args.moe_shared_expert_gate:
            extra["moe_shared_expert_gate"] = True
    virtual = virtual_pipeline_size(args)
    if virtual is not None:
        # Megatron-LM's default for the interleaved schedule (--overlap-p2p-communication,
        # batch_p2p_comm = not overlap_p2p_comm): unbatched sends and receives, which keep the
        # two directions apart at PP 2, where the next and the previous rank are the same.
        extra.update(
            virtual_pipeline_model_parallel_size=virtual,
            overlap_p2p_comm=True,
            batch_p2p_comm=False,
        )
    config_class: type[TransformerConfig] = TransformerConfig
    if args.qk_layernorm:
        extra["qk_layernorm"] = True
    if args.multi_latent_attention:
        config_class = MLATransformerConfig
        extra.update(
            q_lora_rank=args.q_lora_rank,
            kv_lora_rank=args.kv_lora_rank,
            qk_head_dim=args.qk_head_dim,
            qk_pos_emb_head_dim=args.qk_pos_emb_head_dim,
            v_head_dim=args.v_head_dim,
            rotary_base=args.rotary_base,
        )
        if args.rope_type is not None:
            extra["rope_type"] = args.rope_type
    return config_class(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=dims["num_query_groups"],
        kv_channels=dims["kv_channels"],
        ffn_hidden_size=dims["ffn_hidden_size"],
        gated_linear_unit=args.swiglu,
        activation_func=F.silu if args.swiglu else F.gelu,
        add_bias_linear=not args.disable_bias_linear,
        normalization=args.normalization,
        layernorm_epsilon=args.norm_epsilon,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
        context_parallel_size=args.context_parallel_size,
        num_layers_in_first_pipeline_stage=args.decoder_first_pipeline_num_layers,
        num_layers_in_last_pipeline_stage=args.decoder_last_pipeline_num_layers,
        sequence_parallel=args.sequence_parallel,
        bf16=args.bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        cross_entropy_loss_fusion=False,
        **fusions(args, cuda=torch.cuda.is_available()),
        **extra,
    )


def fusions(args: argparse.Namespace, *, cuda: bool) -> dict[str, bool]:
    """TransformerConfig's fused-kernel switches as Megatron-LM sets them: on GPU each is on
    unless its `--no-*` flag says otherwise (rope fusion, gradient-accumulation fusion and
    persistent layer norm also need the extension that provides them: TE, apex's
    fused_weight_gradient_mlp_cuda, apex); on the CPU all are off, where the plain paths
    compute the same thing."""
    if not cuda:
        return dict.fromkeys(_FUSION_FIELDS, False)
    swiglu = args.swiglu
    return {
        "bias_activation_fusion": not (
            args.no_bias_swiglu_fusion if swiglu else args.no_bias_gelu_fusion
        ),
        "bias_dropout_fusion": not args.no_bias_dropout_fusion,
        "masked_softmax_fusion": not args.no_masked_softmax_fusion,
        "apply_rope_fusion": not args.no_rope_fusion and _importable("transformer_engine"),
        "gradient_accumulation_fusion": not args.no_gradient_accumulation_fusion
        and _importable("fused_weight_gradient_mlp_cuda"),
        "persist_layer_norm": not args.no_persist_layer_norm and _importable("apex"),
    }


_FUSION_FIELDS = (
    "bias_activation_fusion",
    "bias_dropout_fusion",
    "masked_softmax_fusion",
    "apply_rope_fusion",
    "gradient_accumulation_fusion",
    "persist_layer_norm",
)


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def local_mla_refuses_kv_norm_alone() -> bool:
    """Whether this megatron-core's MLA refuses a q norm without a q LoRA (0.19's
    `mla_qk_norm_config`; 0.16.1 leaves it unused and normalizes the kv latent)."""
    return _importable("megatron.core.transformer.mla_qk_norm_config")


def _topk_scaling_factor(args: argparse.Namespace) -> float:
    factor = args.moe_router_topk_scaling_factor
    if factor == "moonlight":
        return gate_scaling_factor(args.num_experts, args.moe_router_topk)
    return float(factor)


def _require_local_grouped_mlp() -> None:
    # megatron-core 0.19 removed the legacy GroupedMLP: its local layer spec then builds a
    # SequentialMLP for --moe-grouped-gemm without a word. Refuse rather than run another
    # expert layout than the one asked for.
    from megatron.core.transformer.moe import experts

    if not hasattr(experts, "GroupedMLP"):
        raise ValueError(
            "--moe-grouped-gemm with the local layers (--transformer-impl local, or no "
            "Transformer Engine) needs megatron-core's legacy GroupedMLP, which this "
            "megatron-core no longer has: use --transformer-impl transformer_engine (TEGroupedMLP) "
            "or drop --moe-grouped-gemm (SequentialMLP)."
        )


def build_model(
    args: argparse.Namespace,
    *,
    ddp_overrides: dict[str, Any] | None = None,
) -> list[torch.nn.Module]:
    """This rank's model chunks: GPTModel [-> Float16Module] -> megatron DDP (ZeRO-1).

    Call after `initialize_parallel`. The DDP config is ZeRO-1 with fp32 grad reduction and
    the overlap flags of `args`, updated from `ddp_overrides`. Returns one chunk, or with an
    interleaved pipeline (`args.virtual_pipeline_size`) one per virtual stage, built as
    Megatron-LM's `get_model` builds them (`vp_stage`, bucketing on the first chunk only).
    """
    config = transformer_config(args)
    use_te = uses_transformer_engine(args)
    if args.num_experts is not None and args.moe_grouped_gemm and not use_te:
        _require_local_grouped_mlp()
    virtual = virtual_pipeline_size(args)
    stages: list[int | None] = list(range(virtual)) if virtual else [None]
    models = [_gpt_model(args, config, use_te, vp_stage) for vp_stage in stages]
    ddp_kwargs: dict[str, Any] = dict(
        use_distributed_optimizer=True,
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=args.overlap_grad_reduce,
        overlap_param_gather=args.overlap_param_gather,
        # None: megatron's DDP takes max(40M, 1M x DP size) with --overlap-grad-reduce and
        # one bucket without, as Megatron-LM does (training.py get_model).
        bucket_size=args.ddp_bucket_size,
    )
    ddp_kwargs.update(ddp_overrides or {})
    ddp_config = DistributedDataParallelConfig(**ddp_kwargs)
    chunks = [
        # Megatron-LM: chunks after the first are not bucketed (their communication overlaps
        # the other chunks' compute).
        DistributedDataParallel(
            config=config, ddp_config=ddp_config, module=model, disable_bucketing=index > 0
        )
        for index, model in enumerate(models)
    ]
    # What megatron/training/training.py wires: without finalize_model_grads there is no
    # data-parallel gradient reduction at all.
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = _per_chunk([c.no_sync for c in chunks])
    if ddp_config.overlap_grad_reduce:
        config.grad_sync_func = _per_chunk([c.start_grad_sync for c in chunks])
    if ddp_config.overlap_param_gather and ddp_config.align_param_gather:
        config.param_sync_func = _per_chunk([c.start_param_sync for c in chunks])
    return chunks


def _per_chunk(funcs: list) -> Any:
    # The schedules take one function, or a list with one per model chunk.
    return funcs[0] if len(funcs) == 1 else funcs


def _gpt_model(
    args: argparse.Namespace, config: TransformerConfig, use_te: bool, vp_stage: int | None
) -> torch.nn.Module:
    """One model chunk (a virtual stage when `vp_stage` is set), before DDP."""
    block_spec = get_gpt_decoder_block_spec(
        config, use_transformer_engine=use_te, normalization=args.normalization,
        vp_stage=vp_stage,
    )
    if args.multi_latent_attention and not use_te:
        use_local_mla_attention(block_spec)
        if args.qk_layernorm and args.q_lora_rank is None and local_mla_refuses_kv_norm_alone():
            raise ValueError(
                "--qk-layernorm with --multi-latent-attention and no --q-lora-rank: this "
                "megatron-core's local MLA spec refuses it (mla_qk_norm_config: the q norm "
                "has no q latent), and so cannot normalize the kv latent alone as Moonlight "
                "does; use Transformer Engine's spec, megatron-core 0.16.1, or add "
                "--q-lora-rank."
            )
    building = te_stand_ins_off() if args.multi_latent_attention else contextlib.nullcontext()
    stage = {} if vp_stage is None else {"vp_stage": vp_stage}
    with building:
        model: torch.nn.Module = GPTModel(
            config=config,
            transformer_layer_spec=block_spec,
            vocab_size=model_vocab_size(args),
            max_sequence_length=args.max_position_embeddings or args.seq_length,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, **stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, **stage),
            share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
            position_embedding_type=args.position_embedding_type,
            rotary_base=args.rotary_base,
            **stage,
        )
    if args.multi_latent_attention and not use_te:
        fix_local_mla_gradients(model)  # megatron-core's TP gradient flaws: see mla.py
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if args.bf16:
        model = Float16Module(config, model)
    return model


def unwrap(model_chunk: torch.nn.Module) -> GPTModel:
    """The `GPTModel` inside the DDP (and Float16Module) wrappers."""
    module = model_chunk
    while isinstance(module, (DistributedDataParallel, Float16Module)):
        module = module.module
    return module


def local_parameter_count(model: list[torch.nn.Module]) -> int:
    """Parameters held by this rank (the whole model's count: `training.model_size`)."""
    return sum(p.numel() for chunk in model for p in chunk.parameters())
