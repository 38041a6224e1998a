"""Newton-Schulz orthogonalization on plain tensors, and its coefficient tables.

This module (like `ops.update`) never imports `torch.distributed`: the distributed
optimizer only moves tensors around and calls these functions, and the single-device
reference calls the same ones, so every layout is compared against one definition of the
arithmetic.

The Newton-Schulz loop mirrors `torch.optim._muon._zeropower_via_newtonschulz`
operation for operation (cast, transpose-if-tall, normalize, `addmm` twice per step) so
that with the quintic coefficients in bf16 it is the same arithmetic as torch's Muon.
"""

from __future__ import annotations

import torch

from muon_megatron.config import CoefficientSet, NSDtype

__all__ = [
    "QUINTIC_COEFFICIENTS",
    "POLAR_EXPRESS_COEFFICIENTS",
    "coefficient_schedule",
    "newton_schulz",
    "ns_flops",
    "DTYPES",
]

# Keller Jordan's quintic, used unchanged by Moonlight and torch.optim.Muon.
QUINTIC_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)

# Polar Express, degree 5 (Amsel, Persson, Musco, Gower 2025, arXiv 2505.16932, Alg. 1):
# one polynomial per step; after the table the last polynomial repeats. Every polynomial but
# the last is shrunk by the paper's safety factor 1.01 so bf16 round-off cannot push a
# singular value past the interval the polynomial was fitted on.
_POLAR_EXPRESS_RAW: tuple[tuple[float, float, float], ...] = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
_PE_SAFETY = 1.01
POLAR_EXPRESS_COEFFICIENTS: tuple[tuple[float, float, float], ...] = tuple(
    (a / _PE_SAFETY, b / _PE_SAFETY**3, c / _PE_SAFETY**5) for a, b, c in _POLAR_EXPRESS_RAW[:-1]
) + (_POLAR_EXPRESS_RAW[-1],)

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp32": torch.float32}
"""torch dtype of each `NSDtype` name (Newton-Schulz and communication dtypes)."""


def coefficient_schedule(name: CoefficientSet, steps: int) -> list[tuple[float, float, float]]:
    """The (a, b, c) used at each of `steps` Newton-Schulz iterations."""
    if steps < 1:
        raise ValueError(f"ns_steps={steps} must be >= 1.")
    if name == "quintic":
        return [QUINTIC_COEFFICIENTS] * steps
    if name == "polar_express":
        table = list(POLAR_EXPRESS_COEFFICIENTS)
        return table[:steps] + [table[-1]] * max(0, steps - len(table))
    raise ValueError(
        f"ns_coefficients={name!r} is unknown; use 'quintic' or 'polar_express'."
    )


def newton_schulz(
    x: torch.Tensor,
    steps: int = 5,
    coefficients: CoefficientSet = "quintic",
    dtype: NSDtype = "bf16",
    eps: float = 1e-7,
) -> torch.Tensor:
    """Approximately orthogonalize `x` (shape [..., A, B]): U S V^T -> U S' V^T, S' ~ 1.

    Tall matrices are transposed so the Gram matrix is the smaller side. The input is
    normalized by its Frobenius norm (an upper bound of the spectral norm), so every
    singular value starts in (0, 1]. Returns a tensor of the compute dtype; callers cast.
    """
    if x.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix or a batch of matrices, got {x.shape}.")
    if dtype not in DTYPES:
        raise ValueError(f"ns dtype={dtype!r} is unknown; use 'bf16' or 'fp32'.")
    schedule = coefficient_schedule(coefficients, steps)
    tall = x.size(-2) > x.size(-1)
    out = x.to(DTYPES[dtype])
    if tall:
        out = out.mT
    norm = out.norm(dim=(-2, -1), keepdim=True)
    if coefficients == "polar_express":
        norm = norm * _PE_SAFETY
    out = out / norm.clamp(min=eps)
    for a, b, c in schedule:
        gram = out @ out.mT
        if out.ndim == 2:
            poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
            out = torch.addmm(out, poly, out, beta=a)
        else:
            poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
            out = torch.baddbmm(out, poly, out, beta=a)
    return out.mT if tall else out


def ns_flops(rows: int, cols: int, steps: int) -> int:
    """Matmul FLOPs of `steps` Newton-Schulz iterations on one rows x cols matrix.

    Per step with n = min, m = max: gram (2 n^2 m), poly (2 n^3), update (2 n^2 m).
    """
    n, m = min(rows, cols), max(rows, cols)
    return steps * (4 * n * n * m + 2 * n**3)
