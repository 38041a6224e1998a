"""The DP x TP grid a Muon matrix is spread over, and the one collective we use on it
(an asynchronous all-to-all).

A dense weight is sharded over the tensor-parallel group (by Megatron's layers) and over
the data-parallel group (by the ZeRO-1 grad buffer: megatron-core's data-and-context-
parallel group, so under context parallelism the grid spans TP x DP x CP); an expert
weight over the expert-TP and expert-DP groups. The *grid* is the set of ranks holding a
piece of the same weights: the union of the TP groups of the members of one DP group. megatron-core has this group
for dense weights (tensor-and-data-parallel) but not for experts, so we build grids
ourselves from any (tp_group, dp_group) pair: the DP peers exchange their TP groups, and
the grid's own ranks create its process group (nothing world-wide). Grids are cached, so
building optimizers again creates no new groups.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from muon_megatron.runtime.hang_watch import watched

__all__ = ["Grid", "TPGroupsOf", "build_grid", "forget_groups", "grid_coords", "InFlight", "Peers", "join_grid", "start_exchange"]


@dataclass(frozen=True)
class Grid:
    """A DP x TP grid: `group` (None when it is this rank alone) and, for each member in
    group-rank order, its (tp_rank, dp_rank) and its global rank."""

    group: dist.ProcessGroup | None
    rank: int
    coords: tuple[tuple[int, int], ...]
    tp_size: int
    dp_size: int
    ranks: tuple[int, ...] = ()

    @property
    def size(self) -> int:
        return len(self.coords)


TPGroupsOf = Callable[[int], Sequence[int]]
"""A global rank -> the global ranks of its TP group (the one the grid is built from)."""

_GROUPS: dict[tuple[int, ...], dist.ProcessGroup] = {}


def build_grid(
    tp_group: dist.ProcessGroup,
    dp_group: dist.ProcessGroup,
    tp_group_of: TPGroupsOf | None = None,
) -> Grid:
    """The grid of this rank.

    The DP peers' TP groups are exchanged over `dp_group` (one all-gather of a few ints per
    rank), unless `tp_group_of` gives them: the planner (`muon_megatron.planner`) builds one
    rank of a large world in a single process, over a fake process group, and reads them
    from megatron-core's own rank layout. Then, the first time a grid is seen, its group is
    created over the grid's own ranks."""
    tp_size, dp_size = tp_group.size(), dp_group.size()
    me = dist.get_rank()
    tp_ranks = dist.get_process_group_ranks(tp_group)
    if tp_group_of is not None:
        peers = [list(tp_group_of(p)) for p in dist.get_process_group_ranks(dp_group)]
    else:
        peers = _exchange_tp_groups(tp_ranks, dp_group)
    coords_of = grid_coords(peers)
    mine = tuple(sorted(coords_of))
    if len(mine) != tp_size * dp_size or any(len(p) != tp_size for p in peers):
        raise ValueError(
            f"rank {me}: the TP group {tp_ranks} and DP group "
            f"{dist.get_process_group_ranks(dp_group)} do not form a {tp_size}x{dp_size} grid "
            f"(got {len(mine)} ranks); Muon needs every DP peer to share the same TP layout."
        )
    if len(mine) > 1 and mine not in _GROUPS:
        # Only the grid's ranks take part (use_local_synchronization): grids of other
        # ranks, other optimizers and other pipeline stages need not be built in step.
        _GROUPS[mine] = dist.new_group(list(mine), use_local_synchronization=True)
    group = _GROUPS.get(mine)
    if group is not None and dist.get_group_rank(group, me) != mine.index(me):
        raise RuntimeError("grid group ranks are not in ascending global-rank order")
    coords = tuple(coords_of[r] for r in mine)
    return Grid(group, mine.index(me), coords, tp_size, dp_size, mine)


def forget_groups() -> None:
    """Drop the cached grid groups (after `torch.distributed.destroy_process_group`)."""
    _GROUPS.clear()


