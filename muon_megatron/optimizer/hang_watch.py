"""Name the collective a hung rank waits in.

A collective that some rank never enters (a different member order, a different group, a
rank that died) blocks the others silently until the backend's timeout, often 10-30
minutes, and then names neither the rank nor the call. Every collective muon-megatron
makes is entered through `watched(name, group)`; a daemon thread per process notices one
that has lasted longer than `MUON_MEGATRON_HANG_TIMEOUT_S` (default 300 s; 0 turns the
watch off) and prints, once per call,

    muon_megatron: rank 3 has waited 300 s in 'nonfinite all_reduce' (call #12 of it on
    this rank) over the ranks [0, 1, 2, 3] ...

followed by every thread's Python stack (faulthandler). Comparing the ranks' lines shows
which rank is elsewhere, and where. For collectives Megatron makes itself, torch's own
`TORCH_DISTRIBUTED_DEBUG=DETAIL` checks that all ranks enter the same collective with the
same shapes (docs/limits.md).
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

__all__ = ["watched", "hang_timeout_s", "TIMEOUT_ENV"]

TIMEOUT_ENV = "MUON_MEGATRON_HANG_TIMEOUT_S"
_DEFAULT_TIMEOUT_S = 300.0

_lock = threading.Lock()
_in_progress: dict[int, tuple[str, int, str, float]] = {}  # id -> (name, seq, ranks, start)
_calls: Counter = Counter()
_reported: set[int] = set()
_watcher: threading.Thread | None = None


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
def watched(name: str, group: Any = None) -> Iterator[None]:
    """Run a collective under the hang watch (`name` says which call, for the report)."""
    timeout = hang_timeout_s()
    if timeout <= 0:
        yield
        return
    _ensure_watcher(timeout)
    with _lock:
        _calls[name] += 1
        token = object()
        key = id(token)
        _in_progress[key] = (name, _calls[name], _ranks(group), time.monotonic())
    try:
        yield
    finally:
        with _lock:
            _in_progress.pop(key, None)
            _reported.discard(key)


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
            late = [
                (key, entry)
                for key, entry in _in_progress.items()
                if now - entry[3] >= timeout and key not in _reported
            ]
            _reported.update(key for key, _ in late)
        for _, (name, seq, ranks, start) in late:
            print(
                f"muon_megatron: rank {_rank()} has waited {now - start:.0f} s in {name!r} "
                f"(call #{seq} of it on this rank) over the ranks {ranks}: some rank of that "
                "group has not entered the same call. Compare the ranks' lines; this "
                f"process's stacks follow ({TIMEOUT_ENV} sets the wait).",
                file=sys.stderr,
                flush=True,
            )
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
