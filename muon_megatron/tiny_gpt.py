"""A tiny megatron-core GPT, wired exactly as Megatron's training loop wires it.

Used by the tests, the `verify` CLI, the benchmarks and the training example: one place that
builds a `GPTModel` for any TP/PP/EP layout, wraps it in megatron's `DistributedDataParallel`
(ZeRO-1 buffers), trains it with megatron's own forward-backward schedules, and moves weights
between layouts through megatron's `dist_checkpointing`.

Conventions a caller can rely on:

* `train_step` hands each data-parallel rank its own slice of the global batch and scales the
  loss so that the reduced gradient is the gradient of the mean per-token loss over the
  *whole* global batch: megatron's schedule divides each micro-batch loss by its token count
  and by the number of micro-batches, and DDP pre-scales grads by 1/dp before the sum
  reduction (`average_in_collective=False`, `calculate_per_token_loss=False`).
* `global_batch` depends only on (step, spec, size, seed), so runs of different layouts see
  the same data.
* `full_state` returns layout-independent fp32 tensors under the names of a TP1/PP1/EP1
  `GPTModel` (no `module.` prefixes, global layer and expert numbers), so two layouts compare
  key by key.

When CUDA is absent, importing this module installs `muon_megatron.testing.cpu_shims`.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    from muon_megatron.testing.cpu_shims import install_cpu_shims

    install_cpu_shims()

from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import Float16Module

__all__ = [
    "ModelSpec",
    "Layout",
    "initialize_parallel",
    "transformer_config",
    "build_model",
    "unwrap",
    "optimizer_config",
    "build_adam_optimizer",
    "global_batch",
    "forward_backward",
    "train_step",
    "save_model",
    "load_model",
    "full_state",
]

DispatcherType = Literal["allgather", "alltoall"]

_SPEC_ATTR = "tiny_gpt_spec"


@dataclass
class ModelSpec:
    """Shape of the tiny GPT; every layout of the same spec computes the same function."""

    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int = 2
    """GQA: key/value heads; must divide `num_attention_heads` and be divisible by TP."""
    ffn_hidden_size: int = 128
    vocab_size: int = 256
    seq_length: int = 32
    swiglu: bool = True
    num_experts: int | None = None
    """None for a dense MLP; otherwise the number of MoE experts in every layer."""
    moe_router_topk: int = 2
    moe_ffn_hidden_size: int = 64
    moe_grouped_gemm: bool = False
    """True: megatron's legacy `GroupedMLP` (one fused weight per layer, bf16 only);
    False: `SequentialMLP` (one `MLP` per expert)."""
    moe_token_dispatcher_type: DispatcherType = "allgather"
    share_embeddings_and_output_weights: bool = True
    bf16: bool = False
    """Wrap the model in megatron's `Float16Module` (bf16 params, fp32 main params)."""
    init_method_std: float = 0.02


