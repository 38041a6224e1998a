"""Model, optimizer and one step for the training entry, from Megatron-LM-style arguments.

What Megatron-LM's `pretrain_gpt.py` + `training.py` do for a GPT/MoE, reduced to the parts
the entry needs: process groups, `GPTModel` with the local or Transformer Engine layer
specs (MoE per `--moe-layer-freq`), megatron DDP with ZeRO-1 buffers, the optimizer (Muon
via `get_muon_optimizer`, AdamW via `get_megatron_optimizer`) and `OptimizerParamScheduler`,
and megatron's forward-backward schedules. `tiny_gpt` is the test harness; this module is
the configurable path (shared experts, dense-then-MoE layers, TE on GPU, dropout, aux loss).
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    from muon_megatron.testing.cpu_shims import install_cpu_shims

    install_cpu_shims()

from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import Float16Module

from muon_megatron.builder import get_muon_optimizer, muon_optimizers
from muon_megatron.arguments import muon_config_from_args
from muon_megatron.train_args import model_dims

__all__ = [
    "device",
    "initialize_parallel",
    "transformer_config",
    "build_model",
    "build_optimizer",
    "forward_backward",
    "evaluate",
    "update_rms",
    "local_parameter_count",
]


def device() -> torch.device:
    """This rank's compute device."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def initialize_parallel(args: argparse.Namespace) -> None:
    """Megatron's process groups for the layout, and every RNG seeded from `--seed`."""
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
    )
    # Megatron-LM's _set_random_seed: a different seed per pipeline stage.
    seed = args.seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _use_transformer_engine(args: argparse.Namespace) -> bool:
    if args.transformer_impl is not None:
        return args.transformer_impl == "transformer_engine"
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def transformer_config(args: argparse.Namespace) -> TransformerConfig:
    """megatron-core's `TransformerConfig` for the arguments (fused CUDA kernels off: the
    plain paths compute the same and run everywhere)."""
    dims = model_dims(args)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    moe: dict[str, Any] = {}
    if args.num_experts is not None:
        moe = dict(
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
    return TransformerConfig(
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
        num_layers_in_first_pipeline_stage=args.decoder_first_pipeline_num_layers,
        num_layers_in_last_pipeline_stage=args.decoder_last_pipeline_num_layers,
        sequence_parallel=args.sequence_parallel,
        bf16=args.bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        cross_entropy_loss_fusion=False,
        **moe,
    )


def build_model(args: argparse.Namespace) -> list[torch.nn.Module]:
    """This rank's model chunk: GPTModel [-> Float16Module] -> megatron DDP (ZeRO-1)."""
    config = transformer_config(args)
    use_te = _use_transformer_engine(args)
    block_spec = get_gpt_decoder_block_spec(
        config, use_transformer_engine=use_te, normalization=args.normalization
    )
    model: torch.nn.Module = GPTModel(
        config=config,
        transformer_layer_spec=block_spec,
        vocab_size=args.vocab_size,
        max_sequence_length=args.max_position_embeddings or args.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if args.bf16:
        model = Float16Module(config, model)
    ddp_config = DistributedDataParallelConfig(
        use_distributed_optimizer=True,
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=args.overlap_grad_reduce,
        overlap_param_gather=args.overlap_param_gather,
        bucket_size=40_000_000 if args.overlap_grad_reduce else None,
    )
    ddp_model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    # What megatron/training/training.py wires: without finalize_model_grads there is no
    # data-parallel gradient reduction at all.
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp_model.no_sync
    if ddp_config.overlap_grad_reduce:
        config.grad_sync_func = ddp_model.start_grad_sync
    if ddp_config.overlap_param_gather and ddp_config.align_param_gather:
        config.param_sync_func = ddp_model.start_param_sync
    return [ddp_model]


def build_optimizer(
    args: argparse.Namespace, model: list[torch.nn.Module]
) -> tuple[MegatronOptimizer, OptimizerParamScheduler]:
    """Muon (`--optimizer muon`) or AdamW, and megatron's lr / wd scheduler.

    Both optimizers read lr and weight decay from the same flags and scheduler: Moonlight's
    recipe keeps AdamW's values for Muon because the update RMS is matched to AdamW's.
    """
    config = OptimizerConfig(
        optimizer=args.optimizer,
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        clip_grad=args.clip_grad,
        bf16=args.bf16,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        use_distributed_optimizer=True,
        overlap_param_gather=args.overlap_param_gather,
    )
    if args.optimizer == "muon":
        optimizer = get_muon_optimizer(config, model, muon_config_from_args(args))
    else:
        optimizer = get_megatron_optimizer(config, model)
    gbs = args.global_batch_size
    decay_iters = args.lr_decay_iters or args.train_iters
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=args.lr_warmup_init,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters * gbs,
        lr_decay_steps=decay_iters * gbs,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters * gbs,
        wd_incr_style="constant",
    )
    for chunk in model:
        # megatron/training/training.py: losses are scaled by the loss scale (1 unless fp16).
        _unwrap(chunk).config.grad_scale_func = optimizer.scale_loss
    return optimizer, scheduler


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    while isinstance(chunk, (DistributedDataParallel, Float16Module)):
        chunk = chunk.module
    return chunk


def _loss_func(
    loss_mask: torch.Tensor, output_tensor: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    # (sum, num_tokens, report): the schedule divides by num_tokens and the number of
    # micro-batches. The report is a copy: the schedule divides the first element in place.
    loss_sum = (output_tensor.float() * loss_mask).sum()
    num_tokens = loss_mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach().clone().double(), num_tokens.double()])
    return loss_sum, num_tokens, {"loss_sum_and_tokens": report}


