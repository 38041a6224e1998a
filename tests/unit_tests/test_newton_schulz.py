"""Math of `muon_megatron.ops.newton_schulz` on CPU: singular-value bands, layout invariances,
bitwise parity with torch's Muon, coefficient tables, update scales and the elementwise
momentum / weight-decay formulas."""

from __future__ import annotations

import math

import pytest
import torch
from torch.optim._muon import _zeropower_via_newtonschulz

from muon_megatron.ops.newton_schulz import (
    POLAR_EXPRESS_COEFFICIENTS,
    QUINTIC_COEFFICIENTS,
    coefficient_schedule,
    newton_schulz,
)
from muon_megatron.ops.update import apply_update_, momentum_update_, nesterov_input, update_scale

SHAPES = [(64, 64), (96, 32), (32, 96)]
DTYPES = ["fp32", "bf16"]

# NS normalizes by the Frobenius norm, so an input singular value s enters as s / ||S||_2.
# Every test input keeps these above MIN_NORMALIZED_SV: below it 5 quintic steps cannot
# lift a direction to the band (the slope at 0 is 3.4445, 3.4445**5 ~ 486).
MIN_NORMALIZED_SV = 2e-3

# Band of the output singular values, per (coefficients, ns_steps). Exact arithmetic
# (iterating the scalar polynomials over sigma in [2e-3, 1]) gives quintic x5:
# [0.6818, 1.2024]; polar_express x5: [0.8703, 1.1236]; polar_express x8: [1 - 1e-15,
# 1 + 1e-15]. Measured on the inputs below in bf16 (the worse dtype): quintic x5
# [0.6772, 1.2034], polar_express x5 [0.8620, 1.1252], polar_express x8 [0.9962, 1.0050].
# Each band adds ~0.03-0.05 of margin for bf16 round-off over other seeds.
SV_BANDS: dict[tuple[str, int], tuple[float, float]] = {
    ("quintic", 5): (0.65, 1.25),
    ("polar_express", 5): (0.84, 1.15),
    ("polar_express", 8): (0.98, 1.02),
}

# Relative Frobenius distance allowed between two evaluations of NS that are equal in exact
# arithmetic but round differently (a transposed square input, bmm vs mm). Per dtype, about
# ten unit round-offs (two rounded matmuls per step, five steps), which NS's slope may
# amplify: measured max over 20 seeds is 1.8e-6 (fp32) and 1.9e-2 (bf16).
NS_REORDER_REL_TOL = {"fp32": 1e-5, "bf16": 5e-2}


def _spectrum_matrix(rows: int, cols: int, cond: float, gen: torch.Generator) -> torch.Tensor:
    """A random rows x cols matrix whose singular values are log-spaced in [1/cond, 1]."""
    u, _ = torch.linalg.qr(torch.randn(rows, rows, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=gen, dtype=torch.float64))
    k = min(rows, cols)
    s = torch.logspace(0.0, -math.log10(cond), k, dtype=torch.float64)
    return ((u[:, :k] * s) @ v[:, :k].T).float()


def _inputs(rows: int, cols: int) -> list[torch.Tensor]:
    """Gaussian (non-square only: a square Gaussian has near-zero singular values) and
    condition-number-100 inputs, each checked against MIN_NORMALIZED_SV."""
    gen = torch.Generator().manual_seed(rows * 1000 + cols)
    xs = [_spectrum_matrix(rows, cols, 100.0, gen) for _ in range(3)]
    if rows != cols:
        xs += [torch.randn(rows, cols, generator=gen) for _ in range(3)]
    for x in xs:
        s = torch.linalg.svdvals(x.double())
        assert (s.min() / s.norm()).item() >= MIN_NORMALIZED_SV, "test input too ill-conditioned"
    return xs


def _rel_dist(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("coefficients,steps", list(SV_BANDS), ids=lambda v: str(v))
def test_singular_values_in_band(coefficients: str, steps: int, shape, dtype: str) -> None:
    lo, hi = SV_BANDS[coefficients, steps]
    for x in _inputs(*shape):
        out = newton_schulz(x, steps, coefficients, dtype)
        assert out.shape == x.shape
        assert out.dtype == (torch.bfloat16 if dtype == "bf16" else torch.float32)
        s = torch.linalg.svdvals(out.double())
        assert lo <= s.min().item() and s.max().item() <= hi, (s.min().item(), s.max().item())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("coefficients", ["quintic", "polar_express"])
def test_batched_equals_per_matrix(coefficients: str, dtype: str) -> None:
    gen = torch.Generator().manual_seed(0)
    for shape in SHAPES + [(3, 5)]:
        x_bmn = torch.randn(4, *shape, generator=gen)
        batched = newton_schulz(x_bmn, 5, coefficients, dtype)
        single = torch.stack([newton_schulz(x, 5, coefficients, dtype) for x in x_bmn])
        if dtype == "bf16":
            # Measured bitwise on CPU: bf16 bmm and mm round each output element alike.
            torch.testing.assert_close(batched, single, rtol=0, atol=0)
        else:
            # fp32 bmm and mm block the reductions differently (measured up to 3e-6 abs).
            for b, s in zip(batched, single):
                assert _rel_dist(b, s) <= NS_REORDER_REL_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_transposition_commutes(shape, dtype: str) -> None:
    for x in _inputs(*shape):
        of_transpose = newton_schulz(x.T, 5, "quintic", dtype)
        transposed = newton_schulz(x, 5, "quintic", dtype).T
        if shape[0] != shape[1]:
            # A tall input is transposed to wide first, so both run identical arithmetic.
            torch.testing.assert_close(of_transpose, transposed, rtol=0, atol=0)
        else:
            assert _rel_dist(of_transpose, transposed) <= NS_REORDER_REL_TOL[dtype]


@pytest.mark.parametrize("shape", SHAPES + [(256, 128), (128, 512)], ids=str)
def test_quintic_bf16_bitwise_equal_to_torch(shape) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    ours = newton_schulz(x, 5, "quintic", "bf16", eps=1e-7)
    theirs = _zeropower_via_newtonschulz(x, QUINTIC_COEFFICIENTS, 5, 1e-7)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_newton_schulz_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="matrix"):
        newton_schulz(torch.ones(4))
    with pytest.raises(ValueError, match="fp16"):
        newton_schulz(torch.ones(4, 4), dtype="fp16")


