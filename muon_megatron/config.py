"""`MuonConfig`: the single source of truth for every Muon knob.

Command-line flags (`muon_megatron.megatron_lm.arguments`), the single-device reference and the
distributed optimizer all read their defaults from here; nothing else writes a default.
Learning rate, weight decay and the schedule are *not* Muon knobs: they come from
Megatron's `OptimizerConfig` / scheduler, exactly as for AdamW (Moonlight's recipe reuses
AdamW's lr and wd thanks to update-RMS matching).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

__all__ = [
    "MuonConfig",
    "ScaleMode",
    "REFUSED_SCALE_MODES",
    "CoefficientSet",
    "NSDtype",
    "CommDtype",
    "RouterOptimizer",
    "Bounds",
    "NamePatterns",
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
NamePatterns = tuple[str, ...]
"""Shell-style patterns (`fnmatch.fnmatchcase`) matched against a parameter's whole name,
without the `module.` prefixes of megatron's wrappers (`decoder.layers.0.mlp.linear_fc1.weight`;
under pipeline parallelism the layer numbers are each stage's own, from 0)."""


@dataclass(frozen=True)
class Bounds:
    """The finite values a numeric `MuonConfig` field accepts, from `low` to `high` (each end
    included unless marked open), and `why`: what the bounds come from, said in the error
    that refuses a value outside them (docs/flags.md shows the range)."""

    low: float
    high: float
    why: str
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        return (
            f"{'(' if self.low_open else '['}{self.low:g}, "
            f"{self.high:g}{')' if self.high_open else ']'}"
        )


def _knob(default, help: str, bounds: Bounds | None = None, moonlight: bool = False):
    """A `MuonConfig` field: its default, help text (the flag's), the `Bounds` of a numeric
    field, and whether the default is Moonlight's recipe (errors then say so)."""
    return field(
        default=default, metadata={"help": help, "bounds": bounds, "moonlight": moonlight}
    )


