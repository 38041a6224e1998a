"""`muon-megatron bench`: what our Muon costs next to megatron-core's AdamW, in one run.

One spawn of `world` gloo processes trains a small megatron-core GPT (and an MoE) under each
layout (DP4, TP2 x DP2, MoE EP2 x DP2 by default) with each optimizer, from the same initial
weights on the same batches (`tiny.global_batch`). Every optimizer gets `warmup` steps,
then `steps` measured ones. Forward and backward run every step and are not measured; around
`optimizer.step()` only, each rank records:

* wall time (after a barrier, so every rank starts together); a step's time is the slowest
  rank's, the reported figure the median over the measured steps;
* bytes sent and received by every `torch.distributed` collective (`comm_counter`); our extra
  bytes are Muon's minus AdamW's on the same rank;
* Newton-Schulz FLOPs, from the shapes actually passed to `newton_schulz` (cross-checked
  against the optimizer's own `owner_loads()` and `ns_calls`), and one copy of every logical
  matrix counted independently from the model spec (`expected_logical_shapes`);
* the buffers passed to the Muon all-to-alls, per bucket, for the transient memory;
* after the last step, the bytes of every tensor in the optimizer state and of the fp32 main
  params.

Muon variants: `muon` (bf16 Newton-Schulz, bf16 communication), `muon_fp32comm` (bf16 NS,
fp32 communication: `MuonConfig`'s defaults) and `muon_fp32` (fp32 NS and communication).
megatron-core's own Muon is run only where its dependency imports (`mcore_muon_status`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "BenchConfig",
    "LAYOUTS",
    "OPTIMIZERS",
    "expected_logical_shapes",
    "mcore_muon_status",
    "run_bench",
    "summarize",
    "main",
]

LAYOUTS: dict[str, dict[str, int]] = {
    "dp4": {},
    "tp2xdp2": {"tp": 2},
    "moe_ep2xdp2": {"ep": 2},
}
"""Layouts on a world of 4: dense data parallel, TP2 x DP2, and an MoE with EP2 (expert DP 2,
dense DP 4)."""

OPTIMIZERS: dict[str, dict[str, str] | None] = {
    "adamw": None,
    "muon": {"muon_ns_dtype": "bf16", "muon_comm_dtype": "bf16"},
    "muon_fp32comm": {"muon_ns_dtype": "bf16", "muon_comm_dtype": "fp32"},
    "muon_fp32": {"muon_ns_dtype": "fp32", "muon_comm_dtype": "fp32"},
}

# Warnings every CPU rank prints on every step that say nothing about the run.
_CPU_NOISE = (
    "ignore:Transformer Engine and Apex are not installed",
    "ignore:Apex is not installed",
    "ignore::FutureWarning",
    "ignore::DeprecationWarning",
    "ignore:The .grad attribute of a Tensor that is not a leaf Tensor",
)

# Issue 7's targets.
EXTRA_BYTES_PER_PARAM_X_DP = 4.0  # bf16 gather + scatter: extra bytes per rank <= 4 B * N / DP
NS_COPIES_TARGET = 1.00
NS_BALANCE_TARGET = 1.15


@dataclass
class BenchConfig:
    """Model, layouts, optimizers and step counts of one benchmark run."""

    world: int = 4
    layouts: tuple[str, ...] = tuple(LAYOUTS)
    optimizers: tuple[str, ...] = tuple(OPTIMIZERS)
    num_layers: int = 4
    hidden_size: int = 256
    num_attention_heads: int = 8
    num_query_groups: int = 4
    ffn_hidden_size: int = 1024
    num_experts: int = 8
    moe_ffn_hidden_size: int = 256
    moe_router_topk: int = 2
    seq_length: int = 64
    global_batch_size: int = 8
    bf16: bool = True
    """bf16 params with fp32 main params (Megatron's mixed precision); False: fp32 params."""
    warmup: int = 3
    steps: int = 20
    seed: int = 1234
    lr: float = 1e-3
    weight_decay: float = 0.1
    muon_bucket_mb: float = field(default=256.0)

    def model_spec(self, layout: str):
        from muon_megatron.testing.tiny import ModelSpec

        moe = layout.startswith("moe")
        return ModelSpec(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            ffn_hidden_size=self.ffn_hidden_size,
            seq_length=self.seq_length,
            num_experts=self.num_experts if moe else None,
            moe_ffn_hidden_size=self.moe_ffn_hidden_size,
            moe_router_topk=self.moe_router_topk,
            bf16=self.bf16,
        )


def expected_logical_shapes(cfg: BenchConfig, layout: str) -> list[tuple[int, int]]:
    """One copy of every logical Muon matrix of the model, from its spec alone (Q, K, V,
    proj; gate, up, down per MLP or per expert); the router, embeddings, norms stay AdamW."""
    h, heads, groups = cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups
    d = h // heads
    attention = [(heads * d, h), (groups * d, h), (groups * d, h), (h, heads * d)]
    if layout.startswith("moe"):
        f = cfg.moe_ffn_hidden_size
        mlp = [(f, h), (f, h), (h, f)] * cfg.num_experts
    else:
        f = cfg.ffn_hidden_size
        mlp = [(f, h), (f, h), (h, f)]
    return (attention + mlp) * cfg.num_layers


def mcore_muon_status() -> tuple[bool, str]:
    """Whether megatron-core's own Muon can run here, and if not, exactly why."""
    try:
        from megatron.core.optimizer import muon as mcore_muon
    except ImportError as exc:
        return False, f"megatron.core.optimizer.muon does not import ({exc!r})"
    if getattr(mcore_muon, "HAVE_EMERGING_OPTIMIZERS", False):
        return True, "megatron.core.optimizer.muon with emerging-optimizers"
    try:
        import emerging_optimizers  # noqa: F401
        from emerging_optimizers.orthogonalized_optimizers import OrthogonalizedOptimizer  # noqa
    except BaseException as exc:  # noqa: BLE001 (the placeholder release aborts on import)
        error = f"{type(exc).__name__}: {exc}".strip()
    else:
        error = "emerging_optimizers imported in this process but not in megatron-core's"
    py = platform.python_version()
    return False, (
        "megatron-core's Muon (megatron.core.optimizer.muon, TensorParallelMuon + "
        "LayerWiseDistributedOptimizer) needs the emerging-optimizers package, which does not "
        f"import here ({error}); its only release with the optimizers, 0.3.0, requires "
        f"Python >= 3.12 and this is Python {py}"
    )


# --------------------------------------------------------------------------------------------
# One rank
# --------------------------------------------------------------------------------------------


class _Probe:
    """Wraps `newton_schulz` and `all_to_all` as `muon_megatron.optimizer.distributed` calls them."""

    def __init__(self) -> None:
        self.ns_flops = 0.0
        self.ns_matrices = 0
        self.a2a: list[dict[str, int]] = []
        self.a2a_seconds = 0.0

    @contextlib.contextmanager
    def installed(self) -> Iterator[_Probe]:
        from muon_megatron.ops.newton_schulz import ns_flops
        from muon_megatron.optimizer import distributed

        ns, a2a = distributed.newton_schulz, distributed.all_to_all

        def newton_schulz(x, *args, **kwargs):
            steps = kwargs.get("steps", args[0] if args else 5)
            batch = x.numel() // (x.shape[-2] * x.shape[-1])
            self.ns_flops += batch * ns_flops(x.shape[-2], x.shape[-1], steps)
            self.ns_matrices += batch
            return ns(x, *args, **kwargs)

        def all_to_all(chunks_out, sizes_in, grid, dtype):
            import torch

            self.a2a.append({
                "send_numel": sum(c.numel() for c in chunks_out),
                "recv_numel": sum(sizes_in),
                "comm_bytes": torch.empty(0, dtype=dtype).element_size(),
                "grid_size": grid.size,
            })
            t0 = time.perf_counter()
            try:
                return a2a(chunks_out, sizes_in, grid, dtype)
            finally:
                self.a2a_seconds += time.perf_counter() - t0

        distributed.newton_schulz, distributed.all_to_all = newton_schulz, all_to_all
        try:
            yield self
        finally:
            distributed.newton_schulz, distributed.all_to_all = ns, a2a

    def reset(self) -> None:
        self.ns_flops, self.ns_matrices, self.a2a, self.a2a_seconds = 0.0, 0, [], 0.0


def _build_optimizer(name: str, cfg: BenchConfig, model: list) -> Any:
    from muon_megatron.config import MuonConfig
    from muon_megatron.testing import tiny

    config = tiny.optimizer_config(lr=cfg.lr, weight_decay=cfg.weight_decay, bf16=cfg.bf16)
    muon_config = None
    if OPTIMIZERS[name] is not None:
        muon_config = MuonConfig(muon_bucket_mb=cfg.muon_bucket_mb, **OPTIMIZERS[name])
    return tiny.build_optimizer(model, config, muon_config)


def _state_bytes(optimizer: Any, muon_shards: set[int], main_is_copy: bool) -> dict[str, Any]:
    """Bytes of the optimizer state (every tensor in `state`, plus the fp32 main params when
    they are copies rather than views of the model params), split Muon / AdamW shards."""
    import torch

    out = {"muon": [0, 0], "adamw": [0, 0]}  # [bytes, numel]
    by_key: dict[str, int] = {}
    for member in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = member.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                kind = "muon" if id(p) in muon_shards else "adamw"
                nbytes = p.numel() * p.element_size() if main_is_copy else 0
                by_key["main_param"] = by_key.get("main_param", 0) + nbytes
                for key, value in inner.state.get(p, {}).items():
                    if isinstance(value, torch.Tensor):
                        size = value.numel() * value.element_size()
                        nbytes += size
                        by_key[key] = by_key.get(key, 0) + size
                out[kind][0] += nbytes
                out[kind][1] += p.numel()
    return {"muon_bytes": out["muon"][0], "muon_numel": out["muon"][1],
            "adamw_bytes": out["adamw"][0], "adamw_numel": out["adamw"][1], "by_key": by_key}


def _muon_static(optimizer: Any) -> dict[str, Any]:
    """Per-rank facts of the Muon optimizers: params, grids, owner loads, buckets."""
    from muon_megatron.optimizer.builder import muon_optimizers

    members, shards, buckets = [], set(), []
    for opt in muon_optimizers(optimizer):
        local = sum(m.param.numel() for m in opt._matrices)
        members.append({
            "grid_size": opt.grid.size, "grid_rank": opt.grid.rank, "dp": opt.grid.dp_size,
            "tp": opt.grid.tp_size, "local_muon_params": local,
            "owner_load": opt.owner_loads()[opt.grid.rank] if opt._matrices else 0.0,
            "logical_matrices_in_grid": opt.logical_matrix_count,
        })
        for m in opt._matrices:
            shard = opt._main_shard(m)
            if shard is not None:
                shards.add(id(shard))
        for bucket in opt._buckets:
            owned = [m for m in bucket if m.owner == opt.grid.rank]
            buckets.append(sum(m.param.numel() * m.split.tp_size for m in owned))
    return {"members": members, "shards": shards, "owned_full_numel_per_bucket": buckets}


def _transient(a2a: list[dict[str, int]], owned_full: list[int]) -> dict[str, Any]:
    """Peak bytes of the gather/scatter buffers over buckets (calls come gather, scatter per
    bucket, in bucket order). Gather: the fp32 concatenated shards, their send copy in the
    wire dtype, the receive buffer and the reassembled fp32 matrices the rank owns. Scatter:
    those matrices and their fp32 updates, the fp32 concatenated slices, send and receive
    buffers. Newton-Schulz's own intermediates (a few copies of the largest batch of equal
    shapes, in the NS dtype) are not included."""
    if len(a2a) != 2 * len(owned_full):
        raise RuntimeError(f"{len(a2a)} all-to-alls for {len(owned_full)} buckets")
    per_bucket = []
    for b, full in enumerate(owned_full):
        g, s = a2a[2 * b], a2a[2 * b + 1]
        c = g["comm_bytes"]
        gather = g["send_numel"] * (4 + c) + g["recv_numel"] * c + 4 * full
        scatter = 8 * full + s["send_numel"] * (4 + c) + s["recv_numel"] * c
        per_bucket.append({"gather": gather, "scatter": scatter, "owned_full_numel": full,
                           "gather_recv_numel": g["recv_numel"],
                           "scatter_send_numel": s["send_numel"]})
    peak = max((max(b["gather"], b["scatter"]) for b in per_bucket), default=0)
    return {"peak_bytes": peak, "buckets": per_bucket}


def _bench_one(cfg: BenchConfig, layout_name: str, opt_name: str) -> dict[str, Any]:
    import torch

    from muon_megatron.optimizer.builder import muon_optimizers
    from muon_megatron.testing import tiny
    from muon_megatron.tools.comm_counter import CollectiveCounter

    spec = cfg.model_spec(layout_name)
    layout = tiny.Layout(**LAYOUTS[layout_name])
    tiny.initialize_parallel(layout, cfg.seed)
    model = tiny.build_model(spec, layout)
    optimizer = _build_optimizer(opt_name, cfg, model)
    static = _muon_static(optimizer)
    dp = layout.dp(cfg.world)
    mbs = cfg.global_batch_size // dp
    counter, probe = CollectiveCounter(), _Probe()
    times, sent, received, flops, matrices, calls, losses = [], [], [], [], [], [], []
    ns_seconds, a2a_seconds = [], []
    by_op: dict[str, Any] = {}
    transient: dict[str, Any] = {"peak_bytes": 0, "buckets": []}
    with counter.installed(), probe.installed():
        for step in range(cfg.warmup + cfg.steps):
            batch = tiny.global_batch(step, spec, cfg.global_batch_size, cfg.seed)
            optimizer.zero_grad()
            losses.append(tiny.forward_backward(model, batch, spec, mbs))
            ns_before = sum(o.ns_calls for o in muon_optimizers(optimizer))
            probe.reset()
            torch.distributed.barrier()
            counter.start()
            t0 = time.perf_counter()
            optimizer.step()
            dt = time.perf_counter() - t0
            records = counter.stop()
            if step < cfg.warmup:
                continue
            totals = counter.totals(records)
            times.append(dt)
            sent.append(totals["sent"])
            received.append(totals["received"])
            by_op = totals["by_op"]
            flops.append(probe.ns_flops)
            matrices.append(probe.ns_matrices)
            calls.append(sum(o.ns_calls for o in muon_optimizers(optimizer)) - ns_before)
            ns_seconds.append(sum(o.muon_metrics.get("muon/ns_seconds_local", 0.0)
                                  for o in muon_optimizers(optimizer)))
            a2a_seconds.append(probe.a2a_seconds)
            if static["owned_full_numel_per_bucket"]:
                transient = _transient(probe.a2a, static["owned_full_numel_per_bucket"])
    state = _state_bytes(optimizer, static.pop("shards"), main_is_copy=cfg.bf16)
    return {
        "times": times, "sent": sent, "received": received, "by_op": by_op,
        "ns_flops": flops, "ns_matrices": matrices, "ns_calls": calls, "losses": losses,
        "ns_seconds": ns_seconds, "a2a_seconds": a2a_seconds,
        "state": state, "muon": static, "transient": transient,
        "local_params": sum(p.numel() for chunk in model for p in chunk.parameters()),
    }


def _rank_main(rank: int, world: int, cfg: BenchConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for layout_name in cfg.layouts:
        for opt_name in cfg.optimizers:
            t0 = time.perf_counter()
            out[f"{layout_name}/{opt_name}"] = _bench_one(cfg, layout_name, opt_name)
            if rank == 0:
                print(f"> bench: {layout_name} {opt_name} done in {time.perf_counter() - t0:.0f} s",
                      flush=True)
    return out


# --------------------------------------------------------------------------------------------
# Aggregation over ranks
# --------------------------------------------------------------------------------------------


def _median_of_max(per_rank_times: list[list[float]]) -> float:
    return statistics.median(max(step) for step in zip(*per_rank_times))


def _row(cfg: BenchConfig, layout: str, name: str, ranks: list[dict], adam: list[dict] | None,
         ) -> dict[str, Any]:
    from muon_megatron.ops.newton_schulz import ns_flops

    row: dict[str, Any] = {"layout": layout, "optimizer": name}
    row["step_ms"] = 1e3 * _median_of_max([r["times"] for r in ranks])
    row["step_ms_rank_median"] = [1e3 * statistics.median(r["times"]) for r in ranks]
    if OPTIMIZERS.get(name) is not None:
        row["ns_ms"] = 1e3 * _median_of_max([r["ns_seconds"] for r in ranks])
        row["a2a_ms"] = 1e3 * _median_of_max([r["a2a_seconds"] for r in ranks])
    row["sent_per_step"] = [statistics.median(r["sent"]) for r in ranks]
    row["received_per_step"] = [statistics.median(r["received"]) for r in ranks]
    row["bytes_constant_over_steps"] = all(
        len(set(r["sent"])) == 1 and len(set(r["received"])) == 1 for r in ranks)
    row["by_op"] = [r["by_op"] for r in ranks]
    states = [r["state"] for r in ranks]
    total_bytes = sum(s["muon_bytes"] + s["adamw_bytes"] for s in states)
    total_numel = sum(s["muon_numel"] + s["adamw_numel"] for s in states)
    row["state_bytes_per_param"] = total_bytes / total_numel
    muon_numel = sum(s["muon_numel"] for s in states)
    row["state_bytes_per_muon_param"] = (
        sum(s["muon_bytes"] for s in states) / muon_numel if muon_numel else None)
    adamw_numel = sum(s["adamw_numel"] for s in states)
    row["state_bytes_per_adamw_param"] = sum(s["adamw_bytes"] for s in states) / adamw_numel
    row["state_bytes_per_rank"] = [s["muon_bytes"] + s["adamw_bytes"] for s in states]
    row["state_by_key_rank0"] = states[0]["by_key"]
    row["losses_rank0"] = ranks[0]["losses"]
    if OPTIMIZERS.get(name) is None:
        return row
    # Newton-Schulz: measured from the shapes, against the plan and one copy of the model.
    per_rank_flops = [statistics.median(r["ns_flops"]) for r in ranks]
    planned = [sum(m["owner_load"] for m in r["muon"]["members"]) for r in ranks]
    one_copy = sum(ns_flops(a, b, 5) for a, b in expected_logical_shapes(cfg, layout))
    mean = statistics.fmean(per_rank_flops)
    row["ns_flops_per_rank"] = per_rank_flops
    row["ns_flops_planned_per_rank"] = planned
    row["ns_flops_measured_equals_planned"] = all(
        abs(a - b) <= 1e-9 * max(b, 1.0) for a, b in zip(per_rank_flops, planned))
    row["ns_max_over_mean"] = max(per_rank_flops) / mean if mean else None
    row["ns_copies"] = sum(per_rank_flops) / one_copy
    expected_count = len(expected_logical_shapes(cfg, layout))
    row["ns_matrices_per_step"] = sum(statistics.median(r["ns_matrices"]) for r in ranks)
    row["ns_calls_per_step"] = sum(statistics.median(r["ns_calls"]) for r in ranks)
    row["ns_expected_matrices"] = expected_count
    row["ns_count_check"] = row["ns_matrices_per_step"] == row["ns_calls_per_step"] == expected_count
    # Extra bytes against AdamW on the same rank, per Muon param held by the rank.
    extra_sent = [m - a for m, a in zip(row["sent_per_step"], [
        statistics.median(r["sent"]) for r in adam])] if adam else None
    extra_recv = [m - a for m, a in zip(row["received_per_step"], [
        statistics.median(r["received"]) for r in adam])] if adam else None
    local_muon = [sum(m["local_muon_params"] for m in r["muon"]["members"]) for r in ranks]
    # The target, per rank: 4 B x (Muon params of the rank) / DP of each of its grids.
    bound = [sum(EXTRA_BYTES_PER_PARAM_X_DP * m["local_muon_params"] / m["dp"]
                 for m in r["muon"]["members"]) for r in ranks]
    row["local_muon_params"] = local_muon
    row["dp_of_grids"] = sorted({m["dp"] for r in ranks for m in r["muon"]["members"]})
    if extra_sent is not None:
        row["extra_sent"], row["extra_received"] = extra_sent, extra_recv
        worst = [max(s, r) for s, r in zip(extra_sent, extra_recv)]
        row["extra_bytes_per_muon_param"] = [w / n for w, n in zip(worst, local_muon)]
        row["extra_over_target"] = max(w / b for w, b in zip(worst, bound))
        row["extra_over_target_mean"] = statistics.fmean(worst) / statistics.fmean(bound)
        row["target_bytes_per_muon_param"] = [b / n for b, n in zip(bound, local_muon)]
    row["transient_peak_bytes"] = [r["transient"]["peak_bytes"] for r in ranks]
    row["transient_buckets_rank0"] = ranks[0]["transient"]["buckets"]
    row["muon_shard_numel"] = [s["muon_numel"] for s in states]
    return row


def summarize(cfg: BenchConfig, per_rank: list[dict[str, Any]], mcore: tuple[bool, str],
              ) -> dict[str, Any]:
    """Rows per (layout, optimizer) and the target checks."""
    rows = []
    for layout in cfg.layouts:
        adam = [r[f"{layout}/adamw"] for r in per_rank] if "adamw" in cfg.optimizers else None
        for name in cfg.optimizers:
            row = _row(cfg, layout, name, [r[f"{layout}/{name}"] for r in per_rank], adam)
            if adam is not None:
                row["step_time_ratio_vs_adamw"] = row["step_ms"] / (
                    1e3 * _median_of_max([r["times"] for r in adam]))
            rows.append(row)
    checks: dict[str, Any] = {}
    bf16 = [r for r in rows if r["optimizer"] == "muon" and "extra_over_target" in r]
    if bf16:
        worst = max(bf16, key=lambda r: r["extra_over_target"])
        mean = max(bf16, key=lambda r: r["extra_over_target_mean"])
        checks["bytes"] = {"ok": worst["extra_over_target"] <= 1.0,
                           "worst_rank_fraction_of_target": worst["extra_over_target"],
                           "worst_layout": worst["layout"],
                           "ok_mean": mean["extra_over_target_mean"] <= 1.0,
                           "mean_fraction_of_target": mean["extra_over_target_mean"],
                           "mean_layout": mean["layout"]}
    muon_rows = [r for r in rows if OPTIMIZERS.get(r["optimizer"]) is not None]
    if muon_rows:
        copies = [r["ns_copies"] for r in muon_rows]
        balance = [r["ns_max_over_mean"] for r in muon_rows]
        checks["ns_copies"] = {"ok": all(abs(c - NS_COPIES_TARGET) < 5e-3 for c in copies)
                               and all(r["ns_count_check"] for r in muon_rows),
                               "values": sorted(set(round(c, 4) for c in copies))}
        checks["ns_balance"] = {"ok": max(balance) <= NS_BALANCE_TARGET, "max": max(balance)}
    checks["vs_mcore_muon"] = {"ok": None, "why": mcore[1]} if not mcore[0] else {
        "ok": None, "why": "megatron-core Muon importable but not wired into this benchmark"}
    return {"rows": rows, "checks": checks}


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _cell(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


TABLE_COLUMNS = (
    ("layout", 12), ("optimizer", 14), ("step ms", 8), ("/AdamW", 7), ("NS ms", 6),
    ("a2a ms", 6), ("sent/rank", 10),
    ("recv/rank", 10), ("extra B/Mp", 10), ("target", 7), ("NS max/mean", 11),
    ("NS copies", 9), ("state B/p", 9), ("B/Muon p", 8), ("transient", 10),
)
"""Columns: step time (median over steps of the slowest rank), its ratio to AdamW's, of it
the time in Newton-Schulz and in the Muon all-to-alls (slowest rank, median); bytes
sent / received per step by the most-loaded rank; extra bytes over AdamW per Muon param of
the rank (worst rank) and the target 4/DP; Newton-Schulz FLOPs max/mean over ranks and total
in copies of the model's matrices; optimizer state bytes per param (all params, Muon
params); peak transient bytes of the gather/scatter buffers (worst rank)."""


def format_table(result: dict[str, Any]) -> str:
    """The one table `muon-megatron bench` prints."""
    head = " ".join(f"{name:>{width}s}" if i > 1 else f"{name:{width}s}"
                    for i, (name, width) in enumerate(TABLE_COLUMNS))
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        extra, target = r.get("extra_bytes_per_muon_param"), r.get("target_bytes_per_muon_param")
        transient = r.get("transient_peak_bytes")
        cells = [
            r["layout"], r["optimizer"], _cell(r["step_ms"], ".1f"),
            _cell(r.get("step_time_ratio_vs_adamw"), ".2f"), _cell(r.get("ns_ms"), ".1f"),
            _cell(r.get("a2a_ms"), ".1f"),
            _fmt_bytes(max(r["sent_per_step"])), _fmt_bytes(max(r["received_per_step"])),
            _cell(None if extra is None else max(extra), ".3f"),
            _cell(None if target is None else max(target), ".3f"),
            _cell(r.get("ns_max_over_mean"), ".3f"), _cell(r.get("ns_copies"), ".3f"),
            _cell(r["state_bytes_per_param"], ".2f"),
            _cell(r["state_bytes_per_muon_param"], ".2f"),
            "-" if transient is None else _fmt_bytes(max(transient)),
        ]
        lines.append(" ".join(f"{c:>{w}s}" if i > 1 else f"{c:{w}s}"
                              for i, (c, (_, w)) in enumerate(zip(cells, TABLE_COLUMNS))))
    return "\n".join(lines)


def summary_line(result: dict[str, Any]) -> str:
    c = result["checks"]

    def mark(check: dict[str, Any] | None) -> str:
        return "n/a" if check is None or check["ok"] is None else ("PASS" if check["ok"] else "MISS")

    parts = []
    if "bytes" in c:
        b = c["bytes"]
        parts.append(f"extra bytes (bf16 comm) <= 4 B/param/DP: mean over ranks "
                     f"{mark({'ok': b['ok_mean']})} ({b['mean_fraction_of_target']:.3f} of "
                     f"target, {b['mean_layout']}), worst rank {mark(b)} "
                     f"({b['worst_rank_fraction_of_target']:.3f}, {b['worst_layout']})")
    if "ns_copies" in c:
        parts.append(f"NS copies == 1.00: {mark(c['ns_copies'])} ({c['ns_copies']['values']})")
        parts.append(f"NS max/mean <= 1.15: {mark(c['ns_balance'])} "
                     f"({c['ns_balance']['max']:.3f})")
    parts.append(f"step-time ratio vs megatron-core Muon: {mark(c['vs_mcore_muon'])} "
                 "(not run, see above)")
    return "bench: " + " | ".join(parts)


def run_bench(cfg: BenchConfig, timeout_s: float = 1800) -> dict[str, Any]:
    """Run the benchmark; returns the summary (rows, checks) plus run information."""
    from muon_megatron.runtime.launch import spawn

    unknown = [x for x in cfg.layouts if x not in LAYOUTS]
    unknown += [x for x in cfg.optimizers if x not in OPTIMIZERS]
    if unknown:
        raise ValueError(f"unknown layouts/optimizers {unknown}; choose from {list(LAYOUTS)} "
                         f"and {list(OPTIMIZERS)}")
    if cfg.steps < 1 or cfg.warmup < 0:
        raise ValueError(f"steps={cfg.steps} must be >= 1 and warmup={cfg.warmup} >= 0")
    mcore = mcore_muon_status()
    t0 = time.perf_counter()
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_DEVICE_MAX_CONNECTIONS": "1",
           "PYTHONWARNINGS": ",".join(_CPU_NOISE)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update({k: os.environ.get(k) or v for k, v in env.items()})
    try:
        per_rank = spawn(_rank_main, cfg.world, cfg, timeout_s=timeout_s)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
    result = summarize(cfg, per_rank, mcore)
    result["config"] = asdict(cfg)
    result["mcore_muon"] = {"available": mcore[0], "why": mcore[1]}
    result["wall_seconds"] = time.perf_counter() - t0
    result["machine"] = {"python": platform.python_version(), "cpus": os.cpu_count(),
                         "platform": platform.platform(), "backend": "gloo"}
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="muon-megatron bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    p.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    p.add_argument("--steps", type=int, default=BenchConfig.steps)
    p.add_argument("--warmup", type=int, default=BenchConfig.warmup)
    p.add_argument("--hidden-size", type=int, default=BenchConfig.hidden_size)
    p.add_argument("--ffn-hidden-size", type=int, default=BenchConfig.ffn_hidden_size)
    p.add_argument("--num-layers", type=int, default=BenchConfig.num_layers)
    p.add_argument("--num-experts", type=int, default=BenchConfig.num_experts)
    p.add_argument("--moe-ffn-hidden-size", type=int, default=BenchConfig.moe_ffn_hidden_size)
    p.add_argument("--fp32-params", action="store_true",
                   help="fp32 model params (default: bf16 params with fp32 main params).")
    p.add_argument("--out", default=os.path.join("outputs", "bench.json"))
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    cfg = BenchConfig(
        layouts=tuple(args.layouts), optimizers=tuple(args.optimizers), steps=args.steps,
        warmup=args.warmup, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
        num_layers=args.num_layers, num_experts=args.num_experts,
        moe_ffn_hidden_size=args.moe_ffn_hidden_size, bf16=not args.fp32_params,
    )
    result = run_bench(cfg)
    print(f"> megatron-core Muon: {'runs' if result['mcore_muon']['available'] else 'left out'}:"
          f" {result['mcore_muon']['why']}")
    print(format_table(result))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)
    print(f"> json: {args.out} ({result['wall_seconds']:.0f} s)")
    print(summary_line(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
