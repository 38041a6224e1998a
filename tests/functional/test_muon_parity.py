"""ZeRO-1 Muon vs the single-device reference, over real multi-process layouts (gloo, CPU).

Each layout runs `muon_megatron.tools.verify.run_verify`: the distributed optimizer trains a
tiny GPT from saved initial weights on deterministic global batches (every DP rank its own
slice, DP gradients really reduced by Megatron's DDP), a world-1 process replays the same
batches with `reference.Muon`, and every tensor's total update is compared.
"""

from __future__ import annotations

from collections import Counter

import pytest

from muon_megatron.config import MuonConfig
from muon_megatron.runtime.launch import spawn
from muon_megatron.testing import tiny
from muon_megatron.tools.verify import (
    BF16_TENSOR_TOLERANCE,
    BF16_TOLERANCE,
    NOISE_CEILING,
    VerifySpec,
    run_verify,
)

STEPS = 5
# name -> (TP, DP)
LAYOUTS: dict[str, tuple[int, int]] = {
    "world1": (1, 1),
    "dp2": (1, 2),
    "dp4": (1, 4),
    "tp2": (2, 1),
    "tp2xdp2": (2, 2),
}
# Issue target for the update RMS in 'moonlight' mode: 0.2 within 5%.
RMS_TARGET, RMS_REL_TOL = 0.2, 0.05


@pytest.fixture(scope="module", params=list(LAYOUTS))
def fp32_run(request) -> dict:
    tp, dp = LAYOUTS[request.param]
    spec = VerifySpec(layout=tiny.Layout(tp=tp), dp=dp, steps=STEPS)
    return run_verify(spec, MuonConfig(muon_ns_dtype="fp32"))


def test_fp32_parity_with_reference(fp32_run: dict, assert_fp32_parity) -> None:
    """Each family within NOISE_GAIN x the run's own measured fp32 noise (floor
    FP32_TOLERANCE, ceiling NOISE_CEILING: verify.py says why)."""
    assert_fp32_parity(fp32_run)
    assert len(fp32_run["dist_losses"]) == STEPS


def test_noise_gauge_measures_reordering_noise() -> None:
    """The gauge the fp32 tolerances come from: the reference retrained with another
    micro-batching differs from itself by fp32 round-off only (small, but not zero: the
    sums really were reordered), in both families."""
    result = run_verify(VerifySpec(dp=2, steps=2), MuonConfig(muon_ns_dtype="fp32"))
    for family, noise in result["noise_diffs"].items():
        assert 0.0 < noise < NOISE_CEILING, (family, noise)


@pytest.mark.parametrize("ns_dtype", ["fp32", "bf16"])
def test_world1_is_bitwise_equal_to_reference(ns_dtype: str) -> None:
    """Same arithmetic, same bits: one process, same micro-batching, no clipping. (With
    clipping, Megatron sums the squared grad norms in its shard order and the reference in
    parameter order: a different rounding of the clip coefficient, covered by the
    tolerance of the other tests.)"""
    result = run_verify(VerifySpec(steps=STEPS, clip_grad=0.0), MuonConfig(muon_ns_dtype=ns_dtype))
    assert result["max_rel_diff"] == 0.0, (result["worst_param"], result["max_rel_diff"])
    assert result["dist_losses"] == result["ref_losses"]


def test_newton_schulz_runs_once_per_logical_matrix(fp32_run: dict) -> None:
    """Summed over all ranks, every logical matrix of the optimizers' plan went through
    Newton-Schulz exactly once per step, and nothing else did; the plan holds as many
    logical matrices as the reference counts on one device, independently."""
    counted: Counter = Counter()
    for per_rank in fp32_run["ns_counts_per_rank"]:
        counted.update(per_rank)
    planned = set().union(*fp32_run["planned_matrices_per_rank"])
    assert len(planned) == fp32_run["ref_logical_matrices"]
    assert counted == Counter({key: STEPS for key in planned})