@dataclass(frozen=True)
class MuonConfig:
    """Muon hyper-parameters and layout options (all fields are `muon_*`), every one checked
    when the config is built: numbers against their `Bounds`, choices against their
    `Literal`, bools as bools. Frozen, so that no field changes after the check (use
    `dataclasses.replace`, which checks again)."""

    muon_momentum: float = _knob(
        0.95,
        "Momentum coefficient mu of the EMA buffer m <- mu*m + (1-mu)*g.",
        Bounds(
            0.0,
            1.0,
            "mu is the weight of the old momentum in m <- mu*m + (1-mu)*g: at 1 no gradient "
            "ever enters it, above 1 it grows without bound, below 0 it flips sign every step",
            high_open=True,
        ),
        moonlight=True,
    )
    muon_nesterov: bool = _knob(
        True,
        "Use Nesterov momentum: orthogonalize (1-mu)*g + mu*m instead of m.",
        moonlight=True,
    )
    muon_ns_steps: int = _knob(
        5,
        "Number of Newton-Schulz iterations.",
        Bounds(
            1,
            100,
            "one iteration is the least that orthogonalizes at all; after about 10 the "
            "singular values are as close to 1 as the coefficients take them (Polar "
            "Express's table has 8 polynomials, then repeats its last; the quintic stays in "
            "its band), and each one costs three matmuls per matrix, so beyond 100 (20 times "
            "Moonlight's work) more iterations only multiply the optimizer's cost",
        ),
        moonlight=True,
    )
    muon_coefficients: CoefficientSet = _knob(
        "quintic",
        "Newton-Schulz coefficients: 'quintic' (Keller Jordan / Moonlight 3.4445, -4.7750, "
        "2.0315 every step) or 'polar_express' (per-step table, arXiv 2505.16932).",
        moonlight=True,
    )
    muon_scale_mode: ScaleMode = _knob(
        "moonlight",
        "Update scale for an A x B (out x in) matrix, times --muon-extra-scale-factor: "
        "'moonlight' = matched_adamw_rms*sqrt(max(A,B)) (matches AdamW's update RMS), "
        "'shape_scaling' = sqrt(max(1, A/B)), 'unit_rms_norm' = sqrt(A/B) (both as in "
        "megatron-core), 'none' = 1. 'spectral' is refused: it means different things in "
        "megatron-core and muon-megatron 0.1.",
        moonlight=True,
    )
    muon_extra_scale_factor: float = _knob(
        1.0,
        "Extra multiplier of the update scale in every mode (megatron-core's "
        "--muon-extra-scale-factor, with its meaning).",
        Bounds(
            0.0,
            1000.0,
            "it multiplies the update in every scale mode: 0 freezes every Muon weight and a "
            "negative factor steps uphill; above 1000 (an update 1000 times the mode's own, "
            "which no ordinary learning rate trains with) it is a typo rather than a setting, "
            "and far above it the update overflows fp32 / bf16 to inf",
            low_open=True,
        ),
        moonlight=True,
    )
    muon_matched_adamw_rms: float = _knob(
        0.2,
        "Target update RMS of the 'moonlight' scale mode (Moonlight uses 0.2).",
        Bounds(
            0.0,
            10.0,
            "it is the RMS the 'moonlight' mode gives the update per unit lr: 0 freezes every "
            "Muon weight and a negative value steps uphill; AdamW's update RMS is about 0.2 "
            "and Adam's step |m/sqrt(v)| stays below 7.3 elementwise (betas 0.9, 0.999), so "
            "above 10 it matches no AdamW (for a larger step, use --muon-extra-scale-factor)",
            low_open=True,
        ),
        moonlight=True,
    )
    muon_ns_dtype: NSDtype = _knob(
        "bf16", "Compute dtype of the Newton-Schulz matmuls ('bf16' or 'fp32').", moonlight=True
    )
    muon_eps: float = _knob(
        1e-7,
        "Floor of the Frobenius norm used to normalize NS input.",
        Bounds(
            1e-12,
            1e-3,
            "it stands in for the norm where the computed norm is too small to divide by: a "
            "momentum whose entries are below ~1e-19 has squares that underflow in fp32 / "
            "bf16, so its computed norm is 0 however many entries it has, and dividing by a "
            "floor under 1e-12 blows it past what Newton-Schulz can take (inf / NaN weights; "
            "1e-12 keeps it below norm 1 up to 1e9 elements, even with flush-to-zero); above "
            "1e-3 it exceeds ordinary momentum norms and scales their updates down instead",
        ),
        moonlight=True,
    )
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
    muon_owner_bucket_mb: float = _knob(
        32.0,
        "Upper bound (MiB of fp32 full matrices) on what each owner orthogonalizes in one "
        "bucket. A bucket is a round of the whole grid (one exchange each way): every owner "
        "does about the same share of its Newton-Schulz work in every bucket, so the number "
        "of buckets grows with the work per owner, not with the grid; buckets are pipelined. "
        "A matrix larger than the bound gets a bucket of its own.",
        Bounds(
            0.0,
            math.inf,
            "it is a size in MiB: a positive, finite number (a small one is valid, only "
            "slower: a matrix larger than the bound gets a bucket of its own)",
            low_open=True,
            high_open=True,
        ),
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

    muon_include: NamePatterns = _knob(
        (),
        "Send the parameters whose name matches this pattern to Muon (shell-style, fnmatch, "
        "on the whole name without 'module.' prefixes, e.g. 'decoder.layers.*.mlp.router.weight'"
        "); each must be a 2-D weight. Repeat the flag for more patterns.",
    )
    muon_exclude: NamePatterns = _knob(
        (),
        "Send the parameters whose name matches this pattern to AdamW (as --muon-include, "
        "e.g. '*.linear_kv_down_proj.weight'). A parameter matched by both flags is refused.",
    )
    muon_print_routing: bool = _knob(
        False,
        "At rank 0, when the optimizer is built, print one line per parameter (optimizer, "
        "why, logical matrices, TP layout) after the routing table's one line per kind.",
    )

    def __post_init__(self) -> None:
        """Refuse, naming the value, the allowed values and the default: a wrong type
        (TypeError; a bool is not a number here, nor a number a bool) or a value outside
        the field's choices or `Bounds` (ValueError; NaN and inf are outside every range)."""
        hints = _field_types()
        for f in dataclasses.fields(self):
            _check_field(f, hints[f.name], getattr(self, f.name))

        both = sorted(set(self.muon_include) & set(self.muon_exclude))
        if both:
            raise ValueError(
                f"muon_include={self.muon_include!r} and muon_exclude={self.muon_exclude!r} "
                f"(--muon-include / --muon-exclude) both hold {both}: a parameter cannot go "
                "to Muon and to AdamW; drop it from one."
            )

    @classmethod
    def from_namespace(cls, args) -> MuonConfig:
        """Build from an argparse namespace holding (at least) every `muon_*` field."""
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


@functools.cache
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(MuonConfig)


def _default_text(f: dataclasses.Field) -> str:
    whose = "Moonlight's value, the default," if f.metadata["moonlight"] else "The default"
    return f"{whose} is {f.default!r}."


def _check_field(f: dataclasses.Field, hint: Any, value: Any) -> None:
    flag = "--" + f.name.replace("_", "-")
    named = f"{f.name}={value!r} ({flag})"
    if hint is bool:
        if not isinstance(value, bool):
            raise TypeError(
                f"{named} is of type {type(value).__name__}; pass True or False. "
                f"{_default_text(f)}"
            )
        return
    if typing.get_origin(hint) is Literal:
        choices = get_args(hint)
        if not isinstance(value, str):
            raise TypeError(
                f"{named} is of type {type(value).__name__}; pass one of {choices}. "
                f"{_default_text(f)}"
            )
        if f.name == "muon_scale_mode" and value in REFUSED_SCALE_MODES:
            raise ValueError(REFUSED_SCALE_MODES[value])
        if value not in choices:
            raise ValueError(
                f"{named} is not one of {choices}; pick one of those. {_default_text(f)}"
            )
        return
    if hint == NamePatterns:
        _check_patterns(named, value)
        return
    bounds: Bounds | None = f.metadata["bounds"]
    if hint not in (int, float) or bounds is None:
        raise TypeError(
            f"MuonConfig.{f.name} ({hint}) has no check: make it a bool, a Literal of str, "
            "NamePatterns, or an int / float with Bounds."
        )
    number = numbers.Integral if hint is int else numbers.Real
    kind = "an int" if hint is int else "a number"
    allowed = f"{kind} in {bounds}"
    if isinstance(value, bool) or not isinstance(value, number):
        raise TypeError(
            f"{named} is of type {type(value).__name__}; pass {allowed}. {_default_text(f)}"
        )
    if value not in bounds:
        raise ValueError(
            f"{named} is outside the allowed range: pass {allowed} (finite), because "
            f"{bounds.why}. {_default_text(f)}"
        )


def _check_patterns(named: str, value: Any) -> None:
    """A tuple of non-empty name patterns, each given once."""
    if not isinstance(value, tuple) or not all(isinstance(p, str) for p in value):
        raise TypeError(
            f"{named} is not a tuple of str; pass name patterns as a tuple, e.g. "
            "('*.linear_kv_down_proj.weight',). The default is ()."
        )
    bad = [p for p in value if not p.strip() or p != p.strip()]
    if bad:
        raise ValueError(
            f"{named}: the patterns {bad} are empty or start / end with whitespace, which no "
            "parameter name has; write the name pattern alone (fnmatch, e.g. "
            "'*.linear_proj.weight'). The default is ()."
        )
    if len(set(value)) != len(value):
        raise ValueError(f"{named} repeats a pattern; give each once. The default is ().")
