"""Megatron-LM's own `pretrain_gpt.py` with damaged checkpoints (muon-megatron's load hook).

A 2-rank Muon run saves `iter_0000002` and `iter_0000004` (its tracker at 4); each test
damages a copy of `iter_0000004` the way issue 23 did by hand and resumes from it on one
rank. Megatron-LM on its own stops in an EOFError, FileNotFoundError, UnpicklingError or
AttributeError, or, for flipped bytes, trains on from garbage; with the hook the run stops
before its first iteration with `CheckpointReadError` naming the directory, the file and the
last complete checkpoint (`iter_0000002`).

Needs a Megatron-LM checkout (`MEGATRON_LM_DIR`) and the Python packages its
`megatron.training` imports; skipped, with the reason, without them.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
from collections.abc import Callable

import pytest

from muon_megatron.testing.megatron_lm_run import (
    logged_values,
    megatron_lm_dir,
    run_pretrain_gpt,
    skip_without_megatron_lm,
    tiny_gpt_args,
)

skip_without_megatron_lm()

RUN_TIMEOUT_S = 600.0
DAMAGED, LAST_COMPLETE = "iter_0000004", "iter_0000002"


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("megatron_lm_checkpoints")


@pytest.fixture(scope="module")
def saved(runs_dir: pathlib.Path) -> pathlib.Path:
    save = runs_dir / "saved"
    args = tiny_gpt_args(train_iters=4, save=str(save), save_interval=2)
    returncode, output = run_pretrain_gpt(2, args, timeout_s=RUN_TIMEOUT_S)
    (runs_dir / "saved.log").write_text(output)
    assert returncode == 0, output[-8000:]
    return save


def _truncate(name: str) -> Callable[[pathlib.Path], None]:
    def damage(ckpt_dir: pathlib.Path) -> None:
        path = ckpt_dir / name
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)

    return damage


def _delete(name: str) -> Callable[[pathlib.Path], None]:
    return lambda ckpt_dir: (ckpt_dir / name).unlink()


def _flip(name: str, count: int = 300) -> Callable[[pathlib.Path], None]:
    """XOR `count` bytes in the middle of the file (its size unchanged), as issue 23 did."""

    def damage(ckpt_dir: pathlib.Path) -> None:
        path = ckpt_dir / name
        with open(path, "r+b") as f:
            f.seek(path.stat().st_size // 2)
            chunk = f.read(count)
            f.seek(-len(chunk), os.SEEK_CUR)
            f.write(bytes(b ^ 0x5A for b in chunk))

    return damage


# (damage, the file the error must name, what it must say about it); Megatron-LM's own error
# for each, without the hook, in the comment.
CASES = {
    "truncated_shard": (_truncate("__0_0.distcp"), "__0_0.distcp", "is truncated"),  # EOFError
    "deleted_shard": (_delete("__1_0.distcp"), "__1_0.distcp", "is missing"),  # FileNotFoundError
    "garbled_metadata": (_flip(".metadata", 64), ".metadata", "is damaged"),  # UnpicklingError
    "deleted_common": (_delete("common.pt"), "common.pt", "is missing"),  # AttributeError
    "flipped_bytes": (_flip("__0_0.distcp"), "__0_0.distcp", "differs from what was saved"),  # trains on
}


def _writes_common_pt() -> bool:
    """Whether the checkout's megatron-core writes `common.pt`: up to 0.18; from 0.19 the
    common state is an item of `.metadata`'s index (docs/checkpoints.md)."""
    info = (pathlib.Path(megatron_lm_dir()) / "megatron/core/package_info.py").read_text()
    major, minor = (int(re.search(rf"^{k} = (\d+)", info, re.M).group(1)) for k in ("MAJOR", "MINOR"))
    return (major, minor) < (0, 19)


