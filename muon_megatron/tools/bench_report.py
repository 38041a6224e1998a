"""Aggregation of `muon-megatron bench`'s ranks into rows and target checks, and its table.

A step's time is the slowest rank's, the reported figure the median over the measured steps;
our extra bytes are Muon's minus AdamW's on the same rank; Newton-Schulz FLOPs are checked
against the optimizer's own plan (`owner_loads()`) and against one copy of every logical
matrix counted from the model spec alone (`expected_logical_shapes`).
"""

from __future__ import annotations

import statistics
from typing import Any

from muon_megatron.tools.bench_config import (
    EXTRA_BYTES_PER_PARAM_X_DP,
    MCORE_MUON,
    NS_BALANCE_TARGET,
    NS_COPIES_TARGET,
    OPTIMIZERS,
    PREPARE_GRADS_TARGET,
    TRANSIENT_BUCKETS_TARGET,
    VS_MCORE_TARGETS,
    BenchConfig,
    expected_logical_shapes,
)

__all__ = ["TABLE_COLUMNS", "format_table", "summarize", "summary_line"]


def _median_of_max(per_rank_times: list[list[float]]) -> float:
    return statistics.median(max(step) for step in zip(*per_rank_times))


def _row(cfg: BenchConfig, layout: str, name: str, ranks: list[dict], adam: list[dict] | None,
         ) -> dict[str, Any]:
    from muon_megatron.ops.newton_schulz import ns_flops

    row: dict[str, Any] = {"layout": layout, "optimizer": name}
    row["step_ms"] = 1e3 * _median_of_max([r["times"] for r in ranks])
    row["step_ms_rank_median"] = [1e3 * statistics.median(r["times"]) for r in ranks]
    row["prepare_ms"] = 1e3 * _median_of_max([r["prepare_seconds"] for r in ranks])
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
    # What the per-param figures divide: main-param shards and their elements, over ranks.
    for kind in ("muon", "adamw"):
        row[f"state_{kind}_shards"] = sum(s[f"{kind}_shards"] for s in states)
        row[f"state_{kind}_numel"] = sum(s[f"{kind}_numel"] for s in states)
    row["state_by_key_rank0"] = states[0]["by_key"]
    row["losses_rank0"] = ranks[0]["losses"]
    if OPTIMIZERS.get(name) is None:
        return row
    # Newton-Schulz: measured from the shapes, against the plan and one copy of the model.
    per_rank_flops = [statistics.median(r["ns_flops"]) for r in ranks]
    planned = [sum(m["owner_load"] for m in r["muon"]["members"]) for r in ranks]
    split_fc1 = OPTIMIZERS[name].get("muon_split_fc1", True)
    shapes = expected_logical_shapes(cfg, layout, split_fc1)
    one_copy = sum(ns_flops(a, b, 5) for a, b in shapes)
    mean = statistics.fmean(per_rank_flops)
    row["ns_flops_per_rank"] = per_rank_flops
    row["ns_flops_planned_per_rank"] = planned
    row["ns_flops_measured_equals_planned"] = all(
        abs(a - b) <= 1e-9 * max(b, 1.0) for a, b in zip(per_rank_flops, planned))
    row["ns_max_over_mean"] = max(per_rank_flops) / mean if mean else None
    row["ns_copies"] = sum(per_rank_flops) / one_copy
    expected_count = len(shapes)
    row["ns_matrices_per_step"] = sum(statistics.median(r["ns_matrices"]) for r in ranks)
    row["ns_expected_matrices"] = expected_count
    row["ns_count_check"] = row["ns_matrices_per_step"] == expected_count
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
    bucket = max(r["transient"]["bucket_bytes"] for r in ranks)
    row["bucket_bytes"] = bucket
    row["transient_over_bucket"] = max(row["transient_peak_bytes"]) / bucket if bucket else None
    row["muon_shard_numel"] = [s["muon_numel"] for s in states]
    return row


