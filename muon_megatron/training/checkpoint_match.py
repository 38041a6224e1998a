"""Checking a checkpoint against the run before any state is touched, and fitting it.

`training.checkpointing.load_checkpoint` asks this module, from the checkpoint's tensor
metadata alone, whether every parameter finds the state it needs, redirects the requests of
an optimizer switch (AdamW's `exp_avg` <-> Muon's momentum, fully_reshardable only),
refuses a dp_reshardable checkpoint saved under another TP/PP/VPP/EP layout (naming both), and
fits the saved chain of optimizers to this run's (`optimizer.chain_fit`: EP1 <-> EP > 1).
Every problem is raised on every rank together (`CheckpointMismatchError`), naming the
parameter and the fix.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import (
    LocalNonpersistentObject,
    ShardedBase,
    ShardedObject,
)
from megatron.core.utils import log_single_rank
from torch.distributed.checkpoint.api import CheckpointException

from muon_megatron.integrity import CheckpointMismatchError, CheckpointReadError, read_error
from muon_megatron.integrity.files import last_complete_checkpoint
from muon_megatron.optimizer.chain_fit import chain_members, match_chain
from muon_megatron.optimizer.checkpoint_state import MUON_MANIFEST, MUON_MOMENTUM

__all__ = [
    "CheckpointMismatchError",
    "CheckpointReadError",
    "read_checkpoint",
    "reconcile_model_space",
    "reconcile_bucket_space",
    "match_chain",
    "chain_members",
    "run_layout",
    "check_layout",
    "state_at",
]

logger = logging.getLogger("muon_megatron.training.checkpointing")

_STATE_KEY = re.compile(
    r"^(?P<prefix>(?:chained_\d+\.)?optimizer\.state\.)"
    r"(?P<state>param|exp_avg|exp_avg_sq|" + MUON_MOMENTUM + r")\.(?P<param>.+)$"
)
_MAX_LISTED = 6


def read_checkpoint(ckpt_dir: str, reader):
    """`reader(ckpt_dir)`, with any read failure raised as `CheckpointReadError` naming the
    directory, the error and the last complete checkpoint beside it."""
    try:
        return reader(ckpt_dir)
    except CheckpointMismatchError:
        raise
    # torch.distributed.checkpoint reports read failures of any rank, on every rank, as a
    # CheckpointException, which derives from BaseException.
    except (Exception, CheckpointException) as error:  # noqa: BLE001
        problem = (
            f"reading it failed ({type(error).__name__}: {error}): its files are missing, "
            "truncated or corrupt (an interrupted save or copy?)"
        )
        raise read_error(ckpt_dir, [problem], last_complete_checkpoint(ckpt_dir)) from error


def reconcile_model_space(opt_sd: dict, saved_keys: set[str], ckpt_dir: str) -> list[tuple]:
    """Check every requested optimizer-state tensor against the checkpoint; redirect requests
    for an optimizer switch. Returns the paths whose `exp_avg_sq` is the momentum squared."""
    # Checkpoint key -> state -> requests. One key can serve several parameters: megatron
    # stacks the layers of a transformer block into one tensor per weight.
    requested: dict[str, dict[str, list[tuple]]] = defaultdict(lambda: defaultdict(list))
    for path, value in _leaves(opt_sd):
        if isinstance(value, ShardedBase) and not isinstance(value, ShardedObject):
            match = _STATE_KEY.match(value.key)
            if match:
                requested[match["param"]][match["state"]].append((path, value, match["prefix"]))
    saved: dict[str, set[str]] = defaultdict(set)
    for key in saved_keys:
        match = _STATE_KEY.match(key)
        if match:
            saved[match["param"]].add(match["state"])
    ckpt_muon = any(MUON_MOMENTUM in states for states in saved.values())
    run_muon = _on_any_rank(any(MUON_MOMENTUM in states for states in requested.values()))
    switch = None
    if saved and run_muon and not ckpt_muon:
        switch = "AdamW -> Muon"
    elif ckpt_muon and not run_muon:
        switch = "Muon -> AdamW"

    errors: list[str] = []
    squares: list[tuple] = []
    if not saved:
        errors.append(
            f"{ckpt_dir!r} holds no optimizer state (a weights-only checkpoint?); load its "
            "weights with tiny.load_model / model.load_state_dict instead."
        )
    for name, states in sorted(requested.items()) if saved else []:
        have = saved.get(name, set())
        if "param" in states and "param" not in have:
            errors.append(
                f"{name}: the checkpoint has no main parameter for it "
                f"(optimizer.state.param.{name}); it is from a different model: load a "
                "checkpoint of this model."
            )
        if MUON_MOMENTUM in states:
            if MUON_MOMENTUM in have:
                continue
            if switch and "exp_avg" in have:
                for request in states[MUON_MOMENTUM]:
                    _redirect(opt_sd, request, "exp_avg")
            elif "exp_avg" in have:
                errors.append(
                    f"{name} is a Muon parameter in this run, but the checkpoint holds AdamW "
                    "state (exp_avg, exp_avg_sq) for it while other parameters carry Muon "
                    "momentum: it was saved with a different Muon parameter set. Build the "
                    "optimizer with the routing (is_muon) of the run that saved it."
                )
            else:
                errors.append(
                    f"{name} is a Muon parameter, but the checkpoint has no momentum for it "
                    f"(optimizer.state.{MUON_MOMENTUM}.{name} is missing, and no AdamW state "
                    "either): the checkpoint is incomplete. Load a complete checkpoint (e.g. "
                    "the previous one); never restart Muon from zero momentum silently."
                )
        elif "exp_avg" in states:
            if {"exp_avg", "exp_avg_sq"} <= have:
                continue
            if switch and MUON_MOMENTUM in have:
                for request in states["exp_avg"]:
                    _redirect(opt_sd, request, MUON_MOMENTUM)
                for path, _, _ in states["exp_avg_sq"]:
                    state_at(opt_sd, path[:-1])[path[-1]] = LocalNonpersistentObject(None)
                    squares.append(path[:-1])
            elif MUON_MOMENTUM in have:
                errors.append(
                    f"{name} is an AdamW parameter in this run, but the checkpoint holds Muon "
                    "momentum for it while other parameters carry AdamW state: it was saved "
                    "with a different Muon parameter set. Build the optimizer with the routing "
                    "(is_muon) of the run that saved it."
                )
            else:
                errors.append(
                    f"{name}: the checkpoint has no AdamW state for it "
                    f"(optimizer.state.exp_avg.{name}): the checkpoint is incomplete; load a "
                    "complete checkpoint."
                )
    _raise_on_every_rank(errors, CheckpointMismatchError, ckpt_dir)
    if switch == "AdamW -> Muon":
        detail = (
            "Muon momentum initialised from AdamW's exp_avg (the same EMA of gradients), their "
            "exp_avg_sq not read"
        )
    elif switch:
        detail = (
            "AdamW exp_avg initialised from the Muon momentum (the same EMA of gradients) and "
            "exp_avg_sq from its elementwise square"
        )
    if switch:
        log_single_rank(
            logger,
            logging.WARNING,
            f"muon_megatron: optimizer switch {switch} while loading {ckpt_dir}: {detail}; "
            "AdamW state of the other parameters loaded as saved.",
        )
    return squares


def reconcile_bucket_space(opt_sd: dict, saved_keys: set[str], ckpt_dir: str) -> list[tuple]:
    """dp_reshardable: compare the per-DP-group Muon parameter lists before loading."""
    manifests = [
        (path, value)
        for path, value in _leaves(opt_sd)
        if isinstance(value, ShardedObject) and value.key.endswith("." + MUON_MANIFEST)
    ]
    ckpt_muon = any(k.endswith("." + MUON_MANIFEST) for k in saved_keys)
    run_muon = _on_any_rank(any(value.data for _, value in manifests))
    run_manifests = _on_any_rank(bool(manifests))
    errors: list[str] = []
    if ckpt_muon and run_manifests:
        missing = [v.key for _, v in manifests if v.key not in saved_keys]
        if missing:
            errors.append(
                f"the checkpoint has no {missing[0]}: it was saved under a different TP/PP/EP "
                "layout, which dp_reshardable cannot change; resume under the saving layout or "
                "save with sharding_type='fully_reshardable'."
            )
        request = {i: v for i, (_, v) in enumerate(manifests)} if not _on_any_rank(bool(missing)) else None
        if request is not None:
            loaded = read_checkpoint(ckpt_dir, lambda d: dist_checkpointing.load(request, d))
            for i, (_, value) in enumerate(manifests):
                theirs, mine = list(loaded[i]), list(value.data)
                if theirs != mine:
                    errors.append(_manifest_mismatch(theirs, mine))
    elif run_muon or ckpt_muon:
        direction = "AdamW -> Muon" if run_muon else "Muon -> AdamW"
        errors.append(
            f"switching optimizers ({direction}) needs a fully_reshardable checkpoint, and "
            f"{ckpt_dir!r} is dp_reshardable: re-save it with sharding_type='fully_reshardable' "
            "from the run that wrote it, or keep its optimizer."
        )
    _raise_on_every_rank(errors, CheckpointMismatchError, ckpt_dir)
    return []


def run_layout() -> dict[str, int]:
    """This run's parallel sizes, as a checkpoint records them."""
    return {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "vpp": parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1,
        "ep": parallel_state.get_expert_model_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(),
    }


