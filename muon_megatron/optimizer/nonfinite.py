"""Skip a step whose gradients are not finite, on every rank together.

Megatron only checks for inf/NaN when an fp16 grad scaler is present. For bf16/fp32 a single
non-finite gradient would flow into Newton-Schulz (which normalises by the Frobenius norm:
the whole matrix becomes NaN) and into the momentum, poisoning every later step.

The check rides on a reduction every step already makes: Megatron's `ChainedOptimizer.step`
computes the global gradient norm (an all-reduce over the shared grad-stats group, every
rank of the distributed-optimizer instance: TP, PP, DP and EP together) and copies it to the
host, whether or not it clips. A NaN or Inf in any rank's reduced gradient makes that norm
non-finite on every rank. `check_once_per_step` wraps the chain's `get_grad_norm` to hand
the verdict (`math.isfinite` of a host float: no extra sync, no extra collective) to its
members; each then returns `update_successful=False` from `step_with_ready_grads` before
touching anything: params, momentum, AdamW moments and steps stay bitwise as they were. On
such a (rare) step the chain's first member runs one more all-reduce to say where the
NaN/Inf is, dense or expert and on how many ranks, for the log. Each member counts the skip
in `skipped_steps`; the run goes on with the next batch (a training loop does not advance
the lr schedule for an unsuccessful step).

A norm whose squares overflow fp32 (a gradient norm above ~1e19) is not finite either, and
its step is skipped as well: it would have been clipped to nothing.

Where the chain cannot carry the verdict (members with different grad-stats groups,
`overlap_param_gather_with_optimizer_step`, which asserts every step succeeds, or an
optimizer used outside a ChainedOptimizer) `prepare_grads` checks instead: one `isfinite`
pass over the rank's reduced grad shards and one all-reduce per step.
"""

from __future__ import annotations

import logging
import math

import torch
from megatron.core.distributed.param_and_grad_buffer import shard_buffer
from megatron.core.utils import log_single_rank

from muon_megatron.runtime.hang_watch import watched

__all__ = ["NonFiniteGradSkipMixin", "check_once_per_step", "check_nonfinite", "skipped_steps"]

logger = logging.getLogger(__name__)


class NonFiniteGradSkipMixin:
    """Adds the non-finite check to a Megatron `DistributedOptimizer` subclass, whose
    `step_with_ready_grads` must return False at once when `skip_nonfinite_step()` is True."""

    skipped_steps: int = 0
    """Steps skipped because some gradient on some rank was NaN or Inf."""
    # "prepare": prepare_grads checks this member; "chain": the chain checks in
    # prepare_grads for all members; "grad_norm": the chain's grad norm decides.
    _nonfinite_mode: str = "prepare"
    _grad_norm_finite: bool = True
    _nonfinite_reporter: list | None = None  # on the chain's first member: all members

    @torch.no_grad()
    def prepare_grads(self) -> bool:
        found_inf = super().prepare_grads()
        if self._nonfinite_mode != "prepare":
            return found_inf
        return check_nonfinite([self]) or found_inf

    def skip_nonfinite_step(self) -> bool:
        """Whether this step's grad norm was not finite (then counted, and logged once)."""
        if self._nonfinite_mode != "grad_norm":
            return False
        finite, self._grad_norm_finite = self._grad_norm_finite, True
        if finite:
            return False
        self.skipped_steps += 1
        if self._nonfinite_reporter is not None:
            _report(self._nonfinite_reporter, *_locate(self._nonfinite_reporter))
        return True


def check_once_per_step(optimizer) -> None:
    """Wire a `ChainedOptimizer`'s members to the chain's grad-norm verdict, or else make it
    check once per step in `prepare_grads`, for all of them (see the module docstring)."""
    members = [
        m for m in getattr(optimizer, "chained_optimizers", []) if isinstance(m, NonFiniteGradSkipMixin)
    ]
    chained = getattr(optimizer, "chained_optimizers", [])
    if not members or len(members) != len(chained):
        return
    shared = optimizer.grads_states_parallel_group_is_shared()
    overlap = any(
        getattr(m.config, "overlap_param_gather_with_optimizer_step", False) for m in members
    )
    if shared and not overlap:
        for member in members:
            member._nonfinite_mode = "grad_norm"
        members[0]._nonfinite_reporter = members
        grad_norm = optimizer.get_grad_norm

        def get_grad_norm():
            norm = grad_norm()  # a host float: Megatron already synced for it
            finite = norm is None or math.isfinite(norm)
            for member in members:
                member._grad_norm_finite = finite
            return norm

        optimizer.get_grad_norm = get_grad_norm
        return
    if len(members) < 2 or not shared:
        return
    for member in members:
        member._nonfinite_mode = "chain"
    prepare_members = optimizer.prepare_grads

    def prepare_grads() -> bool:
        found_inf = prepare_members()
        return check_nonfinite(members) or found_inf

    optimizer.prepare_grads = prepare_grads


@torch.no_grad()
def check_nonfinite(members: list) -> bool:
    """Whether any rank's reduced gradient is NaN/Inf, for `members` (the optimizers of one
    rank, sharing one grad-stats group); counts and logs a skip on each of them."""
    dense_ranks, expert_ranks = _locate(members)
    if dense_ranks == expert_ranks == 0:
        return False
    for member in members:
        member.skipped_steps += 1
    _report(members, dense_ranks, expert_ranks)
    return True


@torch.no_grad()
def _locate(members: list) -> tuple[int, int]:
    """How many ranks hold a NaN/Inf in their dense / expert reduced gradient shards: one
    `isfinite` pass per shard, one all-reduce (collective over the grad-stats group)."""
    first = members[0]
    device = _device(first)
    chunks = getattr(first, "model_chunks", None) or []
    dense = [b for chunk in chunks for b in getattr(chunk, "buffers", [])]
    expert = [b for chunk in chunks for b in getattr(chunk, "expert_parallel_buffers", [])]
    flags = torch.stack([_nonfinite(dense, device), _nonfinite(expert, device)]).float()
    group = first.get_grad_stats_parallel_group()
    work = torch.distributed.all_reduce(flags, group=group, async_op=True)
    with watched("non-finite gradient check all_reduce", group, [work]):
        work.wait()
        dense_ranks, expert_ranks = (int(v) for v in flags.tolist())
    return dense_ranks, expert_ranks


def _report(members: list, dense_ranks: int, expert_ranks: int) -> None:
    first = members[0]
    for kind, ranks in (("dense", dense_ranks), ("expert", expert_ranks)):
        if ranks:
            log_single_rank(
                logger,
                logging.WARNING,
                f"muon_megatron: non-finite gradient in the {kind} parameters on {ranks} "
                "rank(s); this step is skipped on every rank (params, momentum and AdamW state "
                f"unchanged); skipped_steps={first.skipped_steps}",
            )
    if not dense_ranks and not expert_ranks:
        log_single_rank(
            logger,
            logging.WARNING,
            "muon_megatron: the gradient norm is not finite (its squares overflow fp32) "
            "although every gradient is; this step is skipped on every rank; "
            f"skipped_steps={first.skipped_steps}",
        )


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
