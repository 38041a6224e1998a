"""QK-Clip (MuonClip, Kimi K2 arXiv 2507.20534) on megatron-core's local attention, with the
ZeRO-1 optimizers: the max-logit hook, the reduction and the rescale of params and shards.

`QKClip(model_chunks, ...)` hooks every attention layer's core attention (megatron-core's
local `DotProductAttention`, so it runs on CPU): each forward records, per head of this TP
rank, the maximum over batch, query and key positions of the scaled pre-softmax logit
q.k * softmax_scale (masked positions excluded). `apply(optimizer)`, after each optimizer
step:

1. one all-reduce MAX over the data-parallel (with context-parallel) group of every
   layer's per-head maxima: S_h over the global batch. TP ranks hold different heads and
   pipeline stages their own layers, so neither is reduced for the clip;
2. for each layer with a head above the threshold, the row factors of
   `muon_megatron.optimizer.qk_clip` (GQA per KV group, MLA nope/rope; see there);
3. the model params (the whole TP-local tensor, which every DP rank holds after the
   optimizer's param all-gather) are scaled in place, and so are the optimizer's fp32 main
   shards (ZeRO-1: flat slices [start, end) of the TP-local tensor, Megatron's
   `_get_model_param_range_map`; the same range as `MuonMatrix.dp_ranges` for a Muon matrix,
   which `optimizer.plan` checks), unless the shard is a view of the model param itself
   (fp32 params), which step 3 already scaled. Muon and AdamW params alike: the fused
   `linear_qkv` is a Muon matrix, MLA's projections too, but a recipe may route them to AdamW.

The momentum is not rescaled (Kimi K2 rescales the weights only). The recorded maxima are
reset after `apply`, so they cover exactly one step's forwards (all its micro-batches).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from muon_megatron.optimizer import qk_clip as clip_math

__all__ = ["QKClip", "QKClipStats", "qk_clip_from_args", "record_max_logits"]


@dataclass
class QKClipStats:
    """One step's figures, the same on every rank."""

    max_attention_logit: float
    """Max pre-softmax logit over every head of the model, before the clip."""
    clipped_heads: int
    """Heads (summed over layers and TP ranks) whose max logit exceeded the threshold."""


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
            if not isinstance(core, DotProductAttention):
                raise TypeError(
                    f"QK-Clip collects max logits from megatron-core's local "
                    f"DotProductAttention, not {type(core).__name__}: build the model with "
                    "the local spec (--transformer-impl local)"
                )
            if module.config.window_size is not None:
                raise ValueError("QK-Clip with sliding-window attention is not supported")
            layers.append(module)
    return layers


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
        self._hooks = [
            layer.core_attention.register_forward_pre_hook(record_max_logits, with_kwargs=True)
            for layer in self.layers
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
            layer.core_attention.qk_clip_max_logits = None

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
            recorded = getattr(layer.core_attention, "qk_clip_max_logits", None)
            if recorded is None:
                raise RuntimeError("QK-Clip: no forward recorded a max logit since the last step")
            local.append(recorded)
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
        main shards of `optimizer`), reset the records; return the step's figures."""
        per_layer = self.max_logits()
        clipped = 0
        for layer, s_H in zip(self.layers, per_layer):
            layer.core_attention.qk_clip_max_logits = None
            over = int((s_H > self.threshold).sum())
            clipped += over
            if not self.clip or over == 0:
                continue
            gammas_H = clip_math.clip_gammas(s_H, self.threshold)
            for weight, rows in _row_factors(layer, gammas_H, self.alpha):
                for shard, start, end in _main_shards(optimizer, weight):
                    clip_math.scale_shard_(shard, rows, tuple(weight.shape), start, end)
                clip_math.scale_rows_(weight.data, rows)
        return self._stats(per_layer, clipped)

    def _stats(self, per_layer: list[torch.Tensor], clipped: int) -> QKClipStats:
        local_max = max((float(s.max()) for s in per_layer), default=float("-inf"))
        figures = torch.tensor([local_max], dtype=torch.float64)
        counts = torch.tensor([float(clipped)], dtype=torch.float64)
        if self._size(self.log_group) > 1:
            torch.distributed.all_reduce(figures, torch.distributed.ReduceOp.MAX, self.log_group)
            torch.distributed.all_reduce(counts, group=self.log_group)
            # Every DP (and CP) replica counted the same heads.
            counts /= self._size(self.dp_cp_group)
        return QKClipStats(float(figures[0]), round(float(counts[0])))

    @staticmethod
    def _size(group) -> int:
        if not torch.distributed.is_initialized():
            return 1
        return torch.distributed.get_world_size(group)


def qk_clip_from_args(args, model_chunks) -> QKClip | None:
    """The training entry's QK-Clip: --qk-clip clips (and logs), --log-max-attention-logit
    alone only logs; None when neither is set (nothing hooked: today's run, bit for bit)."""
    if not (args.qk_clip or args.log_max_attention_logit):
        return None
    return QKClip.for_model(
        model_chunks, threshold=args.qk_clip_threshold, alpha=args.qk_clip_alpha,
        clip=args.qk_clip,
    )
