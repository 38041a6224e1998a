"""The DP x TP grid a Muon matrix is spread over, and the one collective we use on it
(an asynchronous all-to-all).

A dense weight is sharded over the tensor-parallel group (by Megatron's layers) and over
the data-parallel group (by the ZeRO-1 grad buffer); an expert weight over the expert-TP
and expert-DP groups. The *grid* is the set of ranks holding a piece of the same weights:
the union of the TP groups of the members of one DP group. megatron-core has this group
for dense weights (tensor-and-data-parallel) but not for experts, so we build grids
ourselves from any (tp_group, dp_group) pair. Building groups is collective over the
whole world; grids are cached so building optimizers again creates no new groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from muon_megatron.optimizer.hang_watch import watched

__all__ = ["Grid", "build_grid", "InFlight", "start_all_to_all"]


@dataclass(frozen=True)
class Grid:
    """A DP x TP grid: `group` (None when it is this rank alone) and, for each member in
    group-rank order, its (tp_rank, dp_rank)."""

    group: dist.ProcessGroup | None
    rank: int
    coords: tuple[tuple[int, int], ...]
    tp_size: int
    dp_size: int

    @property
    def size(self) -> int:
        return len(self.coords)


_GROUPS: dict[tuple[int, ...], dist.ProcessGroup] = {}


def build_grid(tp_group: dist.ProcessGroup, dp_group: dist.ProcessGroup) -> Grid:
    """The grid of this rank. Collective over the default (world) group."""
    tp_size, dp_size = tp_group.size(), dp_group.size()
    me = dist.get_rank()
    info = (
        tuple(dist.get_process_group_ranks(tp_group)),
        tuple(dist.get_process_group_ranks(dp_group)),
        tp_group.rank(),
        dp_group.rank(),
    )
    everyone: list = [None] * dist.get_world_size()
    with watched("Muon grid construction all_gather_object"):
        dist.all_gather_object(everyone, info)

    def grid_of(rank: int) -> tuple[int, ...]:
        _, dp_ranks, _, _ = everyone[rank]
        return tuple(sorted({r for d in dp_ranks for r in everyone[d][0]}))

    grids = sorted({grid_of(r) for r in range(len(everyone))})
    mine = grid_of(me)
    if len(mine) != tp_size * dp_size:
        raise ValueError(
            f"rank {me}: the TP group {info[0]} and DP group {info[1]} do not form a "
            f"{tp_size}x{dp_size} grid (got {len(mine)} ranks); Muon needs every DP peer to "
            "share the same TP layout."
        )
    # new_group is collective over the world: every rank creates every grid, same order.
    for ranks in grids:
        if len(ranks) > 1 and ranks not in _GROUPS:
            _GROUPS[ranks] = dist.new_group(list(ranks))
    coords = tuple((everyone[r][2], everyone[r][3]) for r in mine)
    group = _GROUPS.get(mine)
    if group is not None and dist.get_group_rank(group, me) != mine.index(me):
        raise RuntimeError("grid group ranks are not in ascending global-rank order")
    return Grid(group, mine.index(me), coords, tp_size, dp_size)


class InFlight:
    """An issued all-to-all: `wait()` returns what each member sent, as views of one
    receive buffer. `keep` rides along: the caller's pieces that did not go on the wire."""

    def __init__(self, work, send, recv, sizes_in, group, keep) -> None:
        self.work, self.send, self.recv = work, send, recv
        self.sizes_in, self.group, self.keep = sizes_in, group, keep

    def wait(self, name: str, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        if self.work is not None:
            with watched(name, self.group):
                self.work.wait()
            self.work = None
        self.send = None  # the send buffer can go as soon as the collective is done
        recv = self.recv if dtype is None else self.recv.to(dtype)
        return list(recv.split(self.sizes_in))

    @property
    def nbytes(self) -> int:
        """Bytes of the buffers this collective holds now."""
        held = [t for t in (self.send, self.recv) if t is not None]
        return sum(t.numel() * t.element_size() for t in held)


def start_all_to_all(
    parts: list[list[torch.Tensor]],
    sizes_in: list[int],
    grid: Grid,
    dtype: torch.dtype,
    device: torch.device,
    keep: dict | None = None,
) -> InFlight:
    """Issue (asynchronously) one `all_to_all_single` sending `parts[m]` (1-D tensors,
    concatenated, in `dtype` on the wire) to grid member m and receiving `sizes_in[m]`
    elements from each member m. Copies into the send buffer in one foreach launch."""
    send_sizes = [sum(p.numel() for p in member) for member in parts]
    flat = [p for member in parts for p in member]
    send = torch.empty(sum(send_sizes), dtype=dtype, device=device)
    if flat:
        torch._foreach_copy_(list(send.split([p.numel() for p in flat])), flat)
    recv = torch.empty(sum(sizes_in), dtype=dtype, device=device)
    work = None
    if grid.group is not None:  # every member joins, with or without a payload
        work = dist.all_to_all_single(
            recv,
            send,
            output_split_sizes=list(sizes_in),
            input_split_sizes=send_sizes,
            group=grid.group,
            async_op=True,
        )
    return InFlight(work, send, recv, list(sizes_in), grid.group, keep or {})
