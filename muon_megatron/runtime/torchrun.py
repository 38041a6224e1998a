"""Run `verify` and `bench` under torchrun: one process per GPU over NCCL (or gloo on CPU).

`spawn` (runtime.launch) starts its own gloo ranks on this machine's CPUs; on a GPU node
they would all share cuda:0 over gloo, which tests nothing a cluster runs. Under torchrun
(`RANK`, `WORLD_SIZE`, `LOCAL_RANK` and `MASTER_ADDR` in the environment) the command's
own process is one rank instead:

    torchrun --nproc-per-node 8 -m muon_megatron.tools.cli verify --tp 2 --dp 4 --backend nccl

`--backend auto` picks NCCL where CUDA is available and gloo otherwise; `nccl` without a
GPU is refused, naming the fix. Each rank takes `cuda:LOCAL_RANK`. On CPU the CPU shims are
installed first, exactly as `spawn` does, so the torchrun path is tested on CPU too.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from typing import Any, Literal

import torch
import torch.distributed as dist

__all__ = ["BACKENDS", "Backend", "under_torchrun", "launcher_rank", "resolve_backend",
           "torchrun_session", "all_gather_objects", "broadcast_object"]

Backend = Literal["auto", "nccl", "gloo"]
BACKENDS: tuple[str, ...] = ("auto", "nccl", "gloo")
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def under_torchrun() -> bool:
    """Whether this process was started by torchrun (or another launcher that sets its
    environment variables)."""
    return all(os.environ.get(k) for k in _TORCHRUN_ENV)


def launcher_rank() -> int:
    """This process's rank as the launcher set it (0 without torchrun): who prints."""
    return int(os.environ.get("RANK", "0") or 0)


def resolve_backend(backend: str) -> str:
    """'auto' -> 'nccl' with CUDA, else 'gloo'; refuses 'nccl' without a GPU."""
    if backend not in BACKENDS:
        raise ValueError(f"--backend {backend!r} is not one of {BACKENDS}.")
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError(
            "--backend nccl needs CUDA GPUs and this machine has none; use --backend gloo "
            "(or auto) here, and nccl on a GPU node under torchrun."
        )
    return backend


@contextlib.contextmanager
def torchrun_session(backend: str, timeout_s: float = 1800) -> Iterator[tuple[int, int, str]]:
    """Join the torchrun job's process group; yields (rank, world size, backend) and tears
    megatron's groups and the default group down afterwards."""
    if not under_torchrun():
        raise RuntimeError(
            "torchrun_session needs torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, "
            "MASTER_ADDR, MASTER_PORT); start the command with torchrun."
        )
    resolved = resolve_backend(backend)
    local_rank = int(os.environ["LOCAL_RANK"])
    if resolved == "nccl":
        torch.cuda.set_device(local_rank)
    elif not torch.cuda.is_available():
        from muon_megatron.runtime.cpu_shims import install_cpu_shims

        install_cpu_shims()
    dist.init_process_group(resolved, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield dist.get_rank(), dist.get_world_size(), resolved
    finally:
        import sys

        if "megatron.core.parallel_state" in sys.modules:
            sys.modules["megatron.core.parallel_state"].destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
