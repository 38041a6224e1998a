"""Skip a step whose gradients are not finite, on every rank together.

Megatron only checks for inf/NaN when an fp16 grad scaler is present. For bf16/fp32 a single
non-finite gradient would flow into Newton-Schulz (which normalises by the Frobenius norm:
the whole matrix becomes NaN) and into the momentum, poisoning every later step.

`prepare_grads` (Megatron's hook that returns `found_inf`) checks the reduced gradient shards
of *all* the model's grad buffers on this rank (dense and expert) once per step, and
all-reduces the verdict over the optimizers' shared grad-stats group (every rank of the
distributed-optimizer instance: TP, PP, DP and EP together): `check_once_per_step` makes the
`ChainedOptimizer` do it for all its members. Every rank therefore gets the same flag,
`ChainedOptimizer.step()` returns `update_successful=False` before clipping, and nothing is
touched: params, momentum,
AdamW moments and steps stay bitwise as they were. Each member counts the skip in
`skipped_steps`; the run goes on with the next batch (a training loop does not advance the
lr schedule for an unsuccessful step).
"""

from __future__ import annotations

import logging

import torch
from megatron.core.distributed.param_and_grad_buffer import shard_buffer
from megatron.core.utils import log_single_rank

from muon_megatron.optimizer.hang_watch import watched

__all__ = ["NonFiniteGradSkipMixin", "check_once_per_step", "check_nonfinite", "skipped_steps"]

logger = logging.getLogger(__name__)


class NonFiniteGradSkipMixin:
    """Adds the non-finite check to a Megatron `DistributedOptimizer` subclass.

    Cost: one `isfinite` pass over this rank's reduced grad shards and one all-reduce of two
    numbers per step, for the whole chained optimizer (`check_once_per_step`). Every rank
    makes exactly one such all-reduce per step whatever members it has: a pipeline stage
    without expert parameters has no expert member, and one all-reduce per member would
    leave the ranks of different stages in different collectives.
    """

    skipped_steps: int = 0
    """Steps skipped because some gradient on some rank was NaN or Inf."""
    _chain_checks_nonfinite: bool = False

    @torch.no_grad()
    def prepare_grads(self) -> bool:
        found_inf = super().prepare_grads()
        if self._chain_checks_nonfinite:
            return found_inf
        return check_nonfinite([self]) or found_inf


def check_once_per_step(optimizer) -> None:
    """Make a `ChainedOptimizer` of several of our members check once per step, for all of
    them (a single member checks itself)."""
    members = [
        m for m in getattr(optimizer, "chained_optimizers", []) if isinstance(m, NonFiniteGradSkipMixin)
    ]
    if len(members) < 2 or not optimizer.grads_states_parallel_group_is_shared():
        return
    for member in members:
        member._chain_checks_nonfinite = True
    prepare_members = optimizer.prepare_grads

    def prepare_grads() -> bool:
        found_inf = prepare_members()
        return check_nonfinite(members) or found_inf

    optimizer.prepare_grads = prepare_grads


@torch.no_grad()
def check_nonfinite(members: list) -> bool:
    """Whether any rank's reduced gradient is NaN/Inf, for `members` (the optimizers of one
    rank, sharing one grad-stats group); counts and logs a skip on each of them."""
    first = members[0]
    device = _device(first)
    chunks = getattr(first, "model_chunks", None) or []
    dense = [b for chunk in chunks for b in getattr(chunk, "buffers", [])]
    expert = [b for chunk in chunks for b in getattr(chunk, "expert_parallel_buffers", [])]
    flags = torch.stack([_nonfinite(dense, device), _nonfinite(expert, device)]).float()
    group = first.get_grad_stats_parallel_group()
    with watched("non-finite gradient check all_reduce", group):
        torch.distributed.all_reduce(flags, group=group)
    dense_ranks, expert_ranks = (int(v) for v in flags.tolist())
    if dense_ranks == expert_ranks == 0:
        return False
    for member in members:
        member.skipped_steps += 1
    for kind, ranks in (("dense", dense_ranks), ("expert", expert_ranks)):
        if ranks:
            log_single_rank(
                logger,
                logging.WARNING,
                f"muon_megatron: non-finite gradient in the {kind} parameters on {ranks} "
                "rank(s); this step is skipped on every rank (params, momentum and AdamW state "
                f"unchanged); skipped_steps={first.skipped_steps}",
            )
    return True


def skipped_steps(optimizer) -> int:
    """Skipped steps of a (possibly chained) optimizer; every member counts the same steps."""
    members = getattr(optimizer, "chained_optimizers", [optimizer])
    return max((getattr(m, "skipped_steps", 0) for m in members), default=0)


def _nonfinite(buffers, device: torch.device) -> torch.Tensor:
    """True if any gradient this rank's optimizers consume is NaN/Inf (no host sync).

    After the reduce-scatter a rank's shard of each bucket holds the reduced gradient, so a
    NaN anywhere in the DP group shows up in some rank's shard."""
    found = torch.zeros((), dtype=torch.bool, device=device)
    for buffer in buffers:
        rank = buffer.data_parallel_group.rank()
        for bucket in buffer.buckets:
            shard = shard_buffer(bucket.grad_data, buffer.data_parallel_world_size)[rank]
            found |= ~torch.isfinite(shard).all()
    return found


def _device(optimizer) -> torch.device:
    for chunk in getattr(optimizer, "model_chunks", None) or []:
        for buffer in list(getattr(chunk, "buffers", [])) + list(getattr(chunk, "expert_parallel_buffers", [])):
            return buffer.grad_data.device
    # A stub optimizer still joins the all-reduce, on the backend's device.
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
