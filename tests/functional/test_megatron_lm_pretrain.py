"""Megatron-LM's own, unmodified `pretrain_gpt.py` with `--optimizer muon`, end to end on CPU.

Every run is the command a user types (`torchrun ... -m muon_megatron.megatron_lm
pretrain_gpt.py --optimizer muon --use-distributed-optimizer ...`, see
`muon_megatron.testing.megatron_lm_run`): a tiny GPT on mock data over gloo, 10 iterations,
`--ckpt-format torch_dist` checkpoints at iteration 5 and 10. The runs are module-scoped and
shared between tests; a test only reads their logs and checkpoints.

Comparisons use the loss strings Megatron-LM prints (7 significant digits). Two resumes in
the same layout do the same arithmetic, so their printed values must be equal; a resume in
another data-parallel layout sums gradients in another order, so it is held to a tolerance
(`LAYOUT_RTOL`).

Needs a Megatron-LM checkout (`MEGATRON_LM_DIR`) and the Python packages its `megatron.training`
imports; skipped, with the reason, without them.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import re
from typing import Any

import numpy as np
import pytest
import torch

from muon_megatron.testing.megatron_lm_run import (
    logged_values,
    run_pretrain_gpt,
    skip_without_megatron_lm,
    tiny_gpt_args,
)

skip_without_megatron_lm()

TRAIN_ITERS = 10
SAVE_AT = 5
# A resume in another DP layout (DP4 <-> DP2), or a run with other buckets, differs from the
# uninterrupted run only in the order in which fp32 gradients are summed: ~1e-7 relative on
# the first step, grown by Muon at lr 1e-2 to at most 2e-5 on the loss by iteration 10 here.
# A resume that loses the optimizer state (`--no-load-optim`) is off by 2-3% from the first
# step it affects: 2e-4 keeps a 10x margin on the noise and 100x on that error.
LAYOUT_RTOL = 2e-4
MOE_FLAGS = (
    "--num-experts", "4",
    "--expert-model-parallel-size", "2",
    "--moe-router-topk", "2",
    "--moe-token-dispatcher-type", "allgather",
    # Without biases every parameter's numel is a multiple of 64, the DistributedOptimizer's
    # alignment: no intra-bucket padding, which dp_reshardable checkpoints write
    # uninitialised (distrib_optimizer.py:1633) and a bitwise comparison cannot cover.
    "--disable-bias-linear",
)  # fmt: skip
# Measured on 2 busy cores: ~20-35 s per 2-rank run, ~30-50 s per 4-rank run; 8 runs.
RUN_TIMEOUT_S = 600.0


class Run:
    """One finished pretrain_gpt.py run: its output, logged values and checkpoint dir."""

    def __init__(self, output: str, save: pathlib.Path | None) -> None:
        self.output = output
        self.save = save
        self.losses = logged_values(output, "lm loss")
        self.grad_norms = logged_values(output, "grad norm")

    def argument(self, name: str) -> str:
        """The value Megatron-LM's argument dump printed for `name`."""
        match = re.search(rf"^\s*{re.escape(name)} \.+ (.*?)\s*$", self.output, re.MULTILINE)
        assert match is not None, f"no '{name}' in Megatron-LM's argument dump"
        return match.group(1)


def _launch(
    root: pathlib.Path,
    name: str,
    nproc: int,
    *,
    save: bool = False,
    load_from: Run | None = None,
    extra: tuple[str, ...] = (),
    optimizer: str = "muon",
) -> Run:
    save_dir = root / name if save else None
    args = tiny_gpt_args(
        optimizer=optimizer,
        train_iters=TRAIN_ITERS,
        save=None if save_dir is None else str(save_dir),
        save_interval=SAVE_AT if save else None,
        load=None if load_from is None else str(load_from.save),
        extra=extra + (() if load_from is None else ("--ckpt-step", str(SAVE_AT))),
    )
    returncode, output = run_pretrain_gpt(nproc, args, timeout_s=RUN_TIMEOUT_S)
    (root / f"{name}.log").write_text(output)
    assert returncode == 0, f"{name}: pretrain_gpt.py exited {returncode}:\n{output[-8000:]}"
    if load_from is not None:
        assert f"successfully loaded checkpoint from {load_from.save} " in output
    return Run(output, save_dir)


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("megatron_lm_pretrain")


