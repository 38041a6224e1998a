"""The test harness's tiny GPT: a `ModelSpec` and a `Layout`, built by `training.model`.

Used by the tests, `verify` and the benchmarks. `ModelSpec` + `Layout` become Megatron-LM
arguments (`megatron_args`), and the model, DDP, optimizer, scheduler and schedule are the
training entry's own (`training.model`, `training.step`), so what the tests check is what a
training run runs. The harness adds only:

* `global_batch`: synthetic tokens that depend only on (step, spec, size, seed), so runs of
  different layouts see the same data; `forward_backward` hands each data-parallel rank its
  own rows of it, and the reduced gradient is that of the mean per-token loss over the whole
  global batch (`training.step`'s loss convention).
* `full_state`: layout-independent fp32 tensors under the names of a TP1/PP1/EP1 `GPTModel`
  (no `module.` prefixes, global layer and expert numbers), so two layouts compare key by
  key; the un-sharding is megatron's own checkpoint resharding.
* harness defaults: dropout off, no biases, RoPE, no MoE auxiliary loss and no capacity
  limit (dropless), so the gradient is a function of the weights and the data alone, the same
  under every layout; a constant lr and weight decay.

Launch with `muon_megatron.runtime.launch.spawn`, which applies the CPU shims; importing
this module applies nothing.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Literal

import torch
from megatron.core import parallel_state
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig

from muon_megatron.config import MuonConfig
from muon_megatron.runtime.launch import spawn
from muon_megatron.training import model as gpt
from muon_megatron.training import step
from muon_megatron.training.args import build_parser, layout_errors
from muon_megatron.training.checkpointing import load_model, save_model
from muon_megatron.training.model import unwrap

__all__ = [
    "ModelSpec",
    "Layout",
    "megatron_args",
    "megatron_argv",
    "initialize_parallel",
    "transformer_config",
    "build_model",
    "unwrap",
    "optimizer_config",
    "build_optimizer",
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
    """True: megatron's legacy `GroupedMLP` with the local layers (one fused weight per
    layer, bf16 only), `TEGroupedMLP` with Transformer Engine's (one weight per expert);
    False: `SequentialMLP` (one `MLP` per expert)."""
    moe_token_dispatcher_type: DispatcherType = "allgather"
    share_embeddings_and_output_weights: bool = True
    bf16: bool = False
    """Wrap the model in megatron's `Float16Module` (bf16 params, fp32 main params)."""
    init_method_std: float = 0.02
    multi_latent_attention: bool = False
    """MLA (megatron-core's MLASelfAttention) instead of GQA; the fields below shape it."""
    q_lora_rank: int | None = None
    """None: one linear_q_proj; an int: linear_q_down_proj / linear_q_up_proj."""
    kv_lora_rank: int = 16
    qk_head_dim: int = 16
    qk_pos_emb_head_dim: int = 8
    v_head_dim: int = 16
    qk_layernorm: bool = False
    """With MLA: q_layernorm / kv_layernorm on the latents."""
    transformer_impl: Literal["local", "transformer_engine"] = "local"
    """megatron-core's layer spec: its local layers, or Transformer Engine's (which must be
    importable: the real one on a GPU node, the tests' CPU stand-in in their processes)."""


