"""Moonlight's gate scaling factor (arXiv 2502.16982, appendix C, figure 6).

Moonlight scales the routed experts' output by 2.446 for 64 experts top-6 "to control a
similar output rms like dense models" (DeepSeek-V3 used 2.5, DeepSeek-V2-Lite none). The
report computes it by Monte Carlo: draw Gaussian router logits, take the top-k sigmoid
scores, renormalize them to sum to 1 (`p`), and average 1 / ||p||_2 over the draws. With k
equally weighted, independent expert outputs of RMS r, the combination sum_i p_i y_i has RMS
r ||p||_2, so 1 / ||p||_2 is the factor that brings it back to r; it is sqrt(k) when the k
scores are equal and a little less otherwise (sqrt(6) = 2.449).

In Megatron the factor is `--moe-router-topk-scaling-factor` (megatron-core's
`moe_router_topk_scaling_factor`, applied to the normalized top-k probabilities); the
training entry also takes `--moe-router-topk-scaling-factor moonlight`, which computes it
here for the run's `--num-experts` and `--moe-router-topk`.
"""

from __future__ import annotations

import torch

__all__ = ["GATE_SCALING_SAMPLES", "gate_scaling_factor", "gate_scaling_samples"]

GATE_SCALING_SAMPLES = 200_000
"""Monte Carlo draws: the mean's standard error is then ~5e-6 for 64 experts top-6 (the
per-draw standard deviation is ~2.3e-3), a hundred times below the published figure's
rounding (2.446 has three decimals)."""


def gate_scaling_samples(
    num_experts: int, topk: int, samples: int, *, seed: int = 0
) -> torch.Tensor:
    """1 / ||p||_2 for `samples` draws of the report's procedure (float64, [samples])."""
    if num_experts < 1 or not 1 <= topk <= num_experts:
        raise ValueError(
            f"gate_scaling_factor(num_experts={num_experts}, topk={topk}): need "
            "1 <= topk <= num_experts; pass the run's --num-experts and --moe-router-topk."
        )
    if samples < 1:
        raise ValueError(f"samples={samples} must be >= 1 (default {GATE_SCALING_SAMPLES}).")
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(samples, num_experts, generator=generator, dtype=torch.float64)
    top = torch.sigmoid(logits).topk(topk, dim=-1).values
    p = top / top.sum(dim=-1, keepdim=True)
    return p.square().sum(dim=-1).rsqrt()


def gate_scaling_factor(
    num_experts: int, topk: int, samples: int = GATE_SCALING_SAMPLES, *, seed: int = 0
) -> float:
    """Moonlight's gate scaling factor for `topk` of `num_experts` sigmoid-scored experts
    (deterministic for a seed; about 2.446 for 64 experts top-6)."""
    return float(gate_scaling_samples(num_experts, topk, samples, seed=seed).mean())
