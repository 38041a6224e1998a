"""What `muon-megatron bench` runs: the layouts, the optimizers, the model and the targets.

Kept apart from the measuring ranks (`bench_rank`) and the report (`bench_report`), which
both read it; `muon_megatron.tools.bench` re-exports everything here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from muon_megatron.tools.mcore_muon import OURS_MATCHING

if TYPE_CHECKING:
    from muon_megatron.testing.tiny import ModelSpec

__all__ = [
    "DEFAULT_MODEL",
    "EXTRA_BYTES_PER_PARAM_X_DP",
    "LAYOUTS",
    "LAYOUT_WORLDS",
    "MCORE_MUON",
    "PREPARE_GRADS_TARGET",
    "TRANSIENT_BUCKETS_TARGET",
    "VS_MCORE_TARGETS",
    "NS_BALANCE_TARGET",
    "NS_COPIES_TARGET",
    "OPTIMIZERS",
    "BenchConfig",
    "expected_logical_shapes",
]

LAYOUTS: dict[str, dict[str, int]] = {
    "dp2": {},
    "tp2": {"tp": 2},
    "dp4": {},
    "tp2xdp2": {"tp": 2},
    "moe_ep2xdp2": {"ep": 2},
}
"""Dense data parallel on 2 and 4 ranks, TP2 on 2, TP2 x DP2, and an MoE with EP2 (expert
DP 2, dense DP 4). A layout whose name starts with `moe` runs the MoE model; its world size
is `LAYOUT_WORLDS` (one launch per world size)."""
LAYOUT_WORLDS: dict[str, int] = {"dp2": 2, "tp2": 2, "dp4": 4, "tp2xdp2": 4, "moe_ep2xdp2": 4}

MCORE_MUON = "mcore_muon"
"""megatron-core's own Muon (`tools.mcore_muon`) in the configuration that matches ours."""

OPTIMIZERS: dict[str, dict[str, Any] | None] = {
    "adamw": None,
    "muon": {"muon_ns_dtype": "bf16", "muon_comm_dtype": "bf16"},
    "muon_fp32comm": {"muon_ns_dtype": "bf16", "muon_comm_dtype": "fp32"},
    "muon_fp32": {"muon_ns_dtype": "fp32", "muon_comm_dtype": "fp32"},
    "muon_match": {
        k: v for k, v in dataclasses.asdict(OURS_MATCHING).items() if k != "muon_owner_bucket_mb"
    },
    MCORE_MUON: None,
}
"""Ours in four settings (`muon_match`: the configuration megatron-core's Muon runs too, fp32
Newton-Schulz), and megatron-core's own Muon (None: no MuonConfig; AdamW too)."""

# Issue 13's targets: ours / megatron-core's Muon step time, per layout.
VS_MCORE_TARGETS: dict[str, float] = {"tp2": 0.6, "tp2xdp2": 0.6, "dp2": 0.85}
PREPARE_GRADS_TARGET = 2.0  # Muon's prepare_grads time / AdamW's
TRANSIENT_BUCKETS_TARGET = 2.0  # peak transient bytes / the largest bucket's fp32 bytes

# Issue 7's targets.
EXTRA_BYTES_PER_PARAM_X_DP = 4.0  # bf16 gather + scatter: extra bytes per rank <= 4 B * N / DP
NS_COPIES_TARGET = 1.00
NS_BALANCE_TARGET = 1.15

DEFAULT_MODEL: dict[str, Any] = {
    "num_layers": 4,
    "hidden_size": 256,
    "num_attention_heads": 8,
    "num_query_groups": 4,
    "ffn_hidden_size": 1024,
    "moe_ffn_hidden_size": 256,
    "moe_router_topk": 2,
    "seq_length": 64,
    "bf16": True,
}
"""The benchmark's dense model, as `ModelSpec` fields (the rest are ModelSpec's defaults):
bf16 params with fp32 main params (Megatron's mixed precision). The MoE layouts add
`BenchConfig.num_experts` experts of `moe_ffn_hidden_size`."""


def _default_model() -> ModelSpec:
    # The harness imports megatron-core (seconds): only when a config is built.
    from muon_megatron.testing.tiny import ModelSpec

    return ModelSpec(**DEFAULT_MODEL)


@dataclass
class BenchConfig:
    """Model, layouts, optimizers and step counts of one benchmark run."""

    layouts: tuple[str, ...] = tuple(LAYOUTS)
    optimizers: tuple[str, ...] = tuple(OPTIMIZERS)
    model: ModelSpec = field(default_factory=_default_model)
    """The dense model (`num_experts` None); `model.bf16` False runs fp32 params."""
    num_experts: int = 8
    """Experts per layer of the MoE layouts: `model` with this many experts."""
    global_batch_size: int = 8
    warmup: int = 3
    steps: int = 20
    seed: int = 1234
    lr: float = 1e-3
    weight_decay: float = 0.1
    muon_owner_bucket_mb: float = 1.0
    """Small against the default model's 15.7 MB of fp32 Muon matrices (4-8 MB per owner on
    2-4 ranks), so that the step has several buckets to pipeline (a large model gets as many
    from MuonConfig's default)."""

    def __post_init__(self) -> None:
        if self.model.num_experts is not None:
            raise ValueError(
                f"BenchConfig.model has num_experts={self.model.num_experts}; it is the dense "
                "model: leave num_experts=None there and set BenchConfig(num_experts=N) for "
                "the MoE layouts."
            )

    def world_of(self, layout: str) -> int:
        """Ranks of `layout`'s launch."""
        return LAYOUT_WORLDS[layout]

    @property
    def bf16(self) -> bool:
        return self.model.bf16

    def model_spec(self, layout: str) -> ModelSpec:
        if layout.startswith("moe"):
            return dataclasses.replace(self.model, num_experts=self.num_experts)
        return self.model


def expected_logical_shapes(
    cfg: BenchConfig, layout: str, split_fc1: bool = True
) -> list[tuple[int, int]]:
    """One copy of every logical Muon matrix of the model, from its spec alone (Q, K, V,
    proj; gate and up (SwiGLU; one fc1 matrix without `split_fc1`), down per MLP or per
    expert); the router, embeddings, norms stay AdamW."""
    spec = cfg.model_spec(layout)
    h, heads, groups = spec.hidden_size, spec.num_attention_heads, spec.num_query_groups
    d = h // heads
    attention = [(heads * d, h), (groups * d, h), (groups * d, h), (h, heads * d)]
    f = spec.ffn_hidden_size if spec.num_experts is None else spec.moe_ffn_hidden_size
    fc1 = [(f, h), (f, h)] if not spec.swiglu or split_fc1 else [(2 * f, h)]
    mlp = (fc1 if spec.swiglu else [(f, h)]) + [(h, f)]
    return (attention + mlp * (spec.num_experts or 1)) * spec.num_layers