def test_quintic_schedule_repeats() -> None:
    assert QUINTIC_COEFFICIENTS == (3.4445, -4.7750, 2.0315)
    assert coefficient_schedule("quintic", 7) == [QUINTIC_COEFFICIENTS] * 7


def test_polar_express_table() -> None:
    # Paper's (arXiv 2505.16932) first and last degree-5 polynomials, before the safety factor.
    first = (8.28721201814563, -23.595886519098837, 17.300387312530933)
    assert len(POLAR_EXPRESS_COEFFICIENTS) == 8
    a, b, c = first
    assert POLAR_EXPRESS_COEFFICIENTS[0] == (a / 1.01, b / 1.01**3, c / 1.01**5)
    # The last polynomial has 1 as fixed point and is kept unshrunk.
    assert POLAR_EXPRESS_COEFFICIENTS[-1] == (1.875, -1.25, 0.375)
    assert sum(POLAR_EXPRESS_COEFFICIENTS[-1]) == 1.0
    schedule = coefficient_schedule("polar_express", 11)
    assert schedule[:8] == list(POLAR_EXPRESS_COEFFICIENTS)
    assert schedule[8:] == [POLAR_EXPRESS_COEFFICIENTS[-1]] * 3
    assert coefficient_schedule("polar_express", 5) == list(POLAR_EXPRESS_COEFFICIENTS[:5])


def test_coefficient_schedule_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="'cubic'"):
        coefficient_schedule("cubic", 5)
    with pytest.raises(ValueError, match="ns_steps=0"):
        coefficient_schedule("quintic", 0)


def test_update_scale_documented_values() -> None:
    assert update_scale("moonlight", 1024, 4096) == 0.2 * 64 == 12.8
    assert update_scale("moonlight", 4096, 1024, matched_adamw_rms=0.25) == 16.0
    # megatron-core's names with megatron-core's meaning (emerging_optimizers'
    # get_muon_scale_factor(size_out, size_in, mode)).
    assert update_scale("shape_scaling", 4096, 1024) == 2.0
    assert update_scale("shape_scaling", 1024, 4096) == 1.0
    assert update_scale("unit_rms_norm", 1024, 4096) == 0.5
    assert update_scale("unit_rms_norm", 4096, 1024) == 2.0
    assert update_scale("none", 4096, 1024) == 1.0
    # The extra factor multiplies every mode (megatron-core's muon_extra_scale_factor); 0.2
    # on top of sqrt(max(A, B)) is exactly the moonlight scale.
    assert update_scale("moonlight", 1024, 4096, 1.0, extra_scale_factor=0.2) == 0.2 * 64
    assert update_scale("shape_scaling", 4096, 1024, extra_scale_factor=0.5) == 1.0
    with pytest.raises(ValueError, match="unit_rms_norm"):
        update_scale("spectral", 4, 4)
    with pytest.raises(ValueError, match="'adam'"):
        update_scale("adam", 4, 4)


# Dyadic inputs (mu = 3/4, lr = 1/2, ...) make every formula exact in fp32, so the tests
# below compare against the documented formula with rtol=0, atol=0.
def _dyadic(seed: int) -> torch.Tensor:
    return torch.randint(-64, 64, (8, 6), generator=torch.Generator().manual_seed(seed)) / 16.0


def test_momentum_update_formula() -> None:
    buf, grad, mu = _dyadic(0), _dyadic(1), 0.75
    expected = mu * buf + (1 - mu) * grad
    out = momentum_update_(buf, grad, mu)
    assert out.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(buf, expected, rtol=0, atol=0)


def test_nesterov_input_formula() -> None:
    buf, grad, mu = _dyadic(2), _dyadic(3), 0.75
    torch.testing.assert_close(
        nesterov_input(grad, buf, mu, nesterov=True), (1 - mu) * grad + mu * buf, rtol=0, atol=0
    )
    assert nesterov_input(grad, buf, mu, nesterov=False) is buf


def test_apply_update_formula() -> None:
    param, update = _dyadic(4), _dyadic(5)
    lr, wd, scale = 0.5, 0.25, 2.0
    expected = param * (1 - lr * wd) - lr * scale * update
    out = apply_update_(param, update, lr, wd, scale)
    assert out.data_ptr() == param.data_ptr()
    torch.testing.assert_close(param, expected, rtol=0, atol=0)
