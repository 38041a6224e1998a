"""The GPU-ready step: no host syncs per matrix, pipelined buckets, interleaved members.

Host syncs are counted on the CPU by wrapping every call that, on a GPU, copies a device
value to the host or waits for the device: Tensor.item / __float__ / __bool__ / __int__ /
tolist / cpu, and torch.cuda.synchronize. On the CPU they cost nothing, but the same calls
run on a GPU, so their count there is the count here.
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from collections.abc import Iterator

import pytest
import torch

from muon_megatron.config import MuonConfig
from muon_megatron.optimizer.pipeline import interleave
from muon_megatron.runtime.launch import spawn
from muon_megatron.testing.tiny import Layout, ModelSpec
from muon_megatron.tools.observe import recording_pipeline

# Where neither Transformer Engine nor apex is installed (here), megatron-core falls back to
# Python stand-ins for two fused kernels, and both read device values one tensor at a time:
# torch.optim's Adam reads each param's step count with .item(), and
# `local_multi_tensor_l2_norm` turns each grad's norm into a float. A GPU run uses
# FusedAdam and amp_C's multi_tensor_l2norm, which do not. Calls made inside those two are
# left out of every count, AdamW's included; every other call is counted.
FALLBACKS = (
    ("torch/optim/", None),
    ("megatron/core/utils.py", "local_multi_tensor_l2_norm"),
)
SHIM_WRAPPERS = "muon_megatron/runtime/cpu_shims/"


def _in_fallback() -> bool:
    frame = sys._getframe(2)
    while frame is not None and SHIM_WRAPPERS in frame.f_code.co_filename.replace("\\", "/"):
        frame = frame.f_back
    if frame is None:
        return False
    path = frame.f_code.co_filename.replace("\\", "/")
    return any(f in path and name in (None, frame.f_code.co_name) for f, name in FALLBACKS)


SYNC_METHODS = ("item", "__float__", "__bool__", "__int__", "tolist", "cpu")
# 7 logical Muon matrices per layer: Q, K, V, linear_proj, gate, up, linear_fc2.
LOGICAL_PER_LAYER = 7
SMALL_BUCKET_MB = 0.01  # ~2.6k fp32 elements per owner: a few matrices per bucket here


@contextlib.contextmanager
def counting_host_syncs() -> Iterator[Counter]:
    counts: Counter = Counter()
    saved = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}
    saved_sync = torch.cuda.synchronize

    def counted(name, original):
        def wrapper(*args, **kwargs):
            if not _in_fallback():
                counts[name] += 1
            return original(*args, **kwargs)

        return wrapper

    for name, original in saved.items():
        setattr(torch.Tensor, name, counted(name, original))
    torch.cuda.synchronize = counted("cuda.synchronize", saved_sync)
    try:
        yield counts
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)
        torch.cuda.synchronize = saved_sync


def _sync_counts(rank: int, world: int, layers: int, muon: bool, bucket_mb: float) -> dict:
    from muon_megatron.optimizer.builder import muon_optimizers
    from muon_megatron.testing import tiny

    spec, layout = ModelSpec(num_layers=layers), Layout()
    tiny.initialize_parallel(layout, seed=0)
    model = tiny.build_model(spec, layout)
    cfg = MuonConfig(muon_ns_dtype="fp32", muon_owner_bucket_mb=bucket_mb) if muon else None
    optimizer = tiny.build_optimizer(model, tiny.optimizer_config(), cfg)
    counts = []
    for step in range(3):
        optimizer.zero_grad()
        tiny.forward_backward(model, tiny.global_batch(step, spec, 8, seed=0), spec, 2)
        with counting_host_syncs() as count:
            success, _, _ = optimizer.step()
        assert success
        counts.append(dict(count))
    members = muon_optimizers(optimizer)
    return {
        "counts": counts,
        "logical": sum(o.logical_matrix_count for o in members),
        "buckets": sum(len(o._buckets) for o in members),
        "metrics": {k: v for o in members for k, v in o.muon_metrics.items()},
    }


@pytest.fixture(scope="module")
def sync_runs() -> dict:
    runs = {}
    for name, layers, muon, bucket_mb in [
        ("adamw", 5, False, 64.0),
        ("muon", 5, True, 64.0),
        ("muon_buckets", 5, True, SMALL_BUCKET_MB),
        ("muon_wide", 10, True, SMALL_BUCKET_MB),
    ]:
        runs[name] = spawn(_sync_counts, 2, layers, muon, bucket_mb)
    return runs


def _total(run: list[dict], step: int) -> int:
    return max(sum(r["counts"][step].values()) for r in run)


def test_optimizer_step_makes_at_most_one_host_sync_more_than_adamw(sync_runs) -> None:
    muon = sync_runs["muon_buckets"]
    assert muon[0]["logical"] >= 30 and muon[0]["buckets"] >= 3, muon[0]
    adamw = _total(sync_runs["adamw"], 2)
    assert adamw >= 1  # Megatron reads the grad norm once: the counter sees it
    for name in ("muon", "muon_buckets", "muon_wide"):
        for step in (1, 2):
            assert _total(sync_runs[name], step) <= adamw + 1, (name, sync_runs[name][0]["counts"])


def test_host_syncs_do_not_grow_with_the_number_of_matrices(sync_runs) -> None:
    small, wide = sync_runs["muon_buckets"], sync_runs["muon_wide"]
    assert wide[0]["logical"] == 2 * small[0]["logical"] == 2 * 5 * LOGICAL_PER_LAYER
    assert wide[0]["buckets"] > small[0]["buckets"]
    assert _total(wide, 2) == _total(small, 2)


def test_metrics_are_read_at_log_time_from_the_device(sync_runs) -> None:
    # Read after the step, outside the counted region: Moonlight's matched RMS is 0.2.
    for rank in sync_runs["muon_buckets"]:
        rms = [v for k, v in rank["metrics"].items() if k.startswith("muon/update_rms/")]
        assert rms and all(0.1 < v <= 0.2 + 1e-6 for v in rms), rank["metrics"]
        assert rank["metrics"]["muon/ns_seconds_local"] >= 0.0


# ---------------------------------------------------------------------------- overlap
def _traced_step(rank: int, world: int, layout: Layout, spec: ModelSpec) -> dict:
    from muon_megatron.optimizer.builder import muon_optimizers
    from muon_megatron.testing import tiny

    tiny.initialize_parallel(layout, seed=0)
    model = tiny.build_model(spec, layout)
    cfg = MuonConfig(muon_ns_dtype="fp32", muon_owner_bucket_mb=SMALL_BUCKET_MB)
    optimizer = tiny.build_optimizer(model, tiny.optimizer_config(), cfg)
    members = muon_optimizers(optimizer)
    with recording_pipeline() as record:
        tiny.train_step(model, optimizer, tiny.global_batch(0, spec, 8, seed=0), spec, layout, 2)
    (trace,) = record.traces
    return {
        "trace": trace,
        "buckets": [len(o._buckets) for o in members],
        "leader": [o._pipeline_members is not None and len(o._pipeline_members) for o in members],
    }


def _check_pipelined(trace: list) -> int:
    where = {event: i for i, event in enumerate(trace)}
    n = 1 + max(k for _, k in trace)
    for k in range(n):
        for event in ("gather_issue", "gather_wait", "ns_begin", "ns_end", "scatter_issue", "scatter_wait"):
            assert (event, k) in where, (event, k, trace)
    for k in range(n - 1):
        # bucket k+1's gather is in flight while bucket k's Newton-Schulz runs ...
        assert where[("gather_issue", k + 1)] < where[("ns_begin", k)], trace
        assert where[("gather_wait", k + 1)] > where[("ns_end", k)], trace
        # ... and bucket k's scatter while bucket k+1's runs.
        assert where[("scatter_issue", k)] < where[("ns_begin", k + 1)], trace
        assert where[("scatter_wait", k)] > where[("ns_end", k + 1)], trace
    return n


def test_bucket_k_plus_1_gather_is_in_flight_during_bucket_k_newton_schulz() -> None:
    out = spawn(_traced_step, 2, Layout(tp=2), ModelSpec(num_layers=2))
    for rank in out:
        assert rank["buckets"][0] >= 3, rank["buckets"]
        assert _check_pipelined(rank["trace"]) == rank["buckets"][0]


def test_dense_and_expert_buckets_are_interleaved_in_one_pipeline() -> None:
    spec = ModelSpec(num_layers=2, num_experts=4)
    out = spawn(_traced_step, 2, Layout(ep=2), spec)
    for rank in out:
        dense, expert = rank["buckets"]
        assert dense >= 2 and expert >= 2, rank["buckets"]
        assert rank["leader"] == [2, False], rank["leader"]  # the first member runs both
        assert _check_pipelined(rank["trace"]) == dense + expert


def test_interleave_is_round_robin_over_members() -> None:
    class Member:
        def __init__(self, buckets):
            self._buckets = buckets

    a, b = Member(["a0", "a1", "a2"]), Member(["b0"])
    assert [bucket for _, bucket in interleave([a, b])] == ["a0", "b0", "a1", "a2"]
