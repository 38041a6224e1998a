"""The two schemes a user would pick instead, on the same matrices and grid.

- **megatron-core's own Muon** (`get_megatron_muon_optimizer`: `TensorParallelMuon` inside
  `LayerWiseDistributedOptimizer`, megatron-core 0.16.1 `optimizer/layer_wise_optimizer.py`
  and `muon.py`): DDP all-reduces the gradients (no reduce-scatter: the all-gather half is
  extra against ZeRO-1), each DP rank updates whole parameters dealt out ping-pong by size
  (sorted by numel, ranks 0..D-1 then D-1..0), keeps their fp32 main copy and state, and
  all-gathers the updated parameters (as ZeRO-1 does). With `--muon-tp-mode duplicated`
  (the mode that orthogonalizes the full matrix, our algorithm) each TP rank all-gathers
  the TP pieces and repeats Newton-Schulz. Modelled on the Muon parameters: the AdamW ones
  are dealt out the same way but are not Newton-Schulz work.
- **Moonlight's scheme** ("Muon is Scalable for LLM Training", arXiv 2502.16982,
  Algorithm 1): ZeRO-1; every rank all-gathers each matrix's momentum over DP (and its TP
  pieces), orthogonalizes the full matrix and keeps its own shard of the update: every
  member of the grid repeats every matrix's Newton-Schulz.

Both are figured per grid from `figures.GridFigures`: NS FLOPs per rank (max and mean),
bytes per rank beyond ZeRO-1 AdamW, steady optimizer-state bytes of the busiest rank, and
an estimated time (the busiest rank's Newton-Schulz plus its extra collectives, which the
schemes do not overlap).
"""

from __future__ import annotations

from dataclasses import dataclass

from muon_megatron.costmodel.figures import GridFigures
from muon_megatron.costmodel.hardware import Hardware
from muon_megatron.ops.newton_schulz import ns_flops

__all__ = ["SchemeFigures", "megatron_core_muon", "moonlight_muon", "ring_seconds"]


@dataclass
class SchemeFigures:
    name: str
    ns_flops_max: float
    ns_flops_mean: float
    extra_bytes: float
    """Bytes the busiest rank sends and receives per step beyond ZeRO-1 AdamW."""
    state_bytes: float
    """Steady fp32 main copies and optimizer moments of the busiest rank."""
    transient_bytes: float
    seconds: float


def _ns_cost(shapes: list[tuple[int, int]], steps: int) -> float:
    return float(sum(ns_flops(r, c, steps) for r, c in shapes))


def ring_seconds(nbytes: float, ranks: tuple[int, ...], hw: Hardware) -> float:
    """A ring all-gather (or reduce-scatter) of `nbytes` per rank over `ranks`: (n-1) steps,
    each at the slowest link the ring crosses, plus a latency per step."""
    n = len(ranks)
    if n <= 1:
        return 0.0
    nodes = {r // hw.gpus_per_node for r in ranks}
    gbps = hw.ib_gbps if len(nodes) > 1 else hw.nvlink_gbps
    latency = hw.ib_peer_latency_us if len(nodes) > 1 else hw.peer_latency_us
    return (
        hw.collective_latency_us * 1e-6
        + (n - 1) * latency * 1e-6
        + nbytes * (n - 1) / n / (gbps * 1e9 * hw.link_efficiency)
    )


def _ns_tflops(fig: GridFigures, hw: Hardware) -> float:
    peak = hw.bf16_tflops if fig.ns_dtype == "bf16" else hw.fp32_tflops
    return peak * 1e12 * hw.ns_efficiency


def megatron_core_muon(fig: GridFigures, hw: Hardware, ns_steps: int) -> SchemeFigures:
    """megatron-core's LayerWiseDistributedOptimizer with TensorParallelMuon (duplicated)."""
    dp = fig.dp_size
    order = sorted(range(fig.params), key=lambda i: fig.local_numel[i])
    loop = list(range(dp)) + list(range(dp))[::-1]
    flops, numel = [0.0] * dp, [0] * dp
    tp_gather = [0] * dp
    for j, i in enumerate(order):
        d = loop[j % len(loop)]
        flops[d] += _ns_cost(fig.logical_shapes[i], ns_steps)
        numel[d] += fig.local_numel[i]
        if fig.tp_split[i]:
            tp_gather[d] += (fig.tp_size - 1) * fig.local_numel[i] * 4
    busiest = max(range(dp), key=lambda d: flops[d])
    grad_gather = 4 * fig.shard_numel * (dp - 1)  # the all-gather half of the all-reduce
    dp_ranks = tuple(r for r, (t, _) in zip(fig.ranks, fig.coords) if t == 0)
    tp_ranks = tuple(r for r, (_, d) in zip(fig.ranks, fig.coords) if d == 0)
    tp = fig.tp_size
    # The AdamW params are dealt out too: on average (all - Muon) / DP per rank, 8 bytes of
    # moments each; every updated param has its fp32 main copy (bf16 params).
    others = max(fig.shard_numel * dp - sum(fig.local_numel), 0) / dp
    main = 4 if fig.main_param_copies else 0
    state = max(numel) * (4 + main) + others * (8 + main)
    largest = max(
        (n * (tp if split else 1) for n, split in zip(fig.local_numel, fig.tp_split)), default=0
    )
    seconds = (
        flops[busiest] / _ns_tflops(fig, hw)
        + ring_seconds(4.0 * fig.shard_numel * dp, dp_ranks, hw)
        + ring_seconds(tp_gather[busiest] * tp / max(tp - 1, 1), tp_ranks, hw)
    )
    return SchemeFigures(
        "megatron-core Muon (layer-wise, TP duplicated)",
        max(flops),
        sum(flops) / dp,
        2.0 * (grad_gather + tp_gather[busiest]),
        float(state),
        float(largest * 8),
        seconds,
    )


def moonlight_muon(fig: GridFigures, hw: Hardware, ns_steps: int) -> SchemeFigures:
    """Moonlight's Distributed Muon: all-gather, Newton-Schulz on every member."""
    total = sum(_ns_cost(s, ns_steps) for s in fig.logical_shapes)
    full = [n * (fig.tp_size if split else 1) for n, split in zip(fig.local_numel, fig.tp_split)]
    wire = fig.wire_bytes
    gathered = sum(full) * wire * (fig.size - 1) / fig.size
    largest_bucket = max((sum(b.owned_numel) for b in fig.buckets), default=0)
    muon = max(fig.muon_shard_numel, default=0)
    state = muon * 4 + (fig.shard_numel - muon) * 8 + (4 * fig.shard_numel
                                                       if fig.main_param_copies else 0)
    return SchemeFigures(
        "Moonlight (all-gather, NS on every rank)",
        total,
        total,
        2.0 * gathered,
        float(state),
        float(largest_bucket * (wire + 4)),
        total / _ns_tflops(fig, hw) + ring_seconds(sum(full) * wire, fig.ranks, hw),
    )