@dataclass
class Layout:
    """Parallel layout; the data-parallel size is whatever the world size leaves over."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int | None = None
    """Expert tensor-parallel size; None lets megatron use `tp`."""
    sequence_parallel: bool = False

    def dp(self, world_size: int) -> int:
        """Data-parallel size (dense params) of this layout on `world_size` ranks."""
        if world_size % (self.tp * self.pp) != 0:
            raise ValueError(
                f"world size {world_size} is not divisible by tp*pp = {self.tp}*{self.pp}"
            )
        return world_size // (self.tp * self.pp)

    def check(self, spec: ModelSpec, world_size: int) -> None:
        """Raise ValueError, naming the fix, if `spec` cannot run under this layout."""
        dp = self.dp(world_size)
        etp = self.tp if self.etp is None else self.etp
        if spec.num_experts is None:
            if self.ep != 1:
                raise ValueError(f"ep={self.ep} needs an MoE spec: set ModelSpec.num_experts")
        else:
            if self.tp > 1 and not self.sequence_parallel:
                raise ValueError(
                    f"megatron requires sequence parallelism for MoE with tp={self.tp}: "
                    "set Layout(sequence_parallel=True)"
                )
            if spec.num_experts % self.ep != 0:
                raise ValueError(f"num_experts={spec.num_experts} not divisible by ep={self.ep}")
            if (dp * self.tp) % (self.ep * etp) != 0:
                raise ValueError(
                    f"ep*etp = {self.ep}*{etp} must divide dp*tp = {dp}*{self.tp} per PP stage"
                )
            if spec.moe_grouped_gemm and not spec.bf16:
                raise ValueError("megatron's GroupedMLP is bf16 only: set ModelSpec(bf16=True)")
        if spec.num_layers % self.pp != 0:
            raise ValueError(f"num_layers={spec.num_layers} not divisible by pp={self.pp}")
        if spec.num_query_groups % self.tp != 0:
            raise ValueError(
                f"num_query_groups={spec.num_query_groups} not divisible by tp={self.tp}"
            )
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("sequence_parallel needs tp > 1")
        if self.sequence_parallel and spec.seq_length % self.tp != 0:
            raise ValueError(f"seq_length={spec.seq_length} not divisible by tp={self.tp}")


def initialize_parallel(layout: Layout, seed: int) -> None:
    """Create megatron's process groups for `layout` and seed every RNG it uses.

    Needs `torch.distributed` initialised (as `muon_megatron.testing.launch.spawn` does).
    """
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)


def transformer_config(spec: ModelSpec, layout: Layout) -> TransformerConfig:
    """The `TransformerConfig` for `spec` under `layout`; fusions that need CUDA are off."""
    dtype = torch.bfloat16 if spec.bf16 else torch.float32
    moe: dict[str, Any] = {}
    if spec.num_experts is not None:
        moe = dict(
            num_moe_experts=spec.num_experts,
            moe_router_topk=spec.moe_router_topk,
            moe_ffn_hidden_size=spec.moe_ffn_hidden_size,
            moe_grouped_gemm=spec.moe_grouped_gemm,
            moe_token_dispatcher_type=spec.moe_token_dispatcher_type,
            # No auxiliary loss and no capacity limit (dropless): the gradient is then a
            # function of the weights and the data only, the same under every layout.
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
            moe_expert_capacity_factor=None,
        )
    return TransformerConfig(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_query_groups,
        ffn_hidden_size=spec.ffn_hidden_size,
        gated_linear_unit=spec.swiglu,
        activation_func=F.silu if spec.swiglu else F.gelu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=spec.init_method_std,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
        sequence_parallel=layout.sequence_parallel,
        bf16=spec.bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        # The fused kernels are CUDA/torch.compile paths; the plain ones compute the same.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        cross_entropy_loss_fusion=False,
        **moe,
    )


def build_model(
    spec: ModelSpec, layout: Layout, *, ddp_overrides: dict[str, Any] | None = None
) -> list[torch.nn.Module]:
    """Build this rank's model chunk: GPTModel [-> Float16Module] -> megatron DDP.

    Call after `initialize_parallel(layout, seed)`. The DDP config is ZeRO-1
    (`use_distributed_optimizer=True`) with fp32 grad reduction and no overlap, updated from
    `ddp_overrides`. Returns a one-element list (no virtual pipeline stages).
    """
    layout.check(spec, torch.distributed.get_world_size())
    config = transformer_config(spec, layout)
    layer_spec = get_gpt_layer_local_spec(
        num_experts=spec.num_experts, moe_grouped_gemm=spec.moe_grouped_gemm
    )
    model: torch.nn.Module = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=spec.vocab_size,
        max_sequence_length=spec.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=spec.share_embeddings_and_output_weights,
        position_embedding_type="rope",
    )
    if spec.bf16:
        model = Float16Module(config, model)

    ddp_kwargs: dict[str, Any] = dict(
        use_distributed_optimizer=True,
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        overlap_param_gather=False,
    )
    ddp_kwargs.update(ddp_overrides or {})
    ddp_config = DistributedDataParallelConfig(**ddp_kwargs)
    ddp_model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)

    # What megatron/training/training.py sets on the config for its schedules: without
    # finalize_model_grads there is no data-parallel gradient reduction at all.
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp_model.no_sync
    if ddp_config.overlap_grad_reduce:
        config.grad_sync_func = ddp_model.start_grad_sync
    if ddp_config.overlap_param_gather and ddp_config.align_param_gather:
        config.param_sync_func = ddp_model.start_param_sync
    # full_state rebuilds the same spec under TP1/PP1/EP1.
    setattr(ddp_model, _SPEC_ATTR, spec)
    return [ddp_model]


def unwrap(model_chunk: torch.nn.Module) -> GPTModel:
    """The `GPTModel` inside the DDP (and Float16Module) wrappers."""
    module = model_chunk
    while isinstance(module, (DistributedDataParallel, Float16Module)):
        module = module.module
    return module


def optimizer_config(
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    bf16: bool = False,
    clip_grad: float = 1.0,
    **kw: Any,
) -> OptimizerConfig:
    """Megatron `OptimizerConfig` for ZeRO-1 Adam(W); `kw` sets any other field."""
    fields = dict(
        optimizer="adam",
        lr=lr,
        min_lr=lr,
        weight_decay=weight_decay,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        clip_grad=clip_grad,
        use_distributed_optimizer=True,
    )
    fields.update(kw)
    return OptimizerConfig(**fields)


def build_adam_optimizer(
    model_chunks: list[torch.nn.Module], config: OptimizerConfig
) -> MegatronOptimizer:
    """Megatron's optimizer for `model_chunks` (`get_megatron_optimizer`), constant lr and wd.

    A constant `OptimizerParamScheduler` is applied once, as megatron's training loop does at
    every step: it is what turns each param group's `wd_mult` into its `weight_decay` (no
    decay on norms and biases); without it every group decays at `config.weight_decay`.
    """
    optimizer = get_megatron_optimizer(config, model_chunks)
    OptimizerParamScheduler(
        optimizer,
        init_lr=config.lr,
        max_lr=config.lr,
        min_lr=config.lr,
        lr_warmup_steps=0,
        lr_decay_steps=1,
        lr_decay_style="constant",
        start_wd=config.weight_decay,
        end_wd=config.weight_decay,
        wd_incr_steps=1,
        wd_incr_style="constant",
    )
    for chunk in model_chunks:
        # megatron/training/training.py: losses are scaled by the optimizer's loss scale
        # (1 unless fp16).
        unwrap(chunk).config.grad_scale_func = optimizer.scale_loss
    return optimizer


def global_batch(
    step: int, spec: ModelSpec, global_batch_size: int, seed: int
) -> dict[str, torch.Tensor]:
    """Deterministic token batch for `step`: the same on every rank and under every layout.

    Each sequence is an arithmetic progression mod vocab (random start, stride 1-3) with 10%
    of tokens replaced at random, so there is something to learn and the loss falls.
    Returns tokens, labels (next-token shift), loss_mask and position_ids, all [gbs, seq].
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    seq = spec.seq_length
    start = torch.randint(0, spec.vocab_size, (global_batch_size, 1), generator=gen)
    stride = torch.randint(1, 4, (global_batch_size, 1), generator=gen)
    stream = (start + stride * torch.arange(seq + 1)) % spec.vocab_size
    noise = torch.randint(0, spec.vocab_size, stream.shape, generator=gen)
    stream = torch.where(torch.rand(stream.shape, generator=gen) < 0.1, noise, stream)
    return {
        "tokens": stream[:, :-1].contiguous(),
        "labels": stream[:, 1:].contiguous(),
        "loss_mask": torch.ones(global_batch_size, seq),
        "position_ids": torch.arange(seq).expand(global_batch_size, seq).contiguous(),
    }


