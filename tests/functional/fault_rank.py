"""A rank killed with SIGKILL at a chosen point (test harness only).

    MUON_TEST_FAULT=<point>:<n> RANK=1 WORLD_SIZE=2 MASTER_ADDR=... MASTER_PORT=... \
        python tests/functional/fault_rank.py <examples/pretrain_moe.py flags>

runs `muon_megatron.training.entry.main` as a torchrun rank would, after wrapping, from
outside, the functions that mark the point; nothing in the package knows about it. Under
Megatron-LM's `pretrain_gpt.py`, `fault_site/sitecustomize.py` calls `install_from_env()` in
the rank that MUON_TEST_FAULT_RANK names. Iterations are counted by the optimizer's steps,
saves by torch_dist's writes, so the points mean the same in both entries:

* `save-file:<n>`: in the n-th checkpoint save, once this rank's first shard file (`.distcp`)
  is written and closed; its other shard files may be half written, and the coordinator's
  `.metadata`, the checksums and the tracker are not written yet.
* `before-scatter:<n>`: in iteration n's Muon step, after the first bucket's gather has
  arrived and before its scatter starts (the owners hold the gathered momenta).
* `before-param-gather:<n>`: in iteration n, after the inner optimizer step has updated this
  rank's main shards and copied them to its model params, before the data-parallel param
  all-gather.
* `async-save-file:<n>`: as `save-file`, in the n-th save, which must be an `--async-save`
  one: its files are written by megatron-core's persistent checkpoint worker while the rank
  trains on, and the kill lands there, before the save is finalized (checksums, tracker).
  A synchronous n-th save does not match, and the rank is not killed.

The kill is SIGKILL to the rank's process, what `kill -9` does: no Python cleanup, no
exception, no flush; the processes the rank forked (megatron-core's checkpoint writers) get
one too. A shard file is written by a process megatron-core forks per file, so `save-file`
kills the rank (its parent) from there; megatron-core 0.19 writes in threads of the saving
process instead, and the kill comes from that thread.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys

ENV = "MUON_TEST_FAULT"
POINTS = ("save-file", "async-save-file", "before-scatter", "before-param-gather")


def _kill(pid: int) -> None:
    """SIGKILL the rank `pid` and every process under it (the checkpoint writers, the
    persistent checkpoint worker and its writers): orphaned, a writer can block forever on a
    queue whose reader died, holding the launcher's output pipe open."""
    sys.stdout.flush()
    for child in _descendants(pid):
        if child != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
    os.kill(pid, signal.SIGKILL)


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        children = _children(todo.pop())
        found += children
        todo += children
    return found


def _children(pid: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                with open(f"/proc/{entry}/stat") as stat:
                    # pid (comm) state ppid ...: comm may hold spaces, so split after ')'.
                    if int(stat.read().rsplit(")", 1)[1].split()[1]) == pid:
                        children.append(int(entry))
    return children


def _install(point: str, n: int) -> None:
    from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBucketGroup
    from megatron.core.dist_checkpointing.strategies.filesystem_async import (
        FileSystemWriterAsync,
    )

    from muon_megatron.optimizer.distributed import MuonDistributedOptimizer

    rank_pid = os.getpid()
    count = {"saves": 0, "iteration": 0, "saver": None}
    in_step = {"n": None}  # the iteration whose optimizer step is running, else None
    step_with_ready_grads = MuonDistributedOptimizer.step_with_ready_grads

    @functools.wraps(step_with_ready_grads)
    def marked_step(self):
        # The member that runs the pipeline (the chain's first) steps once per iteration,
        # before the chain's other members.
        if self._pipeline_members is not None:
            count["iteration"] += 1
        in_step["n"] = count["iteration"]
        try:
            return step_with_ready_grads(self)
        finally:
            in_step["n"] = None

    MuonDistributedOptimizer.step_with_ready_grads = marked_step

    if point in ("save-file", "async-save-file"):
        # A torch_dist save runs this once, in the rank's process (synchronous) or in the
        # persistent checkpoint worker it forked (--async-save, the saves in order), in both
        # entries. It writes each shard file in a process it forks (megatron-core 0.16,
        # `..._multiproc`) or in a thread of its own (0.19, `..._multithread`).
        name = next(n for n in ("write_preloaded_data_multiproc", "write_preloaded_data_multithread")
                    if hasattr(FileSystemWriterAsync, n))  # fmt: skip
        write_all = getattr(FileSystemWriterAsync, name)

        @functools.wraps(write_all)
        def counted_save(*args, **kwargs):
            count["saves"] += 1
            count["saver"] = os.getpid()  # the rank, or its checkpoint worker (async)
            return write_all(*args, **kwargs)

        setattr(FileSystemWriterAsync, name, staticmethod(counted_save))
        write = FileSystemWriterAsync.write_preloaded_data

        @functools.wraps(write)
        def write_then_kill(transform_list, local_proc_idx, *args, **kwargs):
            result = write(transform_list, local_proc_idx, *args, **kwargs)
            # The counters are those of the process running the save (the rank, or its
            # checkpoint worker), as a forked writer inherited them.
            is_async = count["saver"] != rank_pid
            if count["saves"] == n and local_proc_idx == 0 and is_async == (point != "save-file"):
                _kill(rank_pid)
                os._exit(0)  # a forked writer has nothing left to report to
            return result

        FileSystemWriterAsync.write_preloaded_data = staticmethod(write_then_kill)
    elif point == "before-scatter":
        start_scatter = MuonDistributedOptimizer._phase4_start_scatter

        @functools.wraps(start_scatter)
        def kill_then_scatter(self, bucket, buffer):
            if in_step["n"] == n:
                _kill(rank_pid)
            return start_scatter(self, bucket, buffer)

        MuonDistributedOptimizer._phase4_start_scatter = kill_then_scatter
    elif point == "before-param-gather":
        # Each bucket group's all-gather: megatron-core 0.16 reaches it through
        # DistributedDataParallel.start_param_sync, 0.19 through the optimizer's
        # start_param_sync_for_bucket_group_subset (DDP._start_bucket_group_param_sync).
        start_param_sync = _ParamAndGradBucketGroup.start_param_sync

        @functools.wraps(start_param_sync)
        def kill_then_sync(self, *args, **kwargs):
            if in_step["n"] == n:
                _kill(rank_pid)
            return start_param_sync(self, *args, **kwargs)

        _ParamAndGradBucketGroup.start_param_sync = kill_then_sync
    else:
        raise ValueError(f"{ENV}={point}:{n}: the point must be one of {POINTS}")


def install_from_env() -> None:
    """Install the point MUON_TEST_FAULT names in this process."""
    point, _, n = os.environ[ENV].partition(":")
    _install(point, int(n))


def main() -> int:
    install_from_env()
    from muon_megatron.training.entry import main as entry_main

    return entry_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
