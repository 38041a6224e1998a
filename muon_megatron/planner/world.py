"""One rank of a large world, built in this process on the meta device.

The planner must see exactly what a real run builds: megatron-core's model, its DDP gradient
buffers (bucket sizes, padding: they fix every rank's ZeRO-1 range) and our optimizer's plan
(matrix splits, owners, buckets). It builds them with megatron-core's and our own code, for
one rank of a world of any size, without a cluster:

- torch's fake process group (`torch.distributed` backend "fake", as torchtitan's memory
  estimator uses) stands for the world: every group megatron creates exists, with its real
  ranks and sizes, and collectives return at once without moving data;
- parameters and buffers live on the meta device (shapes only, no memory; megatron's weight
  initialization runs as usual, which sets the TP attributes, and costs nothing there);
- the one exchange the optimizer makes at construction (the DP peers' TP groups,
  `grid.build_grid`) is answered from megatron-core's own `RankGenerator`, the layout
  `initialize_model_parallel` builds its groups from.

Under pure DP, TP, CP and EP every rank of a pipeline stage sees the same plan (its grids,
owners, buckets and ranges: the plan is computed identically on every rank), so one rank per
stage gives every rank's figures. The process must have CUDA hidden (the planner runs in a
child process with `CUDA_VISIBLE_DEVICES=""`): megatron-core then runs through
`runtime.cpu_shims`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
from collections.abc import Iterator

import torch
import torch.distributed as dist

from muon_megatron.costmodel.layout import RankLayout

__all__ = ["fake_rank", "build_rank"]


@contextlib.contextmanager
def fake_rank(world_size: int, rank: int) -> Iterator[None]:
    """`rank` of a fake world of `world_size` processes; torch.distributed and megatron's
    groups are torn down on exit, so the next stage can be built in the same process."""
    from megatron.core import parallel_state
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from muon_megatron.optimizer.grid import forget_groups

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        forget_groups()
        dist.destroy_process_group()


@contextlib.contextmanager
def _on_meta_device() -> Iterator[None]:
    """megatron places params and buffers at `torch.cuda.current_device()` (or the default
    device): both answer the meta device while building."""
    saved = torch.cuda.current_device
    torch.cuda.current_device = lambda: torch.device("meta")
    try:
        with torch.device("meta"):
            yield
    finally:
        torch.cuda.current_device = saved


def _without_context_parallel_config(args: argparse.Namespace) -> argparse.Namespace:
    """The flags the model itself is built with: `--context-parallel-size` 1.

    Context parallelism changes no parameter and no DDP buffer: DDP and the optimizer take
    their data-and-context-parallel group from megatron's process groups, which
    `initialize_parallel` creates with CP, so the grids and ZeRO-1 ranges are the run's. Only
    the attention's forward reads the config's CP size, and megatron-core's local attention,
    the one the planner builds, refuses a config with CP > 1; the planner runs no forward."""
    if args.context_parallel_size == 1:
        return args
    built = copy.copy(args)
    built.context_parallel_size = 1
    return built


def build_rank(args: argparse.Namespace, world_size: int, rank: int, layout: RankLayout):
    """(model chunks, optimizer) of `rank`, as `training.model` / `training.step` build them
    for a run, on the meta device. Call inside `fake_rank(world_size, rank)`."""
    from muon_megatron.config_flags import muon_config_from_args
    from muon_megatron.optimizer.builder import get_muon_optimizer
    from muon_megatron.training import model as model_builder
    from muon_megatron.training.step import optimizer_config_from_args

    model_builder.initialize_parallel(args, gloo_groups=False)
    with _on_meta_device():
        model = model_builder.build_model(_without_context_parallel_config(args))
        optimizer = get_muon_optimizer(
            optimizer_config_from_args(args),
            model,
            muon_config_from_args(args),
            use_gloo_process_groups=False,
            tp_groups_of=layout.tp_group_of,
            report_routing=False,  # a fake rank: the plan's own report says what matters
        )
    return model, optimizer