_BUCKET_LAYOUT = ("tp", "pp", "vpp", "ep")
"""What fixes the gradient buckets of a rank, and so a dp_reshardable checkpoint's layout
(a checkpoint without "vpp" was saved with one model chunk per rank)."""


def _sizes(layout: dict[str, int]) -> dict[str, int]:
    return {k: layout.get(k, 1) for k in (*_BUCKET_LAYOUT, "dp")}


def _layout_name(layout: dict[str, int]) -> str:
    sizes = _sizes(layout)
    pp = f"PP{sizes['pp']}" + (f"xVPP{sizes['vpp']}" if sizes["vpp"] > 1 else "")
    return f"TP{sizes['tp']} {pp} EP{sizes['ep']} (DP{sizes['dp']})"


def check_layout(saved: dict[str, int] | None, sharding_type: str, ckpt_dir: str) -> None:
    """Refuse a dp_reshardable checkpoint saved under another TP/PP/EP layout, naming both
    (every rank decides alike from the same common state). `saved` is None for checkpoints
    that predate the record; their layout is checked later, key by key."""
    run = run_layout()
    if saved is None or sharding_type != "dp_reshardable":
        return
    if any(_sizes(saved)[k] != run[k] for k in _BUCKET_LAYOUT):
        saving = _layout_name(saved).rsplit(" (", 1)[0]
        raise CheckpointMismatchError(
            f"checkpoint {ckpt_dir} is dp_reshardable and was saved under "
            f"{_layout_name(saved)}; this run is {_layout_name(run)}. A dp_reshardable "
            "checkpoint holds the optimizer state per gradient bucket, which only the saving "
            f"TP/PP/VPP/EP layout has (any DP size works): resume under {saving}, or re-save "
            "it under that layout with sharding_type='fully_reshardable', which loads under "
            "any TP/PP/VPP/EP/DP."
        )