def _resume(runs_dir: pathlib.Path, name: str, load: pathlib.Path) -> tuple[int, str]:
    """Resume from `load` on one rank to iteration 6 (the schedule as saved: the saving run
    had --train-iters 4)."""
    args = tiny_gpt_args(train_iters=6, load=str(load), extra=("--use-checkpoint-opt_param-scheduler",))
    returncode, output = run_pretrain_gpt(1, args, timeout_s=RUN_TIMEOUT_S)
    (runs_dir / f"{name}.log").write_text(output)
    return returncode, output


def test_the_intact_copy_resumes_and_trains_5_and_6(saved: pathlib.Path, runs_dir: pathlib.Path) -> None:
    load = runs_dir / "intact"
    shutil.copytree(saved, load)
    returncode, output = _resume(runs_dir, "intact", load)
    assert returncode == 0, output[-4000:]
    assert sorted(logged_values(output, "lm loss")) == [5, 6], output[-4000:]
    # the shard files, .metadata, metadata.json and (up to megatron-core 0.18) common.pt
    files = len(list((load / DAMAGED).glob("*.distcp"))) + 2 + _writes_common_pt()
    assert f"{load / DAMAGED}: {files} files" in output and "crc32 verified" in output, output[-4000:]


@pytest.mark.parametrize("case", list(CASES))
def test_a_damaged_checkpoint_stops_pretrain_gpt_naming_the_file_and_the_last_complete_one(
    saved: pathlib.Path, runs_dir: pathlib.Path, case: str
) -> None:
    damage, name, says = CASES[case]
    if name == "common.pt" and not _writes_common_pt():
        pytest.skip("this megatron-core keeps the common state in .metadata: there is no common.pt")
    load = runs_dir / case
    shutil.copytree(saved, load)
    damage(load / DAMAGED)
    returncode, output = _resume(runs_dir, case, load)
    assert returncode != 0 and not logged_values(output, "lm loss"), output[-4000:]
    assert "CheckpointReadError" in output, output[-4000:]
    assert f"the checkpoint at '{load / DAMAGED}' cannot be loaded" in output, output[-4000:]
    assert f"{name} {says}" in output, output[-4000:]
    assert f"The last complete checkpoint before it is {load / LAST_COMPLETE}" in output


