"""Megatron-LM's `pretrain_gpt.py` resumed under another tensor-parallel size, with Muon.

The tiny GPT of `muon_megatron.testing.megatron_lm_run` on 2 CPU ranks, checkpoints in
`--ckpt-format torch_dist` with `--dist-ckpt-optim-fully-reshardable` (the format
docs/checkpoints.md prescribes for a layout change):

    tp1:  TP1 (DP2) iterations 1-4, saves at 2 and 4
    tp2:  TP2 (DP1) resumed from tp1's iteration 2, iterations 3-6, saves at 4 and 6
    tp1b: TP1 (DP2) resumed from tp2's iteration 4, iterations 5-6

What a resume under another TP size must equal, and how exactly:

* The state it loads is the state that was saved. Megatron-LM's own converter
  (`--ckpt-convert-format torch_dist --ckpt-convert-save`: load, save, exit, no step) run
  under the new TP size writes back every tensor of the checkpoint it read (weights, fp32
  main params, Muon momenta, AdamW moments), bit for bit: resharding is a copy.
* The steps after it equal the saved layout's uninterrupted steps within `TP_RTOL`: TP2
  splits each matmul and sums the partial products (row-parallel layers, the vocab-parallel
  cross entropy) in another order, so the same update is not the same arithmetic.

Needs a Megatron-LM checkout (`MEGATRON_LM_DIR`) and the packages its `megatron.training`
imports; skipped, with the reason, without them.
"""

from __future__ import annotations

import pathlib

import pytest
import torch

from muon_megatron.testing.checkpoint_tensors import checkpoint_tensors
from muon_megatron.testing.megatron_lm_run import (
    logged_values,
    run_pretrain_gpt,
    skip_without_megatron_lm,
    tiny_gpt_args,
)

skip_without_megatron_lm()

RUN_TIMEOUT_S = 600.0
FULLY_RESHARDABLE = ("--dist-ckpt-optim-fully-reshardable",)
# Megatron-LM pads the vocabulary (2048 + EOD) to a multiple of 128 x TP: 2176 rows at TP1,
# 2304 at TP2, and the rows a resume adds keep their fresh initial values, which enter every
# softmax (7.795 against 7.731 on the first step after a TP1 -> TP2 resume). 2047 + EOD needs
# no padding at either size, so both layouts hold the same model.
SAME_VOCAB_AT_TP1_AND_TP2 = ("--vocab-size", "2047")
# TP2 against TP1 differs by the fp32 summation order of the split matmuls: ~1e-7 relative on
# the first loss, grown by Muon at lr 1e-2 over the 2-4 steps compared here. A resume that
# loses the optimizer state (momentum, AdamW moments) is off by about 1e-3 at the second step
# after it (`test_megatron_lm_pretrain.py` measures 2-3% over 5 steps): 2e-4 holds the noise
# with a wide margin and would still catch that.
TP_RTOL = 2e-4


def _run(root: pathlib.Path, name: str, tp: int, train_iters: int, *,
         load: pathlib.Path | None = None, ckpt_step: int | None = None,
         save: bool = True, extra: tuple[str, ...] = ()) -> tuple[int, str]:  # fmt: skip
    flags = ("--tensor-model-parallel-size", str(tp)) + FULLY_RESHARDABLE + SAME_VOCAB_AT_TP1_AND_TP2
    flags += extra
    if ckpt_step is not None:
        # The schedule as saved (the lr is constant): the saving run may have had fewer
        # --train-iters.
        flags += ("--ckpt-step", str(ckpt_step), "--use-checkpoint-opt_param-scheduler")
    args = tiny_gpt_args(
        train_iters=train_iters,
        save=str(root / name) if save else None,
        save_interval=2 if save else None,
        load=None if load is None else str(load),
        extra=flags,
    )
    returncode, output = run_pretrain_gpt(2, args, timeout_s=RUN_TIMEOUT_S)
    (root / f"{name}.log").write_text(output)
    assert returncode == 0, f"{name}: pretrain_gpt.py exited {returncode}:\n{output[-8000:]}"
    return returncode, output


def _convert(root: pathlib.Path, name: str, tp: int, load: pathlib.Path, step: int) -> pathlib.Path:
    """Megatron-LM's converter under TP `tp`: load `load`'s iteration `step`, save, exit.
    Returns the directory of the checkpoint it wrote."""
    out = root / name
    _run(root, name, tp, step, load=load, ckpt_step=step, save=False,
         extra=("--ckpt-convert-format", "torch_dist", "--ckpt-convert-save", str(out)))
    return out / "torch_dist" / f"iter_{step:07d}"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("megatron_lm_tp")


@pytest.fixture(scope="module")
def tp1(root: pathlib.Path) -> dict[int, str]:
    _, output = _run(root, "tp1", 1, 4)
    return logged_values(output, "lm loss")


@pytest.fixture(scope="module")
def tp2(root: pathlib.Path, tp1: dict[int, str]) -> dict[int, str]:
    _, output = _run(root, "tp2", 2, 6, load=root / "tp1", ckpt_step=2)
    assert "(TP, PP) mismatch after resume ((2, 1) vs (1, 1) from checkpoint)" in output
    return logged_values(output, "lm loss")


def _assert_same_tensors(saved: pathlib.Path, rewritten: pathlib.Path, scratch: pathlib.Path) -> None:
    a = checkpoint_tensors(saved, scratch / "saved.pt")
    b = checkpoint_tensors(rewritten, scratch / "rewritten.pt")
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())
    kinds = ("/optimizer.state.muon_momentum.", "/optimizer.state.exp_avg.",
             "/optimizer.state.exp_avg_sq.", "/optimizer.state.param.", "/decoder.")  # fmt: skip
    assert all(any(key.startswith(kind) for key in a) for kind in kinds), sorted(a)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _assert_within_tp_rtol(resumed: dict[int, str], straight: dict[int, str], start: int) -> None:
    """`resumed` began after iteration `start`; its second line is the mean of its first two
    iterations (Megatron-LM's log accumulators, see `logged_values`)."""
    for it, value in resumed.items():
        want = float(straight[it])
        if it == start + 2:
            want = (float(straight[it - 1]) + want) / 2
        assert float(value) == pytest.approx(want, rel=TP_RTOL, abs=0), (it, resumed, straight)


def test_a_tp1_checkpoint_resumes_at_tp2_with_the_saved_state_and_tp1s_steps(
    root: pathlib.Path, tp1: dict[int, str], tp2: dict[int, str]
) -> None:
    assert sorted(tp2) == [3, 4, 5, 6], tp2
    _assert_within_tp_rtol({it: tp2[it] for it in (3, 4)}, tp1, 2)
    rewritten = _convert(root, "tp2_convert", 2, root / "tp1", 2)
    _assert_same_tensors(root / "tp1" / "iter_0000002", rewritten, root)


def test_a_tp2_checkpoint_resumes_at_tp1_with_the_saved_state_and_tp2s_steps(
    root: pathlib.Path, tp2: dict[int, str]
) -> None:
    _, output = _run(root, "tp1b", 1, 6, load=root / "tp2", ckpt_step=4)
    resumed = logged_values(output, "lm loss")
    assert sorted(resumed) == [5, 6], resumed
    _assert_within_tp_rtol(resumed, tp2, 4)
    rewritten = _convert(root, "tp1_convert", 1, root / "tp2", 4)
    _assert_same_tensors(root / "tp2" / "iter_0000004", rewritten, root)
