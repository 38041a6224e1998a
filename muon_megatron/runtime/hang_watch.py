"""Name the collective a hung rank waits in.

A collective that some rank never enters (a different member order, a different group, a
rank that died) blocks the others silently until the backend's timeout, often 10-30
minutes, and then names neither the rank nor the call. Every collective muon-megatron
makes is entered through `watched(name, group, works)`; a daemon thread per process notices
one that has lasted longer than `MUON_MEGATRON_HANG_TIMEOUT_S` (default 300 s; 0 turns the
watch off) and prints, once per call,

    muon_megatron: rank 3 has waited 300 s in 'nonfinite all_reduce' (call #12 of it on
    this rank) over the ranks [0, 1, 2, 3] ...

followed by every thread's Python stack (faulthandler). Comparing the ranks' lines shows
which rank is elsewhere, and where.

What "lasted" means: the `with` block is still running (the host is blocked: gloo's
`work.wait()`, or a `.tolist()` / `.cpu()` of the result, which waits for the device), or
one of the `works` it was given has not completed (`Work.is_completed()`, polled by the
thread). The second matters under NCCL, where `work.wait()` returns at once (it only makes
the current stream wait for the communication stream): the block ends, and the call stays
watched until the device has finished it. A collective made without its `Work` (a plain
synchronous `dist.all_gather` under NCCL) is watched only while its block runs.

Not covered: collectives Megatron makes itself (the gradient reduce-scatter, the param
all-gather); torch's own NCCL watchdog (`TORCH_NCCL_ASYNC_ERROR_HANDLING`, the process
group's timeout) and `TORCH_DISTRIBUTED_DEBUG=DETAIL` cover those (docs/limits.md).
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

__all__ = ["watched", "hang_timeout_s", "TIMEOUT_ENV"]

TIMEOUT_ENV = "MUON_MEGATRON_HANG_TIMEOUT_S"
_DEFAULT_TIMEOUT_S = 300.0

_lock = threading.Lock()
_in_progress: dict[int, _Call] = {}
_calls: Counter = Counter()
_reported: set[int] = set()
_watcher: threading.Thread | None = None


class _Call:
    """One watched collective: its report fields, its works, whether its block still runs."""

    def __init__(self, name: str, seq: int, ranks: str, works: Sequence[Any]) -> None:
        self.name, self.seq, self.ranks, self.works = name, seq, ranks, list(works)
        self.start = time.monotonic()
        self.running = True

    def done(self) -> bool:
        return not self.running and all(w.is_completed() for w in self.works)


def hang_timeout_s() -> float:
    value = os.environ.get(TIMEOUT_ENV, "")
    try:
        return float(value) if value else _DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(
            f"{TIMEOUT_ENV}={value!r} is not a number of seconds; set it to e.g. 300, or 0 "
            "to turn the hang watch off."
        ) from None


@contextlib.contextmanager
def watched(name: str, group: Any = None, works: Sequence[Any] = ()) -> Iterator[None]:
    """Run a collective under the hang watch: watched while the block runs and, after it,
    until every `Work` of `works` reports `is_completed()` (`name` says which call)."""
    timeout = hang_timeout_s()
    if timeout <= 0:
        yield
        return
    _ensure_watcher(timeout)
    with _lock:
        _calls[name] += 1
        call = _Call(name, _calls[name], _ranks(group), works)
        _in_progress[id(call)] = call
    try:
        yield
    finally:
        with _lock:
            call.running = False
            if call.done():
                _in_progress.pop(id(call), None)
                _reported.discard(id(call))


def _ranks(group: Any) -> str:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return "[this process only]"
    if group is None:
        return f"all {dist.get_world_size()} ranks"
    return str(dist.get_process_group_ranks(group))


def _rank() -> str:
    import torch.distributed as dist

    return str(dist.get_rank()) if dist.is_available() and dist.is_initialized() else "?"


def _ensure_watcher(timeout: float) -> None:
    global _watcher
    with _lock:
        if _watcher is not None and _watcher.is_alive():
            return
        _watcher = threading.Thread(
            target=_watch, args=(timeout,), name="muon-megatron-hang-watch", daemon=True
        )
        _watcher.start()


def _watch(timeout: float) -> None:
    period = min(5.0, max(0.01, timeout / 4))
    while True:
        time.sleep(period)
        now = time.monotonic()
        with _lock:
            for key in [key for key, call in _in_progress.items() if call.done()]:
                _in_progress.pop(key)
                _reported.discard(key)
            late = [
                call
                for key, call in _in_progress.items()
                if now - call.start >= timeout and key not in _reported
            ]
            _reported.update(id(call) for call in late)
        for call in late:
            print(
                f"muon_megatron: rank {_rank()} has waited {now - call.start:.0f} s in "
                f"{call.name!r} (call #{call.seq} of it on this rank) over the ranks "
                f"{call.ranks}: some rank of that group has not entered the same call. "
                "Compare the ranks' lines; this process's stacks follow "
                f"({TIMEOUT_ENV} sets the wait).",
                file=sys.stderr,
                flush=True,
            )
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
