"""Skip a step whose gradients are not finite, on every rank together.

Megatron only checks for inf/NaN when an fp16 grad scaler is present. For bf16/fp32 a single
non-finite gradient would flow into Newton-Schulz (which normalises by the Frobenius norm:
the whole matrix becomes NaN) and into the momentum, poisoning every later step.

`NonFiniteGradSkipMixin.prepare_grads` (Megatron's hook that returns `found_inf`) checks the
reduced gradient shards of *all* the model's grad buffers on this rank (dense and expert) and
all-reduces the verdict over the optimizer's grad-stats group (every rank of the
distributed-optimizer instance: TP, PP, DP and EP together). Every member of a
`ChainedOptimizer` therefore returns the same flag on every rank, `ChainedOptimizer.step()`
returns `update_successful=False` before clipping, and nothing is touched: params, momentum,
AdamW moments and steps stay bitwise as they were. Each member counts the skip in
`skipped_steps`; the run goes on with the next batch (a training loop does not advance the
lr schedule for an unsuccessful step).
"""

from __future__ import annotations

import logging

import torch
from megatron.core.distributed.param_and_grad_buffer import shard_buffer
from megatron.core.utils import log_single_rank

__all__ = ["NonFiniteGradSkipMixin", "skipped_steps"]

logger = logging.getLogger(__name__)


class NonFiniteGradSkipMixin:
    """Adds the non-finite check to a Megatron `DistributedOptimizer` subclass.

    Cost: one `isfinite` pass over this rank's reduced grad shards per chained member and one
    all-reduce of two numbers per step.
    """

    skipped_steps: int = 0
    """Steps skipped because some gradient on some rank was NaN or Inf."""

    @torch.no_grad()
    def prepare_grads(self) -> bool:
        found_inf = super().prepare_grads()
        device = _device(self)
        flags = torch.stack(
            [_nonfinite(_model_buffers(self), device), _nonfinite(getattr(self, "buffers", []), device)]
        ).float()
        torch.distributed.all_reduce(flags, group=self.get_grad_stats_parallel_group())
        model_ranks, own_ranks = (int(v) for v in flags.tolist())
        if model_ranks == 0:
            return found_inf
        self.skipped_steps += 1
        if own_ranks:
            kind = "expert" if _is_expert(self) else "dense"
            log_single_rank(
                logger,
                logging.WARNING,
                f"muon_megatron: non-finite gradient in the {kind} parameters on {own_ranks} "
                "rank(s); this step is skipped on every rank (params, momentum and AdamW state "
                f"unchanged); skipped_steps={self.skipped_steps}",
            )
        return True


def skipped_steps(optimizer) -> int:
    """Skipped steps of a (possibly chained) optimizer; every member counts the same steps."""
    members = getattr(optimizer, "chained_optimizers", [optimizer])
    return max((getattr(m, "skipped_steps", 0) for m in members), default=0)


def _model_buffers(optimizer) -> list:
    buffers = []
    for chunk in getattr(optimizer, "model_chunks", None) or []:
        buffers += list(getattr(chunk, "buffers", [])) + list(getattr(chunk, "expert_parallel_buffers", []))
    return buffers


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
    buffers = _model_buffers(optimizer)
    if buffers:
        return buffers[0].grad_data.device
    # A stub optimizer still joins the all-reduce, on the backend's device.
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _is_expert(optimizer) -> bool:
    inner = getattr(optimizer, "optimizer", None)
    groups = inner.param_groups if inner is not None else []
    return any(g.get("is_expert_parallel", False) for g in groups)