@pytest.fixture(scope="module")
def dp4(runs_dir: pathlib.Path) -> Run:
    return _launch(runs_dir, "dp4", 4, save=True)


@pytest.fixture(scope="module")
def dp4_resumed(runs_dir: pathlib.Path, dp4: Run) -> Run:
    return _launch(runs_dir, "dp4_resumed", 4, save=True, load_from=dp4)


@pytest.fixture(scope="module")
def dp2_from_dp4(runs_dir: pathlib.Path, dp4: Run) -> Run:
    return _launch(runs_dir, "dp2_from_dp4", 2, load_from=dp4)


@pytest.fixture(scope="module")
def dp2(runs_dir: pathlib.Path) -> Run:
    return _launch(runs_dir, "dp2", 2, save=True)


@pytest.fixture(scope="module")
def dp4_from_dp2(runs_dir: pathlib.Path, dp2: Run) -> Run:
    return _launch(runs_dir, "dp4_from_dp2", 4, load_from=dp2)


@pytest.fixture(scope="module")
def moe_ep2(runs_dir: pathlib.Path) -> Run:
    return _launch(runs_dir, "moe_ep2", 2, save=True, extra=MOE_FLAGS)


@pytest.fixture(scope="module")
def moe_ep2_resumed(runs_dir: pathlib.Path, moe_ep2: Run) -> Run:
    return _launch(runs_dir, "moe_ep2_resumed", 2, save=True, load_from=moe_ep2, extra=MOE_FLAGS)


# An interleaved pipeline: PP2 with two virtual stages (model chunks) of one layer per rank;
# 8 / 2 = 4 micro-batches per step, a multiple of PP as the interleaved schedule needs.
VPP_FLAGS = ("--pipeline-model-parallel-size", "2", "--num-layers", "4",
             "--num-virtual-stages-per-pipeline-rank", "2")  # fmt: skip


@pytest.fixture(scope="module")
def pp2_vpp2(runs_dir: pathlib.Path) -> Run:
    return _launch(runs_dir, "pp2_vpp2", 2, save=True, extra=VPP_FLAGS)


@pytest.fixture(scope="module")
def pp2_vpp2_resumed(runs_dir: pathlib.Path, pp2_vpp2: Run) -> Run:
    return _launch(runs_dir, "pp2_vpp2_resumed", 2, save=True, load_from=pp2_vpp2, extra=VPP_FLAGS)


@pytest.fixture(scope="module")
def dp4_overlap(runs_dir: pathlib.Path) -> Run:
    # A 40k-element bucket splits the ~241k parameters into 3 buckets, so the overlapped
    # reduce-scatter and the param all-gather run bucket by bucket.
    flags = ("--overlap-grad-reduce", "--overlap-param-gather", "--ddp-bucket-size", "40000")
    return _launch(runs_dir, "dp4_overlap", 4, extra=flags)


@pytest.fixture(scope="module")
def adam_dp4(runs_dir: pathlib.Path) -> Run:
    return _launch(runs_dir, "adam_dp4", 4, save=True, optimizer="adam")


@pytest.fixture(scope="module")
def muon_from_adam_dp4(runs_dir: pathlib.Path, adam_dp4: Run) -> Run:
    return _launch(runs_dir, "muon_from_adam_dp4", 4, load_from=adam_dp4)


# QK-Clip under Megatron-LM's loop: one layer (so a head's logits scale exactly with its
# clip factor), lr 0 (the weights move only by the clip), bf16 params (the fp32 main shards
# are separate tensors, which the next step's main -> model copy would put back unclipped)
# and a threshold far below the init logits (~0.1), so that every head is clipped at once.
QK_TAU = 1e-3
QK_FLAGS = ("--num-layers", "1", "--bf16", "--lr", "0.0", "--min-lr", "0.0",
            "--qk-clip-threshold", str(QK_TAU))  # fmt: skip


