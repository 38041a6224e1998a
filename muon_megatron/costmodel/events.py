"""An event model of the pipelined Muon step on a GPU cluster.

The issue order is not restated here: `issue_order` runs `optimizer.pipeline.run_pipeline`
itself on members that only record, and returns its trace ('gather_issue', 'gather_wait',
'ns_begin', 'ns_end', 'scatter_issue', 'scatter_wait' with the position k in the
interleaved sequence of buckets). `simulate` then plays that trace on every rank of a
pipeline stage, as a GPU runs it:

- the host issues everything at once (nothing in the step waits for the device);
- each rank has one compute stream, in trace order: momentum(k) at gather_issue(k),
  Newton-Schulz(k) at ns_begin(k), apply(k) at scatter_wait(k);
- each grid has one communicator, and on each rank its work runs in issue order, as NCCL
  runs it on one stream: an exchange is a batch of point-to-point transfers between the
  pairs that have something to send (`grid.start_exchange`); the transfers of one
  connected set of ranks run once each of them has finished its previous work on that
  communicator and has its input ready (gather(k): momentum(k); scatter(k):
  Newton-Schulz(k)), for the time the cost function gives them;
- a wait makes the rank's compute stream wait for its transfers (CUDA's stream wait).

`ideal` is the busiest rank's own Newton-Schulz time, what the step would take if every
owner worked from the start; `ns_critical_path` is when the last Newton-Schulz ends with
communication and elementwise work taken as free, i.e. what the issue order alone costs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from muon_megatron.optimizer.pipeline import interleave, run_pipeline

__all__ = ["issue_order", "Timeline", "simulate"]


class _Recorder:
    """Stands in for a `MuonDistributedOptimizer` in `run_pipeline`: phases do nothing."""

    class _Flight:
        nbytes = 0

    def __init__(self, buckets: int) -> None:
        self._buckets = list(range(buckets))

    def _begin_step(self) -> None:
        pass

    _end_step = _begin_step

    def _phase1_local_momentum(self, bucket: int) -> list:
        return []

    def _phase2_start_gather(self, bucket: int, inputs: list) -> Any:
        return self._Flight()

    def _phase2_finish_gather(self, bucket: int, flight: Any) -> torch.Tensor:
        return torch.empty(0)

    def _phase3_orthogonalize(self, bucket: int, owned: torch.Tensor) -> torch.Tensor:
        return owned

    _phase4_start_scatter = _phase2_start_gather

    def _phase4_finish_scatter(self, bucket: int, flight: Any) -> None:
        pass


def issue_order(bucket_counts: Sequence[int]) -> tuple[list[tuple[str, int]], list[int]]:
    """`run_pipeline`'s trace for members with these numbers of buckets, and the member of
    each position k of the interleaved sequence."""
    members = [_Recorder(n) for n in bucket_counts]
    trace: list[tuple[str, int]] = []
    run_pipeline(members, trace=trace)
    owner = {id(m): i for i, m in enumerate(members)}
    return trace, [owner[id(opt)] for opt, _ in interleave(members)]


@dataclass
class Timeline:
    """What `simulate` found, in seconds."""

    ideal: float
    ns_critical_path: float
    step: float
    """When the last rank's last apply ends: the Muon part of the step."""
    busiest_rank: int


Placement = list[list[tuple[int, int]]]
"""Per rank of the stage, per optimizer member: (grid instance, member index in its grid)."""

Component = tuple[list[int], float]
"""Grid members that exchange with each other (directly or through others) in one
exchange, and the seconds their transfers take once all of them have started."""


def simulate(
    trace: list[tuple[str, int]],
    member_of: list[int],
    placement: Placement,
    compute: Callable[[str, int, int], float],
    exchange: Callable[[str, int, int], list[Component]],
) -> Timeline:
    """Play `trace` on every rank. `compute(kind, k, g)` is the seconds of 'momentum', 'ns'
    or 'apply' of position k on grid member g; `exchange(kind, k, instance)` the connected
    components of 'gather' or 'scatter' of position k on that grid instance.

    An exchange is a batch of point-to-point transfers: a rank's part starts when its
    communicator's previous work on that rank is done and its input is ready, and a
    component's transfers run once every member of it has started. A rank outside every
    component has nothing to exchange and waits for nothing."""
    ranks = range(len(placement))
    rank_of = {(m, slot): r for r, slots in enumerate(placement) for m, slot in enumerate(slots)}
    stream = [0.0] * len(placement)
    ns_busy = [0.0] * len(placement)
    last_ns_end = 0.0
    comm_free: dict[tuple[int, int], float] = {}  # (member, rank) -> its stream's end
    done: dict[tuple[str, int, int], float] = {}  # (kind, k, rank) -> transfers' end

    def run_exchange(kind: str, k: int) -> None:
        m = member_of[k]
        for instance in sorted({placement[r][m][0] for r in ranks}):
            for members, seconds in exchange(kind, k, instance):
                involved = [rank_of[(m, (instance, g))] for g in members]
                start = max(max(stream[r], comm_free.get((m, r), 0.0)) for r in involved)
                for r in involved:
                    comm_free[(m, r)] = done[(kind, k, r)] = start + seconds

    for event, k in trace:
        m = member_of[k]
        if event == "gather_issue":
            for r in ranks:
                stream[r] += compute("momentum", k, placement[r][m][1])
            run_exchange("gather", k)
        elif event in ("gather_wait", "scatter_wait"):
            kind = "gather" if event == "gather_wait" else "scatter"
            for r in ranks:
                stream[r] = max(stream[r], done.get((kind, k, r), 0.0))
                if kind == "scatter":
                    stream[r] += compute("apply", k, placement[r][m][1])
        elif event == "ns_begin":
            for r in ranks:
                seconds = compute("ns", k, placement[r][m][1])
                stream[r] += seconds
                ns_busy[r] += seconds
                last_ns_end = max(last_ns_end, stream[r])
        elif event == "scatter_issue":
            run_exchange("scatter", k)
    busiest = max(ranks, key=lambda r: (ns_busy[r], -r))
    return Timeline(ns_busy[busiest], last_ns_end, max(stream), busiest)
