"""What each rank of `muon-megatron bench` measures around `optimizer.step()`.

One rank builds the model of each layout and each optimizer from the same initial weights,
trains `warmup` unmeasured steps and `steps` measured ones on the same batches
(`tiny.global_batch`), and records per measured step: the wall time after a barrier, the
bytes of every collective (`comm_counter`), the Newton-Schulz FLOPs from the shapes actually
passed to `newton_schulz`, the Muon all-to-all buffers, and after the last step the bytes
of the optimizer state. `bench_report` aggregates the ranks.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from muon_megatron.tools.bench_config import LAYOUTS, OPTIMIZERS, BenchConfig

__all__ = ["rank_main"]


class _Probe:
    """Wraps `newton_schulz` and `all_to_all` where `optimizer.distributed` calls them."""

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
    they are copies rather than views of the model params), split Muon / AdamW shards, with
    the number of shards of each kind (torch's Adam keeps a `step` tensor per shard)."""
    import torch

    out = {kind: {"bytes": 0, "numel": 0, "shards": 0} for kind in ("muon", "adamw")}
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
                out[kind]["bytes"] += nbytes
                out[kind]["numel"] += p.numel()
                out[kind]["shards"] += 1
    flat = {f"{kind}_{what}": n for kind, tally in out.items() for what, n in tally.items()}
    return {**flat, "by_key": by_key}


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
    from muon_megatron.training.model import local_parameter_count

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
        "local_params": local_parameter_count(model),
    }


def rank_main(rank: int, world: int, cfg: BenchConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for layout_name in cfg.layouts:
        for opt_name in cfg.optimizers:
            t0 = time.perf_counter()
            out[f"{layout_name}/{opt_name}"] = _bench_one(cfg, layout_name, opt_name)
            if rank == 0:
                print(f"> bench: {layout_name} {opt_name} done in {time.perf_counter() - t0:.0f} s",
                      flush=True)
    return out
