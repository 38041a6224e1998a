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
  * refuse a checkpoint that does not match (another Muon parameter set, missing momentum)
    with `CheckpointMismatchError` naming the parameter and the fix, raised on every rank
    together;
  * refuse, before reading anything, a checkpoint whose files are missing, truncated or
    differ from what was saved (`muon_megatron.integrity`: every save records each file's
    CRC-32), with `CheckpointReadError` naming the file and the last complete checkpoint.

docs/checkpoints.md describes the format and the policies.
"""

from __future__ import annotations

import logging
import os
import random
from typing import Any

import numpy as np
import torch
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.serialization import load_sharded_metadata
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.utils import log_single_rank

from muon_megatron.integrity import record_checksums, verify_checkpoint
from muon_megatron.optimizer.checkpoint_state import SHARDING_TYPES
from muon_megatron.training.checkpoint_match import (
    CheckpointMismatchError,
    CheckpointReadError,
    chain_members,
    check_layout,
    match_chain,
    read_checkpoint,
    reconcile_bucket_space,
    reconcile_model_space,
    run_layout,
    state_at,
)
from muon_megatron.training.model import unwrap

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "save_model",
    "load_model",
    "model_sharded_state_dict",
    "load_weights",
    "CheckpointMismatchError",
    "CheckpointReadError",
    "FORMAT_VERSION",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_FORMAT_KEY = "muon_megatron_checkpoint"


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
    optimizer switch) or 'dp_reshardable' (bucket space, no gather; same TP/PP/VPP/EP, any DP).
    Every rank then records the CRC-32 of the files it wrote (`integrity.record_checksums`);
    it returns when all of them have.
    """
    if sharding_type not in SHARDING_TYPES:
        raise ValueError(f"sharding_type={sharding_type!r}: pick one of {SHARDING_TYPES}.")
    if torch.distributed.get_rank() == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
    torch.distributed.barrier()
    metadata = _metadata(sharding_type)
    model_sd = model_sharded_state_dict(model_chunks)
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
        "layout": run_layout(),
    }
    dist_checkpointing.save(state, ckpt_dir, content_metadata=content)
    record_checksums(ckpt_dir)


# ------------------------------------------------------------------------------------ load
def load_checkpoint(
    ckpt_dir: str, model_chunks: list[torch.nn.Module], optimizer, scheduler=None
) -> int:
    """Load a `save_checkpoint` checkpoint into this run; returns its iteration.

    Collective over all ranks. The layout may differ from the saving run's wherever the
    checkpoint's sharding type allows it; RNG states are restored only under the same world
    size. Raises `CheckpointMismatchError` / `CheckpointReadError` (on every rank) before any
    state is changed when the checkpoint does not fit, is incomplete, or differs from what
    was saved (each file against its CRC-32; the ranks share the reading).
    """
    _log_verified(verify_checkpoint(ckpt_dir))
    common = read_checkpoint(ckpt_dir, dist_checkpointing.load_common_state_dict)
    content = common.get("content_metadata") or {}
    if _FORMAT_KEY not in content:
        raise CheckpointMismatchError(
            f"{ckpt_dir!r} was not written by muon_megatron.training.checkpointing.save_checkpoint (its "
            f"content metadata has no {_FORMAT_KEY!r}); save the run with save_checkpoint."
        )
    if content[_FORMAT_KEY] > FORMAT_VERSION:
        raise CheckpointMismatchError(
            f"{ckpt_dir!r} has checkpoint format {content[_FORMAT_KEY]}, newer than this "
            f"muon_megatron's {FORMAT_VERSION}; upgrade muon_megatron."
        )
    sharding_type = content["distrib_optim_sharding_type"]
    check_layout(content.get("layout"), sharding_type, ckpt_dir)
    metadata = _metadata(sharding_type)
    model_sd = model_sharded_state_dict(model_chunks)
    opt_sd = optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=metadata)
    saved_keys = {k.split("/")[0] for k in read_checkpoint(ckpt_dir, load_sharded_metadata)}
    if sharding_type == "fully_reshardable":
        squares = reconcile_model_space(opt_sd, saved_keys, ckpt_dir)
    else:
        squares = reconcile_bucket_space(opt_sd, saved_keys, ckpt_dir)

    request: dict[str, Any] = {**model_sd, "optimizer": opt_sd}
    same_world = content.get("world_size") == torch.distributed.get_world_size()
    if same_world:
        request["rng_state"] = _rng_sharded_object()
    with torch.no_grad():
        loaded = read_checkpoint(ckpt_dir, lambda d: dist_checkpointing.load(request, d))
        for path in squares:
            entry = state_at(loaded["optimizer"], path)
            entry["exp_avg_sq"] = entry["exp_avg"].square()
        load_weights(model_chunks, loaded)
        members = chain_members(opt_sd)
        optimizer.load_state_dict(match_chain(loaded["optimizer"], members, common["optimizer"]))
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


