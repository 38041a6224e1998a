"""Every grid member's share of a built `MuonDistributedOptimizer`'s plan.

One rank's optimizer holds the whole grid's plan: every matrix's owner, every member's ZeRO-1
range and the buckets (`optimizer.plan`), computed identically on every rank. `grid_figures`
reads from it, for every member of the grid, what that member owns, orthogonalizes, holds,
sends and receives in each bucket, and the sizes of the gradient buffers behind it. The
transfers come from `optimizer.bucket.bucket_transfers`, the function the bucket itself
sizes its all-to-alls with, so the figures are the optimizer's own, not a model of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from muon_megatron.ops.newton_schulz import DTYPES
from muon_megatron.optimizer.bucket import Transfers, bucket_transfers

__all__ = ["BucketFigures", "GridFigures", "grid_figures", "member_bytes"]


@dataclass
class BucketFigures:
    """One bucket, per grid member g (lists indexed by g)."""

    ns_flops: list[float]
    owned_matrices: list[int]
    owned_numel: list[int]
    """Elements of the full matrices g orthogonalizes (its Newton-Schulz inputs)."""
    shard_numel: list[int]
    """Elements of the bucket's Muon main shards g holds (its momentum work)."""
    gather: Transfers
    scatter: Transfers

    def sent(self, g: int) -> int:
        """Elements g puts on the wire in this bucket (gather and scatter)."""
        return sum(n for (src, _), n in self.gather.items() if src == g) + sum(
            n for (src, _), n in self.scatter.items() if src == g
        )


@dataclass
class GridFigures:
    """The plan of one optimizer (the dense or the expert grid) for every member."""

    kind: str
    ranks: tuple[int, ...]
    coords: tuple[tuple[int, int], ...]
    tp_size: int
    dp_size: int
    params: int
    logical: int
    logical_shapes: list[list[tuple[int, int]]]
    """Per Muon param: its logical matrices' shapes (for the other schemes' figures)."""
    tp_split: list[bool]
    """Per Muon param: whether its TP pieces form one matrix (False: TP-replicated)."""
    local_numel: list[int]
    """Per Muon param: elements of the TP-local tensor."""
    buckets: list[BucketFigures]
    wire_bytes: int
    ns_dtype: str
    shard_numel: int
    """Elements of each member's ZeRO-1 shard of this optimizer's gradient buffers."""
    param_bytes: int
    grad_bytes: int
    main_param_copies: bool
    """bf16 params: the fp32 main shards are copies (4 bytes per shard element)."""
    muon_shard_numel: list[int]
    """Per member: elements of its Muon main shards (the momentum it keeps)."""
    logical_owned: list[int]
    """Per member: logical matrices it orthogonalizes."""
    names: list[str]
    owners: list[int]
    """Per Muon param (plan order): its owner's member index."""
    bucket_names: list[list[str]]

    @property
    def size(self) -> int:
        return len(self.coords)

    def owned(self, g: int) -> tuple[int, int, float]:
        """(params, logical matrices, Newton-Schulz FLOPs) grid member g owns."""
        return (
            sum(b.owned_matrices[g] for b in self.buckets),
            self.logical_owned[g],
            sum(b.ns_flops[g] for b in self.buckets),
        )


def grid_figures(opt, kind: str) -> GridFigures:
    """The figures of a built `MuonDistributedOptimizer` (any rank's: the plan is the same)."""
    grid, cfg = opt.grid, opt.muon_config
    size = grid.size
    logical_owned = [0] * size
    buckets: list[BucketFigures] = []
    for bucket in opt._buckets:
        flops, count, owned, held = [0.0] * size, [0] * size, [0] * size, [0] * size
        for m in bucket.matrices:
            flops[m.owner] += m.cost
            count[m.owner] += 1
            owned[m.owner] += m.param.numel() * m.split.tp_size
            logical_owned[m.owner] += len(m.split.logical_shapes())
            for g, (_, d) in enumerate(grid.coords):
                held[g] += m.shard_numel(d)
        gather, scatter = bucket_transfers(bucket.matrices, grid)
        buckets.append(BucketFigures(flops, count, owned, held, gather, scatter))
    muon_shard = [sum(b.shard_numel[g] for b in buckets) for g in range(size)]
    buffers = list(opt.buffers)
    grad_numel = sum(b.grad_data.numel() for b in buffers)
    matrices = opt._matrices
    figures = GridFigures(
        kind=kind,
        ranks=tuple(grid.ranks) or (0,),
        coords=grid.coords,
        tp_size=grid.tp_size,
        dp_size=grid.dp_size,
        params=len(matrices),
        logical=sum(len(m.split.logical_shapes()) for m in matrices),
        logical_shapes=[m.split.logical_shapes() for m in matrices],
        tp_split=[m.split.tp_mode != "replicated" for m in matrices],
        local_numel=[m.param.numel() for m in matrices],
        buckets=buckets,
        wire_bytes=DTYPES[cfg.muon_comm_dtype].itemsize,
        ns_dtype=cfg.muon_ns_dtype,
        shard_numel=grad_numel // grid.dp_size,
        param_bytes=sum(b.grad_data.numel() * b.param_dtype.itemsize for b in buffers),
        grad_bytes=sum(b.grad_data.numel() * b.grad_data.element_size() for b in buffers),
        main_param_copies=any(b.param_dtype != torch.float32 for b in buffers),
        muon_shard_numel=muon_shard,
        logical_owned=logical_owned,
        names=[m.name for m in matrices],
        owners=[m.owner for m in matrices],
        bucket_names=[[m.name for m in bucket.matrices] for bucket in opt._buckets],
    )
    return figures


def member_bytes(fig: GridFigures, g: int, muon: bool) -> dict[str, int]:
    """Steady memory of grid member g for this optimizer's params: model params, gradient
    buffer, fp32 main shards, and the optimizer's moments (Muon: momentum on Muon shards,
    Adam's two moments elsewhere; AdamW: two moments everywhere)."""
    shard = fig.shard_numel
    muon_shard = fig.muon_shard_numel[g] if muon else 0
    return {
        "params": fig.param_bytes,
        "grads": fig.grad_bytes,
        "main_shards": 4 * shard if fig.main_param_copies else 0,
        "muon_momentum": 4 * muon_shard,
        "adam_moments": 8 * (shard - muon_shard),
    }
