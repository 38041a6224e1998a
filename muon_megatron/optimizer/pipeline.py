"""The Muon part of one optimizer step, pipelined over buckets (and optimizers).

Per bucket the four phases of `MuonDistributedOptimizer` run in order: local momentum,
gather to the owner, Newton-Schulz, scatter back and apply. Across buckets they overlap:

    issue gather(0)
    for k = 0, 1, ...:
        wait gather(k)
        momentum(k+1); issue gather(k+1)     <- in flight while NS(k) runs
        NS(k); issue scatter(k)              <- in flight while NS(k+1) runs
        wait scatter(k-1); apply(k-1)

The exchanges are asynchronous (`grid.start_exchange`), so on a GPU bucket k+1's gather
and bucket k's scatter run on the communication stream while bucket k+1's Newton-Schulz
runs on the compute stream, and the host never waits for the device. At most two buckets'
wire buffers are alive besides the one being orthogonalized, and momentum/Nesterov inputs
exist for one bucket ahead only.

The buckets of several optimizers (a ChainedOptimizer's dense and expert members, each
with its own grid) are interleaved round-robin into one sequence, the same on every
rank: every group then sees its collectives issued in the same order by all of its
members, so no two ranks can wait on each other in a cycle.

`trace`, when a list is passed, records ('gather_issue' | 'gather_wait' | 'ns_begin' |
'ns_end' | 'scatter_issue' | 'scatter_wait', k) with k the position in the interleaved
sequence: the planner's event model plays it (`costmodel.events`).
"""

from __future__ import annotations

import itertools
from typing import Any

from muon_megatron.optimizer.timing import PhaseTimer

__all__ = ["run_pipeline", "interleave"]


def interleave(members: list[Any]) -> list[tuple[Any, Any]]:
    """(optimizer, bucket) pairs, round-robin over `members` (bucket 0 of each, then 1...)."""
    lanes = [[(opt, b) for b in opt._buckets] for opt in members]
    return [item for row in itertools.zip_longest(*lanes) for item in row if item is not None]


def run_pipeline(members: list[Any], trace: list | None = None) -> int:
    """Run the Muon phases of every bucket of `members` (MuonDistributedOptimizers of this
    rank, in chain order), pipelined, each phase under the first member's Megatron timers
    (`optimizer.timing`). Returns the most bytes the step held at once: the exchanges in
    flight and the owner's buffer of the bucket being orthogonalized (Newton-Schulz's own
    work space not counted)."""
    items = interleave(members)
    timer = PhaseTimer.of(members[0]) if members else PhaseTimer(None)
    for opt in members:
        opt._begin_step()

    def note(event: str, k: int) -> None:
        if trace is not None:
            trace.append((event, k))

    def start_gather(k: int):
        opt, bucket = items[k]
        with timer("muon-momentum"):
            ns_inputs = opt._phase1_local_momentum(bucket)
        with timer("muon-gather"):
            flight = opt._phase2_start_gather(bucket, ns_inputs)
        note("gather_issue", k)
        return flight

    gathers = {0: start_gather(0)} if items else {}
    pending = None  # (k, flight) of the scatter in flight
    peak = 0
    for k, (opt, bucket) in enumerate(items):
        with timer("muon-gather"):
            owned = opt._phase2_finish_gather(bucket, gathers.pop(k))
        note("gather_wait", k)
        if k + 1 < len(items):
            gathers[k + 1] = start_gather(k + 1)
        note("ns_begin", k)
        with timer("muon-newton-schulz"):
            owned = opt._phase3_orthogonalize(bucket, owned)
        note("ns_end", k)
        flights = list(gathers.values()) + ([pending[1]] if pending else [])
        peak = max(peak, sum(f.nbytes for f in flights) + owned.numel() * owned.element_size())
        with timer("muon-scatter"):
            scatter = opt._phase4_start_scatter(bucket, owned)
        note("scatter_issue", k)
        del owned
        if pending is not None:
            _finish(items, pending, note, timer)
        pending = (k, scatter)
    if pending is not None:
        _finish(items, pending, note, timer)
    for opt in members:
        opt._end_step()
    return peak


def _finish(items, pending, note, timer: PhaseTimer) -> None:
    k, flight = pending
    opt, bucket = items[k]
    with timer("muon-scatter"):
        opt._phase4_finish_scatter(bucket, flight)
    note("scatter_wait", k)
