"""One bucket of Muon matrices as this rank sees it, laid out once, at construction.

A bucket is a round of the grid (`plan.make_buckets`): one exchange sends every shard to
its matrix's owner, one returns the updates. Everything here is fixed by the plan and is
worked out when the optimizer is built; the step then only launches a fixed number of
batched ops per bucket, whatever the number of matrices in it:

- **wire**: each exchange is a sparse set of point-to-point transfers, one per pair of
  members with something to send (`grid.start_exchange`); a payload is its matrices' pieces
  in bucket order. A rank's own pieces of a matrix it owns never go on the wire: they stay
  fp32 (`keep`), neither copied to the send buffer nor rounded to a bf16 wire dtype.
- **assembly**: the owner copies received and kept pieces, in one foreach copy, into one
  fp32 buffer holding its matrices' TP-local tensors, grouped by *class* (matrices that
  split alike: the same `MatrixSplit` and local shape), `[n, TP, numel]` per class.
- **logical matrices**: per class and row group, one narrow or index_select plus one
  permute/reshape turns the class's `[n, TP, E, A, B]` view into a `[matrices, rows, cols]`
  stack of logical matrices (experts, Q/K/V, gate/up, TP pieces joined); stacks of one
  shape go through Newton-Schulz together, and the updates are written back into the same
  buffer with the inverse ops.
- **apply**: the returned update shards are split once and applied per param group.

Every index and split size is computed here, once; Python in the step only builds lists
of views over precomputed positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from muon_megatron.config import MuonConfig
from muon_megatron.ops.update import update_scale
from muon_megatron.optimizer.grid import Grid, Peers
from muon_megatron.optimizer.plan import MuonMatrix
from muon_megatron.routing.splits import MatrixSplit

__all__ = ["Bucket", "Exchange", "Transfers", "bucket_transfers", "MatrixClass", "Batch"]

Transfers = dict[tuple[int, int], int]
"""Elements moved from grid member `src` to grid member `dst`, keyed (src, dst)."""


def bucket_transfers(matrices: list[MuonMatrix], grid: Grid) -> tuple[Transfers, Transfers]:
    """What every pair of grid members sends each other in one bucket: (gather, scatter).

    Gather: each member sends its ZeRO-1 shard of a matrix (TP rank 0's alone for a
    TP-replicated tensor) to the matrix's owner. Scatter: the owner returns every member its
    shard of the update. What stays on the owner is not counted. The bucket's own exchanges
    and the planner's per-rank bytes both come from here."""
    member = {coords: g for g, coords in enumerate(grid.coords)}
    gather: Transfers = {}
    scatter: Transfers = {}
    for m in matrices:
        owner = m.owner
        for d, (start, end) in enumerate(m.dp_ranges):
            n = end - start
            if n == 0:
                continue
            for t in range(grid.tp_size):
                g = member[(t, d)]
                if g == owner:
                    continue
                if m.sends_from(t):
                    gather[(g, owner)] = gather.get((g, owner), 0) + n
                scatter[(owner, g)] = scatter.get((owner, g), 0) + n
    return gather, scatter


@dataclass
class Exchange:
    """One direction of a bucket's exchange, as this rank sees it: the pieces it sends
    (`send_order` picks them from the caller's list, `send_blocks` their sizes, peers' in
    turn), to whom (`send_peers`), and what it receives (`recv_blocks`, from `recv_peers`,
    members ascending)."""

    send_order: list[int]
    send_blocks: list[int]
    send_peers: Peers
    recv_blocks: list[int]
    recv_peers: Peers
    tag: int


