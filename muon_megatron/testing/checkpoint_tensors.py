"""Every tensor of a torch_dist checkpoint, for comparing two checkpoints bit for bit."""

from __future__ import annotations

import pathlib

import torch

__all__ = ["checkpoint_tensors"]


def checkpoint_tensors(ckpt_dir: pathlib.Path, scratch: pathlib.Path) -> dict:
    """Every tensor of the torch_dist checkpoint at `ckpt_dir`, flattened to '/a/b/c' keys
    (torch's own converter into the file `scratch`, no process group)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(ckpt_dir), str(scratch))
    out: dict = {}

    def walk(node, path: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{path}/{k}")
        elif torch.is_tensor(node):
            out[path] = node

    walk(torch.load(scratch, weights_only=False), "")
    return out