# ------------------------------------------------------------------------- weights only
def save_model(model_chunks: list[torch.nn.Module], ckpt_dir: str) -> None:
    """Save the model weights alone with `dist_checkpointing` (torch_dist format).

    Collective over all ranks; `ckpt_dir` must be the same path on every rank. The result
    loads under any other layout of the same model, with `load_model`.
    """
    if torch.distributed.get_rank() == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(model_sharded_state_dict(model_chunks), ckpt_dir)
    record_checksums(ckpt_dir)


@torch.no_grad()
def load_model(
    model_chunks: list[torch.nn.Module],
    ckpt_dir: str,
    *,
    optimizer: MegatronOptimizer | None = None,
) -> None:
    """Load weights saved by `save_model` or `save_checkpoint` (under any layout).

    Collective over all ranks. A mixed-precision optimizer keeps fp32 main copies of the
    params: pass it as `optimizer` (its main params are refreshed from the loaded weights), or
    load before building the optimizer. For an fp32 model the ZeRO-1 optimizer's main params
    are views of the model params and see the load either way. Raises `CheckpointReadError`
    (every rank) for an incomplete or damaged checkpoint, before anything is read.
    """
    _log_verified(verify_checkpoint(ckpt_dir))
    loaded = dist_checkpointing.load(model_sharded_state_dict(model_chunks), ckpt_dir)
    load_weights(model_chunks, loaded)
    if optimizer is not None:
        optimizer.reload_model_params()


def model_sharded_state_dict(model_chunks: list[torch.nn.Module]) -> dict[str, Any]:
    """The model's sharded state dict under Megatron-LM's keys ('model', or 'model0', ...)."""
    return {
        _chunk_key(i, len(model_chunks)): unwrap(chunk).sharded_state_dict()
        for i, chunk in enumerate(model_chunks)
    }


def load_weights(model_chunks: list[torch.nn.Module], loaded: dict[str, Any]) -> None:
    """Put the model part of a loaded `model_sharded_state_dict` request into the model.

    Strict, except for Transformer Engine's `_extra_state` (its FP8 metadata): megatron-core's
    `TEDotProductAttention.sharded_state_dict` leaves it out (0.16.1 extensions/
    transformer_engine.py L1436-1455), so the checkpoint never holds it, as Megatron-LM's own
    loader allows (it retries non-strict)."""
    for i, chunk in enumerate(model_chunks):
        result = unwrap(chunk).load_state_dict(
            loaded[_chunk_key(i, len(model_chunks))], strict=False
        )
        missing = [k for k in result.missing_keys if not k.endswith("._extra_state")]
        if missing or result.unexpected_keys:
            raise RuntimeError(
                f"the checkpoint does not match the model: missing {missing}, unexpected "
                f"{result.unexpected_keys}"
            )


def _chunk_key(index: int, count: int) -> str:
    return "model" if count == 1 else f"model{index}"


# ------------------------------------------------------------------------------------ helpers
def _log_verified(note: str) -> None:
    log_single_rank(logger, logging.INFO, f"muon_megatron: checkpoint {note}")


def _metadata(sharding_type: str) -> dict[str, Any]:
    # What Megatron-LM's training loop passes (model-space keys without 'chained_i.' prefixes).
    return {"distrib_optim_sharding_type": sharding_type, "chained_optim_avoid_prefix": True}


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


