"""Muon's per-step figures without host syncs: kept on the device, read when logged.

During `optimizer.step()` nothing here copies a value to the host or waits for the device:
- each owned matrix's squared update norm is added on the device into one vector (one slot
  per Muon matrix of the optimizer) by an `index_add_` per bucket;
- at the end of the step that vector is summed over the grid by one *asynchronous*
  all-reduce (only the owner's slot is non-zero), whose handle is kept;
- Newton-Schulz time is taken with CUDA events on a GPU (with `time.perf_counter` on the
  CPU, where there is no device to wait for).

`StepMetrics.read()` waits for that all-reduce, copies the vector to the host and reads
the events: the training loop calls it through `muon_metrics` at its log interval only.
Reading is local (the collective was already issued by every rank in the step), so a
rank that logs never makes others wait.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from muon_megatron.runtime.hang_watch import watched

__all__ = ["StepMetrics", "NSTimer"]


class NSTimer:
    """Newton-Schulz seconds of one step: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._seconds = 0.0
        self._start: float | torch.cuda.Event | None = None

    def reset(self) -> None:
        self._events, self._seconds = [], 0.0

    def begin(self) -> None:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def end(self) -> None:
        if self.cuda:
            stop = torch.cuda.Event(enable_timing=True)
            stop.record()
            self._events.append((self._start, stop))
        else:
            self._seconds += time.perf_counter() - self._start

    def seconds(self) -> float:
        """Host sync on a GPU (waits for the last event): call at log time only."""
        if self.cuda:
            if self._events:
                self._events[-1][1].synchronize()
            return self._seconds + sum(a.elapsed_time(b) for a, b in self._events) / 1e3
        return self._seconds


@dataclass
class StepMetrics:
    """Device-side figures of the last step of one `MuonDistributedOptimizer`.

    `names`, `numels` and `groups` are per Muon matrix (plan order); `numels` counts the
    elements of the matrix's update, logical pieces together."""

    names: list[str]
    numels: list[int]
    groups: list[int]
    device: torch.device
    group: dist.ProcessGroup | None
    timer: NSTimer = field(init=False)
    _sq: torch.Tensor | None = field(default=None, init=False)
    _work: object = field(default=None, init=False)
    _read: dict | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.timer = NSTimer(self.device)

    def begin_step(self) -> None:
        self._sq = torch.zeros(len(self.names), dtype=torch.float64, device=self.device)
        self._work, self._read = None, None
        self.timer.reset()

    def add(self, index: torch.Tensor, sq: torch.Tensor) -> None:
        """Add squared update norms `sq` of the matrices at `index` (device tensors)."""
        self._sq.index_add_(0, index, sq.to(torch.float64))

    def end_step(self) -> None:
        if self.group is not None:
            self._work = dist.all_reduce(self._sq, group=self.group, async_op=True)

    def read(self) -> dict:
        """{'update_rms': {name: rms}, 'group_rms': {group: rms}, 'ns_seconds': float}, or
        an empty dict before the first step. Waits for this step's all-reduce (log time)."""
        if self._sq is None:
            return {}
        if self._read is None:
            work, self._work = self._work, None
            name = "Muon metrics all_reduce (wait)"
            with contextlib.nullcontext() if work is None else watched(name, self.group, [work]):
                if work is not None:
                    work.wait()
                sq = self._sq.cpu().tolist()  # under NCCL, waits here for the all-reduce
            per_group_sq: dict[int, float] = {}
            per_group_n: dict[int, int] = {}
            for s, n, g in zip(sq, self.numels, self.groups):
                per_group_sq[g] = per_group_sq.get(g, 0.0) + s
                per_group_n[g] = per_group_n.get(g, 0) + n
            self._read = {
                "update_rms": {
                    name: (s / n) ** 0.5 for name, s, n in zip(self.names, sq, self.numels)
                },
                "group_rms": {g: (per_group_sq[g] / per_group_n[g]) ** 0.5 for g in per_group_sq},
                "ns_seconds": self.timer.seconds(),
            }
        return self._read
