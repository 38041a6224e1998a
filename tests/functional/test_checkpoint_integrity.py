"""Damaged checkpoints are refused before anything is read (the training entry's loader).

A DP2 run of the tiny GPT saves `iter_0000002` and `iter_0000004` with
`training.checkpointing.save_checkpoint`; each test damages a copy of `iter_0000004` the way
issue 23 did by hand (truncate, delete, garble, flip bytes, lose a checksum file) and loads it
into a fresh DP2 run. The load must raise `CheckpointReadError` on every rank, naming the
directory, the damaged file and `iter_0000002` (the last complete checkpoint), and leave the
run's parameters and optimizer state as they were. Megatron-LM's loader has the same tests
in test_megatron_lm_pretrain.py.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable

import pytest
import torch

from muon_megatron.runtime.launch import spawn

SEED, DATA_SEED, GLOBAL_BATCH, MICRO_BATCH = 1234, 7, 8, 2
SAVES = (2, 4)
DAMAGED = "iter_0000004"
LAST_COMPLETE = "iter_0000002"


def _setup():
    from muon_megatron.config import MuonConfig
    from muon_megatron.testing import tiny
    from muon_megatron.training import step

    spec, layout = tiny.ModelSpec(), tiny.Layout()
    tiny.initialize_parallel(layout, SEED)
    model = tiny.build_model(spec, layout)
    config = tiny.optimizer_config(lr=1e-2, weight_decay=0.1)
    optimizer = step.build_optimizer(config, model, MuonConfig(muon_ns_dtype="fp32"))
    return spec, model, optimizer


def _state(model, optimizer) -> dict[str, torch.Tensor]:
    """This rank's parameters and optimizer-state tensors, cloned."""
    from muon_megatron.testing import tiny

    out = {n: p.detach().clone() for n, p in tiny.unwrap(model[0]).named_parameters()}
    for i, member in enumerate(getattr(optimizer, "chained_optimizers", [optimizer])):
        for j, state in enumerate(member.optimizer.state.values()):
            out.update({f"{i}.{j}.{k}": v.detach().clone() for k, v in state.items()})
    return out


def _save_run(rank: int, world: int, root: str) -> None:
    from muon_megatron.testing import tiny
    from muon_megatron.training import checkpointing

    spec, model, optimizer = _setup()
    for it in range(1, max(SAVES) + 1):
        optimizer.zero_grad()
        tiny.forward_backward(model, tiny.global_batch(it, spec, GLOBAL_BATCH, DATA_SEED), spec, MICRO_BATCH)
        optimizer.step()
        if it in SAVES:
            checkpointing.save_checkpoint(os.path.join(root, f"iter_{it:07d}"), model, optimizer, None, it)


def _try_loads(rank: int, world: int, ckpt_dirs: dict[str, str]) -> dict[str, tuple[str, bool]]:
    return {case: _try_load(ckpt_dir) for case, ckpt_dir in ckpt_dirs.items()}


def _try_load(ckpt_dir: str) -> tuple[str, bool]:
    """(the error, or 'loaded'; whether this rank's state is unchanged by the attempt)."""
    from muon_megatron.testing import tiny
    from muon_megatron.training import checkpointing

    spec, model, optimizer = _setup()
    optimizer.zero_grad()  # one step, so that there is optimizer state to lose
    tiny.forward_backward(model, tiny.global_batch(0, spec, GLOBAL_BATCH, DATA_SEED), spec, MICRO_BATCH)
    optimizer.step()
    before = _state(model, optimizer)
    try:
        checkpointing.load_checkpoint(ckpt_dir, model, optimizer)
    except (checkpointing.CheckpointReadError, checkpointing.CheckpointMismatchError) as error:
        message = f"{type(error).__name__}: {error}"
    else:
        message = "loaded"
    after = _state(model, optimizer)
    unchanged = before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    return message, unchanged


