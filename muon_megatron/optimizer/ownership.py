"""Which rank of the DP x TP grid orthogonalizes which matrix.

Every Muon matrix is orthogonalized by exactly one owner. Owners are chosen by
longest-processing-time-first bin packing on the Newton-Schulz cost: sort the jobs by
decreasing cost and give each to the currently least-loaded rank. LPT's makespan is at most
4/3 of optimal (Graham 1969); with many more matrices than ranks it is close to the mean.

Locality: Megatron's ZeRO-1 shards each gradient bucket into contiguous DP ranges, so a
matrix often lies mostly (at small DP, wholly) in one rank's range. When the caller says how
many elements of each job every rank already holds, a job goes to the rank holding the most
of it among those whose load stays within `LOCALITY_SLACK` of the mean load; the elements
that rank holds are neither gathered nor scattered. Where no such rank exists, plain LPT.

Ties break on the lowest rank and the original job index, so every rank computes the same
assignment with no communication.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence

__all__ = ["LOCALITY_SLACK", "assign_owners", "load_per_rank"]

LOCALITY_SLACK = 0.05
"""A locality-preferring owner may end at most 5% above the mean Newton-Schulz load
(issue 7's balance target is max / mean <= 1.15)."""


def assign_owners(
    costs: Sequence[float],
    num_ranks: int,
    held: Sequence[Mapping[int, int]] | None = None,
    slack: float = LOCALITY_SLACK,
) -> list[int]:
    """Owner rank (0..num_ranks-1) of each job, balancing the summed cost per rank.

    `held[j]` maps a rank to the number of job j's elements it already holds (ranks holding
    none may be left out); None: no locality preference, plain LPT.
    """
    if num_ranks < 1:
        raise ValueError(f"num_ranks={num_ranks} must be >= 1.")
    if held is not None and len(held) != len(costs):
        raise ValueError(f"held has {len(held)} entries for {len(costs)} jobs.")
    owners = [0] * len(costs)
    loads = [0.0] * num_ranks
    heap = [(0.0, rank) for rank in range(num_ranks)]  # (load, rank), stale entries skipped
    cap = (1.0 + slack) * sum(costs) / num_ranks
    for job in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        cost = costs[job]
        local = []
        if held is not None:
            local = [r for r, n in held[job].items() if n > 0 and loads[r] + cost <= cap]
        if local:
            rank = min(local, key=lambda r: (-held[job][r], loads[r], r))
        else:
            while heap[0][0] != loads[heap[0][1]]:
                heapq.heappop(heap)
            rank = heap[0][1]
        owners[job] = rank
        loads[rank] += cost
        heapq.heappush(heap, (loads[rank], rank))
    return owners


def load_per_rank(costs: Sequence[float], owners: Sequence[int], num_ranks: int) -> list[float]:
    """Summed cost per rank for an assignment."""
    load = [0.0] * num_ranks
    for cost, owner in zip(costs, owners):
        load[owner] += cost
    return load
