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

from muon_megatron.tools.bench_config import LAYOUTS, MCORE_MUON, OPTIMIZERS, BenchConfig

__all__ = ["rank_main"]


class _Probe:
    """Wraps `newton_schulz`, `start_exchange` and `run_pipeline` where
    `optimizer.distributed` calls them, and the optimizer's `prepare_grads`."""

    def __init__(self) -> None:
        self.reset()

    @contextlib.contextmanager
    def installed(self, optimizer: Any) -> Iterator[_Probe]:
        from muon_megatron.ops.newton_schulz import ns_flops
        from muon_megatron.optimizer import distributed

        ns, a2a = distributed.newton_schulz, distributed.start_exchange
        pipeline = distributed.run_pipeline
        prepare = optimizer.prepare_grads

        def newton_schulz(x, *args, **kwargs):
            steps = kwargs.get("steps", args[0] if args else 5)
            batch = x.numel() // (x.shape[-2] * x.shape[-1])
            self.ns_flops += batch * ns_flops(x.shape[-2], x.shape[-1], steps)
            self.ns_matrices += batch
            return ns(x, *args, **kwargs)

        def start_exchange(pieces, exchange, grid, dtype, device, keep=None):
            import torch

            self.a2a.append({
                "send_numel": sum(exchange.send_blocks),
                "recv_numel": sum(exchange.recv_blocks),
                "comm_bytes": torch.empty(0, dtype=dtype).element_size(),
                "grid_size": grid.size,
            })
            t0 = time.perf_counter()
            try:
                return a2a(pieces, exchange, grid, dtype, device, keep)
            finally:
                self.a2a_seconds += time.perf_counter() - t0

        def run_pipeline(members, trace=None):
            peak = pipeline(members, trace)
            self.transient_peak = max(self.transient_peak, peak)
            return peak

        def prepare_grads():
            t0 = time.perf_counter()
            try:
                return prepare()
            finally:
                self.prepare_seconds += time.perf_counter() - t0

        distributed.newton_schulz, distributed.start_exchange = newton_schulz, start_exchange
        distributed.run_pipeline = run_pipeline
        optimizer.prepare_grads = prepare_grads
        try:
            yield self
        finally:
            distributed.newton_schulz, distributed.start_exchange = ns, a2a
            distributed.run_pipeline = pipeline
            optimizer.prepare_grads = prepare

    def reset(self) -> None:
        self.ns_flops, self.ns_matrices, self.a2a = 0.0, 0, []
        self.a2a_seconds = self.prepare_seconds = 0.0
        self.transient_peak = 0


def _build(name: str, cfg: BenchConfig, spec: Any, layout: Any) -> tuple[list, Any]:
    """Model and optimizer `name` for this layout (process groups already built), from the
    same initial weights as every other optimizer of the benchmark."""
    import torch
    from megatron.core import tensor_parallel

    from muon_megatron.config import MuonConfig
    from muon_megatron.testing import tiny
    from muon_megatron.tools import mcore_muon
    from muon_megatron.training import step

    torch.manual_seed(cfg.seed)
    tensor_parallel.model_parallel_cuda_manual_seed(cfg.seed)
    config = tiny.optimizer_config(lr=cfg.lr, weight_decay=cfg.weight_decay, bf16=cfg.bf16)
    if name == MCORE_MUON:
        # megatron-core's Muon needs the plain DDP (no distributed optimizer).
        model = tiny.build_model(spec, layout, ddp_overrides={"use_distributed_optimizer": False})
        optimizer = mcore_muon.build(config, model)
        step.param_scheduler(optimizer, max_lr=cfg.lr, min_lr=cfg.lr, weight_decay=cfg.weight_decay)
        return model, optimizer
    model = tiny.build_model(spec, layout)
    muon_config = None
    if OPTIMIZERS[name] is not None:
        muon_config = MuonConfig(muon_owner_bucket_mb=cfg.muon_owner_bucket_mb, **OPTIMIZERS[name])
    return model, tiny.build_optimizer(model, config, muon_config)


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
        buckets.extend(4 * bucket.numel for bucket in opt._buckets)
    return {"members": members, "shards": shards, "bucket_bytes": buckets}


