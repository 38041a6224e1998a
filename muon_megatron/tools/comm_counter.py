"""Count the bytes `torch.distributed` collectives move per rank while a block of code runs.

`CollectiveCounter.installed()` wraps the collectives (`all_to_all_single`, `all_to_all`,
`all_gather_into_tensor` / `_all_gather_base`, `all_gather`, `reduce_scatter_tensor` /
`_reduce_scatter_base`, `reduce_scatter`, `all_reduce`, `broadcast`, `reduce`, point to
point) in `torch.distributed`, in `torch.distributed.distributed_c10d`, and in every loaded
`megatron` / `muon_megatron` module that imported one by name (megatron binds
`dist_all_gather_func = torch.distributed.all_gather_into_tensor` at import time). Only the
outermost call counts (`_all_gather_base` calls `all_gather_into_tensor` inside torch), and
only between `start()` and `stop()`.

Bytes are what this rank sends to and receives from *other* ranks under the usual
bandwidth-optimal algorithms (NCCL's "bus bandwidth" accounting), with W the group size:

| collective | sent | received |
|---|---|---|
| all-to-all | its input splits for the other W-1 ranks | the output splits from them |
| all-gather (input b bytes) | (W-1) b | (W-1) b |
| reduce-scatter (output b bytes) | (W-1) b | (W-1) b |
| all-reduce (b bytes) | 2 (W-1)/W b | 2 (W-1)/W b |
| broadcast (b bytes) | (W-1) b on the source | b elsewhere |
| reduce (b bytes) | b off the destination | (W-1) b on it |

Nothing in this module runs a collective itself.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

__all__ = ["CollectiveRecord", "CollectiveCounter", "collective_bytes"]

COUNTED_OPS: tuple[str, ...] = (
    "all_to_all_single",
    "all_to_all",
    "all_gather_into_tensor",
    "_all_gather_base",
    "all_gather",
    "reduce_scatter_tensor",
    "_reduce_scatter_base",
    "reduce_scatter",
    "all_reduce",
    "broadcast",
    "reduce",
    "send",
    "recv",
    "isend",
    "irecv",
)
_MODULE_PREFIXES = ("megatron.", "muon_megatron.")


@dataclass(frozen=True)
class CollectiveRecord:
    """One collective call as this rank saw it."""

    op: str
    group_size: int
    sent: int
    received: int


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _split_bytes(t: torch.Tensor, splits: Sequence[int] | None, world: int) -> list[int]:
    if splits is None or len(splits) == 0:
        return [_nbytes(t) // world] * world
    row = t[0].numel() * t.element_size() if t.dim() > 0 and t.shape[0] else 0
    return [int(s) * row for s in splits]


def _group_size_rank(group: Any) -> tuple[int, int]:
    return dist.get_world_size(group), dist.get_rank(group)


def collective_bytes(op: str, bound: inspect.BoundArguments) -> CollectiveRecord:
    """Bytes sent and received by this rank for one call of `op` (arguments `bound`)."""
    a = bound.arguments
    world, me = _group_size_rank(a.get("group"))
    sent = received = 0
    if op == "all_to_all_single":
        out = _split_bytes(a["output"], a.get("output_split_sizes"), world)
        inp = _split_bytes(a["input"], a.get("input_split_sizes"), world)
        sent, received = sum(inp) - inp[me], sum(out) - out[me]
    elif op == "all_to_all":
        inp = [_nbytes(t) for t in a["input_tensor_list"]]
        out = [_nbytes(t) for t in a["output_tensor_list"]]
        sent, received = sum(inp) - inp[me], sum(out) - out[me]
    elif op in ("all_gather_into_tensor", "_all_gather_base"):
        b = _nbytes(a["input_tensor"])
        sent = received = (world - 1) * b
    elif op == "all_gather":
        b = _nbytes(a["tensor"])
        sent = received = (world - 1) * b
    elif op in ("reduce_scatter_tensor", "_reduce_scatter_base", "reduce_scatter"):
        b = _nbytes(a["output"])
        sent = received = (world - 1) * b
    elif op == "all_reduce":
        b = _nbytes(a["tensor"])
        sent = received = 2 * (world - 1) * b // world
    elif op in ("broadcast", "reduce"):
        b = _nbytes(a["tensor"])
        kind = "src" if op == "broadcast" else "dst"
        group_root, root = a.get(f"group_{kind}"), a.get(kind)
        is_root = group_root == me if group_root is not None else root == dist.get_rank()
        if op == "broadcast":
            sent, received = ((world - 1) * b, 0) if is_root else (0, b)
        else:
            sent, received = (0, (world - 1) * b) if is_root else (b, 0)
    elif op in ("send", "isend"):
        sent = _nbytes(a["tensor"])
    elif op in ("recv", "irecv"):
        received = _nbytes(a["tensor"])
    else:
        raise ValueError(f"collective {op!r} is not one CollectiveCounter counts")
    return CollectiveRecord(op, world, int(sent), int(received))


class CollectiveCounter:
    """Records every collective this process issues between `start()` and `stop()`.

    >>> counter = CollectiveCounter()
    >>> with counter.installed():
    ...     counter.start(); optimizer.step(); records = counter.stop()
    """

    def __init__(self) -> None:
        self.records: list[CollectiveRecord] = []
        self._active = False
        self._local = threading.local()
        self._undo: list[tuple[Any, str, Any]] = []

    # ------------------------------------------------------------------ windows
    def start(self) -> None:
        """Begin a counting window (drops earlier records)."""
        self.records = []
        self._active = True

    def stop(self) -> list[CollectiveRecord]:
        """End the window; returns its records."""
        self._active = False
        return list(self.records)

    @staticmethod
    def totals(records: Sequence[CollectiveRecord]) -> dict[str, Any]:
        """Sent / received bytes in all and per op."""
        by_op: dict[str, dict[str, int]] = defaultdict(lambda: {"calls": 0, "sent": 0,
                                                                "received": 0})
        for r in records:
            by_op[r.op]["calls"] += 1
            by_op[r.op]["sent"] += r.sent
            by_op[r.op]["received"] += r.received
        return {
            "sent": sum(r.sent for r in records),
            "received": sum(r.received for r in records),
            "by_op": dict(by_op),
        }

    # ------------------------------------------------------------------ patching
    def _wrap(self, op: str, original: Callable) -> Callable:
        signature = inspect.signature(original)

        @functools.wraps(original)
        def counted(*args: Any, **kwargs: Any) -> Any:
            depth = getattr(self._local, "depth", 0)
            if self._active and depth == 0:
                bound = signature.bind(*args, **kwargs)
                bound.apply_defaults()
                self.records.append(collective_bytes(op, bound))
            self._local.depth = depth + 1
            try:
                return original(*args, **kwargs)
            finally:
                self._local.depth = depth

        counted.__wrapped_collective__ = original  # type: ignore[attr-defined]
        return counted

    def _set(self, owner: Any, name: str, value: Any) -> None:
        self._undo.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def install(self) -> None:
        """Wrap the collectives (see the module docstring); `uninstall` undoes it."""
        if self._undo:
            raise RuntimeError("CollectiveCounter is already installed")
        wrappers: dict[int, Callable] = {}
        for op in COUNTED_OPS:
            original = getattr(c10d, op, None)
            if original is None:
                continue
            wrapper = self._wrap(op, original)
            wrappers[id(original)] = wrapper
            for owner in (c10d, dist):
                if getattr(owner, op, None) is original:
                    self._set(owner, op, wrapper)
        for name, module in list(sys.modules.items()):
            if module is None or not name.startswith(_MODULE_PREFIXES):
                continue
            for attr, value in list(vars(module).items()):
                if callable(value) and id(value) in wrappers:
                    self._set(module, attr, wrappers[id(value)])

    def uninstall(self) -> None:
        for owner, name, value in reversed(self._undo):
            setattr(owner, name, value)
        self._undo = []
        self._active = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[CollectiveCounter]:
        self.install()
        try:
            yield self
        finally:
            self.uninstall()
