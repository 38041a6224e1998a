"""`MuonConfig`: the single source of truth for every Muon knob.

Command-line flags (`muon_megatron.megatron_lm.arguments`), the single-device reference and the
distributed optimizer all read their defaults from here; nothing else writes a default.
Learning rate, weight decay and the schedule are *not* Muon knobs: they come from
Megatron's `OptimizerConfig` / scheduler, exactly as for AdamW (Moonlight's recipe reuses
AdamW's lr and wd thanks to update-RMS matching).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, get_args

__all__ = [
    "MuonConfig",
    "ScaleMode",
    "REFUSED_SCALE_MODES",
    "CoefficientSet",
    "NSDtype",
    "CommDtype",
    "RouterOptimizer",
]

ScaleMode = Literal["moonlight", "shape_scaling", "unit_rms_norm", "none"]
# Spellings refused with a message, never reinterpreted: "spectral" means sqrt(max(A, B)) in
# megatron-core and emerging-optimizers but meant sqrt(max(1, A/B)) in muon-megatron 0.1, so
# either reading would silently change somebody's launch script.
REFUSED_SCALE_MODES: dict[str, str] = {
    "spectral": (
        "muon_scale_mode='spectral' (--muon-scale-mode spectral) is ambiguous and refused. "
        "megatron-core's 'spectral' is sqrt(max(A, B)): write --muon-scale-mode moonlight "
        "--muon-matched-adamw-rms 1.0 (times --muon-extra-scale-factor, as in megatron-core). "
        "muon-megatron 0.1's 'spectral' was sqrt(max(1, A/B)): write --muon-scale-mode "
        "shape_scaling."
    ),
}
CoefficientSet = Literal["quintic", "polar_express"]
NSDtype = Literal["bf16", "fp32"]
CommDtype = Literal["fp32", "bf16"]
RouterOptimizer = Literal["adamw", "muon"]


def _knob(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class MuonConfig:
    """Muon hyper-parameters and layout options (all fields are `muon_*`)."""

    muon_momentum: float = _knob(
        0.95, "Momentum coefficient mu of the EMA buffer m <- mu*m + (1-mu)*g."
    )
    muon_nesterov: bool = _knob(
        True, "Use Nesterov momentum: orthogonalize (1-mu)*g + mu*m instead of m."
    )
    muon_ns_steps: int = _knob(5, "Number of Newton-Schulz iterations.")
    muon_coefficients: CoefficientSet = _knob(
        "quintic",
        "Newton-Schulz coefficients: 'quintic' (Keller Jordan / Moonlight 3.4445, -4.7750, "
        "2.0315 every step) or 'polar_express' (per-step table, arXiv 2505.16932).",
    )
    muon_scale_mode: ScaleMode = _knob(
        "moonlight",
        "Update scale for an A x B (out x in) matrix, times --muon-extra-scale-factor: "
        "'moonlight' = matched_adamw_rms*sqrt(max(A,B)) (matches AdamW's update RMS), "
        "'shape_scaling' = sqrt(max(1, A/B)), 'unit_rms_norm' = sqrt(A/B) (both as in "
        "megatron-core), 'none' = 1. 'spectral' is refused: it means different things in "
        "megatron-core and muon-megatron 0.1.",
    )
    muon_extra_scale_factor: float = _knob(
        1.0,
        "Extra multiplier of the update scale in every mode (megatron-core's "
        "--muon-extra-scale-factor, with its meaning).",
    )
    muon_matched_adamw_rms: float = _knob(
        0.2, "Target update RMS of the 'moonlight' scale mode (Moonlight uses 0.2)."
    )
    muon_ns_dtype: NSDtype = _knob(
        "bf16", "Compute dtype of the Newton-Schulz matmuls ('bf16' or 'fp32')."
    )
    muon_eps: float = _knob(1e-7, "Floor of the Frobenius norm used to normalize NS input.")
    muon_comm_dtype: CommDtype = _knob(
        "fp32",
        "Dtype of the momentum gather and update scatter ('bf16' halves the bytes; the "
        "momentum itself always stays fp32).",
    )
    muon_split_qkv: bool = _knob(
        True, "Orthogonalize Q, K and V of a fused linear_qkv weight as separate matrices."
    )
    muon_split_qkv_per_head: bool = _knob(
        False, "With --muon-split-qkv, split further into one matrix per attention head."
    )
    muon_split_fc1: bool = _knob(
        True, "With gated linear units (SwiGLU), orthogonalize fc1's gate and up separately."
    )
    muon_bucket_mb: float = _knob(
        64.0,
        "Upper bound (MiB of fp32, full matrices) on one bucket: one gather and one scatter "
        "each. Buckets are pipelined (bucket k+1's gather and bucket k-1's scatter overlap "
        "bucket k's Newton-Schulz), so a large model needs several; a matrix larger than "
        "the bound gets a bucket of its own.",
    )
    muon_split_mla: bool = _knob(
        False,
        "Orthogonalize MLA's linear_kv_up_proj as its K-nope and V matrices, and "
        "linear_q_proj / linear_q_up_proj as q-nope and q-rope (each over all heads). "
        "Default: every MLA projection as one whole matrix.",
    )
    muon_router_optimizer: RouterOptimizer = _knob(
        "adamw",
        "Optimizer of the MoE router weight [experts, hidden]: 'adamw' (DeepSeek-style, "
        "the default) or 'muon' (a Muon matrix, orthogonalized whole).",
    )
    muon_norm_weight_decay: bool = _knob(
        False,
        "Decay norm gammas (the weights of RMSNorm / LayerNorm) at the run's weight decay; "
        "Megatron leaves every 1-D param undecayed. Moonlight found it crucial for "
        "training stability (arXiv 2502.16982, appendix D). Biases stay undecayed.",
    )

    def __post_init__(self) -> None:
        if self.muon_scale_mode in REFUSED_SCALE_MODES:
            raise ValueError(REFUSED_SCALE_MODES[self.muon_scale_mode])
        _check_choice("muon_scale_mode", self.muon_scale_mode, ScaleMode)
        _check_choice("muon_coefficients", self.muon_coefficients, CoefficientSet)
        _check_choice("muon_ns_dtype", self.muon_ns_dtype, NSDtype)
        _check_choice("muon_comm_dtype", self.muon_comm_dtype, CommDtype)
        _check_choice("muon_router_optimizer", self.muon_router_optimizer, RouterOptimizer)
        if not 0.0 <= self.muon_momentum < 1.0:
            raise ValueError(
                f"muon_momentum={self.muon_momentum} is outside [0, 1); Moonlight uses 0.95."
            )
        if self.muon_ns_steps < 1:
            raise ValueError(f"muon_ns_steps={self.muon_ns_steps} must be >= 1 (default 5).")
        if not self.muon_extra_scale_factor > 0:
            raise ValueError(
                f"muon_extra_scale_factor={self.muon_extra_scale_factor} must be positive "
                "(default 1.0)."
            )
        if self.muon_bucket_mb <= 0:
            raise ValueError(f"muon_bucket_mb={self.muon_bucket_mb} must be positive.")

    @classmethod
    def from_namespace(cls, args) -> MuonConfig:
        """Build from an argparse namespace holding (at least) every `muon_*` field."""
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def _check_choice(name: str, value: str, choices_type) -> None:
    choices = get_args(choices_type)
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {choices}; pick one of those.")