class _Runner:
    """One optimizer of one layout and what its measured steps recorded."""

    def __init__(self, name: str, model: list, optimizer: Any) -> None:
        self.name, self.model, self.optimizer = name, model, optimizer
        self.static = _muon_static(optimizer)
        self.probe = _Probe()
        self.rec: dict[str, list] = {k: [] for k in (
            "times", "sent", "received", "ns_flops", "ns_matrices", "losses",
            "ns_seconds", "a2a_seconds", "prepare_seconds")}
        self.by_op: dict[str, Any] = {}
        self.transient: dict[str, Any] = {"peak_bytes": 0, "bucket_bytes": 0, "buckets": 0}

    def step(self, cfg: BenchConfig, spec: Any, mbs: int, step: int, counter: Any,
             measured: bool) -> None:
        import torch

        from muon_megatron.optimizer.builder import muon_optimizers
        from muon_megatron.testing import tiny
        from muon_megatron.tools import mcore_muon

        optimizer, probe = self.optimizer, self.probe
        batch = tiny.global_batch(step, spec, cfg.global_batch_size, cfg.seed)
        optimizer.zero_grad()
        loss = tiny.forward_backward(self.model, batch, spec, mbs)
        members = muon_optimizers(optimizer)
        padded = mcore_muon.padded_all_gather() if self.name == MCORE_MUON else _nothing()
        with probe.installed(optimizer), padded:
            probe.reset()
            _device_sync()
            torch.distributed.barrier()
            counter.start()
            t0 = time.perf_counter()
            optimizer.step()
            _device_sync()  # a GPU step returns before its kernels finish
            dt = time.perf_counter() - t0
            records = counter.stop()
        if not measured:
            return
        totals = counter.totals(records)
        rec = self.rec
        rec["losses"].append(loss)
        rec["times"].append(dt)
        rec["sent"].append(totals["sent"])
        rec["received"].append(totals["received"])
        self.by_op = totals["by_op"]
        rec["ns_flops"].append(probe.ns_flops)
        rec["ns_matrices"].append(probe.ns_matrices)
        # Reading the metrics waits for the device: after the timed region, as a log would.
        rec["ns_seconds"].append(sum(o.muon_metrics.get("muon/ns_seconds_local", 0.0)
                                     for o in members))
        rec["a2a_seconds"].append(probe.a2a_seconds)
        rec["prepare_seconds"].append(probe.prepare_seconds)
        if self.static["bucket_bytes"]:
            self.transient = {"peak_bytes": probe.transient_peak,
                              "bucket_bytes": max(self.static["bucket_bytes"]),
                              "buckets": len(self.static["bucket_bytes"])}

    def result(self, main_is_copy: bool) -> dict[str, Any]:
        from muon_megatron.training.model import local_parameter_count

        state = _state_bytes(self.optimizer, self.static.pop("shards"), main_is_copy)
        return {**self.rec, "by_op": self.by_op, "state": state, "muon": self.static,
                "transient": self.transient, "local_params": local_parameter_count(self.model)}


def _device_sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextlib.contextmanager
def _nothing() -> Iterator[None]:
    yield


def _bench_layout(cfg: BenchConfig, layout_name: str) -> dict[str, dict[str, Any]]:
    """Every optimizer of `cfg` on one layout, their steps interleaved (step s of each
    optimizer, then step s+1 of each), so that a slow spell of the machine hits all alike."""
    from muon_megatron.testing import tiny
    from muon_megatron.tools.comm_counter import CollectiveCounter

    spec = cfg.model_spec(layout_name)
    layout = tiny.Layout(**LAYOUTS[layout_name])
    tiny.initialize_parallel(layout, cfg.seed)
    names = [n for n in cfg.optimizers if n != MCORE_MUON or not spec.num_experts]
    runners = [_Runner(n, *_build(n, cfg, spec, layout)) for n in names]
    mbs = cfg.global_batch_size // layout.dp(cfg.world_of(layout_name))
    counter = CollectiveCounter()
    with counter.installed():
        for step in range(cfg.warmup + cfg.steps):
            for runner in runners:
                runner.step(cfg, spec, mbs, step, counter, measured=step >= cfg.warmup)
    return {r.name: r.result(main_is_copy=cfg.bf16) for r in runners}


def rank_main(rank: int, world: int, cfg: BenchConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for layout_name in cfg.layouts:
        if cfg.world_of(layout_name) != world:
            continue
        t0 = time.perf_counter()
        for opt_name, result in _bench_layout(cfg, layout_name).items():
            out[f"{layout_name}/{opt_name}"] = result
        if rank == 0:
            print(f"> bench: {layout_name} done in {time.perf_counter() - t0:.0f} s", flush=True)
    return out