def grid_coords(peer_tp_groups: Sequence[Sequence[int]]) -> dict[int, tuple[int, int]]:
    """(TP rank, DP rank) of every global rank of the grid, from the TP group (global ranks,
    in TP-rank order) of each DP peer, in DP-rank order."""
    return {rank: (t, d) for d, group in enumerate(peer_tp_groups) for t, rank in enumerate(group)}


def _exchange_tp_groups(tp_ranks: list[int], dp_group: dist.ProcessGroup) -> list[list[int]]:
    """Every DP peer's TP group (global ranks), in DP-rank order: one all-gather."""
    dp_size = dp_group.size()
    mine_info = torch.tensor(tp_ranks, dtype=torch.long)
    if dp_size == 1:
        return [tp_ranks]
    gathered = [torch.empty_like(mine_info) for _ in range(dp_size)]
    with watched("Muon grid construction all_gather", dp_group):
        dist.all_gather(gathered, _on_backend_device(mine_info, dp_group), group=dp_group)
    return [g.cpu().tolist() for g in gathered]


def _on_backend_device(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    if dist.get_backend(group) == "nccl":
        return t.cuda()
    return t


class InFlight:
    """An issued exchange: `wait()` returns the receive buffer (every sender's payload, by
    sender ascending). `keep` rides along: the caller's pieces that did not go on the wire."""

    def __init__(self, works, send, recv, group, keep) -> None:
        self.works, self.send, self.recv = works, send, recv
        self.group, self.keep = group, keep

    def wait(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if self.works:
            with watched(name, self.group, self.works):
                for work in self.works:
                    work.wait()
            self.works = []
        self.send = None  # the send buffer can go as soon as the transfers are done
        return self.recv if dtype is None else self.recv.to(dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the buffers this exchange holds now."""
        held = [t for t in (self.send, self.recv) if t is not None]
        return sum(t.numel() * t.element_size() for t in held)


Peers = list[tuple[int, int]]
"""(grid member, elements) of each peer a rank exchanges with, members ascending."""


def start_exchange(
    pieces: list[torch.Tensor],
    exchange,
    grid: Grid,
    dtype: torch.dtype,
    device: torch.device,
    keep: list | None = None,
) -> InFlight:
    """Issue (asynchronously) one direction of a bucket's exchange (`bucket.Exchange`):
    `pieces` (1-D, `exchange.send_blocks` in size, peers' payloads one after another) go to
    `exchange.send_peers` in `dtype`, and the receive buffer takes each member of
    `exchange.recv_peers` its elements.

    Only pairs with something to send communicate: a batch of point-to-point sends and
    receives on the grid's group (NCCL runs a batch as one grouped launch on the group's
    communicator, in order with the group's other work), so its latency grows with the
    peers a rank really has, not with the grid. Copies into the send buffer in one foreach
    launch."""
    send = torch.empty(sum(exchange.send_blocks), dtype=dtype, device=device)
    if pieces:
        torch._foreach_copy_(list(send.split(exchange.send_blocks)), pieces)
    recv = torch.empty(sum(n for _, n in exchange.recv_peers), dtype=dtype, device=device)
    ops = []
    for buffer, peers, op in ((send, exchange.send_peers, dist.isend),
                              (recv, exchange.recv_peers, dist.irecv)):
        offset = 0
        for g, n in peers:
            ops.append(dist.P2POp(op, buffer[offset : offset + n], grid.ranks[g], grid.group,
                                  exchange.tag))
            offset += n
    works = dist.batch_isend_irecv(ops) if ops else []
    return InFlight(works, send, recv, grid.group, [] if keep is None else keep)


def join_grid(grid: Grid) -> None:
    """One collective over the grid's group, by every member, when the optimizer is built:
    a batch of point-to-point transfers must not be the group's first operation unless
    every member takes part (torch.distributed.batch_isend_irecv), and a rank with nothing
    to exchange in a bucket does not."""
    if grid.group is not None:
        dist.all_reduce(_on_backend_device(torch.zeros(1), grid.group), group=grid.group)