def _manifest_mismatch(theirs: list[str], mine: list[str]) -> str:
    only_theirs = sorted(set(theirs) - set(mine))
    only_mine = sorted(set(mine) - set(theirs))
    first = (only_mine or only_theirs or ["(same parameters, another order)"])[0]
    return (
        f"{first}: the checkpoint was saved with a different Muon parameter set (Muon there, "
        f"not here: {only_theirs or 'none'}; Muon here, not there: {only_mine or 'none'}). "
        "Build the optimizer with the routing (is_muon) of the run that saved it."
    )


def _redirect(opt_sd: dict, request: tuple, saved_state: str) -> None:
    path, value, prefix = request
    name = _STATE_KEY.match(value.key)["param"]
    state_at(opt_sd, path[:-1])[path[-1]] = dataclasses.replace(
        value, key=f"{prefix}{saved_state}.{name}"
    )


def _raise_on_every_rank(errors: list[str], error_type: type[Exception], ckpt_dir: str) -> None:
    """Raise on all ranks if any rank found a problem (a lone raise would leave the other
    ranks waiting in the next collective)."""
    gathered: list[list[str]] = [[] for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather_object(gathered, errors)
    problems = list(dict.fromkeys(e for rank_errors in gathered for e in rank_errors))
    if not problems:
        return
    more = len(problems) - _MAX_LISTED
    listed = "\n  ".join(problems[:_MAX_LISTED]) + (f"\n  ... and {more} more" if more > 0 else "")
    raise error_type(f"checkpoint {ckpt_dir} does not match this run:\n  {listed}")


def _on_any_rank(flag: bool) -> bool:
    value = torch.tensor([int(flag)], device=_collective_device())
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def _leaves(node: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, path + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _leaves(value, path + (index,))
    else:
        yield path, node


def state_at(node: Any, path: tuple) -> Any:
    for key in path:
        node = node[key]
    return node


def _collective_device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
