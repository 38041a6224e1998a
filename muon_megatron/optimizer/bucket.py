"""One bucket of Muon matrices as this rank sees it: what it sends, receives and keeps.

A bucket is a set of matrices balanced across owners (`plan.make_buckets`), communicated by one
all-to-all each way over the grid. Everything here is fixed by the plan, so it is worked
out once, at construction: the sizes this rank receives from each grid member, and the
matrix index and update scale of each Newton-Schulz job of the matrices it owns. During
the step the bucket only lays tensors out; it never reads a tensor's value.

Wire layout (both directions): the payload for one member is its matrices' pieces in bucket
order. A rank's own pieces of a matrix it owns never go through the wire: they stay in
fp32 (`keep`), neither copied into the send buffer nor rounded to a bf16 wire dtype.
"""

from __future__ import annotations

import torch

from muon_megatron.config import MuonConfig
from muon_megatron.ops.update import update_scale
from muon_megatron.optimizer.grid import Grid
from muon_megatron.optimizer.plan import MuonMatrix

__all__ = ["Bucket", "Transfers", "bucket_transfers"]


Transfers = dict[tuple[int, int], int]
"""Elements moved from grid member `src` to grid member `dst`, keyed (src, dst)."""


def bucket_transfers(matrices: list[MuonMatrix], grid: Grid) -> tuple[Transfers, Transfers]:
    """What every pair of grid members sends each other in one bucket: (gather, scatter).

    Gather: each member sends its ZeRO-1 shard of a matrix (TP rank 0's alone for a
    TP-replicated tensor) to the matrix's owner. Scatter: the owner returns every member its
    shard of the update. What stays on the owner is not counted. The bucket's own receive
    sizes and the planner's per-rank bytes both come from here."""
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


class Bucket:
    """`matrices` of one bucket, seen from grid member `grid.rank`."""

    def __init__(
        self, matrices: list[MuonMatrix], grid: Grid, cfg: MuonConfig, device: torch.device
    ) -> None:
        self.matrices = matrices
        self.grid = grid
        self.me = grid.rank
        self.my_tp, self.my_dp = grid.coords[grid.rank]
        self.mine = [m for m in matrices if m.owner == self.me]
        scales, job_matrix = [], []
        for m in self.mine:
            for rows, cols in m.split.logical_shapes():
                job_matrix.append(m.index)
                scales.append(
                    update_scale(
                        cfg.muon_scale_mode,
                        rows,
                        cols,
                        cfg.muon_matched_adamw_rms,
                        cfg.muon_extra_scale_factor,
                    )
                )
        self.owned_scales: list[float] = scales
        self.owned_job_index = torch.tensor(job_matrix, dtype=torch.long, device=device)
        gather, scatter = bucket_transfers(matrices, grid)
        self._gather_recv = [gather.get((g, self.me), 0) for g in range(grid.size)]
        self._scatter_recv = [scatter.get((o, self.me), 0) for o in range(grid.size)]

    @property
    def numel(self) -> int:
        """Elements of the bucket's full logical matrices (all TP pieces)."""
        return sum(m.param.numel() * m.split.tp_size for m in self.matrices)

    # ------------------------------------------------------------ gather (phase 2)
    def gather_sends(
        self, ns_inputs: dict[int, torch.Tensor]
    ) -> tuple[list[list[torch.Tensor]], dict[int, torch.Tensor]]:
        """Per grid member, this rank's Newton-Schulz inputs for the matrices it owns; and
        the inputs of the matrices this rank owns itself (kept)."""
        parts: list[list[torch.Tensor]] = [[] for _ in range(self.grid.size)]
        keep = {}
        for m in self.matrices:
            if m.index not in ns_inputs or not m.sends_from(self.my_tp):
                continue
            if m.owner == self.me:
                keep[m.index] = ns_inputs[m.index]
            else:
                parts[m.owner].append(ns_inputs[m.index])
        return parts, keep

    def gather_recv_sizes(self) -> list[int]:
        return self._gather_recv

    def assemble_owned(
        self,
        received: list[torch.Tensor],
        keep: dict[int, torch.Tensor],
        device: torch.device,
    ) -> dict[int, list[torch.Tensor]]:
        """The TP-local flat fp32 tensors of every owned matrix (one per TP rank that
        sends), from the received pieces and the kept ones; in bucket order."""
        flats: dict[int, list[torch.Tensor]] = {}
        dsts, srcs = [], []
        offsets = [0] * self.grid.size
        for m in self.mine:
            ranks = m.split.tp_size if m.split.tp_mode != "replicated" else 1
            # Every element is written below: the DP ranges partition each TP-local tensor.
            flats[m.index] = [
                torch.empty(m.param.numel(), dtype=torch.float32, device=device)
                for _ in range(ranks)
            ]
            for g, (t, d) in enumerate(self.grid.coords):
                n = m.shard_numel(d)
                if not m.sends_from(t) or n == 0:
                    continue
                start, end = m.dp_ranges[d]
                dsts.append(flats[m.index][t][start:end])
                if g == self.me:
                    srcs.append(keep[m.index])
                else:
                    srcs.append(received[g][offsets[g] : offsets[g] + n])
                    offsets[g] += n
        _copy_all(dsts, srcs)
        return flats

    # ------------------------------------------------------------ scatter (phase 4)
    def scatter_sends(
        self, updates: dict[int, list[torch.Tensor]]
    ) -> tuple[list[list[torch.Tensor]], dict[int, torch.Tensor]]:
        """Per grid member, its slices of the updates of the matrices this rank owns; and
        this rank's own slices (kept, fp32)."""
        parts: list[list[torch.Tensor]] = [[] for _ in range(self.grid.size)]
        keep = {}
        for m in self.mine:
            replicated = m.split.tp_mode == "replicated"
            for g, (t, d) in enumerate(self.grid.coords):
                if m.shard_numel(d) == 0:
                    continue
                start, end = m.dp_ranges[d]
                piece = updates[m.index][0 if replicated else t][start:end]
                if g == self.me:
                    keep[m.index] = piece
                else:
                    parts[g].append(piece)
        return parts, keep

    def scatter_recv_sizes(self) -> list[int]:
        return self._scatter_recv

    def received_updates(
        self, received: list[torch.Tensor], keep: dict[int, torch.Tensor]
    ) -> dict[int, torch.Tensor]:
        """This rank's update slice of every matrix of the bucket it holds a shard of."""
        out, offsets = {}, [0] * self.grid.size
        for m in self.matrices:
            n = m.shard_numel(self.my_dp)
            if n == 0:
                continue
            if m.owner == self.me:
                out[m.index] = keep[m.index]
            else:
                o = m.owner
                out[m.index] = received[o][offsets[o] : offsets[o] + n]
                offsets[o] += n
        return out


def _copy_all(dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
    """dst.copy_(src) for every pair, in one foreach launch (dtypes may differ)."""
    if dsts:
        torch._foreach_copy_(dsts, srcs)
