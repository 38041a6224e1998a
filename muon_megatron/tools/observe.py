"""Watching a Muon step from outside: what verify, bench and the tests observe.

The optimizer keeps no counters of its own: these context managers wrap its functions for
the duration of a block and record what the step did, so production code carries no
state that only a check reads.

- `counting_newton_schulz()`: which logical matrices each rank orthogonalized, keyed
  (grid ranks, param name, logical index), counted once per step they went through
  Newton-Schulz. The wrapper of the owner's phase counts the matrices that really entered
  `newton_schulz` (batched: a [n, rows, cols] stack is n) and refuses a bucket where that
  number differs from the logical matrices the bucket says its owner holds.
- `recording_pipeline()`: each step's `run_pipeline` trace and peak transient bytes.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

__all__ = ["NsKey", "counting_newton_schulz", "PipelineRecord", "recording_pipeline"]

NsKey = tuple[tuple[int, ...], str, int]


def grid_ranks(grid) -> tuple[int, ...]:
    """The global ranks of a grid (this rank alone when it has no group)."""
    return tuple(grid.ranks) if grid.ranks else (torch.distributed.get_rank(),)


@contextlib.contextmanager
def counting_newton_schulz() -> Iterator[Counter]:
    from muon_megatron.optimizer import distributed

    counts: Counter = Counter()
    entered: list[int] = []
    original_ns = distributed.newton_schulz
    original_phase = distributed.MuonDistributedOptimizer._phase3_orthogonalize

    def newton_schulz(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        entered.append(1 if x.ndim == 2 else x.shape[0])
        return original_ns(x, *args, **kwargs)

    def phase3(self, bucket, buffer):
        entered.clear()
        out = original_phase(self, bucket, buffer)
        keys = [(grid_ranks(self.grid), m.name, j)
                for m in bucket.mine for j in range(len(m.split.logical_shapes()))]
        if sum(entered) != len(keys):
            raise AssertionError(
                f"{sum(entered)} matrices went through Newton-Schulz for the {len(keys)} "
                "logical matrices this rank owns in the bucket"
            )
        counts.update(keys)
        return out

    distributed.newton_schulz = newton_schulz
    distributed.MuonDistributedOptimizer._phase3_orthogonalize = phase3
    try:
        yield counts
    finally:
        distributed.newton_schulz = original_ns
        distributed.MuonDistributedOptimizer._phase3_orthogonalize = original_phase


@dataclass
class PipelineRecord:
    """Per step: `run_pipeline`'s trace, its members' bucket counts, its peak bytes."""

    traces: list[list[tuple[str, int]]] = field(default_factory=list)
    buckets: list[list[int]] = field(default_factory=list)
    peaks: list[int] = field(default_factory=list)


@contextlib.contextmanager
def recording_pipeline() -> Iterator[PipelineRecord]:
    from muon_megatron.optimizer import distributed

    record = PipelineRecord()
    original = distributed.run_pipeline

    def run_pipeline(members, trace=None):
        trace = [] if trace is None else trace
        peak = original(members, trace=trace)
        record.traces.append(trace)
        record.buckets.append([len(m._buckets) for m in members])
        record.peaks.append(peak)
        return peak

    distributed.run_pipeline = run_pipeline
    try:
        yield record
    finally:
        distributed.run_pipeline = original
