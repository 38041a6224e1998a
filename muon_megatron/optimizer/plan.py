"""The plan of a Muon optimizer: its matrices, their DP ranges, owners and buckets.

Built once, at construction, from the DistributedOptimizer's own buffers: for every Muon
parameter its `MatrixSplit` (routing.splits), the flat range of the TP-local tensor each DP
rank holds (mirroring Megatron's grad-buffer ranges), its Newton-Schulz cost and the grid
member that owns it (ownership.assign_owners); then buckets balanced across owners.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.utils import get_model_config

from muon_megatron.ops.newton_schulz import ns_flops
from muon_megatron.optimizer.ownership import assign_owners
from muon_megatron.routing.rules import canonical_name
from muon_megatron.routing.splits import MatrixSplit, ModelShape, matrix_split
from muon_megatron.routing.tp_layout import TPLayouts

__all__ = ["MuonMatrix", "plan_matrices", "plan_names", "make_buckets"]


@dataclass
class MuonMatrix:
    """One Muon parameter as the grid sees it."""

    index: int
    name: str
    """The parameter's name with its global layer number (`plan_names`): unique among the
    matrices of a rank, whatever its model chunks."""
    param: torch.nn.Parameter
    split: MatrixSplit
    local_shape: tuple[int, ...]
    dp_ranges: list[tuple[int, int]]  # flat [start, end) of the TP-local tensor per DP rank
    group_index: int
    cost: float
    owner: int = 0
    local_name: str = ""
    """The name inside its model chunk (layer numbers counted from the chunk's first)."""

    def sends_from(self, tp_rank: int) -> bool:
        # A TP-replicated tensor is identical on every TP rank: TP rank 0's copy is used.
        return self.split.tp_mode != "replicated" or tp_rank == 0

    def shard_numel(self, dp_rank: int) -> int:
        start, end = self.dp_ranges[dp_rank]
        return end - start


def _param_names(model_chunks) -> dict[torch.nn.Parameter, str]:
    names = {}
    for chunk in model_chunks:
        for name, p in chunk.named_parameters():
            names[p] = canonical_name(name)
    return names


_LAYERS = re.compile(r"(?:.*\.)?layers")
_LAYER = re.compile(r"(?:[^.]+\.)*?layers\.\d+(?=\.)")


def plan_names(model_chunks: Sequence[torch.nn.Module]) -> dict[torch.nn.Parameter, str]:
    """Each parameter of `model_chunks` named as in the whole model: the chunk-local layer
    index of `...layers.<i>.` replaced by the layer's global index (`layer_number - 1`, the
    number megatron-core's `TransformerBlock.sharded_state_dict` writes in checkpoint keys).

    A pipeline stage or virtual stage numbers its layers from 0 (every model chunk of an
    interleaved pipeline has a `decoder.layers.0`); global numbers keep the names of one
    rank's matrices apart, so they key owners, Newton-Schulz accounting, metrics and the
    checkpoint's Muon manifest. Experts keep their local index: an expert grid holds one EP
    rank's experts. Raises RuntimeError if two parameters still share a name."""
    names: dict[torch.nn.Parameter, str] = {}
    taken: dict[str, torch.nn.Parameter] = {}
    for chunk in model_chunks:
        renamed = {}  # 'decoder.layers.1' -> 'decoder.layers.5'
        for module_name, module in chunk.named_modules():
            local = canonical_name(module_name)
            head, _, index = local.rpartition(".")
            number = getattr(module, "layer_number", None)
            if isinstance(number, int) and index.isdigit() and _LAYERS.fullmatch(head):
                renamed[local] = f"{head}.{number - 1}"
        for name, param in chunk.named_parameters():
            name = canonical_name(name)
            match = _LAYER.match(name)
            if match and match.group(0) in renamed:
                name = renamed[match.group(0)] + name[match.end() :]
            if taken.setdefault(name, param) is not param:
                raise RuntimeError(
                    f"two parameters of this rank's model chunks are both named {name!r} with "
                    "their global layer numbers: Muon's plan cannot tell them apart"
                )
            names[param] = name
    return names


def plan_matrices(opt: DistributedOptimizer, group_of: dict, is_muon: Callable) -> list[MuonMatrix]:
    """Every Muon matrix of `opt` (a DistributedOptimizer after its own __init__): its split,
    the DP ranges of each rank, its param group, its Newton-Schulz cost and its owner.
    `group_of` maps each model param to its param group (taken before ZeRO-1 sharding)."""
    model_config = get_model_config(opt.model_chunks[0])
    names = _param_names(opt.model_chunks)
    keys = plan_names(opt.model_chunks)
    matrices: list[MuonMatrix] = []
    shape_args = asdict(ModelShape.from_transformer_config(model_config))
    # The TP layout comes from the module that owns each param (how megatron-core built it),
    # not from its attributes, which Transformer Engine sets wrongly (routing/tp_layout.py).
    tp_layouts = TPLayouts(opt.model_chunks, opt.grid.tp_size)
    for buffer in opt.buffers:
        for param in buffer.params:
            if param not in group_of or not is_muon(names[param], param):
                continue
            name = names[param]
            split = matrix_split(
                name,
                param.shape,
                tp_size=opt.grid.tp_size,
                tp_partition_dim=tp_layouts.of(name, param).partition_dim,
                muon_config=opt.muon_config,
                **shape_args,
            )
            steps = opt.muon_config.muon_ns_steps
            cost = sum(ns_flops(r, c, steps) for r, c in split.logical_shapes())
            matrices.append(
                MuonMatrix(
                    index=len(matrices),
                    name=keys[param],
                    local_name=name,
                    param=param,
                    split=split,
                    local_shape=tuple(param.shape),
                    dp_ranges=_dp_ranges(opt, buffer, param),
                    group_index=group_of[param],
                    cost=float(cost),
                )
            )
    tp_layouts.raise_undetermined()
    # What each grid member already holds of a matrix stays there if it owns it.
    held = [
        {g: m.shard_numel(d) for g, (t, d) in enumerate(opt.grid.coords) if m.sends_from(t)}
        for m in matrices
    ]
    owners = assign_owners([m.cost for m in matrices], opt.grid.size, held)
    for m, owner in zip(matrices, owners):
        m.owner = owner
    return matrices


def _dp_ranges(opt: DistributedOptimizer, buffer, param) -> list[tuple[int, int]]:
    """Flat range of `param` held by every DP rank (mirrors Megatron's gbuf ranges)."""
    start, end, bucket_id = buffer.param_index_map[param]
    bucket = buffer.buckets[bucket_id]
    dp = opt.grid.dp_size
    per_rank = bucket.grad_data.numel() // dp
    ranges = []
    for d in range(dp):
        lo = bucket.offset + d * per_rank
        hi = lo + per_rank
        s, e = max(start, lo), min(end, hi)
        ranges.append((s - start, e - start) if e > s else (0, 0))
    if param in opt.model_param_gbuf_map:
        mine = opt._get_model_param_range_map(param)["param"]
        if (mine.start, mine.end) != ranges[opt.data_parallel_group.rank()]:
            raise RuntimeError(f"ZeRO-1 range mismatch for a Muon matrix: {mine}")
    return ranges


def make_buckets(
    matrices: list[MuonMatrix], owner_mb: float, grid_size: int = 1
) -> list[list[MuonMatrix]]:
    """Buckets that are rounds of the whole grid: in every bucket, every owner orthogonalizes
    about the same share of its own Newton-Schulz work, and at most `owner_mb` MiB of fp32
    full matrices (a matrix larger than that alone).

    The number of rounds R is the least for which every owner's share fits its cap and a
    round holds no more than `grid_size` caps in all (so what a rank sends and receives in
    one round stays bounded too). It grows with the work per owner, never with the grid:
    with fewer matrices than ranks, one round. Each owner's matrices, largest first, go to
    rounds by where their work starts in the owner's own timeline: round k holds what
    starts in [k/R, (k+1)/R) of it. So every owner keeps working through every round and
    the in-order exchanges never leave most owners idle (docs/design.md). The order depends on the plan only: every rank
    forms the same buckets."""
    limit = owner_mb * 2**20 / 4
    by_owner: dict[int, list[MuonMatrix]] = {}
    for m in matrices:
        by_owner.setdefault(m.owner, []).append(m)
    for owned in by_owner.values():
        owned.sort(key=lambda m: (-m.cost, m.index))
    owners = sorted(by_owner)
    longest = max((len(owned) for owned in by_owner.values()), default=1)
    total = sum(m.param.numel() * m.split.tp_size for m in matrices)
    # No fewer rounds than the owner with the most bytes needs, however they are paced, nor
    # than the grid's caps take to hold everything.
    rounds = max(
        [1, math.ceil(total / (max(grid_size, 1) * limit))]
        + [math.ceil(sum(m.param.numel() * m.split.tp_size for m in owned) / limit)
           for owned in by_owner.values()]
    )
    while True:
        placed = {o: _paced(owned, rounds) for o, owned in by_owner.items()}
        if rounds >= longest or all(_fits(r, limit) for r in placed.values()):
            break
        rounds += 1
    buckets: list[list[MuonMatrix]] = [[] for _ in range(rounds)]
    for owner in owners:
        for k, members in enumerate(placed[owner]):
            buckets[k].extend(members)
    for bucket in buckets:
        bucket.sort(key=lambda m: m.index)
    return [b for b in buckets if b]


def _paced(owned: list[MuonMatrix], rounds: int) -> list[list[MuonMatrix]]:
    """`owned` (largest first) in `rounds` rounds by where each one's work starts."""
    load = sum(m.cost for m in owned) or 1.0
    out: list[list[MuonMatrix]] = [[] for _ in range(rounds)]
    start = 0.0
    for m in owned:
        out[min(int(start / load * rounds), rounds - 1)].append(m)
        start += m.cost
    return out


def _fits(rounds: list[list[MuonMatrix]], limit: float) -> bool:
    return all(
        len(r) <= 1 or sum(m.param.numel() * m.split.tp_size for m in r) <= limit for r in rounds
    )
