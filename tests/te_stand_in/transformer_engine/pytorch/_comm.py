"""Tensor- and sequence-parallel communication of TE's column / row parallel layers, as
autograd functions over `torch.distributed` (all-reduce and all-gather only, which gloo has:
a reduce-scatter is an all-reduce and this rank's slice).

Column-parallel input (TE v2.11 linear.py `_Linear.forward`): with sequence parallelism the
input is all-gathered along the sequence (dim 0) and its gradient reduce-scattered; without,
it is used as is and its gradient all-reduced. Row-parallel output: reduce-scattered along
the sequence with sequence parallelism, all-reduced without.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["column_input", "gather_sequence", "row_output"]


def _size(group) -> int:
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


def _gather_dim0(x: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=0)


def _reduce_scatter_dim0(x: torch.Tensor, group) -> torch.Tensor:
    total = x.contiguous().clone()
    dist.all_reduce(total, group=group)
    return total.chunk(_size(group), dim=0)[dist.get_rank(group)].contiguous()


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    total = x.contiguous().clone()
    dist.all_reduce(total, group=group)
    return total


class _GatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_dim0(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_dim0(grad, ctx.group), None


class _ScatterSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_dim0(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_dim0(grad, ctx.group), None


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def column_input(x: torch.Tensor, group, sequence_parallel: bool) -> torch.Tensor:
    """The input a column-parallel GEMM multiplies (whole sequence on every TP rank)."""
    if _size(group) == 1:
        return x
    if sequence_parallel:
        return _GatherSeq.apply(x, group)
    return _CopyToTP.apply(x, group)


def row_output(y: torch.Tensor, group, sequence_parallel: bool) -> torch.Tensor:
    """A row-parallel GEMM's partial sums, reduced over the TP group (and scattered along the
    sequence with sequence parallelism)."""
    if _size(group) == 1:
        return y
    if sequence_parallel:
        return _ScatterSeq.apply(y, group)
    return _ReduceFromTP.apply(y, group)


def gather_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """`x` all-gathered along dim 0 over `group` (ranks in group order), its gradient
    reduce-scattered back: TE's `gather_along_first_dim` forward and
    `reduce_scatter_along_first_dim` backward (TE v2.11 distributed.py)."""
    if _size(group) == 1:
        return x
    return _GatherSeq.apply(x, group)