def _loss_func(
    loss_mask: torch.Tensor, output_tensor: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    # The (sum, num_tokens, report) form: the schedule divides by num_tokens and by the number
    # of micro-batches (calculate_per_token_loss=False). The report is a copy because the
    # schedule divides the first element in place.
    loss_sum = (output_tensor.float() * loss_mask).sum()
    num_tokens = loss_mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach().clone().double(), num_tokens.double()])
    return loss_sum, num_tokens, {"loss_sum_and_tokens": report}


def _forward_step(
    data_iterator: Iterator[dict[str, torch.Tensor]], model: torch.nn.Module
) -> tuple[torch.Tensor, functools.partial]:
    micro = next(data_iterator)
    output = model(micro["tokens"], micro["position_ids"], None, labels=micro["labels"])
    return output, functools.partial(_loss_func, micro["loss_mask"])


def forward_backward(
    model_chunks: list[torch.nn.Module],
    batch: dict[str, torch.Tensor],
    spec: ModelSpec,
    micro_batch_size: int,
) -> float:
    """Zero the grad buffers and run megatron's forward-backward schedule on this rank's slice.

    This rank takes rows `[dp_rank*n, (dp_rank+1)*n)` of the global `batch` (n = gbs/dp) in
    micro-batches of `micro_batch_size`; the schedule is pipelined when pp > 1. Afterwards
    each param's `main_grad` holds the gradient of the mean per-token loss over the whole
    global batch (reduced by `config.finalize_model_grads_func`; with the distributed
    optimizer only this rank's shard of the buffer is reduced). Returns that mean loss,
    identical on every rank.
    """
    dp_size = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    gbs = batch["tokens"].shape[0]
    if gbs % (dp_size * micro_batch_size) != 0:
        raise ValueError(
            f"global batch {gbs} is not divisible by dp*micro_batch_size = "
            f"{dp_size}*{micro_batch_size}"
        )
    local = gbs // dp_size
    num_microbatches = local // micro_batch_size
    # On GPU megatron keeps params on the current CUDA device; the batch and the loss
    # all-reduce (NCCL takes CUDA tensors only) follow them there.
    device = torch.device(torch.cuda.current_device() if torch.cuda.is_available() else "cpu")
    shard = {k: v[dp_rank * local : (dp_rank + 1) * local].to(device) for k, v in batch.items()}
    micro_batches = [
        {k: v[i * micro_batch_size : (i + 1) * micro_batch_size] for k, v in shard.items()}
        for i in range(num_microbatches)
    ]

    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    reports = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iter(micro_batches),
        model=model_chunks,
        num_microbatches=num_microbatches,
        seq_length=spec.seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=False,
    )

    # Only the last stage has losses; TP ranks hold copies, so count tp rank 0 only.
    total = torch.zeros(2, dtype=torch.float64, device=device)
    if (
        parallel_state.is_pipeline_last_stage()
        and parallel_state.get_tensor_model_parallel_rank() == 0
    ):
        for report in reports:
            total += report["loss_sum_and_tokens"]
    torch.distributed.all_reduce(total)
    return float(total[0] / total[1])