@dataclass
class Layout:
    """Parallel layout; the data-parallel size is whatever the world size leaves over."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int | None = None
    """Expert tensor-parallel size; None lets megatron use `tp`."""
    sequence_parallel: bool = False
    vpp: int | None = None
    """Virtual stages (model chunks) per pipeline rank: an interleaved pipeline."""
    cp: int = 1
    """Context-parallel size (megatron-core's attention needs Transformer Engine's for cp > 1:
    `ModelSpec(transformer_impl="transformer_engine")`)."""

    def dp(self, world_size: int) -> int:
        """Data-parallel size (dense params) of this layout on `world_size` ranks."""
        if world_size % (self.tp * self.pp * self.cp) != 0:
            raise ValueError(
                f"world size {world_size} is not divisible by tp*pp*cp = "
                f"{self.tp}*{self.pp}*{self.cp}"
            )
        return world_size // (self.tp * self.pp * self.cp)

    def check(self, spec: ModelSpec, world_size: int) -> None:
        """Raise ValueError, naming the fix, if `spec` cannot run under this layout (the
        training entry's own layout checks, plus the harness's GroupedMLP limit)."""
        errors = layout_errors(megatron_args(spec, self), world_size)
        if spec.moe_grouped_gemm and not spec.bf16 and spec.transformer_impl == "local":
            errors.append("megatron's GroupedMLP is bf16 only: set ModelSpec(bf16=True)")
        if errors:
            raise ValueError(f"{spec} cannot run under {self}:\n  " + "\n  ".join(errors))


def megatron_args(spec: ModelSpec, layout: Layout, seed: int = 0) -> argparse.Namespace:
    """The training entry's arguments (Megatron-LM flag names) for `spec` under `layout`."""
    return build_parser().parse_args(megatron_argv(spec, layout, seed))


def megatron_argv(spec: ModelSpec, layout: Layout, seed: int = 0) -> list[str]:
    """The command line of `megatron_args`: what `examples/pretrain_moe.py` (and
    `muon-megatron plan`) would be given for `spec` under `layout`."""
    argv = [
        f"--tensor-model-parallel-size={layout.tp}",
        f"--pipeline-model-parallel-size={layout.pp}",
        f"--expert-model-parallel-size={layout.ep}",
        f"--context-parallel-size={layout.cp}",
        f"--num-layers={spec.num_layers}",
        f"--hidden-size={spec.hidden_size}",
        f"--num-attention-heads={spec.num_attention_heads}",
        f"--ffn-hidden-size={spec.ffn_hidden_size}",
        f"--vocab-size={spec.vocab_size}",
        f"--seq-length={spec.seq_length}",
        "--disable-bias-linear",
        "--hidden-dropout=0",
        "--attention-dropout=0",
        f"--init-method-std={spec.init_method_std}",
        f"--transformer-impl={spec.transformer_impl}",
        f"--seed={seed}",
    ]
    if not spec.multi_latent_attention:
        argv += ["--group-query-attention", f"--num-query-groups={spec.num_query_groups}"]
    if layout.etp is not None:
        argv.append(f"--expert-tensor-parallel-size={layout.etp}")
    if layout.sequence_parallel:
        argv.append("--sequence-parallel")
    if layout.vpp is not None:
        argv.append(f"--num-virtual-stages-per-pipeline-rank={layout.vpp}")
    if spec.swiglu:
        argv.append("--swiglu")
    if not spec.share_embeddings_and_output_weights:
        argv.append("--untie-embeddings-and-output-weights")
    if spec.bf16:
        argv.append("--bf16")
    if spec.num_experts is not None:
        argv += [
            f"--num-experts={spec.num_experts}",
            f"--moe-router-topk={spec.moe_router_topk}",
            f"--moe-ffn-hidden-size={spec.moe_ffn_hidden_size}",
            f"--moe-token-dispatcher-type={spec.moe_token_dispatcher_type}",
            "--moe-router-load-balancing-type=none",
            "--moe-aux-loss-coeff=0",
        ]
        if spec.moe_grouped_gemm:
            argv.append("--moe-grouped-gemm")
    if spec.multi_latent_attention:
        argv += [
            "--multi-latent-attention",
            f"--kv-lora-rank={spec.kv_lora_rank}",
            f"--qk-head-dim={spec.qk_head_dim}",
            f"--qk-pos-emb-head-dim={spec.qk_pos_emb_head_dim}",
            f"--v-head-dim={spec.v_head_dim}",
            "--rope-type=rope",
        ]
        if spec.q_lora_rank is not None:
            argv.append(f"--q-lora-rank={spec.q_lora_rank}")
    if spec.qk_layernorm:
        argv.append("--qk-layernorm")
    return argv


