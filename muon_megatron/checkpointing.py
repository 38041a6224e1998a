"""Save and resume a Muon (or AdamW) training run with megatron-core's `dist_checkpointing`.

`save_checkpoint` / `load_checkpoint` make the calls a Megatron training loop makes
(`optimizer.sharded_state_dict(model_sharded_state_dict, is_loading=..., metadata=...)`,
`dist_checkpointing.save/load` in the torch_dist format, `optimizer.load_state_dict`) and add
what a loop needs around them: the model, the lr scheduler, the iteration, the RNG states,
and a check of the checkpoint against the run *before* any state is touched.

How Muon state looks inside the checkpoint is `checkpoint_state`'s business (momentum under
the state key `muon_momentum`); this module reads the checkpoint's tensor metadata to
  * resume: every parameter finds the state it needs (bitwise: nothing is recomputed);
  * switch optimizers (fully_reshardable only), one log line each way:
      AdamW -> Muon  the momentum of a Muon parameter is loaded from AdamW's `exp_avg` (the
                     same EMA of gradients); its `exp_avg_sq` is not read;
      Muon -> AdamW  `exp_avg` is loaded from the momentum and `exp_avg_sq` set to its
                     elementwise square, so the first AdamW updates are bounded by lr per
                     element, like AdamW's own first step (zeros would divide by eps);
  * refuse a checkpoint that does not match (another Muon parameter set, missing momentum,
    unreadable files) with `CheckpointMismatchError` / `CheckpointReadError` naming the
    parameter and the fix, raised on every rank together.

docs/checkpoints.md describes the format and the policies.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import re
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.api import CheckpointException
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.mapping import (
    LocalNonpersistentObject,
    ShardedBase,
    ShardedObject,
)
from megatron.core.dist_checkpointing.serialization import load_sharded_metadata
from megatron.core.distributed import DistributedDataParallel
from megatron.core.transformer.module import Float16Module
from megatron.core.utils import log_single_rank

from muon_megatron.checkpoint_state import MUON_MANIFEST, MUON_MOMENTUM, SHARDING_TYPES

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "CheckpointMismatchError",
    "CheckpointReadError",
    "FORMAT_VERSION",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_FORMAT_KEY = "muon_megatron_checkpoint"
_STATE_KEY = re.compile(
    r"^(?P<prefix>(?:chained_\d+\.)?optimizer\.state\.)"
    r"(?P<state>param|exp_avg|exp_avg_sq|" + MUON_MOMENTUM + r")\.(?P<param>.+)$"
)
_MAX_LISTED = 6


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit this run (Muon parameter set, missing state, format)."""


class CheckpointReadError(RuntimeError):
    """The checkpoint's files could not be read (missing, truncated or corrupt)."""


# ------------------------------------------------------------------------------------ save
def save_checkpoint(
    ckpt_dir: str,
    model_chunks: list[torch.nn.Module],
    optimizer,
    scheduler=None,
    iteration: int = 0,
    sharding_type: str = "fully_reshardable",
) -> None:
    """Write model, optimizer, scheduler, iteration and RNG states to `ckpt_dir` (torch_dist).

    Collective over all ranks; `ckpt_dir` must be the same (shared) path everywhere and must
    not hold a checkpoint already. `sharding_type` is the distributed optimizer's format:
    'fully_reshardable' (model space; loads under any TP/PP/EP/DP layout and allows an
    optimizer switch) or 'dp_reshardable' (bucket space, no gather; same TP/PP/EP, any DP).
    """
    if sharding_type not in SHARDING_TYPES:
        raise ValueError(f"sharding_type={sharding_type!r}: pick one of {SHARDING_TYPES}.")
    if torch.distributed.get_rank() == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
    torch.distributed.barrier()
    metadata = _metadata(sharding_type)
    model_sd = _model_sharded_state_dict(model_chunks)
    state: dict[str, Any] = dict(model_sd)
    state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=False, metadata=metadata)
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    state["iteration"] = int(iteration)
    state["rng_state"] = _rng_sharded_object()
    content = {
        **metadata,
        _FORMAT_KEY: FORMAT_VERSION,
        "world_size": torch.distributed.get_world_size(),
    }
    dist_checkpointing.save(state, ckpt_dir, content_metadata=content)


