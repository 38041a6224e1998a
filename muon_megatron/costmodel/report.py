"""The plan as text and JSON: per-stage tables, the comparison, the verdict, summary lines."""

from __future__ import annotations

import dataclasses
from typing import Any

from muon_megatron.costmodel.estimate import StageEstimate
from muon_megatron.costmodel.figures import GridFigures
from muon_megatron.costmodel.hardware import Hardware

__all__ = ["ModelCost", "grid_lines", "stage_lines", "verdict", "as_json", "summary_lines"]

GIB = 2**30


@dataclasses.dataclass
class ModelCost:
    """What the model costs per iteration (forward and backward), for the optimizer's share."""

    total_params: int
    active_params: int
    tokens: int
    flops: float
    world_size: int

    def seconds(self, hw: Hardware) -> float:
        """Forward-backward time of one iteration at the hardware's MFU."""
        return self.flops / self.world_size / (hw.bf16_tflops * 1e12 * hw.mfu)


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def _spread(values: list[int]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def grid_lines(fig: GridFigures) -> list[str]:
    """One line per grid: members, matrices, owners, Newton-Schulz balance, buckets."""
    owned = [fig.owned(g) for g in range(fig.size)]
    flops = [f for _, _, f in owned]
    busy = sum(1 for f in flops if f > 0)
    mean = sum(flops) / fig.size
    owners = [sum(1 for f in b.ns_flops if f > 0) for b in fig.buckets] or [0]
    name = f"{fig.kind} TP{fig.tp_size}xDP{fig.dp_size}"
    return [
        f"  {name:<18} {fig.size:>5} members | {fig.params} Muon params, {fig.logical} logical"
        f" | owners busy {busy}/{fig.size}, logical per owner max {max(fig.logical_owned)}"
        f" | NS {max(flops) / 1e12:.3f} TFLOP max, {mean / 1e12:.3f} mean (max/mean "
        f"{max(flops) / mean if mean else 1.0:.2f}) | {len(fig.buckets)} buckets, owners per "
        f"bucket {_spread(owners)}"
    ]


def stage_lines(est: StageEstimate, hw: Hardware) -> list[str]:
    """The stage's table: grids, memory per GPU against ZeRO-1 AdamW, bytes, times, schemes."""
    out = [f"stage {est.stage} ({est.ranks} ranks)"]
    for fig in est.grids:
        out += grid_lines(fig)
    out.append(f"  {'memory per GPU (GiB), busiest rank':<36} {'Muon':>9} {'ZeRO-1 AdamW':>13}")
    rows = [("params", "params"), ("grads", "grads"), ("fp32 main shards", "main_shards"),
            ("Muon momentum", "muon_momentum"), ("Adam moments", "adam_moments"),
            ("transient gather/scatter", "transient")]
    for label, key in rows:
        out.append(f"    {label:<34} {_gib(est.memory.get(key, 0)):>9} "
                   f"{_gib(est.memory_adamw.get(key, 0)):>13}")
    out.append(f"    {'total':<34} {_gib(sum(est.memory.values())):>9} "
               f"{_gib(sum(est.memory_adamw.values())):>13}")
    out.append(
        f"  bytes per step beyond ZeRO-1 AdamW, busiest rank: NVLink {est.nvlink_bytes / 1e9:.3f}"
        f" GB, InfiniBand {est.ib_bytes / 1e9:.3f} GB (sent + received)"
    )
    out.append(
        f"  Newton-Schulz: ideal {est.ideal * 1e3:.2f} ms (busiest owner's own work), critical "
        f"path {est.ns_critical_path * 1e3:.2f} ms under the pipeline's issue order: "
        f"{est.ratio:.2f}x the ideal"
    )
    out.append(
        f"  optimizer step: Muon phases {est.muon_seconds * 1e3:.2f} ms + AdamW on the other "
        f"shards {est.adam_seconds * 1e3:.2f} ms; ZeRO-1 AdamW {est.zero1_adam_seconds * 1e3:.2f}"
        " ms"
    )
    out.append(f"  {'scheme':<48} {'NS TFLOP/rank':>13} {'extra GB/rank':>13} "
               f"{'state GiB':>9} {'est. ms':>8}")
    ours_flops = sum(max(fig.owned(g)[2] for g in range(fig.size)) for fig in est.grids)
    ours_state = est.memory["main_shards"] + est.memory["muon_momentum"] + est.memory[
        "adam_moments"]
    out.append(f"  {'muon-megatron (one owner per matrix, pipelined)':<48} "
               f"{ours_flops / 1e12:>13.3f} {(est.nvlink_bytes + est.ib_bytes) / 1e9:>13.3f} "
               f"{_gib(ours_state):>9} {est.muon_seconds * 1e3:>8.2f}")
    for s in est.alternatives:
        out.append(f"  {s.name:<48} {s.ns_flops_max / 1e12:>13.3f} {s.extra_bytes / 1e9:>13.3f} "
                   f"{_gib(s.state_bytes):>9} {s.seconds * 1e3:>8.2f}")
    return out


def verdict(stages: list[StageEstimate], model: ModelCost, hw: Hardware) -> str:
    """One line: does it fit, what share of an iteration it costs, where it loses."""
    step = model.seconds(hw)
    muon = max(s.muon_seconds + s.adam_seconds for s in stages)
    adamw = max(s.zero1_adam_seconds for s in stages)
    memory = max(sum(s.memory.values()) for s in stages)
    ratio = max(s.ratio for s in stages)
    mcore = max(s.alternatives[0].seconds for s in stages)
    moon = max(s.alternatives[1].seconds for s in stages)
    fits = memory <= hw.hbm_gib * GIB
    parts = [
        f"{'fits' if fits else 'DOES NOT FIT'} ({memory / GIB:.1f} of {hw.hbm_gib:g} GiB)",
        f"optimizer {muon / (step + muon):.1%} of an iteration (ZeRO-1 AdamW "
        f"{adamw / (step + adamw):.1%})",
        f"Newton-Schulz critical path {ratio:.2f}x the ideal"
        + (" (owners wait on each other: see the buckets)" if ratio > 1.10 else ""),
        f"megatron-core's Muon would take {mcore / muon:.1f}x and Moonlight's {moon / muon:.1f}x "
        "our time",
    ]
    return "verdict: " + "; ".join(parts)


def summary_lines(est: StageEstimate, hw: Hardware) -> list[str]:
    """What a real run's log says at start-up (rank 0, its stage): the grids and the step."""
    lines = [f"[muon plan] {line.strip()}" for fig in est.grids for line in grid_lines(fig)]
    lines.append(
        f"[muon plan] per step on {hw.name}: Newton-Schulz ideal {est.ideal * 1e3:.2f} ms, "
        f"critical path {est.ns_critical_path * 1e3:.2f} ms ({est.ratio:.2f}x); Muon phases "
        f"~{est.muon_seconds * 1e3:.2f} ms; {(est.nvlink_bytes + est.ib_bytes) / 1e9:.3f} GB "
        f"beyond AdamW; transient {_gib(est.transient_bytes)} GiB"
    )
    return lines


def as_json(stages: list[StageEstimate], model: ModelCost | None, hw: Hardware,
            **extra: Any) -> dict[str, Any]:
    """The plan as plain data (bucket transfer pairs left out)."""

    def stage(est: StageEstimate) -> dict[str, Any]:
        grids = []
        for fig in est.grids:
            owned = [fig.owned(g) for g in range(fig.size)]
            grids.append({
                "kind": fig.kind, "members": fig.size, "tp": fig.tp_size, "dp": fig.dp_size,
                "muon_params": fig.params, "logical_matrices": fig.logical,
                "owned_params": [o[0] for o in owned], "owned_logical": [o[1] for o in owned],
                "ns_flops": [o[2] for o in owned], "buckets": len(fig.buckets),
                "owners_per_bucket": [sum(1 for f in b.ns_flops if f > 0) for b in fig.buckets],
                "ranks": list(fig.ranks), "owners": dict(zip(fig.names, fig.owners)),
                "bucket_names": fig.bucket_names,
            })
        data = {k: v for k, v in dataclasses.asdict(est).items()
                if k not in ("grids", "alternatives", "per_rank")}
        data["per_rank"] = {str(r): v for r, v in est.per_rank.items()}
        data["grids"] = grids
        data["ratio"] = est.ratio
        data["alternatives"] = [dataclasses.asdict(a) for a in est.alternatives]
        return data

    out: dict[str, Any] = {"hardware": dataclasses.asdict(hw), **extra,
                           "stages": [stage(s) for s in stages]}
    if model is not None:
        out["model"] = dataclasses.asdict(model)
        out["iteration_seconds"] = model.seconds(hw)
    return out
