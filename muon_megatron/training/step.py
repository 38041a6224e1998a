"""The optimizer, its scheduler, and one forward-backward pass, on a `training.model` model.

Built from the same Megatron-LM-style arguments as the model, or (`optimizer_config`,
`build_optimizer`, `param_scheduler`) from explicit values, as the tools and tests do.

Loss convention: `forward_backward` hands the schedule this rank's rows and a loss function
returning (sum, num_tokens): the schedule divides each micro-batch loss by its token count
and by the number of micro-batches, and DDP pre-scales grads by 1/dp before the sum
reduction, so the reduced gradient is that of the mean per-token loss over the whole global
batch. The returned loss is that mean, the same on every rank.

Context parallelism: the CP ranks of one DP rank get the same rows, and each forward takes
its CP rank's share of the sequence (megatron-core's `get_batch_on_this_cp_rank`: the
sequence in 2 x CP chunks, rank r keeping chunks r and 2 x CP - 1 - r, which is what
Transformer Engine's context-parallel attention expects). Each CP rank's loss function
returns CP x its own chunks' loss sum with the token count of the whole micro-batch's
sequence (known before the split: no communication); DDP pre-scales by 1/(dp x cp) and sums
over the DP x CP group, so the CP ranks' shares add up to the sum over the whole sequence
divided by its token count: the same mean per-token loss, exact also where the loss mask
leaves the CP ranks different numbers of tokens.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from muon_megatron.config import MuonConfig
from muon_megatron.config_flags import muon_config_from_args
from muon_megatron.optimizer.builder import get_muon_optimizer, muon_optimizers
from muon_megatron.training.interleaving import interleaved_microbatch_error
from muon_megatron.training.model import PARAMS_DTYPES, device, unwrap

__all__ = [
    "optimizer_config",
    "optimizer_config_from_args",
    "build_optimizer",
    "param_scheduler",
    "build_optimizer_and_scheduler",
    "forward_backward",
    "evaluate",
    "update_rms",
]


# --------------------------------------------------------------------------------------------
# Optimizer and scheduler
# --------------------------------------------------------------------------------------------


def optimizer_config(
    *, lr: float, weight_decay: float, bf16: bool, clip_grad: float = 1.0, **kw: Any
) -> OptimizerConfig:
    """megatron's `OptimizerConfig` for ZeRO-1 AdamW (min_lr = lr unless `kw` sets it)."""
    fields: dict[str, Any] = dict(
        optimizer="adam",
        lr=lr,
        min_lr=lr,
        weight_decay=weight_decay,
        bf16=bf16,
        params_dtype=PARAMS_DTYPES[bf16],
        clip_grad=clip_grad,
        use_distributed_optimizer=True,
    )
    fields.update(kw)
    return OptimizerConfig(**fields)


def optimizer_config_from_args(args: argparse.Namespace) -> OptimizerConfig:
    """`optimizer_config` from Megatron-LM's flags. Muon reads the same lr and weight decay:
    Moonlight's recipe keeps AdamW's values because the update RMS is matched to AdamW's."""
    return optimizer_config(
        lr=args.lr,
        weight_decay=args.weight_decay,
        bf16=args.bf16,
        clip_grad=args.clip_grad,
        optimizer=args.optimizer,
        min_lr=args.min_lr,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        overlap_param_gather=args.overlap_param_gather,
    )


def build_optimizer(
    config: OptimizerConfig,
    model: list[torch.nn.Module],
    muon_config: MuonConfig | None = None,
    **muon_kw: Any,
) -> MegatronOptimizer:
    """Muon (when `muon_config` is given; `muon_kw` goes to `get_muon_optimizer`) or
    megatron's own optimizer, with the loss scale wired into the model as training.py does."""
    if muon_config is not None:
        optimizer = get_muon_optimizer(config, model, muon_config, **muon_kw)
    else:
        optimizer = get_megatron_optimizer(config, model)
    for chunk in model:
        # megatron/training/training.py: losses are scaled by the loss scale (1 unless fp16).
        unwrap(chunk).config.grad_scale_func = optimizer.scale_loss
    return optimizer


def param_scheduler(
    optimizer: MegatronOptimizer,
    *,
    max_lr: float,
    min_lr: float,
    weight_decay: float,
    init_lr: float | None = None,
    warmup_steps: int = 0,
    decay_steps: int = 1,
    decay_style: str = "constant",
) -> OptimizerParamScheduler:
    """megatron's `OptimizerParamScheduler` with a constant weight decay.

    Building it applies step 0 at once, as the training loop does at every step: that is
    what turns each param group's `wd_mult` into its `weight_decay` (no decay on norms and
    biases); without it every group decays at the config's weight decay. The defaults give
    a constant lr.
    """
    return OptimizerParamScheduler(
        optimizer,
        init_lr=max_lr if init_lr is None else init_lr,
        max_lr=max_lr,
        min_lr=min_lr,
        lr_warmup_steps=warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=decay_style,
        start_wd=weight_decay,
        end_wd=weight_decay,
        wd_incr_steps=max(decay_steps, 1),
        wd_incr_style="constant",
    )