@pytest.fixture(scope="module")
def qk_logged(runs_dir: pathlib.Path) -> Run:
    return _launch(runs_dir, "qk_logged", 2, extra=QK_FLAGS + ("--log-max-attention-logit",))


@pytest.fixture(scope="module")
def qk_clipped(runs_dir: pathlib.Path) -> Run:
    return _launch(runs_dir, "qk_clipped", 2, extra=QK_FLAGS + ("--qk-clip",))


def _refused(root: pathlib.Path, name: str, *extra: str, optimizer: str = "muon", load: Run | None = None) -> str:
    """Output of a run that must stop before its first iteration (non-zero exit)."""
    args = tiny_gpt_args(
        optimizer=optimizer,
        train_iters=2,
        load=None if load is None else str(load.save),
        extra=extra + (() if load is None else ("--ckpt-step", str(SAVE_AT))),
    )
    returncode, output = run_pretrain_gpt(1, args, timeout_s=RUN_TIMEOUT_S)
    (root / f"{name}.log").write_text(output)
    assert returncode != 0, f"{name}: pretrain_gpt.py should have refused {extra}:\n{output[-4000:]}"
    assert not logged_values(output, "lm loss"), f"{name}: it trained before refusing"
    return output


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _printed_ulp(value: str) -> float:
    """One unit in the last printed place of a '%.6E' value."""
    return 10.0 ** (int(value.split("E")[1]) - 6)


def _assert_resumed_losses_equal(full: Run, resumed: Run) -> None:
    """The resumed run's printed losses for 6..10 are the uninterrupted run's.

    Iteration 7 is the resumed run's second logged line, which Megatron-LM prints as the mean
    of 6 and 7 (see `logged_values`): it is compared with the mean of the uninterrupted run's
    printed 6 and 7, to within their rounding (half a unit each, halved, plus half a unit).
    """
    after = range(SAVE_AT + 1, TRAIN_ITERS + 1)
    assert sorted(resumed.losses) == list(after), resumed.losses
    second = SAVE_AT + 2
    for it in after:
        if it != second:
            assert resumed.losses[it] == full.losses[it], (it, resumed.losses, full.losses)
    mean = (float(full.losses[second - 1]) + float(full.losses[second])) / 2
    assert float(resumed.losses[second]) == pytest.approx(
        mean, rel=0, abs=_printed_ulp(full.losses[second])
    ), (resumed.losses, full.losses)


def _assert_resumed_losses_close(full: Run, resumed: Run, rtol: float) -> None:
    after = range(SAVE_AT + 1, TRAIN_ITERS + 1)
    assert sorted(resumed.losses) == list(after), resumed.losses
    second = SAVE_AT + 2
    for it in after:
        got = float(resumed.losses[it])
        assert math.isfinite(got), (it, resumed.losses)
        want = float(full.losses[it])
        if it == second:
            want = (float(full.losses[it - 1]) + want) / 2
        assert got == pytest.approx(want, rel=rtol, abs=0), (it, resumed.losses, full.losses)


