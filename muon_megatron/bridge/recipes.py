"""Megatron-Bridge's Moonlight-16B recipe with Muon.

Bridge ships Moonlight-16B-A3B (`megatron.bridge.recipes.moonlight`) trained with AdamW;
Moonlight was made with Muon (arXiv 2502.16982). `moonlight_16b_muon_pretrain_config()` takes
Bridge's pre-training recipe unchanged (model, parallelism, data, checkpointing) and swaps
its optimizer for `MuonOptimizerConfig` with Moonlight's settings, the same ones as
`examples/moonlight_multinode.sbatch` (docs/moonlight.md gives the report's reason for each):

  lr 3e-4 -> 3e-5 cosine (Bridge's own values), weight decay 0.1 on Muon and AdamW alike,
  Muon momentum 0.95 with Nesterov, 5 quintic Newton-Schulz steps in bf16, the update scaled
  to RMS 0.2 (`muon_scale_mode='moonlight'`: AdamW's typical update RMS, so AdamW's lr and
  weight decay carry over), weight decay on the RMSNorm gammas, the router on AdamW.

Bridge's scheduler sets the weight decay of every step (`start_weight_decay` /
`end_weight_decay`; its Moonlight recipe has 0.033): the recipe sets both to Moonlight's 0.1.
Megatron's precision-aware optimizer (bf16 Adam moments) is turned off: Muon keeps its
momentum in fp32 next to the fp32 main params.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from muon_megatron.bridge import MuonOptimizerConfig
from muon_megatron.config import MuonConfig

__all__ = [
    "MOONLIGHT_MUON",
    "moonlight_muon_optimizer_config",
    "moonlight_16b_muon_pretrain_config",
]

MOONLIGHT_MUON = MuonConfig(
    muon_momentum=0.95,
    muon_nesterov=True,
    muon_coefficients="quintic",
    muon_ns_steps=5,
    muon_scale_mode="moonlight",
    muon_matched_adamw_rms=0.2,
    muon_ns_dtype="bf16",
    muon_norm_weight_decay=True,
    muon_router_optimizer="adamw",
)
"""Moonlight's Muon settings (report sections 2.1-2.2, appendix D)."""

MOONLIGHT_WEIGHT_DECAY = 0.1


def moonlight_muon_optimizer_config(**fields: Any) -> MuonOptimizerConfig:
    """`MuonOptimizerConfig` with Moonlight's lr, weight decay, AdamW betas and Muon settings;
    `fields` override any `OptimizerConfig` field (or `muon`)."""
    values: dict[str, Any] = dict(
        optimizer="adam", lr=3e-4, min_lr=3e-5, weight_decay=MOONLIGHT_WEIGHT_DECAY,
        adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, clip_grad=1.0, bf16=True,
        use_distributed_optimizer=True, muon=dataclasses.replace(MOONLIGHT_MUON),
    )
    values.update(fields)
    return MuonOptimizerConfig(**values)


def moonlight_16b_muon_pretrain_config(**optimizer_fields: Any) -> Any:
    """Bridge's `moonlight_16b_pretrain_config()` (its `ConfigContainer`) with Muon: the
    optimizer is `moonlight_muon_optimizer_config(**optimizer_fields)` (Bridge's clip_grad and
    bf16 kept), the scheduler's weight decay Moonlight's. Needs Megatron-Bridge."""
    try:
        from megatron.bridge.recipes.moonlight import moonlight_16b_pretrain_config
    except ImportError as exc:
        raise ImportError(
            "moonlight_16b_muon_pretrain_config needs Megatron-Bridge "
            "(pip install megatron-bridge; Python >= 3.12)") from exc
    cfg = moonlight_16b_pretrain_config()
    adam = cfg.optimizer
    fields = dict(clip_grad=adam.clip_grad, bf16=adam.bf16, params_dtype=adam.params_dtype)
    fields.update(optimizer_fields)
    cfg.optimizer = moonlight_muon_optimizer_config(**fields)
    weight_decay = cfg.optimizer.weight_decay
    cfg.scheduler.start_weight_decay = cfg.scheduler.end_weight_decay = weight_decay
    cfg.scheduler.weight_decay_incr_style = "constant"
    return cfg