def initialize_parallel(layout: Layout, seed: int) -> None:
    """Create megatron's process groups for `layout` and seed every RNG from `seed` (the
    same seed on every pipeline stage). Needs `torch.distributed` initialised."""
    gpt.initialize_parallel(megatron_args(ModelSpec(), layout, seed), seed_per_stage=False)


def transformer_config(spec: ModelSpec, layout: Layout):
    """The training entry's `TransformerConfig` for `spec` under `layout`."""
    return gpt.transformer_config(megatron_args(spec, layout))


def build_model(
    spec: ModelSpec, layout: Layout, *, ddp_overrides: dict[str, Any] | None = None
) -> list[torch.nn.Module]:
    """This rank's model chunks (`training.model.build_model`): call after
    `initialize_parallel(layout, seed)`. DDP is ZeRO-1 without overlap unless
    `ddp_overrides` says otherwise."""
    layout.check(spec, torch.distributed.get_world_size())
    chunks = gpt.build_model(megatron_args(spec, layout), ddp_overrides=ddp_overrides)
    # full_state rebuilds the same spec under TP1/PP1/EP1.
    setattr(chunks[0], _SPEC_ATTR, spec)
    return chunks


def optimizer_config(
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    bf16: bool = False,
    clip_grad: float = 1.0,
    **kw: Any,
) -> OptimizerConfig:
    """`training.step.optimizer_config` with the harness's defaults."""
    return step.optimizer_config(
        lr=lr, weight_decay=weight_decay, bf16=bf16, clip_grad=clip_grad, **kw
    )


def build_optimizer(
    model_chunks: list[torch.nn.Module],
    config: OptimizerConfig,
    muon_config: MuonConfig | None = None,
    **muon_kw: Any,
) -> MegatronOptimizer:
    """`training.step.build_optimizer` (Muon when `muon_config` is given, else megatron's
    AdamW) under a constant lr and weight decay at `config`'s values."""
    optimizer = step.build_optimizer(config, model_chunks, muon_config, **muon_kw)
    step.param_scheduler(
        optimizer, max_lr=config.lr, min_lr=config.lr, weight_decay=config.weight_decay
    )
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


def forward_backward(
    model_chunks: list[torch.nn.Module],
    batch: dict[str, torch.Tensor],
    spec: ModelSpec,
    micro_batch_size: int,
) -> float:
    """`training.step.forward_backward` on this rank's rows of the global `batch`.

    This rank takes rows `[dp_rank*n, (dp_rank+1)*n)` (n = gbs/dp; the context-parallel
    ranks of one DP rank take the same rows and `step.forward_backward` splits their
    sequence). Afterwards each param's
    `main_grad` holds the gradient of the mean per-token loss over the whole global batch;
    returns that mean loss, identical on every rank.
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
    rows = {k: v[dp_rank * local : (dp_rank + 1) * local] for k, v in batch.items()}
    return step.forward_backward(
        model_chunks, rows, seq_length=spec.seq_length, micro_batch_size=micro_batch_size
    )


def train_step(
    model_chunks: list[torch.nn.Module],
    optimizer: MegatronOptimizer,
    batch: dict[str, torch.Tensor],
    spec: ModelSpec,
    layout: Layout,
    micro_batch_size: int,
) -> float:
    """One optimizer step on the global `batch`; returns its mean per-token loss (before the
    step), identical on every rank."""
    world_size = torch.distributed.get_world_size()
    layout.check(spec, world_size)
    if layout.dp(world_size) != parallel_state.get_data_parallel_world_size():
        raise ValueError(f"{layout} is not the layout initialize_parallel was called with")
    optimizer.zero_grad()
    loss = forward_backward(model_chunks, batch, spec, micro_batch_size)
    optimizer.step()
    return loss


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
    if layout.tp == layout.pp == layout.ep == 1 and layout.etp in (None, 1):
        # Pure data parallelism: every rank already holds every weight, whole.
        return _named_fp32(model_chunks[0]) if torch.distributed.get_rank() == 0 else None

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
        raise ValueError("full_state needs model chunks made by tiny.build_model")
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