def _damaged_copy(saved: str, root: str, damage: Callable[[str], None]) -> str:
    shutil.copytree(saved, root)
    damage(os.path.join(root, DAMAGED))
    return os.path.join(root, DAMAGED)


def _truncate(name: str) -> Callable[[str], None]:
    def damage(ckpt_dir: str) -> None:
        path = os.path.join(ckpt_dir, name)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)

    return damage


def _delete(name: str) -> Callable[[str], None]:
    return lambda ckpt_dir: os.remove(os.path.join(ckpt_dir, name))


def _flip(name: str, count: int = 300) -> Callable[[str], None]:
    """XOR `count` bytes in the middle of the file (its size unchanged)."""

    def damage(ckpt_dir: str) -> None:
        path = os.path.join(ckpt_dir, name)
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            chunk = f.read(count)
            f.seek(-len(chunk), os.SEEK_CUR)
            f.write(bytes(b ^ 0x5A for b in chunk))

    return damage


# (damage, the file the error must name, what it must say about it)
CASES = {
    "truncated_shard": (_truncate("__0_0.distcp"), "__0_0.distcp", "is truncated"),
    "deleted_shard": (_delete("__1_0.distcp"), "__1_0.distcp", "is missing"),
    "garbled_metadata": (_flip(".metadata", 64), ".metadata", "is damaged"),
    "deleted_common": (_delete("common.pt"), "common.pt", "is missing"),
    "truncated_common": (_truncate("common.pt"), "common.pt", "is damaged"),
    "deleted_metadata_json": (_delete("metadata.json"), "metadata.json", "is missing"),
    "flipped_bytes": (_flip("__0_0.distcp"), "__0_0.distcp", "differs from what was saved"),
    "lost_checksum_file": (_delete("muon_checksums.1.json"), "__1_0.distcp", "no checksum was recorded"),
}


@pytest.fixture(scope="module")
def attempts(tmp_path_factory) -> tuple[str, dict[str, str], list[dict[str, tuple[str, bool]]]]:
    """The saved checkpoints, a damaged copy per case, and each rank's load attempts (one
    spawn for all, the intact checkpoint included)."""
    root = tmp_path_factory.mktemp("integrity")
    saved = str(root / "saved")
    spawn(_save_run, 2, saved)
    present = set(os.listdir(os.path.join(saved, DAMAGED)))
    dirs = {
        case: _damaged_copy(saved, str(root / case), damage)
        for case, (damage, name, _) in CASES.items()
        if name in present
    }
    return saved, dirs, spawn(_try_loads, 2, {**dirs, "intact": os.path.join(saved, DAMAGED)})


@pytest.mark.parametrize("case", list(CASES))
def test_a_damaged_checkpoint_is_refused_naming_the_file_and_the_last_complete_one(
    attempts, case
) -> None:
    _, dirs, per_rank = attempts
    _, name, says = CASES[case]
    if case not in dirs:
        pytest.skip(f"this megatron-core writes no {name}: its torch_dist checkpoint keeps the "
                    "non-sharded state in .metadata's index (megatron-core >= 0.19)")
    ckpt_dir = dirs[case]
    results = [rank_attempts[case] for rank_attempts in per_rank]
    message = results[0][0]
    assert all(m == message for m, _ in results), results  # raised on every rank alike
    assert message.startswith("CheckpointReadError"), message
    assert ckpt_dir in message and name in message and says in message, message
    assert os.path.join(os.path.dirname(ckpt_dir), LAST_COMPLETE) in message, message
    assert all(unchanged for _, unchanged in results), "the failed load changed the run's state"


def test_an_intact_checkpoint_with_its_checksums_loads(attempts) -> None:
    saved, _, per_rank = attempts
    results = [rank_attempts["intact"] for rank_attempts in per_rank]
    assert [m for m, _ in results] == ["loaded", "loaded"], results
    assert all(os.path.isfile(os.path.join(saved, DAMAGED, f"muon_checksums.{r}.json")) for r in (0, 1))