def train_step(
    model_chunks: list[torch.nn.Module],
    optimizer: MegatronOptimizer,
    batch: dict[str, torch.Tensor],
    spec: ModelSpec,
    layout: Layout,
    micro_batch_size: int,
) -> float:
    """One optimizer step on the global `batch`; returns its mean per-token loss.

    `forward_backward` on this rank's data-parallel slice, then `optimizer.step()`. The loss
    is the mean over the whole global batch (before the step), identical on every rank.
    """
    world_size = torch.distributed.get_world_size()
    layout.check(spec, world_size)
    if layout.dp(world_size) != parallel_state.get_data_parallel_world_size():
        raise ValueError(f"{layout} is not the layout initialize_parallel was called with")
    optimizer.zero_grad()
    loss = forward_backward(model_chunks, batch, spec, micro_batch_size)
    optimizer.step()
    return loss


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def save_model(model_chunks: list[torch.nn.Module], ckpt_dir: str) -> None:
    """Save the model weights with megatron `dist_checkpointing` (torch_dist format).

    Collective over all ranks; `ckpt_dir` must be the same path on every rank. The result
    loads under any other layout of the same `ModelSpec`.
    """
    if torch.distributed.get_rank() == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
    torch.distributed.barrier()
    sharded = _sharded_state_dict(model_chunks)
    dist_checkpointing.save(sharded, ckpt_dir)


