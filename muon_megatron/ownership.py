"""Which rank of the DP x TP grid orthogonalizes which matrix.

Every Muon matrix is orthogonalized by exactly one owner. Owners are chosen by
longest-processing-time-first bin packing on the Newton-Schulz cost: sort the jobs by
decreasing cost and give each to the currently least-loaded rank. LPT's makespan is at most
4/3 of optimal (Graham 1969); with many more matrices than ranks it is close to the mean.
Ties break on the lowest rank and the original job index, so every rank computes the same
assignment with no communication.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

__all__ = ["assign_owners", "load_per_rank"]


def assign_owners(costs: Sequence[float], num_ranks: int) -> list[int]:
    """Owner rank (0..num_ranks-1) of each job, balancing the summed cost per rank."""
    if num_ranks < 1:
        raise ValueError(f"num_ranks={num_ranks} must be >= 1.")
    owners = [0] * len(costs)
    heap = [(0.0, rank) for rank in range(num_ranks)]
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    for job in order:
        load, rank = heapq.heappop(heap)
        owners[job] = rank
        heapq.heappush(heap, (load + costs[job], rank))
    return owners


def load_per_rank(costs: Sequence[float], owners: Sequence[int], num_ranks: int) -> list[float]:
    """Summed cost per rank for an assignment."""
    load = [0.0] * num_ranks
    for cost, owner in zip(costs, owners):
        load[owner] += cost
    return load