def _checkpoint_contents(iter_dir: pathlib.Path, scratch: pathlib.Path) -> dict[str, Any]:
    """Every sharded entry of a torch_dist checkpoint (model, optimizer, RNG), gathered into
    one dict by torch's own converter (no process group needed)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = scratch / f"{iter_dir.parent.name}_{iter_dir.name}.pt"
    dcp_to_torch_save(str(iter_dir), str(out))
    return torch.load(out, weights_only=False)


# Where cpu_shims routes the CUDA generator to the CPU one, the DataLoader's base seed (drawn
# from the CPU generator when the iterator is built, i.e. after a resume's load) moves both;
# on GPU only the CPU generator moves. No draw from it reaches training (dropout is off).
_CPU_GENERATOR_KEYS = ("torch_rng_state", "cuda_rng_state")
# The run's arguments (stored in the checkpoint by core_v0.19): a resumed run is launched
# with --load, starts at iteration 5 (ckpt_step: the step it loaded) and, in these tests,
# saves to a directory of its own; these record how it was launched, not its state.
_SET_BY_THE_RESUME = frozenset(
    {"iteration", "num_floating_point_operations_so_far", "load", "ckpt_step", "save"}
)


def _assert_bitwise_equal(a: Any, b: Any, path: str = "") -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for key in a:
            if key not in _CPU_GENERATOR_KEYS:
                _assert_bitwise_equal(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_bitwise_equal(x, y, f"{path}[{i}]")
    elif torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), f"{path}: max |diff| {(a.double() - b.double()).abs().max()}"
    elif isinstance(a, np.ndarray):  # numpy's RNG state
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b), path
    elif isinstance(a, argparse.Namespace):  # core_v0.19 keeps the run's args in every shard
        assert isinstance(b, argparse.Namespace), path
        mine, theirs = vars(a), vars(b)
        differ = sorted(
            k for k in mine.keys() | theirs.keys()
            if k not in _SET_BY_THE_RESUME and mine.get(k) != theirs.get(k)
        )
        assert not differ, f"{path}: {[(k, mine.get(k), theirs.get(k)) for k in differ]}"
    else:
        assert type(a) is type(b) and a == b, path


def _assert_final_checkpoints_bitwise_equal(full: Run, resumed: Run, scratch: pathlib.Path):
    final = f"iter_{TRAIN_ITERS:07d}"
    a = _checkpoint_contents(full.save / final, scratch)
    b = _checkpoint_contents(resumed.save / final, scratch)
    assert any(".exp_avg" in key for key in a), sorted(a)  # optimizer state is in there
    _assert_bitwise_equal(a, b)


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def test_megatron_lm_prints_muon_as_the_optimizer(dp4: Run) -> None:
    assert dp4.argument("optimizer") == "muon"
    assert dp4.argument("use_distributed_optimizer") == "True"


def test_dp4_resume_at_5_prints_the_uninterrupted_losses_6_to_10(
    dp4: Run, dp4_resumed: Run
) -> None:
    _assert_resumed_losses_equal(dp4, dp4_resumed)


def test_dp4_resume_at_5_prints_the_uninterrupted_grad_norms_6_to_10(
    dp4: Run, dp4_resumed: Run
) -> None:
    after = range(SAVE_AT + 1, TRAIN_ITERS + 1)
    assert {it: dp4_resumed.grad_norms[it] for it in after} == {
        it: dp4.grad_norms[it] for it in after
    }


def test_dp4_resume_final_checkpoint_is_bitwise_the_uninterrupted_one(
    dp4: Run, dp4_resumed: Run, runs_dir: pathlib.Path
) -> None:
    _assert_final_checkpoints_bitwise_equal(dp4, dp4_resumed, runs_dir)


def test_dp4_checkpoint_resumed_at_dp2_trains_6_to_10_within_layout_rtol(
    dp4: Run, dp2_from_dp4: Run
) -> None:
    _assert_resumed_losses_close(dp4, dp2_from_dp4, LAYOUT_RTOL)


def test_dp2_checkpoint_resumed_at_dp4_trains_6_to_10_within_layout_rtol(
    dp2: Run, dp4_from_dp2: Run
) -> None:
    _assert_resumed_losses_close(dp2, dp4_from_dp2, LAYOUT_RTOL)


def test_moe_ep2_resume_at_5_prints_the_uninterrupted_losses_6_to_10(
    moe_ep2: Run, moe_ep2_resumed: Run
) -> None:
    assert moe_ep2.argument("num_experts") == "4"
    assert moe_ep2.argument("expert_model_parallel_size") == "2"
    _assert_resumed_losses_equal(moe_ep2, moe_ep2_resumed)


def test_moe_ep2_resume_final_checkpoint_is_bitwise_the_uninterrupted_one(
    moe_ep2: Run, moe_ep2_resumed: Run, runs_dir: pathlib.Path
) -> None:
    _assert_final_checkpoints_bitwise_equal(moe_ep2, moe_ep2_resumed, runs_dir)


def test_pp2_vpp2_resume_at_5_prints_the_uninterrupted_losses_6_to_10(
    pp2_vpp2: Run, pp2_vpp2_resumed: Run
) -> None:
    """Megatron-LM builds two model chunks per rank and runs its interleaved schedule; Muon
    trains them (the loss falls) and resumes them exactly."""
    assert pp2_vpp2.argument("virtual_pipeline_model_parallel_size") == "2"
    losses = [float(pp2_vpp2.losses[it]) for it in sorted(pp2_vpp2.losses)]
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0], losses
    _assert_resumed_losses_equal(pp2_vpp2, pp2_vpp2_resumed)


def test_pp2_vpp2_resume_final_checkpoint_is_bitwise_the_uninterrupted_one(
    pp2_vpp2: Run, pp2_vpp2_resumed: Run, runs_dir: pathlib.Path
) -> None:
    _assert_final_checkpoints_bitwise_equal(pp2_vpp2, pp2_vpp2_resumed, runs_dir)


def test_overlap_flags_train_with_finite_falling_loss(dp4_overlap: Run) -> None:
    assert dp4_overlap.argument("overlap_grad_reduce") == "True"
    assert dp4_overlap.argument("overlap_param_gather") == "True"
    assert "Number of buckets for gradient all-reduce / reduce-scatter: 3" in dp4_overlap.output
    losses = [float(dp4_overlap.losses[it]) for it in range(1, TRAIN_ITERS + 1)]
    assert all(math.isfinite(loss) for loss in losses), losses
    # From ~7.69 to ~7.1 at lr 1e-2; a fall of 0.2 between the first and last 3-step means
    # leaves a wide margin.
    assert sum(losses[:3]) / 3 - sum(losses[-3:]) / 3 > 0.2, losses


def test_overlap_flags_match_the_run_without_them_within_layout_rtol(
    dp4: Run, dp4_overlap: Run
) -> None:
    # Three buckets instead of one: only the order of the gradient sums differs.
    for it in range(1, TRAIN_ITERS + 1):
        assert float(dp4_overlap.losses[it]) == pytest.approx(
            float(dp4.losses[it]), rel=LAYOUT_RTOL, abs=0
        ), (it, dp4_overlap.losses, dp4.losses)


def test_muon_metrics_reach_megatron_lms_log_at_every_log_interval(dp4: Run) -> None:
    lines = re.findall(
        r"\[muon\] iteration\s+(\d+) \| update rms: ([0-9.]+) \| ns time \(s\): ([0-9.]+) \| "
        r"skipped steps: (\d+)",
        dp4.output,
    )
    assert [int(it) for it, *_ in lines] == list(range(1, TRAIN_ITERS + 1)), lines
    for _, rms, ns_seconds, skipped in lines:
        # Quintic Newton-Schulz at 0.2 * sqrt(max(A, B)): ~0.17-0.2 (docs/design.md).
        assert 0.1 < float(rms) <= 0.21 and float(ns_seconds) > 0 and skipped == "0", lines


def test_adamw_checkpoint_switches_to_muon_through_pretrain(adam_dp4: Run, muon_from_adam_dp4: Run) -> None:
    """DP4, Megatron-LM's default dp_reshardable format: the Muon run loads the AdamW
    checkpoint (weights bitwise: its first loss after the load is AdamW's own at that
    iteration), says so once, and trains on."""
    out = muon_from_adam_dp4.output
    assert out.count("optimizer switch AdamW -> Muon") == 1, out[-4000:]
    first = SAVE_AT + 1
    assert muon_from_adam_dp4.losses[first] == adam_dp4.losses[first]
    losses = [float(muon_from_adam_dp4.losses[it]) for it in range(first, TRAIN_ITERS + 1) if it in muon_from_adam_dp4.losses]
    assert len(losses) >= 4 and all(math.isfinite(x) for x in losses), muon_from_adam_dp4.losses


def test_muon_checkpoint_into_adamw_is_refused_naming_the_supported_paths(
    dp4: Run, runs_dir: pathlib.Path
) -> None:
    out = _refused(runs_dir, "adam_from_muon", optimizer="adam", load=dp4)
    assert "--no-load-optim" in out and "muon_megatron.training.checkpointing.load_checkpoint" in out, out[-4000:]


@pytest.mark.parametrize(
    ("flags", "ours"),
    [
        (("--muon-scale-mode", "spectral"), "--muon-scale-mode moonlight --muon-matched-adamw-rms 1.0"),
        (("--muon-tp-mode", "blockwise"), "Drop --muon-tp-mode"),
        (("--muon-fp32-matmul-prec", "high"), "--muon-ns-dtype"),
        (("--ckpt-format", "torch", "--save", "/nonexistent/ckpt"), "--ckpt-format torch_dist"),
        (("--qk-clip", "--qk-clip-alpha", "1.0"), "--qk-clip-alpha 1.0"),
    ],
)
def test_megatron_lm_flags_we_do_not_honour_stop_the_run_before_training(
    runs_dir: pathlib.Path, flags: tuple[str, ...], ours: str
) -> None:
    out = _refused(runs_dir, "refused_" + "_".join(f.strip("-") for f in flags[:2]), *flags)
    assert ours in out, out[-4000:]


def test_megatron_lm_extra_scale_factor_scales_the_update(dp4: Run, runs_dir: pathlib.Path) -> None:
    """`--muon-extra-scale-factor 0.5` keeps megatron-core's meaning: the first update (the
    same gradients as the dp4 run's) has half the RMS."""
    half = _launch(runs_dir, "dp4_half_scale", 4, extra=("--muon-extra-scale-factor", "0.5"))
    rms = {
        run: float(re.search(r"\[muon\] iteration\s+1 \| update rms: ([0-9.]+)", run.output).group(1))
        for run in (dp4, half)
    }
    # Printed to 4 decimals: half a unit of rounding on each side.
    assert rms[half] == pytest.approx(rms[dp4] / 2, abs=1e-4), rms