@torch.no_grad()
def load_model(
    model_chunks: list[torch.nn.Module],
    ckpt_dir: str,
    *,
    optimizer: MegatronOptimizer | None = None,
) -> None:
    """Load weights saved by `save_model` (under any layout) into `model_chunks`.

    Collective over all ranks. A mixed-precision optimizer keeps fp32 main copies of the
    params: pass it as `optimizer` (its main params are refreshed from the loaded weights), or
    load before building the optimizer. For an fp32 model the ZeRO-1 optimizer's main params
    are views of the model params and see the load either way.
    """
    sharded = _sharded_state_dict(model_chunks)
    loaded = dist_checkpointing.load(sharded, ckpt_dir)
    for i, chunk in enumerate(model_chunks):
        unwrap(chunk).load_state_dict(loaded[_chunk_key(i, len(model_chunks))], strict=True)
    if optimizer is not None:
        optimizer.reload_model_params()


def _chunk_key(index: int, count: int) -> str:
    return "model" if count == 1 else f"model{index}"


def _sharded_state_dict(model_chunks: list[torch.nn.Module]) -> dict[str, Any]:
    return {
        _chunk_key(i, len(model_chunks)): unwrap(chunk).sharded_state_dict()
        for i, chunk in enumerate(model_chunks)
    }


def full_state(
    model_chunks: list[torch.nn.Module], layout: Layout
) -> dict[str, torch.Tensor] | None:
    """Every weight, whole and in fp32, under its TP1/PP1/EP1 `GPTModel` parameter name.

    Collective over all ranks; returns the dict on global rank 0 and None elsewhere. Under
    any layout but a single process it saves with `save_model` and loads that checkpoint into
    a TP1/PP1/EP1 model of the same `ModelSpec` in a fresh one-process job, so the
    un-sharding (TP splits, SwiGLU and QKV interleaving, PP stages, EP experts) is megatron's
    own checkpoint resharding rather than a second implementation of it.
    """
    if len(model_chunks) != 1:
        raise ValueError(f"full_state supports one model chunk, got {len(model_chunks)}")
    if layout.tp == layout.pp == layout.ep == 1 and layout.etp in (None, 1):
        # Pure data parallelism: every rank already holds every weight, whole.
        return _named_fp32(model_chunks[0]) if torch.distributed.get_rank() == 0 else None

    from muon_megatron.testing.launch import spawn

    rank = torch.distributed.get_rank()
    holder: list[str | None] = [tempfile.mkdtemp(prefix="full_state_") if rank == 0 else None]
    torch.distributed.broadcast_object_list(holder, src=0)
    ckpt_dir = holder[0]
    try:
        save_model(model_chunks, ckpt_dir)
        if rank != 0:
            return None
        return spawn(_load_single_process, 1, _spec_of(model_chunks[0]), ckpt_dir)[0]
    finally:
        torch.distributed.barrier()
        if rank == 0:
            shutil.rmtree(ckpt_dir, ignore_errors=True)


def _spec_of(model_chunk: torch.nn.Module) -> ModelSpec:
    spec = getattr(model_chunk, _SPEC_ATTR, None)
    if spec is None:
        raise ValueError("full_state needs model chunks made by tiny_gpt.build_model")
    return spec


def _named_fp32(model_chunk: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: param.detach().float().cpu().clone()
        for name, param in unwrap(model_chunk).named_parameters()
    }


def _load_single_process(rank: int, world_size: int, spec: ModelSpec, ckpt_dir: str) -> dict:
    layout = Layout()
    initialize_parallel(layout, seed=0)
    model_chunks = build_model(spec, layout)
    load_model(model_chunks, ckpt_dir)
    return _named_fp32(model_chunks[0])
