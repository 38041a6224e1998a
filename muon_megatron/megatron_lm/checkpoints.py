"""Megatron-LM's own save and load, with muon-megatron's checks around them.

`install()` rebinds two functions:

* `megatron.core.dist_checkpointing.save` (what Megatron-LM's `save_checkpoint` calls for
  `--ckpt-format torch_dist`) to `recording_checksums`: once the save is complete (at once
  for a synchronous save, as a finalize step of an `--async-save` request), every rank
  records the CRC-32 of the files it wrote (`muon_megatron.integrity`). Both run before
  Megatron-LM writes its tracker file.
* `megatron.training.training.load_checkpoint` to `checking_before_load`. Before Megatron-LM
  reads the checkpoint it is about to load (`--load`, the iteration in its tracker file or
  `--ckpt-step`), the wrapper
  - refuses an incomplete or damaged one (`integrity.verify_checkpoint`: `.metadata`, every
    shard it lists at its size, `common.pt`, `metadata.json`, each file's CRC-32) with
    `CheckpointReadError` naming the file and the last complete checkpoint, where Megatron-LM
    itself would stop in an EOFError, FileNotFoundError, UnpicklingError or AttributeError
    (`--no-load-optim` and `--finetune` included: the weights are read too);
  - compares the expert-parallel size that wrote it (the `args` in its `common.pt`) with
    this run's: a `dp_reshardable` checkpoint (bucket space, Megatron-LM's default) cannot
    change it and is refused with `CheckpointMismatchError` naming both layouts and the ways
    out (Megatron-LM itself checks only TP and PP); a `fully_reshardable` one
    (`--dist-ckpt-optim-fully-reshardable`) loads, with the chain of optimizers fitted
    (`optimizer.chain_fit`: EP1 has one optimizer, EP > 1 a dense and an expert one, and
    Megatron-LM's own `ChainedOptimizer.load_state_dict` stops on the difference) and the
    RNG states not loaded, as Megatron-LM does for a TP or PP change (it stores them per
    (PP, TP) at EP1 and per (PP, TP, DP) at EP > 1, and would stop on the missing keys);
  - compares the optimizer that wrote it with this run's (a file read, no collective):
    * AdamW checkpoint, `--optimizer muon` run: loaded through `reading_adamw_checkpoint`,
      in either sharding type. Each Muon matrix's momentum is AdamW's `exp_avg` (the same EMA
      of gradients), its `exp_avg_sq` is dropped, every other parameter's AdamW state loads
      as saved. One log line says so.
    * Muon checkpoint, AdamW run: refused before anything is read, naming the two supported
      paths (`--no-load-optim`, or muon-megatron's training entry, which converts).
    * Same optimizer, `--no-load-optim`, `--finetune`, no checkpoint: Megatron-LM's own
      path, untouched.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any, Literal

__all__ = [
    "checking_before_load",
    "recording_checksums",
    "checkpoint_optimizer",
    "MUON_STATE_MARK",
]

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
    """The directory Megatron-LM's load_checkpoint will read, or None when there is none
    (no load directory, no tracker file, or a tracker Megatron-LM itself will report)."""
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
        if not release and not text.isdigit():
            return None  # Megatron-LM's read_metadata names the bad tracker file
        iteration = 0 if release else int(text)
    return checkpointing.get_checkpoint_name(load_dir, iteration, release, return_base_dir=True)


def _is_torch_dist(args: argparse.Namespace, ckpt_dir: str) -> bool:
    """Whether Megatron-LM will read `ckpt_dir` as a torch_dist checkpoint (the format our
    checks know; the legacy format keeps `mp_rank_*` folders)."""
    if getattr(args, "ckpt_format", "torch_dist") != "torch_dist" and not getattr(
        args, "auto_detect_ckpt_format", False
    ):
        return False
    if not os.path.isdir(ckpt_dir):
        return True
    return not any(name.startswith("mp_rank_") for name in os.listdir(ckpt_dir))


def recording_checksums(original: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap `dist_checkpointing.save`: after the save, each rank records its files' CRC-32."""
    from muon_megatron.integrity import record_checksums

    @functools.wraps(original)
    def save(sharded_state_dict: Any, checkpoint_dir: Any, *rest: Any, **kwargs: Any) -> Any:
        request = original(sharded_state_dict, checkpoint_dir, *rest, **kwargs)
        if request is None:
            record_checksums(str(checkpoint_dir))
        else:  # --async-save: after the write and dist_checkpointing's own finalize steps
            request.finalize_fns.append(lambda: record_checksums(str(checkpoint_dir)))
        return request

    return save