def build_optimizer_and_scheduler(
    args: argparse.Namespace, model: list[torch.nn.Module]
) -> tuple[MegatronOptimizer, OptimizerParamScheduler]:
    """Muon (`--optimizer muon`) or AdamW, and megatron's lr / wd scheduler, from the flags."""
    muon_config = muon_config_from_args(args) if args.optimizer == "muon" else None
    optimizer = build_optimizer(optimizer_config_from_args(args), model, muon_config)
    gbs = args.global_batch_size
    scheduler = param_scheduler(
        optimizer,
        init_lr=args.lr_warmup_init,
        max_lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.lr_warmup_iters * gbs,
        decay_steps=(args.lr_decay_iters or args.train_iters) * gbs,
        decay_style=args.lr_decay_style,
    )
    return optimizer, scheduler


# --------------------------------------------------------------------------------------------
# Loss and schedule
# --------------------------------------------------------------------------------------------


def _loss_func(
    loss_mask: torch.Tensor,
    sequence_tokens: torch.Tensor,
    cp_size: int,
    output_tensor: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    # (sum, num_tokens, report): the schedule divides by num_tokens and the number of
    # micro-batches. Under CP, `loss_mask` is this CP rank's share and `sequence_tokens` the
    # whole sequence's count (module docstring). The report (this rank's own sum and
    # tokens) is a copy: the schedule divides the first element in place.
    loss_sum = (output_tensor.float() * loss_mask).sum()
    report = torch.stack([loss_sum.detach().clone().double(), loss_mask.sum().double()])
    return loss_sum * cp_size, sequence_tokens, {"loss_sum_and_tokens": report}


def _forward_step(
    data_iterator: Iterator[dict[str, torch.Tensor]], model: torch.nn.Module
) -> tuple[torch.Tensor, Callable]:
    from megatron.core.utils import get_batch_on_this_cp_rank

    micro = next(data_iterator)
    sequence_tokens = micro["loss_mask"].sum().to(torch.int)
    cp_size = parallel_state.get_context_parallel_world_size()
    if cp_size > 1:
        micro = get_batch_on_this_cp_rank(dict(micro))
    output = model(micro["tokens"], micro["position_ids"], None, labels=micro["labels"])
    return output, functools.partial(_loss_func, micro["loss_mask"], sequence_tokens, cp_size)


def forward_backward(
    model: list[torch.nn.Module],
    local: dict[str, torch.Tensor],
    *,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool = False,
) -> float:
    """Run megatron's schedule on this DP rank's rows `local` (tokens, labels, loss_mask,
    position_ids, each [rows, seq], the whole sequence: each forward takes its CP rank's
    share) in micro-batches of `micro_batch_size`; pipelined when pp > 1. Unless
    `forward_only`, the grad buffers are zeroed first and afterwards hold the gradient of
    the global batch's mean per-token loss. Returns that mean loss. With several model
    chunks (an interleaved pipeline) the micro-batches per step must be a multiple of the
    pipeline size (ValueError otherwise)."""
    if local["tokens"].shape[0] % micro_batch_size != 0:
        raise ValueError(
            f"{local['tokens'].shape[0]} rows per data-parallel rank are not divisible by "
            f"the micro-batch size {micro_batch_size}"
        )
    if not forward_only:
        for chunk in model:
            chunk.zero_grad_buffer()
    here = device()
    n = local["tokens"].shape[0] // micro_batch_size
    micro_batches = [
        {k: v[i * micro_batch_size : (i + 1) * micro_batch_size].to(here) for k, v in local.items()}
        for i in range(n)
    ]
    if len(model) > 1:
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        error = interleaved_microbatch_error(n, pp)
        if error:
            raise ValueError(error)
    # Interleaved: one iterator per model chunk, each over every micro-batch (a chunk that
    # neither embeds nor computes the loss ignores the tokens and labels it is handed).
    data: Any = [iter(micro_batches) for _ in model] if len(model) > 1 else iter(micro_batches)
    reports = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=data,
        model=model,
        num_microbatches=n,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    # Only the last pipeline stage has losses; TP ranks hold copies: count TP rank 0 only.
    # CP ranks hold their own chunks' sums and tokens: all of them count.
    total = torch.zeros(2, dtype=torch.float64, device=here)
    if (
        parallel_state.is_pipeline_last_stage()
        and parallel_state.get_tensor_model_parallel_rank() == 0
    ):
        for report in reports:
            total += report["loss_sum_and_tokens"].to(here)
    torch.distributed.all_reduce(total)
    return float(total[0] / total[1])


@torch.no_grad()
def evaluate(
    args: argparse.Namespace,
    model: list[torch.nn.Module],
    batch_for: Callable[[int], dict[str, torch.Tensor]],
) -> float:
    """Mean validation loss over `--eval-iters` global batches (the same ones every time).

    Raises ValueError for `--eval-iters` below 1: 0 is Megatron-LM's "no evaluation", which
    the training loop honours by not calling this at all."""
    if args.eval_iters < 1:
        raise ValueError(
            f"evaluate() with --eval-iters {args.eval_iters} has no batch to average; "
            "--eval-iters 0 means no evaluation: skip the call (the training loop does)."
        )
    for chunk in model:
        chunk.eval()
    try:
        losses = [
            forward_backward(
                model,
                batch_for(i),
                seq_length=args.seq_length,
                micro_batch_size=args.micro_batch_size,
                forward_only=True,
            )
            for i in range(args.eval_iters)
        ]
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