def _assert_bf16_parity(result: dict) -> None:
    """Each family within BF16_TOLERANCE, and every tensor within BF16_TENSOR_TOLERANCE (one
    wholly wrong small tensor barely moves its family; verify.py gives both figures)."""
    assert result["max_rel_diff"] <= BF16_TOLERANCE, (result["worst_param"], result["max_rel_diff"])
    for name, diff in result["diffs"].items():
        assert diff <= BF16_TENSOR_TOLERANCE, (name, diff)


def test_bf16_newton_schulz_parity() -> None:
    spec = VerifySpec(layout=tiny.Layout(tp=2), dp=2, steps=STEPS)
    _assert_bf16_parity(run_verify(spec, MuonConfig(muon_ns_dtype="bf16")))


def test_bf16_communication_parity() -> None:
    cfg = MuonConfig(muon_ns_dtype="fp32", muon_comm_dtype="bf16")
    _assert_bf16_parity(run_verify(VerifySpec(dp=2, steps=STEPS), cfg))


def test_moonlight_scaling_gives_every_full_rank_update_an_rms_of_0_2() -> None:
    """0.2 * sqrt(max(A, B)) gives an orthogonal A x B update an RMS of exactly 0.2 (the RMS
    Moonlight reports for AdamW's updates; AdamW itself is not run here).

    Polar Express drives every singular value to ~1 (band 0.86-1.13 at 5 steps), so each
    matrix whose momentum is full rank lands within 5% of 0.2 (measured 0.196-0.201).
    linear_proj is the exception: at init attention is near-uniform, its input (the
    attention output) is nearly rank-deficient, and singular values near 0 stay near 0, so
    its RMS is lower (measured 0.170 at step 2, 0.186 at step 10); it must still never
    exceed the target. Keller Jordan's quintic lands at ~0.18 (see docs/design.md)."""
    cfg = MuonConfig(muon_ns_dtype="fp32", muon_coefficients="polar_express")
    result = run_verify(VerifySpec(dp=2, steps=2), cfg)
    rms = result["update_rms"]
    assert len(rms) == 8  # 2 layers x (qkv, proj, fc1, fc2), each reported by its owner
    for name, value in rms.items():
        assert value <= RMS_TARGET * (1 + RMS_REL_TOL), (name, value)
        if not name.endswith("linear_proj.weight"):
            assert abs(value - RMS_TARGET) <= RMS_REL_TOL * RMS_TARGET, (name, value)


def _force_norm_into_muon(rank: int, world: int) -> str:
    from muon_megatron.optimizer.builder import get_muon_optimizer
    from muon_megatron.testing import tiny

    layout = tiny.Layout()
    tiny.initialize_parallel(layout, seed=0)
    model = tiny.build_model(tiny.ModelSpec(), layout)
    try:
        get_muon_optimizer(tiny.optimizer_config(), model, is_muon=lambda name, p: True)
    except ValueError as err:
        return str(err)
    return "no error"


def test_non_matrix_forced_into_muon_is_rejected() -> None:
    message = spawn(_force_norm_into_muon, 1)[0]
    assert "Muon needs a 2-D parameter" in message and "is_muon return False" in message, message


def test_unsupported_configs_are_rejected() -> None:
    from megatron.core.optimizer import OptimizerConfig

    from muon_megatron.optimizer.builder import check_supported

    with pytest.raises(ValueError, match="fp16=True.*--bf16"):
        check_supported(
            OptimizerConfig(optimizer="muon", fp16=True, use_distributed_optimizer=True)
        )
    with pytest.raises(ValueError, match="use-distributed-optimizer"):
        check_supported(OptimizerConfig(optimizer="muon", use_distributed_optimizer=False))
    with pytest.raises(ValueError, match="optimizer='sgd'"):
        check_supported(OptimizerConfig(optimizer="sgd", use_distributed_optimizer=True))
