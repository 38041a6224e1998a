"""kill -9 of one rank of Megatron-LM's `pretrain_gpt.py` at a chosen point, then a resume.

The tiny GPT of `muon_megatron.testing.megatron_lm_run` on 2 ranks (DP2, Muon), 6
iterations saving every 2, launched as a user would (`torchrun -m muon_megatron.megatron_lm
pretrain_gpt.py`). Rank 1 is killed with SIGKILL at the point MUON_TEST_FAULT names
(`fault_site/sitecustomize.py` installs `fault_rank`'s wrappers in that rank only); torchrun
then stops the other rank. The resume is the same command with `--load` on the same
directory. After each point: the tracker names the last complete checkpoint, the resumed
run prints the uninterrupted run's losses, and every tensor of its final checkpoint equals
the uninterrupted run's (`==`: the same arithmetic on the same inputs).

With `--async-save --use-persistent-ckpt-worker` the files are written by megatron-core's
checkpoint worker while the rank trains on: the same checks after a kill inside that write,
and an async run that must write the synchronous run's checkpoints tensor for tensor and
resume from them like it.

Needs a Megatron-LM checkout (`MEGATRON_LM_DIR`) and the packages its `megatron.training`
imports; skipped, with the reason, without them.
"""

from __future__ import annotations

import os
import pathlib
import shutil

import pytest
import torch

from muon_megatron.testing.checkpoint_tensors import checkpoint_tensors
from muon_megatron.testing.megatron_lm_run import (
    logged_values,
    megatron_lm_dir,
    run_pretrain_gpt,
    skip_without_megatron_lm,
    tiny_gpt_args,
)

skip_without_megatron_lm()

ROOT = pathlib.Path(__file__).resolve().parents[2]
FAULT_SITE = pathlib.Path(__file__).resolve().parent / "fault_site"
TRAIN_ITERS, SAVE_INTERVAL = 6, 2
RUN_TIMEOUT_S = 600.0
# Megatron-LM's asynchronous save: the rank hands its tensors to megatron-core's persistent
# checkpoint worker and trains on; the save is finalized (checksums, tracker) at a later step.
# From core_v0.19 the default async strategy is nvidia-resiliency-ext's ('nvrx', a package not
# installed here); megatron-core's own worker is `--async-strategy mcore`.
ASYNC_SAVE = ("--async-save", "--use-persistent-ckpt-worker")
if "async_strategy" in (pathlib.Path(megatron_lm_dir()) / "megatron/training/arguments.py").read_text():
    ASYNC_SAVE += ("--async-strategy", "mcore")
# point -> (MUON_TEST_FAULT, the iteration the tracker must name after the kill, run flags)
FAULTS = {
    "mid-save": ("save-file:2", 2, ()),
    "mid async save, in the checkpoint worker": ("async-save-file:2", 2, ASYNC_SAVE),
    "between gather and scatter": ("before-scatter:5", 4, ()),
    "before the param all-gather": ("before-param-gather:5", 4, ()),
}


def _run(save: pathlib.Path, log: pathlib.Path, *, load: bool = False,
         fault: str | None = None, extra: tuple[str, ...] = ()) -> tuple[int, str]:  # fmt: skip
    args = tiny_gpt_args(train_iters=TRAIN_ITERS, save=str(save), save_interval=SAVE_INTERVAL,
                         load=str(save) if load else None, extra=extra)  # fmt: skip
    env = None
    if fault is not None:
        path = [str(FAULT_SITE), megatron_lm_dir(), str(ROOT), os.environ.get("PYTHONPATH", "")]
        env = {"PYTHONPATH": os.pathsep.join(filter(None, path)), "MUON_TEST_FAULT": fault}
    returncode, output = run_pretrain_gpt(2, args, timeout_s=RUN_TIMEOUT_S, env=env)
    log.write_text(output)
    return returncode, output


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("megatron_lm_straight")
    returncode, output = _run(root / "ckpt", root / "run.log")
    assert returncode == 0, output[-8000:]
    return {"losses": logged_values(output, "lm loss"), "final": root / "ckpt" / "iter_0000006"}


@pytest.mark.parametrize("point", list(FAULTS))
def test_a_killed_rank_of_pretrain_gpt_resumes_bitwise_like_the_uninterrupted_run(
    point: str, straight: dict, tmp_path: pathlib.Path
) -> None:
    fault, last_complete, flags = FAULTS[point]
    save = tmp_path / "ckpt"
    returncode, output = _run(save, tmp_path / "killed.log", fault=fault, extra=flags)
    assert returncode != 0 and "SIGKILL" in output, output[-6000:]
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == str(last_complete)

    returncode, output = _run(save, tmp_path / "resumed.log", load=True, extra=flags)
    assert returncode == 0, output[-8000:]
    _assert_resumed_like_straight(output, save, last_complete, straight, tmp_path)


def _assert_resumed_like_straight(output: str, save: pathlib.Path, last_complete: int,
                                  straight: dict, tmp_path: pathlib.Path) -> None:  # fmt: skip
    resumed = logged_values(output, "lm loss")
    assert sorted(resumed) == list(range(last_complete + 1, TRAIN_ITERS + 1)), resumed
    # Megatron-LM's second log line after a resume is the mean of its first two iterations
    # (test_megatron_lm_checkpoints.py meets the same); every other line is one iteration's.
    compared = [it for it in resumed if it != last_complete + 2]
    assert [resumed[it] for it in compared] == [straight["losses"][it] for it in compared]
    a = checkpoint_tensors(straight["final"], tmp_path / "a.pt")
    b = checkpoint_tensors(save / "iter_0000006", tmp_path / "b.pt")
    assert a.keys() == b.keys() and any("exp_avg" in k for k in a), sorted(a)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_async_saves_of_pretrain_gpt_write_the_synchronous_checkpoints_and_resume_bitwise(
    straight: dict, tmp_path: pathlib.Path
) -> None:
    """--async-save --use-persistent-ckpt-worker: the same losses as the synchronous run, every
    tensor of each checkpoint (2, 4, 6) equal to the synchronous one's, and a resume from the
    async checkpoint of iteration 4 equal to the uninterrupted run."""
    save = tmp_path / "ckpt"
    returncode, output = _run(save, tmp_path / "async.log", extra=ASYNC_SAVE)
    assert returncode == 0, output[-8000:]
    for iteration in (2, 4, 6):
        assert f"scheduled an async checkpoint save at iteration {iteration:7d}" in output, output[-6000:]
    assert logged_values(output, "lm loss") == straight["losses"]
    for iteration in (2, 4, 6):
        name = f"iter_{iteration:07d}"
        a = checkpoint_tensors(straight["final"].parent / name, tmp_path / "sync.pt")
        b = checkpoint_tensors(save / name, tmp_path / "async.pt")
        assert a.keys() == b.keys() and any("muon_momentum" in k for k in a), sorted(a)
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)

    # Resume from iteration 4 as if the run had stopped after that save was finalized.
    shutil.rmtree(save / "iter_0000006")
    (save / "latest_checkpointed_iteration.txt").write_text("4")
    returncode, output = _run(save, tmp_path / "resumed.log", load=True, extra=ASYNC_SAVE)
    assert returncode == 0, output[-8000:]
    _assert_resumed_like_straight(output, save, 4, straight, tmp_path)
