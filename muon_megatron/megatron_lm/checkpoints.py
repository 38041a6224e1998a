"""Optimizer switches through Megatron-LM's own `load_checkpoint`.

`install()` wraps `megatron.training.training.load_checkpoint`. Before Megatron-LM reads the
checkpoint it is about to load (`--load`, the iteration in its tracker file or
`--ckpt-step`), the wrapper reads that checkpoint's tensor metadata (a file read on every
rank, no collective) and compares the optimizer that wrote it with this run's:

* AdamW checkpoint, `--optimizer muon` run: loaded through `reading_adamw_checkpoint`, in
  either sharding type. Each Muon matrix's momentum is AdamW's `exp_avg` (the same EMA of
  gradients), its `exp_avg_sq` is dropped, every other parameter's AdamW state loads as
  saved. One log line says so.
* Muon checkpoint, AdamW run: refused before anything is read, naming the two supported
  paths (`--no-load-optim`, or muon-megatron's training entry, which converts).
* Same optimizer, `--no-load-optim`, `--finetune`, no checkpoint: Megatron-LM's own path,
  untouched.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
from collections.abc import Callable
from typing import Any, Literal

__all__ = ["loading_across_optimizers", "checkpoint_optimizer", "MUON_STATE_MARK"]

logger = logging.getLogger(__name__)

MUON_STATE_MARK = "muon_momentum"
"""Substring of every checkpoint key that holds Muon momentum (both sharding types)."""

CheckpointOptimizer = Literal["muon", "adam", "none"]


def checkpoint_optimizer(keys: list[str] | set[str]) -> CheckpointOptimizer:
    """Which optimizer wrote a torch_dist checkpoint with these tensor keys: 'muon' (some
    Muon momentum), 'adam' (optimizer state, no Muon momentum) or 'none' (weights only)."""
    optimizer_keys = [k for k in keys if k.startswith("optimizer.")]
    if any(MUON_STATE_MARK in k for k in optimizer_keys):
        return "muon"
    return "adam" if any(k.endswith("exp_avg") or ".exp_avg." in k for k in optimizer_keys) else "none"


def _checkpoint_dir(args: argparse.Namespace, load_arg: str) -> str | None:
    """The directory Megatron-LM's load_checkpoint will read, or None when there is none."""
    from megatron.training import checkpointing

    load_dir = getattr(args, load_arg, None)
    if not load_dir:
        return None
    step = getattr(args, "ckpt_step", None)
    if step is not None:
        iteration, release = int(step), False
    else:
        tracker = checkpointing.get_checkpoint_tracker_filename(load_dir)
        if not os.path.isfile(tracker):
            return None
        with open(tracker, encoding="utf-8") as f:
            text = f.read().strip()
        release = text == "release"
        iteration = 0 if release else int(text)
    path = checkpointing.get_checkpoint_name(load_dir, iteration, release, return_base_dir=True)
    return path if os.path.isfile(os.path.join(path, ".metadata")) else None


def loading_across_optimizers(
    original: Callable[..., Any], get_args: Callable[[], argparse.Namespace]
) -> Callable[..., Any]:
    @functools.wraps(original)
    def load_checkpoint(ddp_model: Any, optimizer: Any, *rest: Any, **kwargs: Any) -> Any:
        from muon_megatron.optimizer.builder import muon_optimizers
        from muon_megatron.optimizer.checkpoint_state import reading_adamw_checkpoint

        args = get_args()
        load_arg = kwargs.get("load_arg", rest[1] if len(rest) > 1 else "load")
        skip = optimizer is None or args.no_load_optim or getattr(args, "finetune", False)
        ckpt_dir = None if skip else _checkpoint_dir(args, load_arg)
        if ckpt_dir is None:
            return original(ddp_model, optimizer, *rest, **kwargs)
        from megatron.core.dist_checkpointing.serialization import load_tensors_metadata

        saved = checkpoint_optimizer(set(load_tensors_metadata(ckpt_dir)))
        members = muon_optimizers(optimizer)
        if saved == "muon" and not members:
            raise ValueError(
                f"{ckpt_dir} was written by muon-megatron's Muon (it holds muon_momentum), and "
                f"this run's optimizer is --optimizer {args.optimizer}: Megatron-LM's "
                "load_checkpoint cannot turn Muon momentum into AdamW state. Either add "
                "--no-load-optim (weights and iteration load; AdamW state and the lr schedule "
                "start fresh), or convert once with muon-megatron's training entry "
                "(muon_megatron.training.checkpointing.load_checkpoint sets exp_avg <- momentum, "
                "exp_avg_sq <- momentum**2) and save from there."
            )
        if saved != "adam" or not members:
            return original(ddp_model, optimizer, *rest, **kwargs)
        if getattr(args, "rank", 0) == 0:
            logger.warning(
                "muon-megatron: optimizer switch AdamW -> Muon while loading %s: Muon "
                "momentum initialised from AdamW's exp_avg (the same EMA of gradients), "
                "exp_avg_sq not used; AdamW state of the other parameters loaded as saved.",
                ckpt_dir,
            )
        with reading_adamw_checkpoint(members):
            return original(ddp_model, optimizer, *rest, **kwargs)

    return load_checkpoint