@dataclass
class MatrixClass:
    """Owned matrices that split alike, stored `[n, tp, numel]` from `offset` of the buffer."""

    split: MatrixSplit
    indices: list[int]
    offset: int
    tp: int
    numel: int
    rows: list[tuple[int, int] | torch.Tensor]
    """Per row group: (start, stop) when contiguous, else a device index of the rows."""

    @property
    def size(self) -> int:
        return len(self.indices) * self.tp * self.numel

    def oriented(self, buffer: torch.Tensor) -> torch.Tensor:
        """The class's `[n, tp, E, rows, cols]` view, pieces' rows on dim -2."""
        view = self.split.view_shape
        batch = view if len(view) == 3 else (1, *view)
        block = buffer[self.offset : self.offset + self.size]
        block = block.view(len(self.indices), self.tp, *batch)
        return block.transpose(-1, -2) if self.split.transpose else block

    def logical(self, oriented: torch.Tensor, j: int) -> torch.Tensor:
        """Row group j of every matrix as a `[count, rows, cols]` stack of logical matrices."""
        rows = self.rows[j]
        if isinstance(rows, tuple):
            piece = oriented.narrow(-2, rows[0], rows[1] - rows[0])
        else:
            piece = oriented.index_select(-2, rows)
        n, tp, e, r, c = piece.shape
        mode, dim = self.split.tp_mode, self.split.tp_dim
        if mode == "concat" and dim == 0:
            return piece.permute(0, 2, 1, 3, 4).reshape(n * e, tp * r, c)
        if mode == "concat":
            return piece.permute(0, 2, 3, 1, 4).reshape(n * e, r, tp * c)
        return piece.reshape(n * tp * e, r, c)

    def insert(self, oriented: torch.Tensor, j: int, update: torch.Tensor) -> None:
        """Write the `[count, rows, cols]` updates of row group j back (inverse of `logical`)."""
        n, tp = len(self.indices), self.tp
        e = oriented.shape[2]
        mode, dim = self.split.tp_mode, self.split.tp_dim
        if mode == "concat" and dim == 0:
            r, c = update.shape[1] // tp, update.shape[2]
            back = update.view(n, e, tp, r, c).permute(0, 2, 1, 3, 4)
        elif mode == "concat":
            r, c = update.shape[1], update.shape[2] // tp
            back = update.view(n, e, r, tp, c).permute(0, 3, 1, 2, 4)
        else:
            back = update.view(n, tp, e, *update.shape[1:])
        rows = self.rows[j]
        if isinstance(rows, tuple):
            oriented.narrow(-2, rows[0], rows[1] - rows[0]).copy_(back)
        else:
            oriented.index_copy_(-2, rows, back)


@dataclass
class Batch:
    """Logical matrices of one shape: (class, row group) stacks, orthogonalized together."""

    parts: list[tuple[int, int]]
    counts: list[int]
    scale: float
    param_index: torch.Tensor
    """Per logical matrix: its Muon matrix's index (for the update-RMS figures)."""


def _row_groups(split: MatrixSplit, device: torch.device) -> list[tuple[int, int] | torch.Tensor]:
    out: list[tuple[int, int] | torch.Tensor] = []
    for ranges in split.row_groups:
        rows = [r for start, end in ranges for r in range(start, end)]
        if rows == list(range(rows[0], rows[-1] + 1)):
            out.append((rows[0], rows[-1] + 1))
        else:
            out.append(torch.tensor(rows, dtype=torch.long, device=device))
    return out