def _attention_logits(run: Run) -> dict[int, tuple[str, int | None]]:
    """iteration -> (max attention logit as printed, qk-clipped heads or None)."""
    found = re.findall(
        r"\[muon\] iteration\s+(\d+) \|.*?\| max attention logit: ([0-9.eE+-]+)"
        r"(?: \| qk-clipped heads: (\d+))?\s*$",
        run.output,
        re.MULTILINE,
    )
    return {int(it): (value, int(heads) if heads else None) for it, value, heads in found}


def test_qk_clip_bounds_the_max_logit_in_megatron_lms_loop(qk_logged: Run, qk_clipped: Run) -> None:
    """`--qk-clip --optimizer muon` in Megatron-LM's own train_step: after each step the heads
    over tau are rescaled in the model and in the ZeRO-1 fp32 main shards, so the logits stay
    near tau at every later iteration; `--log-max-attention-logit` alone only logs.

    Bounds: at lr 0 with one layer, head h's logits in the clipped run are those of the
    logged run times the product of its clip factors, so after a clip on batch k its max on
    batch k+1 is tau * S_h(k+1) / S_h(k): the batch-to-batch ratio of one head's max at fixed
    weights, near 1 (the logged run's model-wide max varies by a few %). 10 tau leaves a wide
    margin on that ratio and sits 5x below the unclipped logits (>= 50 tau, checked on the
    logged run): a clip lost in the main -> model copy, or never made, fails it."""
    logged, clipped = _attention_logits(qk_logged), _attention_logits(qk_clipped)
    iterations = list(range(1, TRAIN_ITERS + 1))
    assert sorted(logged) == iterations and sorted(clipped) == iterations, (logged, clipped)
    assert qk_clipped.argument("qk_clip") == "True" and qk_logged.argument("qk_clip") == "False"
    assert all(heads is None for _, heads in logged.values()), logged  # nothing clipped
    assert all(float(value) >= 50 * QK_TAU for value, _ in logged.values()), logged
    # Iteration 1: the same weights and batch, so the same figure; all 4 heads are over tau.
    assert clipped[1] == (logged[1][0], 4), (clipped[1], logged[1])
    for it in iterations[1:]:
        assert float(clipped[it][0]) <= 10 * QK_TAU, (it, clipped)
