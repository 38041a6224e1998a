"""QK-Clip (MuonClip, Kimi K2 arXiv 2507.20534) with the ZeRO-1 optimizers: the max-logit
record, the reduction and the rescale of params and main shards, after `optimizer.step()`.

`QKClip(model_chunks, ...)` reads, per attention layer and per head of this TP rank, the
maximum over batch, query and key positions of the scaled pre-softmax logit
q.k * softmax_scale (masked positions excluded), over all of one step's forwards:

- megatron-core's local `DotProductAttention` (any machine, CPU included): a forward
  pre-hook, `record_max_logits`, computes it;
- Transformer Engine's attention (megatron-core's `TEDotProductAttention`, TE >= 2.9, with
  `config.qk_clip` or `config.log_max_attention_logit` set): TE returns it, and megatron-core
  keeps it in `core_attention.current_max_attn_logits` (folded by max over micro-batches),
  which is what megatron-core's own `clip_qk` reads. No hook is installed then.

`apply(optimizer)`, after each optimizer step:

1. one all-reduce MAX over the data-parallel (with context-parallel) group of every
   layer's per-head maxima: S_h over the global batch. TP ranks hold different heads and
   pipeline stages their own layers, so neither is reduced for the clip;
2. for each layer with a head above the threshold, the row factors of
   `muon_megatron.qk_clip.factors` (GQA per KV group, MLA nope/rope; see there);
3. the model params (the whole TP-local tensor, which every DP rank holds after the
   optimizer's param all-gather) are scaled in place, and so are the optimizer's fp32 main
   shards (ZeRO-1: flat slices [start, end) of the TP-local tensor, Megatron's
   `_get_model_param_range_map`; the same range as `MuonMatrix.dp_ranges` for a Muon matrix,
   which `optimizer.plan` checks), unless the shard is a view of the model param itself
   (fp32 params), which step 3 already scaled. Muon and AdamW params alike: the fused
   `linear_qkv` is a Muon matrix, MLA's projections too, but a recipe may route them to AdamW.

The momentum is not rescaled (Kimi K2 rescales the weights only). The recorded maxima are
reset after `apply`, so they cover exactly one step's forwards (all its micro-batches).
megatron-core's own `clip_qk` does steps 1-2 for TE's attention but scales only the model
params, so with bf16 params and the distributed optimizer the next step's main -> model copy
undoes its clip; this module is what `muon_megatron.megatron_lm` puts in its place.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from muon_megatron.qk_clip import factors as clip_math

__all__ = ["QKClip", "QKClipStats", "qk_clip_from_args", "record_max_logits"]

# The attribute where megatron-core's TEDotProductAttention keeps TE's per-head max logits
# (extensions/transformer_engine.py, with config.qk_clip or config.log_max_attention_logit).
TE_MAX_LOGITS = "current_max_attn_logits"
# Where record_max_logits keeps the local attention's.
LOCAL_MAX_LOGITS = "qk_clip_max_logits"


@dataclass
class QKClipStats:
    """One step's figures, the same on every rank."""

    max_attention_logit: float
    """Max pre-softmax logit over every head of the model, before the clip."""
    clipped_heads: int
    """Heads (summed over layers and TP ranks) whose max logit exceeded the threshold and
    which were clipped: 0 when the QKClip only records (clip=False)."""


