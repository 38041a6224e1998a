"""Is a torch_dist checkpoint directory complete? Which earlier one is?

A megatron-core `dist_checkpointing` checkpoint in the torch_dist format is a directory of

* `.metadata`: torch.distributed.checkpoint's index, pickled by rank 0 once every rank has
  written its shards; for every saved item it names the shard file, the offset and the
  length, so it implies each shard file's size;
* the shard files it lists (`__<rank>_<i>.distcp`, one or more per rank);
* `common.pt`: the non-sharded state (rank 0, `torch.save`, a zip archive), up to
  megatron-core 0.18; from 0.19 that state is an item of the index itself (`common_state`),
  and there is no `common.pt`;
* `metadata.json`: dist_checkpointing's backend and version, written last, by rank 0.

`completeness_problems` checks all of that from file sizes and the two indexes alone (no
tensor is read), and `last_complete_checkpoint` walks back through the `iter_NNNNNNN`
directories beside a damaged one to the newest complete one, which `read_error` names.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile

from muon_megatron.integrity.errors import CheckpointReadError

__all__ = [
    "CheckpointReadError",
    "METADATA",
    "COMMON",
    "CONFIG",
    "shard_sizes",
    "expected_files",
    "completeness_problems",
    "last_complete_checkpoint",
    "read_error",
]

METADATA = ".metadata"
COMMON = "common.pt"
CONFIG = "metadata.json"
_ITER_DIR = re.compile(r"^iter_(\d{7})$")
TRACKER = "latest_checkpointed_iteration.txt"
_COMMON_ITEM = "common_state"


def _read_metadata(ckpt_dir: str):
    """`.metadata` unpickled, as torch's FileSystemReader.read_metadata does. Raises whatever
    reading or unpickling it raises (OSError, EOFError, UnpicklingError, ...)."""
    with open(os.path.join(ckpt_dir, METADATA), "rb") as f:
        return pickle.load(f)


def _sizes(metadata) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for info in metadata.storage_data.values():
        end = info.offset + info.length
        sizes[info.relative_path] = max(sizes.get(info.relative_path, 0), end)
    return sizes


def _common_in_index(metadata) -> bool:
    """Whether the index holds the non-sharded state itself (megatron-core >= 0.19 saves it
    as the item `common_state/...` instead of writing `common.pt`)."""
    return any(key.split("/", 1)[0] == _COMMON_ITEM for key in metadata.state_dict_metadata)


def shard_sizes(ckpt_dir: str) -> dict[str, int]:
    """Shard file -> the bytes `.metadata` says it holds at least (the end of its last item).

    Raises whatever reading or unpickling `.metadata` raises; `completeness_problems` turns
    that into a sentence."""
    return _sizes(_read_metadata(ckpt_dir))


def expected_files(ckpt_dir: str) -> list[str]:
    """Every file a complete checkpoint in `ckpt_dir` has, by its `.metadata`: the shard
    files, `.metadata`, `metadata.json` and, where the index does not hold the non-sharded
    state, `common.pt`. Raises as `shard_sizes`."""
    metadata = _read_metadata(ckpt_dir)
    extra = [METADATA, CONFIG] + ([] if _common_in_index(metadata) else [COMMON])
    return sorted(set(_sizes(metadata)) | set(extra))


def completeness_problems(ckpt_dir: str) -> list[str]:
    """What is missing or damaged in `ckpt_dir`, one sentence each; [] when complete."""
    if not os.path.isdir(ckpt_dir):
        return ["the directory does not exist"]
    problems = []
    if not os.path.isfile(os.path.join(ckpt_dir, CONFIG)):
        problems.append(
            f"{CONFIG} is missing (dist_checkpointing writes it last: the save did not finish)"
        )
    common = os.path.join(ckpt_dir, COMMON)
    if os.path.isfile(common) and not zipfile.is_zipfile(common):
        problems.append(
            f"{COMMON} is damaged (not a readable torch.save archive: truncated or overwritten)"
        )
    if not os.path.isfile(os.path.join(ckpt_dir, METADATA)):
        problems.append(
            f"{METADATA} is missing (the index of every shard: the save did not finish)"
        )
        return problems
    try:
        metadata = _read_metadata(ckpt_dir)
        sizes = _sizes(metadata)
        common_in_index = _common_in_index(metadata)
    except Exception as error:  # noqa: BLE001 - any failure to read the index is damage
        problems.append(f"{METADATA} is damaged ({type(error).__name__}: {error})")
        return problems
    if not common_in_index and not os.path.isfile(common):
        problems.append(
            f"{COMMON} is missing (the non-sharded state: iteration, args, param groups)"
        )
    for name, needed in sorted(sizes.items()):
        path = os.path.join(ckpt_dir, name)
        if not os.path.isfile(path):
            problems.append(f"shard file {name} is missing ({METADATA} lists it)")
        elif (size := os.path.getsize(path)) < needed:
            problems.append(
                f"shard file {name} is truncated: {size} bytes, {METADATA} places data up to "
                f"byte {needed}"
            )
    return problems


def last_complete_checkpoint(ckpt_dir: str) -> str | None:
    """The newest `iter_NNNNNNN` directory beside `ckpt_dir`, older than it, whose files are
    complete (`completeness_problems` is empty); None if there is none or `ckpt_dir` is not
    named `iter_NNNNNNN`."""
    parent, name = os.path.split(os.path.normpath(ckpt_dir))
    match = _ITER_DIR.match(name)
    if match is None or not os.path.isdir(parent):
        return None
    older = []
    for entry in os.listdir(parent):
        other = _ITER_DIR.match(entry)
        if other is not None and int(other[1]) < int(match[1]):
            older.append((int(other[1]), os.path.join(parent, entry)))
    for _, path in sorted(older, reverse=True):
        if not completeness_problems(path):
            return path
    return None


def read_error(
    ckpt_dir: str, problems: list[str], last_complete: str | None
) -> CheckpointReadError:
    """The error for a checkpoint that cannot be loaded: the directory, each problem, and the
    way out (the last complete checkpoint, named, or that there is none beside it)."""
    listed = "\n  ".join(problems)
    if last_complete is not None:
        iteration = int(_ITER_DIR.match(os.path.basename(last_complete))[1])
        way_out = (
            f"The last complete checkpoint before it is {last_complete}: resume from it (write "
            f"{iteration} into {os.path.join(os.path.dirname(last_complete), TRACKER)}, or "
            f"pass --ckpt-step {iteration} to Megatron-LM)"
        )
    else:
        way_out = (
            "No complete checkpoint older than it lies beside it: copy it again from where it "
            "was saved, or start from an earlier copy"
        )
    return CheckpointReadError(
        f"the checkpoint at {ckpt_dir!r} cannot be loaded:\n  {listed}\n{way_out}. Nothing "
        "was loaded: the run's state is as it was before the load."
    )