def _forward_step(
    data_iterator: Iterator[dict[str, torch.Tensor]], model: torch.nn.Module
) -> tuple[torch.Tensor, Callable]:
    micro = next(data_iterator)
    output = model(micro["tokens"], micro["position_ids"], None, labels=micro["labels"])
    return output, functools.partial(_loss_func, micro["loss_mask"])


def _run_schedule(
    args: argparse.Namespace,
    model: list[torch.nn.Module],
    local: dict[str, torch.Tensor],
    forward_only: bool,
) -> float:
    mbs = args.micro_batch_size
    n = local["tokens"].shape[0] // mbs
    micro_batches = [{k: v[i * mbs : (i + 1) * mbs] for k, v in local.items()} for i in range(n)]
    reports = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iter(micro_batches),
        model=model,
        num_microbatches=n,
        seq_length=args.seq_length,
        micro_batch_size=mbs,
        forward_only=forward_only,
    )
    # Only the last pipeline stage has losses; TP ranks hold copies: count TP rank 0 only.
    total = torch.zeros(2, dtype=torch.float64, device=device())
    if (
        parallel_state.is_pipeline_last_stage()
        and parallel_state.get_tensor_model_parallel_rank() == 0
    ):
        for report in reports:
            total += report["loss_sum_and_tokens"].to(total.device)
    torch.distributed.all_reduce(total)
    return float(total[0] / total[1])


def forward_backward(
    args: argparse.Namespace, model: list[torch.nn.Module], local: dict[str, torch.Tensor]
) -> float:
    """Zero the grads, run megatron's schedule on this DP rank's rows; returns the mean
    per-token loss over the whole global batch (the same on every rank)."""
    for chunk in model:
        chunk.zero_grad_buffer()
    return _run_schedule(args, model, local, forward_only=False)


@torch.no_grad()
def evaluate(
    args: argparse.Namespace,
    model: list[torch.nn.Module],
    batch_for: Callable[[int], dict[str, torch.Tensor]],
) -> float:
    """Mean validation loss over `--eval-iters` global batches (the same ones every time)."""
    for chunk in model:
        chunk.eval()
    try:
        losses = [_run_schedule(args, model, batch_for(i), True) for i in range(args.eval_iters)]
    finally:
        for chunk in model:
            chunk.train()
    return sum(losses) / len(losses)


def update_rms(optimizer: MegatronOptimizer) -> float | None:
    """Mean over param groups of Muon's update RMS after the last step (None for AdamW)."""
    values = [
        value
        for opt in muon_optimizers(optimizer)
        for name, value in opt.muon_metrics.items()
        if name.startswith("muon/update_rms/")
    ]
    return sum(values) / len(values) if values else None


def local_parameter_count(model: list[torch.nn.Module]) -> int:
    """Parameters held by this rank (the whole model's count: `muon_megatron.model_size`)."""
    return sum(p.numel() for chunk in model for p in chunk.parameters())