class Bucket:
    """`matrices` of one bucket, seen from grid member `grid.rank`."""

    def __init__(
        self,
        matrices: list[MuonMatrix],
        grid: Grid,
        cfg: MuonConfig,
        device: torch.device,
        tag: int = 0,
    ) -> None:
        self.matrices = matrices
        self.grid = grid
        me = self.me = grid.rank
        my_tp, my_dp = grid.coords[me]
        member = {coords: g for g, coords in enumerate(grid.coords)}
        self.mine = [m for m in matrices if m.owner == me]
        # ------------------------------------------------ gather: what this rank sends
        self.held = [m for m in matrices if m.shard_numel(my_dp) > 0]
        to: dict[int, list[int]] = {}
        self.keep_held: list[int] = []
        for i, m in enumerate(self.held):
            if not m.sends_from(my_tp):
                continue
            if m.owner == me:
                self.keep_held.append(i)
            else:
                to.setdefault(m.owner, []).append(i)
        gather_order = [i for g in sorted(to) for i in to[g]]
        gather_peers = [
            (g, sum(self.held[i].shard_numel(my_dp) for i in to[g])) for g in sorted(to)
        ]
        # ------------------------------------------------ the owner's buffer, by class
        self.classes: list[MatrixClass] = []
        by_key: dict[tuple, MatrixClass] = {}
        offset = 0
        for m in self.mine:
            key = (m.split, m.local_shape)
            if key not in by_key:
                tp = 1 if m.split.tp_mode == "replicated" else m.split.tp_size
                by_key[key] = MatrixClass(m.split, [], 0, tp, m.param.numel(),
                                          _row_groups(m.split, device))
                self.classes.append(by_key[key])
            by_key[key].indices.append(m.index)
        for c in self.classes:
            c.offset = offset
            offset += c.size
        self.owned_numel = offset
        by_index = {m.index: m for m in matrices}
        # Blocks of the owner's buffer, (class, matrix, TP rank, DP rank) order: they tile
        # it, since the DP ranges of a TP-local tensor partition it.
        blocks: list[tuple[int, int, int]] = []
        for c in self.classes:
            for index in c.indices:
                m = by_index[index]
                for t in range(c.tp):
                    for d in range(grid.dp_size):
                        if m.shard_numel(d) > 0:
                            blocks.append((index, t, d))
        self.blocks = [by_index[i].shard_numel(d) for i, _, d in blocks]
        block_of = {b: k for k, b in enumerate(blocks)}
        # What arrives, from each member (ascending) in bucket order, and where it goes.
        arrivals: list[tuple[int, int, int]] = []
        arrival_peers: Peers = []
        for g, (t, d) in enumerate(grid.coords):
            if g == me:
                continue
            come = [(m.index, t, d) for m in self.mine
                    if m.sends_from(t) and m.shard_numel(d) > 0]
            if come:
                arrival_peers.append((g, sum(by_index[i].shard_numel(d) for i, _, d in come)))
                arrivals.extend(come)
        self.gather = Exchange(
            gather_order,
            [self.held[i].shard_numel(my_dp) for i in gather_order],
            gather_peers,
            [by_index[i].shard_numel(d) for i, _, d in arrivals],
            arrival_peers,
            tag,
        )
        kept = [(m.index, my_tp, my_dp) for m in self.mine
                if m.sends_from(my_tp) and m.shard_numel(my_dp) > 0]
        # Source of every block: a received piece (its position) or a kept one (after them).
        source = {b: k for k, b in enumerate(arrivals)}
        source.update({b: len(arrivals) + k for k, b in enumerate(kept)})
        self.assemble_from = [source[b] for b in blocks]
        # ------------------------------------------------ Newton-Schulz batches, by shape
        by_shape: dict[tuple[int, int], Batch] = {}
        for ci, c in enumerate(self.classes):
            for j in range(len(c.rows)):
                shape = c.split.logical_shapes()[j]
                count = len(c.indices) * (c.split.batch * (c.tp if c.split.tp_mode == "per_rank"
                                                          else 1))
                if shape not in by_shape:
                    scale = update_scale(cfg.muon_scale_mode, shape[0], shape[1],
                                         cfg.muon_matched_adamw_rms, cfg.muon_extra_scale_factor)
                    by_shape[shape] = Batch([], [], scale, torch.empty(0))
                batch = by_shape[shape]
                batch.parts.append((ci, j))
                batch.counts.append(count)
        for batch in by_shape.values():
            index = []
            for (ci, _), count in zip(batch.parts, batch.counts):
                c = self.classes[ci]
                index += [i for i in c.indices for _ in range(count // len(c.indices))]
            batch.param_index = torch.tensor(index, dtype=torch.long, device=device)
        self.batches = list(by_shape.values())
        # ------------------------------------------------ scatter: the owner returns slices
        out: dict[int, list[int]] = {}
        self.scatter_keep: dict[int, int] = {}
        for g, (t, d) in enumerate(grid.coords):
            for m in self.mine:
                if m.shard_numel(d) == 0:
                    continue
                k = block_of[(m.index, 0 if m.split.tp_mode == "replicated" else t, d)]
                if g == me:
                    self.scatter_keep[m.index] = k
                else:
                    out.setdefault(g, []).append(k)
        scatter_order = [k for g in sorted(out) for k in out[g]]
        # ------------------------------------------------ what comes back to this rank
        self.updated = [m for m in matrices if m.shard_numel(my_dp) > 0 and m.owner != me]
        self.updated.sort(key=lambda m: (m.owner, m.index))  # bucket order: by index
        returns: Peers = []
        for m in self.updated:
            if returns and returns[-1][0] == m.owner:
                returns[-1] = (m.owner, returns[-1][1] + m.shard_numel(my_dp))
            else:
                returns.append((m.owner, m.shard_numel(my_dp)))
        # Tags: unique per bucket of this grid and direction, so that no two exchanges in
        # flight between two ranks can match each other's transfers.
        self.scatter = Exchange(
            scatter_order,
            [self.blocks[k] for k in scatter_order],
            [(g, sum(self.blocks[k] for k in out[g])) for g in sorted(out)],
            [m.shard_numel(my_dp) for m in self.updated],
            returns,
            tag + 1,
        )

    @property
    def numel(self) -> int:
        """Elements of the bucket's full logical matrices (all TP pieces)."""
        return sum(m.param.numel() * m.split.tp_size for m in self.matrices)
