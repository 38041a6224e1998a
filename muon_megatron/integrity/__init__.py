"""Checkpoint integrity, for both entries: is a torch_dist checkpoint complete, and are its
bytes the ones that were saved?

`verify_checkpoint(ckpt_dir)` (collective) runs before anything is read: the completeness
checks of `files.py` on rank 0, then the CRC-32 check of `checksums.py` with the work shared
among the ranks. It raises `CheckpointReadError` on every rank, naming the directory, each
missing or damaged file and the last complete checkpoint beside it. `record_checksums`
(collective) is called right after a save. `CheckpointMismatchError` is the other refusal
(the checkpoint is intact but does not fit the run), raised by the entries' own checks.
"""

from __future__ import annotations

import torch

from muon_megatron.integrity.checksums import record_checksums, verify_checksums
from muon_megatron.integrity.errors import CheckpointMismatchError, CheckpointReadError
from muon_megatron.integrity.files import (
    completeness_problems,
    last_complete_checkpoint,
    read_error,
)

__all__ = [
    "CheckpointMismatchError",
    "CheckpointReadError",
    "verify_checkpoint",
    "record_checksums",
    "read_error",
]


def verify_checkpoint(ckpt_dir: str) -> str:
    """Refuse an incomplete or damaged checkpoint before it is read; returns a log note.

    Collective over all ranks: raises `CheckpointReadError` on every rank together, so that
    no rank goes on into the load's collectives alone."""
    verdict = [completeness_problems(ckpt_dir) if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(verdict, src=0)
    problems, note = verdict[0], ""
    if not problems:
        problems, note = verify_checksums(ckpt_dir)
    if problems:
        raise read_error(ckpt_dir, problems, last_complete_checkpoint(ckpt_dir))
    return note