def summarize(cfg: BenchConfig, ranks_of: dict[str, list[dict[str, Any]]],
              mcore: tuple[bool, str]) -> dict[str, Any]:
    """Rows per (layout, optimizer) and the target checks; `ranks_of['layout/optimizer']`
    holds every rank's record of that run."""
    rows = []
    for layout in cfg.layouts:
        adam = ranks_of.get(f"{layout}/adamw")
        theirs = ranks_of.get(f"{layout}/{MCORE_MUON}")
        for name in cfg.optimizers:
            if f"{layout}/{name}" not in ranks_of:
                continue  # megatron-core's Muon on an MoE layout: not run
            row = _row(cfg, layout, name, ranks_of[f"{layout}/{name}"], adam)
            if adam is not None:
                row["step_time_ratio_vs_adamw"] = row["step_ms"] / (
                    1e3 * _median_of_max([r["times"] for r in adam]))
                row["prepare_ratio_vs_adamw"] = row["prepare_ms"] / (
                    1e3 * _median_of_max([r["prepare_seconds"] for r in adam]))
            if theirs is not None and name != MCORE_MUON:
                row["step_time_ratio_vs_mcore_muon"] = row["step_ms"] / (
                    1e3 * _median_of_max([r["times"] for r in theirs]))
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
                               "values": sorted({round(c, 4) for c in copies})}
        checks["ns_balance"] = {"ok": max(balance) <= NS_BALANCE_TARGET, "max": max(balance)}
        prepare = [r["prepare_ratio_vs_adamw"] for r in muon_rows if "prepare_ratio_vs_adamw" in r]
        if prepare:
            checks["prepare_grads"] = {"ok": max(prepare) <= PREPARE_GRADS_TARGET,
                                       "max": max(prepare)}
        transient = [r["transient_over_bucket"] for r in muon_rows if r["transient_over_bucket"]]
        if transient:
            checks["transient"] = {"ok": max(transient) <= TRANSIENT_BUCKETS_TARGET,
                                   "max": max(transient)}
    matched = {r["layout"]: r["step_time_ratio_vs_mcore_muon"] for r in rows
               if r["optimizer"] == "muon_match" and "step_time_ratio_vs_mcore_muon" in r}
    if not mcore[0]:
        checks["vs_mcore_muon"] = {"ok": None, "why": mcore[1]}
    else:
        judged = {k: v for k, v in matched.items() if k in VS_MCORE_TARGETS}
        checks["vs_mcore_muon"] = {
            "ok": all(v <= VS_MCORE_TARGETS[k] for k, v in judged.items()) if judged else None,
            "ratios": matched, "targets": VS_MCORE_TARGETS,
            "why": "ours (muon_match) / megatron-core's Muon, step time, same launch"}
    return {"rows": rows, "checks": checks}


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _cell(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


TABLE_COLUMNS = (
    ("layout", 12), ("optimizer", 14), ("step ms", 8), ("/AdamW", 7), ("/mcore", 7),
    ("prep ms", 7), ("/AdamW", 7), ("NS ms", 6), ("a2a ms", 6), ("sent/rank", 10),
    ("recv/rank", 10), ("extra B/Mp", 10), ("target", 7), ("NS max/mean", 11),
    ("NS copies", 9), ("state B/p", 9), ("B/Muon p", 8), ("transient", 10), ("/bucket", 8),
)
"""Columns: step time (median over steps of the slowest rank), its ratio to AdamW's and to
megatron-core's Muon (same layout, same launch); the time in `prepare_grads` and its ratio to
AdamW's; the time in Newton-Schulz and in issuing the Muon all-to-alls (slowest rank,
median); bytes
sent / received per step by the most-loaded rank; extra bytes over AdamW per Muon param of
the rank (worst rank) and the target 4/DP; Newton-Schulz FLOPs max/mean over ranks and total
in copies of the model's matrices; optimizer state bytes per param (all params, Muon
params); peak transient bytes the pipelined step held (worst rank) and that over the
largest bucket's fp32 bytes."""


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
            _cell(r.get("step_time_ratio_vs_adamw"), ".2f"),
            _cell(r.get("step_time_ratio_vs_mcore_muon"), ".2f"),
            _cell(r.get("prepare_ms"), ".2f"), _cell(r.get("prepare_ratio_vs_adamw"), ".2f"),
            _cell(r.get("ns_ms"), ".1f"),
            _cell(r.get("a2a_ms"), ".1f"),
            _fmt_bytes(max(r["sent_per_step"])), _fmt_bytes(max(r["received_per_step"])),
            _cell(None if extra is None else max(extra), ".3f"),
            _cell(None if target is None else max(target), ".3f"),
            _cell(r.get("ns_max_over_mean"), ".3f"), _cell(r.get("ns_copies"), ".3f"),
            _cell(r["state_bytes_per_param"], ".2f"),
            _cell(r["state_bytes_per_muon_param"], ".2f"),
            "-" if transient is None else _fmt_bytes(max(transient)),
            _cell(r.get("transient_over_bucket"), ".2f"),
        ]
        lines.append(" ".join(f"{c:>{w}s}" if i > 1 else f"{c:{w}s}"
                              for i, (c, (_, w)) in enumerate(zip(cells, TABLE_COLUMNS))))
    return "\n".join(lines)


def summary_line(result: dict[str, Any]) -> str:
    c = result["checks"]

    def mark(check: dict[str, Any] | None) -> str:
        if check is None or check["ok"] is None:
            return "n/a"
        return "PASS" if check["ok"] else "MISS"

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
    if "prepare_grads" in c:
        parts.append(f"prepare_grads <= {PREPARE_GRADS_TARGET:g}x AdamW: "
                     f"{mark(c['prepare_grads'])} ({c['prepare_grads']['max']:.2f})")
    if "transient" in c:
        parts.append(f"transient <= {TRANSIENT_BUCKETS_TARGET:g} buckets: "
                     f"{mark(c['transient'])} ({c['transient']['max']:.2f})")
    v = c["vs_mcore_muon"]
    ratios = ", ".join(f"{k} {x:.2f} (<= {VS_MCORE_TARGETS.get(k, float('nan')):g})"
                       for k, x in v.get("ratios", {}).items())
    parts.append(f"ours / megatron-core Muon: {mark(v)} ({ratios or 'not run, see above'})")
    return "bench: " + " | ".join(parts)