def record_max_logits(module: DotProductAttention, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: fold this forward's per-head max logit into
    `module.qk_clip_max_logits` ([heads of this TP rank], fp32)."""
    query, key = args[0], args[1]  # [sq, b, np, hn], [sk, b, ng, hn]
    mask = args[3] if len(args) > 3 else kwargs.get("attention_mask")
    mask_type = kwargs.get("attn_mask_type") or module.attn_mask_type
    with torch.no_grad():
        q, k = query.detach().float(), key.detach().float()
        if q.shape[2] != k.shape[2]:
            k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
        scale = module.softmax_scale
        if module.config.apply_query_key_layer_scaling:  # the softmax multiplies it back
            scale *= module.layer_number
        logits = torch.einsum("sbnh,tbnh->bnst", q, k) * scale
        sq, sk = logits.shape[2], logits.shape[3]
        if mask is None and mask_type == AttnMaskType.causal and sq > 1:
            mask = torch.ones(sq, sk, dtype=torch.bool, device=logits.device).triu(1)
        if mask is not None:  # megatron's masks: True where masked out
            logits = logits.masked_fill(mask.bool(), float("-inf"))
        step_max = logits.amax(dim=(0, 2, 3))
    previous = getattr(module, "qk_clip_max_logits", None)
    module.qk_clip_max_logits = step_max if previous is None else torch.maximum(previous, step_max)


def _attention_layers(model_chunks: Iterable[torch.nn.Module]) -> list[torch.nn.Module]:
    layers = []
    for chunk in model_chunks:
        for module in chunk.modules():
            core = getattr(module, "core_attention", None)
            if core is None:
                continue
            if not isinstance(core, DotProductAttention) and not hasattr(core, TE_MAX_LOGITS):
                raise TypeError(
                    f"QK-Clip reads max logits from megatron-core's local DotProductAttention "
                    f"or from Transformer Engine's (TE >= 2.9, which megatron-core asks for with "
                    f"config.qk_clip or config.log_max_attention_logit); "
                    f"{type(core).__name__} has neither: build the model with the local spec "
                    "(--transformer-impl local) or TE >= 2.9 with --qk-clip set in its config"
                )
            if module.config.window_size is not None:
                raise ValueError("QK-Clip with sliding-window attention is not supported")
            layers.append(module)
    return layers


def _record_attribute(core: torch.nn.Module) -> str:
    return LOCAL_MAX_LOGITS if isinstance(core, DotProductAttention) else TE_MAX_LOGITS


def _row_factors(layer: torch.nn.Module, gammas_H: torch.Tensor, alpha: float) -> list:
    """(weight, row factors) of the layer's projections that QK-Clip rescales."""
    cfg = layer.config
    if hasattr(layer, "linear_kv_up_proj"):  # MLA
        q_proj = layer.linear_q_up_proj if cfg.q_lora_rank is not None else layer.linear_q_proj
        return [
            (q_proj.weight, clip_math.mla_q_row_factors(
                gammas_H, cfg.qk_head_dim, cfg.qk_pos_emb_head_dim, alpha)),
            (layer.linear_kv_up_proj.weight, clip_math.mla_kv_up_row_factors(
                gammas_H, cfg.qk_head_dim, cfg.v_head_dim, alpha)),
        ]
    rows = clip_math.gqa_qkv_row_factors(
        gammas_H, layer.num_query_groups_per_partition, layer.hidden_size_per_attention_head,
        alpha,
    )
    return [(layer.linear_qkv.weight, rows)]


def _main_shards(optimizer, param: torch.nn.Parameter) -> list[tuple[torch.Tensor, int, int]]:
    """The optimizer's main-param shards of `param` that are not views of `param` itself:
    (shard, start, end) in the flat TP-local tensor."""
    found = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        index_map = getattr(opt, "model_param_group_index_map", None)
        if index_map is not None:  # megatron's DistributedOptimizer (ours is one)
            if param not in index_map:
                continue
            gi, order = index_map[param]
            shard = opt.optimizer.param_groups[gi]["params"][order]
            span = opt._get_model_param_range_map(param)["param"]
            found.append((shard, span.start, span.end))
        elif hasattr(opt, "masters"):  # tools.reference_stepper: whole fp32 masters
            for model_param, master in zip(opt.model_params, opt.masters):
                if model_param is param:
                    found.append((master.view(-1), 0, param.numel()))
        elif param.dtype != torch.float32:
            raise ValueError(
                f"QK-Clip cannot find the fp32 main params of {type(opt).__name__}: use the "
                "distributed optimizer (--use-distributed-optimizer)"
            )
    shared = param.untyped_storage().data_ptr()
    return [f for f in found if f[0].untyped_storage().data_ptr() != shared]


class QKClip:
    """Records max logits on `model_chunks` and, in `apply`, clips them (see the module
    docstring). `clip=False` only records and reports (--log-max-attention-logit).

    Collective in `apply`: every rank of `dp_cp_group` and of `log_group` (None: the default
    group; the logged max covers every TP rank's heads and every pipeline stage's layers).
    Numerical contract: the factors are exact products of gamma powers in fp32 applied to
    fp32 weights, so every layout scales the same weights by the same factors as the
    single-device reference to round-off in S_h (its max over DP is exact)."""

    def __init__(
        self,
        model_chunks: Iterable[torch.nn.Module],
        *,
        threshold: float = 100.0,
        alpha: float = 0.5,
        dp_cp_group=None,
        log_group=None,
        clip: bool = True,
    ) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"--qk-clip-alpha must lie in [0, 1], got {alpha}")
        if threshold <= 0:
            raise ValueError(f"--qk-clip-threshold must be > 0, got {threshold}")
        self.threshold, self.alpha, self.clip = float(threshold), float(alpha), clip
        self.dp_cp_group, self.log_group = dp_cp_group, log_group
        self.layers = _attention_layers(model_chunks)
        self.last_stats: QKClipStats | None = None
        """The figures of the last `apply` (for a log line written later)."""
        self._hooks = [
            layer.core_attention.register_forward_pre_hook(record_max_logits, with_kwargs=True)
            for layer in self.layers
            if isinstance(layer.core_attention, DotProductAttention)
        ]

    @classmethod
    def for_model(cls, model_chunks, *, threshold: float, alpha: float, clip: bool = True):
        """On megatron's process groups: DP with CP for the clip, the world for the log."""
        from megatron.core import parallel_state

        group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        return cls(model_chunks, threshold=threshold, alpha=alpha, dp_cp_group=group, clip=clip)

    def reset(self) -> None:
        """Forget what was recorded (evaluation forwards, say) since the last `apply`."""
        for layer in self.layers:
            setattr(layer.core_attention, _record_attribute(layer.core_attention), None)

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.reset()

    def max_logits(self) -> list[torch.Tensor]:
        """Every layer's per-head max logit over the global batch (this TP rank's heads);
        collective over `dp_cp_group`."""
        local = []
        for layer in self.layers:
            core = layer.core_attention
            recorded = getattr(core, _record_attribute(core), None)
            if recorded is None:
                raise RuntimeError("QK-Clip: no forward recorded a max logit since the last step")
            local.append(recorded.detach().float().reshape(-1))
        if not local:
            return []
        flat = torch.cat(local)
        if self._size(self.dp_cp_group) > 1:
            torch.distributed.all_reduce(
                flat, op=torch.distributed.ReduceOp.MAX, group=self.dp_cp_group
            )
        return list(flat.split([t.numel() for t in local]))

    @torch.no_grad()
    def apply(self, optimizer) -> QKClipStats:
        """Reduce the step's max logits, rescale what exceeded the threshold (params and
        main shards of `optimizer`), reset the records; return the step's figures.

        Two host reads in all, not one per layer: which layers have a head over the
        threshold, and the logged figures."""
        per_layer = self.max_logits()
        over_L: list[int] = []
        if per_layer:
            over_L = torch.stack([(s > self.threshold).sum() for s in per_layer]).tolist()
        for layer, s_H, over in zip(self.layers, per_layer, over_L):
            if not self.clip or over == 0:
                continue
            gammas_H = clip_math.clip_gammas(s_H, self.threshold)
            for weight, rows in _row_factors(layer, gammas_H, self.alpha):
                for shard, start, end in _main_shards(optimizer, weight):
                    clip_math.scale_shard_(shard, rows, tuple(weight.shape), start, end)
                clip_math.scale_rows_(weight.data, rows)
        self.reset()
        self.last_stats = self._stats(per_layer, sum(over_L) if self.clip else 0)
        return self.last_stats

    def _stats(self, per_layer: list[torch.Tensor], clipped: int) -> QKClipStats:
        if per_layer:
            local_max = torch.stack([s.max() for s in per_layer]).max().double().reshape(1)
        else:  # a pipeline stage without attention layers
            local_max = torch.full(
                (1,), float("-inf"), dtype=torch.float64, device=_default_device()
            )
        counts = torch.tensor([float(clipped)], dtype=torch.float64, device=local_max.device)
        if self._size(self.log_group) > 1:
            torch.distributed.all_reduce(local_max, torch.distributed.ReduceOp.MAX, self.log_group)
            torch.distributed.all_reduce(counts, group=self.log_group)
            # Every DP (and CP) replica counted the same heads.
            counts /= self._size(self.dp_cp_group)
        return QKClipStats(float(local_max[0]), round(float(counts[0])))

    @staticmethod
    def _size(group) -> int:
        if not torch.distributed.is_initialized():
            return 1
        return torch.distributed.get_world_size(group)


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def qk_clip_from_args(args, model_chunks) -> QKClip | None:
    """The QK-Clip of a run with Megatron-LM's flags (the training entry's, Megatron-LM's
    own `args`): --qk-clip clips (and logs), --log-max-attention-logit alone only logs; None
    when neither is set (nothing hooked: today's run, bit for bit)."""
    if not (args.qk_clip or args.log_max_attention_logit):
        return None
    return QKClip.for_model(
        model_chunks, threshold=args.qk_clip_threshold, alpha=args.qk_clip_alpha,
        clip=args.qk_clip,
    )