# ------------------------------------------------------------------------------------ load
def load_checkpoint(
    ckpt_dir: str, model_chunks: list[torch.nn.Module], optimizer, scheduler=None
) -> int:
    """Load a `save_checkpoint` checkpoint into this run; returns its iteration.

    Collective over all ranks. The layout may differ from the saving run's wherever the
    checkpoint's sharding type allows it; RNG states are restored only under the same world
    size. Raises `CheckpointMismatchError` / `CheckpointReadError` (on every rank) before any
    state is changed when the checkpoint does not fit or cannot be read.
    """
    common = _read(ckpt_dir, dist_checkpointing.load_common_state_dict)
    content = common.get("content_metadata") or {}
    if _FORMAT_KEY not in content:
        raise CheckpointMismatchError(
            f"{ckpt_dir!r} was not written by muon_megatron.checkpointing.save_checkpoint (its "
            f"content metadata has no {_FORMAT_KEY!r}); save the run with save_checkpoint."
        )
    if content[_FORMAT_KEY] > FORMAT_VERSION:
        raise CheckpointMismatchError(
            f"{ckpt_dir!r} has checkpoint format {content[_FORMAT_KEY]}, newer than this "
            f"muon_megatron's {FORMAT_VERSION}; upgrade muon_megatron."
        )
    sharding_type = content["distrib_optim_sharding_type"]
    metadata = _metadata(sharding_type)
    model_sd = _model_sharded_state_dict(model_chunks)
    opt_sd = optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=metadata)
    saved_keys = {k.split("/")[0] for k in _read(ckpt_dir, load_sharded_metadata)}
    if sharding_type == "fully_reshardable":
        squares = _reconcile_model_space(opt_sd, saved_keys, ckpt_dir)
    else:
        squares = _reconcile_bucket_space(opt_sd, saved_keys, ckpt_dir)

    request: dict[str, Any] = {**model_sd, "optimizer": opt_sd}
    same_world = content.get("world_size") == torch.distributed.get_world_size()
    if same_world:
        request["rng_state"] = _rng_sharded_object()
    with torch.no_grad():
        loaded = _read(ckpt_dir, lambda d: dist_checkpointing.load(request, d))
        for path in squares:
            entry = _at(loaded["optimizer"], path)
            entry["exp_avg_sq"] = entry["exp_avg"].square()
        for i, chunk in enumerate(model_chunks):
            _unwrap(chunk).load_state_dict(loaded[_chunk_key(i, len(model_chunks))], strict=True)
        optimizer.load_state_dict(_match_chain(loaded["optimizer"], opt_sd, common["optimizer"]))
    if scheduler is not None:
        if "opt_param_scheduler" not in loaded:
            raise CheckpointMismatchError(
                f"{ckpt_dir!r} holds no lr-scheduler state but a scheduler was passed; pass "
                "scheduler=None and set its step yourself."
            )
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if same_world:
        _set_rng_state(loaded["rng_state"])
    else:
        log_single_rank(
            logger,
            logging.INFO,
            f"muon_megatron: {ckpt_dir} was saved on {content.get('world_size')} ranks, this run "
            f"has {torch.distributed.get_world_size()}: RNG states start fresh from the seed.",
        )
    return int(loaded.get("iteration", 0))


def _reconcile_model_space(opt_sd: dict, saved_keys: set[str], ckpt_dir: str) -> list[tuple]:
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
            "weights with tiny_gpt.load_model / model.load_state_dict instead."
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
                    _at(opt_sd, path[:-1])[path[-1]] = LocalNonpersistentObject(None)
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


def _reconcile_bucket_space(opt_sd: dict, saved_keys: set[str], ckpt_dir: str) -> list[tuple]:
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
            loaded = _read(ckpt_dir, lambda d: dist_checkpointing.load(request, d))
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


def _members(state_dict: dict) -> list:
    """Member keys of a ChainedOptimizer state dict ({0: ..., 1: ...}); [] for one member."""
    return sorted(k for k in state_dict if isinstance(k, int))


def _match_chain(loaded: dict, request: dict, saved_common: dict) -> dict:
    """Fit the checkpoint's per-member common state to this run's chain of optimizers.

    The number of members can change with the layout (megatron makes a separate expert
    optimizer only for expert-parallel params: EP2 has two members, EP1 one). The tensors
    were requested in this run's structure; the param groups (lr, wd, AdamW's step) are
    pooled from all saved members: megatron's load_state_dict picks each of its groups by
    (wd_mult, lr_mult, is_expert_parallel, is_decoupled_lr)."""
    run, saved = _members(request), _members(saved_common)
    if run == saved:
        return loaded
    saved_members = [saved_common[k] for k in saved] or [saved_common]
    groups = [g for member in saved_members for g in member["optimizer"]["param_groups"]]
    common = {k: v for k, v in saved_members[0].items() if not isinstance(k, int)}
    common["optimizer"] = {**common["optimizer"], "param_groups": groups}
    if not run:
        own = {k: v for k, v in loaded.items() if not isinstance(k, int) and k not in common}
        return {**own, **common}
    return {k: {**loaded[k], **common} for k in run}


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
    _at(opt_sd, path[:-1])[path[-1]] = dataclasses.replace(
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


def _read(ckpt_dir: str, reader):
    try:
        return reader(ckpt_dir)
    except CheckpointMismatchError:
        raise
    # torch.distributed.checkpoint reports read failures of any rank, on every rank, as a
    # CheckpointException, which derives from BaseException.
    except (Exception, CheckpointException) as error:  # noqa: BLE001
        raise CheckpointReadError(
            f"could not read the checkpoint at {ckpt_dir!r} ({type(error).__name__}: {error}). "
            "Its files are missing, truncated or corrupt (an interrupted save or copy?): load "
            "the previous complete checkpoint, or re-save this one from the run that wrote it."
        ) from error


# ------------------------------------------------------------------------------------ helpers
def _metadata(sharding_type: str) -> dict[str, Any]:
    # What Megatron-LM's training loop passes (model-space keys without 'chained_i.' prefixes).
    return {"distrib_optim_sharding_type": sharding_type, "chained_optim_avoid_prefix": True}


def _unwrap(model_chunk: torch.nn.Module) -> torch.nn.Module:
    module = model_chunk
    while isinstance(module, (DistributedDataParallel, Float16Module)):
        module = module.module
    return module


def _chunk_key(index: int, count: int) -> str:
    # The keys of tiny_gpt.save_model: its load_model reads the weights of a checkpoint.
    return "model" if count == 1 else f"model{index}"


def _model_sharded_state_dict(model_chunks: list[torch.nn.Module]) -> dict[str, Any]:
    return {
        _chunk_key(i, len(model_chunks)): _unwrap(chunk).sharded_state_dict()
        for i, chunk in enumerate(model_chunks)
    }


def _leaves(node: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, path + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _leaves(value, path + (index,))
    else:
        yield path, node


def _at(node: Any, path: tuple) -> Any:
    for key in path:
        node = node[key]
    return node


def _rng_sharded_object() -> ShardedObject:
    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    return ShardedObject("rng_state", state, (world,), (rank,), replica_id=0)


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _collective_device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