def test_every_rank_records_the_checksums_of_its_files_before_the_tracker(saved: pathlib.Path) -> None:
    assert (saved / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    common = ["common.pt"] if _writes_common_pt() else []
    for iteration in ("iter_0000002", "iter_0000004"):
        ckpt = saved / iteration
        assert (ckpt / "common.pt").exists() == bool(common), sorted(p.name for p in ckpt.iterdir())
        records = [json.loads((ckpt / f"muon_checksums.{r}.json").read_text()) for r in (0, 1)]
        files = [sorted(record["files"]) for record in records]
        shards = sorted(p.name for p in ckpt.glob("*.distcp"))
        assert sorted(files[0] + files[1]) == sorted(shards + [".metadata", "metadata.json"] + common)
        assert all(name.startswith("__1_") for name in files[1]), files
        for record in records:
            for name, entry in record["files"].items():
                assert entry["bytes"] == (ckpt / name).stat().st_size, name


# --------------------------------------------------------------------------------------------
# Expert-parallel size changed on resume
# --------------------------------------------------------------------------------------------
# The MoE of test_megatron_lm_pretrain.py (4 experts, top-2, allgather dispatcher, no biases),
# on 2 ranks, at EP1 (DP2, the experts in the dense optimizer) or EP2 (expert DP1, a separate
# expert optimizer).
MOE_FLAGS = ("--num-experts", "4", "--moe-router-topk", "2", "--moe-token-dispatcher-type",
             "allgather", "--disable-bias-linear")  # fmt: skip
FULLY_RESHARDABLE = ("--dist-ckpt-optim-fully-reshardable",)
SAVE_AT, TRAIN_ITERS = 5, 10
# As in test_megatron_lm_pretrain.py: another layout sums the fp32 gradients in another order
# (here the expert gradients: reduced over 2 DP ranks at EP1, computed whole on their EP rank
# at EP2), ~1e-7 on the first step, grown by Muon to at most 2e-5 by iteration 10; losing the
# optimizer state is a 2-3% error.
LAYOUT_RTOL = 2e-4


def _moe_run(runs_dir: pathlib.Path, name: str, ep: int, *, train_iters: int = TRAIN_ITERS,
             save: bool = False, load: pathlib.Path | None = None,
             extra: tuple[str, ...] = ()) -> tuple[int, str]:  # fmt: skip
    flags = MOE_FLAGS + ("--expert-model-parallel-size", str(ep)) + extra
    args = tiny_gpt_args(
        train_iters=train_iters,
        save=str(runs_dir / name) if save else None,
        save_interval=SAVE_AT if save else None,
        load=None if load is None else str(load),
        extra=flags + (() if load is None else ("--ckpt-step", str(SAVE_AT))),
    )
    returncode, output = run_pretrain_gpt(2, args, timeout_s=RUN_TIMEOUT_S)
    (runs_dir / f"{name}.log").write_text(output)
    return returncode, output


@pytest.fixture(scope="module")
def moe_ep1_fully_reshardable(runs_dir: pathlib.Path) -> dict[int, str]:
    """EP1, 10 iterations, a fully_reshardable checkpoint at 5; its printed losses."""
    returncode, output = _moe_run(runs_dir, "moe_ep1_full", 1, save=True, extra=FULLY_RESHARDABLE)
    assert returncode == 0, output[-8000:]
    return logged_values(output, "lm loss")


def test_an_ep1_checkpoint_resumes_at_ep2_within_layout_rtol_of_the_uninterrupted_run(
    runs_dir: pathlib.Path, moe_ep1_fully_reshardable: dict[int, str]
) -> None:
    """fully_reshardable EP1 -> EP2: one optimizer becomes two (dense, expert). Megatron-LM
    alone stops in ChainedOptimizer.load_state_dict ('Expected 2 entries in state dict');
    with the hook the expert optimizer takes its param groups from the dense ones its
    weights were in, and iterations 6-10 match the uninterrupted EP1 run."""
    full = moe_ep1_fully_reshardable
    returncode, output = _moe_run(runs_dir, "moe_ep2_from_ep1", 2, load=runs_dir / "moe_ep1_full")
    assert returncode == 0, output[-8000:]
    resumed = logged_values(output, "lm loss")
    assert sorted(resumed) == list(range(SAVE_AT + 1, TRAIN_ITERS + 1)), resumed
    for it, value in resumed.items():
        want = float(full[it])
        if it == SAVE_AT + 2:  # the resumed run's second line is the mean of 6 and 7
            want = (float(full[it - 1]) + want) / 2
        assert float(value) == pytest.approx(want, rel=LAYOUT_RTOL, abs=0), (it, resumed, full)


def test_a_dp_reshardable_checkpoint_at_another_ep_is_refused_naming_both_layouts(
    runs_dir: pathlib.Path,
) -> None:
    returncode, output = _moe_run(runs_dir, "moe_ep1_dp", 1, train_iters=SAVE_AT, save=True)
    assert returncode == 0, output[-8000:]
    returncode, output = _moe_run(runs_dir, "moe_ep2_from_ep1_dp", 2, load=runs_dir / "moe_ep1_dp")
    assert returncode != 0 and not logged_values(output, "lm loss"), output[-4000:]
    assert "CheckpointMismatchError" in output, output[-4000:]
    assert "saved under TP1 PP1 EP1 (DP2) with the distributed optimizer's dp_reshardable" in output
    assert "this run is TP1 PP1 EP2 (DP2)" in output, output[-4000:]
    assert "--expert-model-parallel-size 1" in output and "--dist-ckpt-optim-fully-reshardable" in output