def checking_before_load(
    original: Callable[..., Any], get_args: Callable[[], argparse.Namespace]
) -> Callable[..., Any]:
    """Wrap Megatron-LM's `load_checkpoint`: the checks of the module docstring, then it."""

    @functools.wraps(original)
    def load_checkpoint(ddp_model: Any, optimizer: Any, *rest: Any, **kwargs: Any) -> Any:
        from muon_megatron.integrity import verify_checkpoint

        args = get_args()
        load_arg = kwargs.get("load_arg", rest[1] if len(rest) > 1 else "load")
        ckpt_dir = _checkpoint_dir(args, load_arg)
        if ckpt_dir is None or not _is_torch_dist(args, ckpt_dir):
            return original(ddp_model, optimizer, *rest, **kwargs)
        note = verify_checkpoint(ckpt_dir)
        if getattr(args, "rank", 0) == 0:
            logger.info("muon-megatron: checkpoint %s", note)
        if optimizer is None or args.no_load_optim or getattr(args, "finetune", False):
            return original(ddp_model, optimizer, *rest, **kwargs)
        with _fitting_an_expert_parallel_change(args, ckpt_dir, optimizer):
            return _load_across_optimizers(
                original, args, ckpt_dir, ddp_model, optimizer, *rest, **kwargs
            )

    return load_checkpoint


def _layout(namespace: Any) -> str:
    """'TP1 PP1 EP2 (DP2)' from Megatron-LM's arguments (this run's, or a checkpoint's)."""
    sizes = [
        getattr(namespace, f"{name}_parallel_size", None) or 1
        for name in ("tensor_model", "pipeline_model", "expert_model", "data")
    ]
    return "TP{} PP{} EP{} (DP{})".format(*sizes)


@contextlib.contextmanager
def _fitting_an_expert_parallel_change(
    args: argparse.Namespace, ckpt_dir: str, optimizer: Any
) -> Iterator[None]:
    """Refuse an EP change that the checkpoint's sharding type cannot make (dp_reshardable),
    or, inside the block, fit what Megatron-LM passes to `optimizer.load_state_dict` to this
    run's chain of optimizers (fully_reshardable)."""
    from megatron.core import dist_checkpointing

    from muon_megatron.integrity import CheckpointMismatchError
    from muon_megatron.optimizer.chain_fit import match_chain

    common = dist_checkpointing.load_common_state_dict(ckpt_dir)
    saved_args = common.get("args")
    saved_ep = getattr(saved_args, "expert_model_parallel_size", None)
    if saved_ep is None or saved_ep == args.expert_model_parallel_size:
        yield
        return
    sharding = (common.get("content_metadata") or {}).get("distrib_optim_sharding_type")
    if sharding != "fully_reshardable":
        raise CheckpointMismatchError(
            f"{ckpt_dir} was saved under {_layout(saved_args)} with the distributed optimizer's "
            f"{sharding} sharding, and this run is {_layout(args)}: a {sharding} checkpoint "
            "holds the optimizer state per gradient bucket, which only the saving "
            f"expert-parallel size has. Resume with --expert-model-parallel-size {saved_ep}; "
            "or re-save it under that layout with --dist-ckpt-optim-fully-reshardable "
            "(loads under another EP); or add --no-load-optim (weights and iteration load, the "
            "Muon momentum and AdamW state start from zero)."
        )
    if getattr(args, "rank", 0) == 0:
        logger.warning(
            "muon-megatron: %s was saved under %s, this run is %s: optimizer state resharded "
            "(fully_reshardable); RNG states not loaded (they start from the seed), as "
            "Megatron-LM does when TP or PP change.",
            ckpt_dir, _layout(saved_args), _layout(args),
        )  # fmt: skip
    members = getattr(optimizer, "chained_optimizers", [optimizer])
    run_members = list(range(len(members))) if len(members) > 1 else []
    load_state_dict = optimizer.load_state_dict

    def fitted(state_dict: dict) -> Any:
        return load_state_dict(match_chain(state_dict, run_members, common["optimizer"]))

    own = vars(optimizer).get("load_state_dict")
    optimizer.load_state_dict = fitted
    no_load_rng, args.no_load_rng = args.no_load_rng, True
    try:
        yield
    finally:
        args.no_load_rng = no_load_rng
        if own is None:
            del optimizer.load_state_dict  # the class's own again
        else:
            optimizer.load_state_dict = own


def _load_across_optimizers(
    original: Callable[..., Any],
    args: argparse.Namespace,
    ckpt_dir: str,
    ddp_model: Any,
    optimizer: Any,
    *rest: Any,
    **kwargs: Any,
) -> Any:
    from megatron.core.dist_checkpointing.serialization import load_tensors_metadata

    from muon_megatron.optimizer.builder import muon_optimizers
    from muon_megatron.optimizer.checkpoint_state import reading_adamw_checkpoint

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
