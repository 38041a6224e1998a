"""Probes of one rank's optimizer step: the torch operators it dispatches, and its host time.

On one CPU rank with tiny matrices the arithmetic is small, so what a step costs is mostly
the host's: Python, and one dispatch per torch operator. These pieces measure that from
outside the optimizer (nothing here is read by production code):

- `DispatchCounter`: a `TorchDispatchMode` counting every operator that reaches torch's
  Python dispatch key while it is active: one per aten call, views included (a foreach
  call over a hundred tensors is one). Composite operators are counted as what they
  decompose into, as they reach the dispatcher.
- `counting_dispatch_in(owner, name)` / `timing_calls_of(owner, name)`: wrap the function
  `owner.name` (a module global, looked up by name at call time) for the duration, and
  record the operators dispatched inside each call, or each call's wall time.
  `muon_megatron.optimizer.distributed.run_pipeline` is where the Muon phases of a step run.
- `tiny_moe_spec(layers, experts)`: the host-cost model: tiny matrices, megatron's
  `SequentialMLP`, so every expert is a Muon parameter of its own.
- `measure_one_rank(...)`: `spawn`'s rank function for a world of one: Muon and megatron's
  AdamW on the same model, stepped alternately; the median `optimizer.step()` time of each,
  the Muon phases' and Newton-Schulz's share, and the operators of one more step of each.

This module imports only what every checkout of the project has had (the harness, `spawn`,
`muon_optimizers`, `MuonConfig`), so `benchmarks/host_cost.py` can run this file against the
optimizer of another checkout, before and after a change.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "PIPELINE",
    "DispatchCounter",
    "counting_dispatch_in",
    "timing_calls_of",
    "tiny_moe_spec",
    "measure_one_rank",
    "muon_shape_facts",
]

PIPELINE = "run_pipeline"
"""The name in `muon_megatron.optimizer.distributed` that `step_with_ready_grads` calls to
run the Muon phases of a step."""
NEWTON_SCHULZ = "newton_schulz"
"""The name in `muon_megatron.optimizer.distributed` the owner's phase calls per batch."""


class DispatchCounter(TorchDispatchMode):
    """Counts, by operator, every torch operator dispatched while the mode is active."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _wrapping(owner: Any, name: str, around: Callable[[Callable, tuple, dict], Any]):
    """Replace `owner.name` by `around(original, args, kwargs)` until the block ends."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        return around(original, args, kwargs)

    @contextlib.contextmanager
    def installed():
        setattr(owner, name, wrapper)
        try:
            yield
        finally:
            setattr(owner, name, original)

    return installed()


@contextlib.contextmanager
def counting_dispatch_in(owner: Any, name: str) -> Iterator[list[Counter[str]]]:
    """While active, every call of `owner.name` runs under its own `DispatchCounter`;
    yields the list of their counts, one Counter per call, in call order."""
    calls: list[Counter[str]] = []

    def around(original, args, kwargs):
        counter = DispatchCounter()
        try:
            with counter:
                return original(*args, **kwargs)
        finally:
            calls.append(counter.counts)

    with _wrapping(owner, name, around):
        yield calls


@contextlib.contextmanager
def timing_calls_of(owner: Any, name: str) -> Iterator[list[float]]:
    """While active, records the wall time (s) of every call of `owner.name`."""
    seconds: list[float] = []

    def around(original, args, kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    with _wrapping(owner, name, around):
        yield seconds


def tiny_moe_spec(layers: int, experts: int):
    """A GPT whose matrices are tiny (hidden 32; experts 16 wide), with megatron's
    `SequentialMLP` (no grouped GEMM): every expert is its own Muon parameter (fc1 split
    into gate and up), so the step's cost is its per-matrix host work."""
    from muon_megatron.testing.tiny import ModelSpec

    return ModelSpec(
        num_layers=layers,
        num_experts=experts,
        hidden_size=32,
        ffn_hidden_size=64,
        moe_ffn_hidden_size=16,
        num_attention_heads=4,
        num_query_groups=2,
        moe_grouped_gemm=False,
    )


def muon_shape_facts(optimizer) -> dict[str, Any]:
    """Muon parameters, logical matrices, buckets and distinct logical shapes of every Muon
    member of `optimizer` (on one rank, every matrix is this rank's own)."""
    from muon_megatron.optimizer.builder import muon_optimizers

    members = muon_optimizers(optimizer)
    shapes = {s for o in members for m in o._matrices for s in m.split.logical_shapes()}
    return {
        "params": sum(len(o._matrices) for o in members),
        "logical": sum(o.logical_matrix_count for o in members),
        "buckets": sum(len(o._buckets) for o in members),
        "shapes": len(shapes),
    }


def _build(spec, muon_config, seed: int):
    """Model and optimizer (Muon when `muon_config` is given, else megatron's AdamW) from
    the same initial weights, with a gradient from one forward-backward."""
    from megatron.core import tensor_parallel

    from muon_megatron.testing import tiny

    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    model = tiny.build_model(spec, tiny.Layout())
    optimizer = tiny.build_optimizer(model, tiny.optimizer_config(), muon_config)
    optimizer.zero_grad()
    tiny.forward_backward(model, tiny.global_batch(0, spec, 2, seed), spec, 2)
    return optimizer


def _step(optimizer) -> None:
    success, _, _ = optimizer.step()
    if not success:
        raise RuntimeError("optimizer.step() was skipped (non-finite gradient)")


def measure_one_rank(
    rank: int,
    world_size: int,
    layers: int,
    experts: int,
    muon_kwargs: dict[str, Any],
    steps: int,
    warmup: int,
    seed: int = 0,
) -> dict[str, Any]:
    """`spawn`'s rank function (a world of one): Muon (`MuonConfig(**muon_kwargs)`) and
    megatron's AdamW on `tiny_moe_spec(layers, experts)`, `warmup` + `steps` calls of
    `optimizer.step()` each, alternating (Muon first on even steps, AdamW on odd).

    Each optimizer steps on the gradient of one forward-backward, made once: what a step
    costs depends on the plan, not on the gradient's values, and a forward-backward of
    Moonlight's 1,728 experts takes seconds on a CPU. Times (s) are medians over the measured
    steps (Newton-Schulz's: the mean); then one more step of each runs under
    `DispatchCounter`, untimed."""
    if world_size != 1:
        raise ValueError(f"measure_one_rank measures one rank alone, got world size {world_size}")
    from muon_megatron.config import MuonConfig
    from muon_megatron.optimizer import distributed
    from muon_megatron.testing import tiny

    spec = tiny_moe_spec(layers, experts)
    tiny.initialize_parallel(tiny.Layout(), seed)
    optimizers = {
        "muon": _build(spec, MuonConfig(**muon_kwargs), seed),
        "adamw": _build(spec, None, seed),
    }
    seconds: dict[str, list[float]] = {name: [] for name in optimizers}
    with contextlib.ExitStack() as stack:
        phases = stack.enter_context(timing_calls_of(distributed, PIPELINE))
        # Another checkout's optimizer may call Newton-Schulz under another name.
        ns = None
        if hasattr(distributed, NEWTON_SCHULZ):
            ns = stack.enter_context(timing_calls_of(distributed, NEWTON_SCHULZ))
        for i in range(warmup + steps):
            if i == warmup:
                phases.clear()
                if ns is not None:
                    ns.clear()
            order = list(optimizers) if i % 2 == 0 else list(reversed(optimizers))
            for name in order:
                start = time.perf_counter()
                _step(optimizers[name])
                if i >= warmup:
                    seconds[name].append(time.perf_counter() - start)
    ops = {}
    for name, optimizer in optimizers.items():
        with counting_dispatch_in(distributed, PIPELINE) as inside, DispatchCounter() as all_:
            _step(optimizer)
        ops[name] = {"step": all_.total, "phases": sum(sum(c.values()) for c in inside)}
    return {
        # The checkout whose optimizer ran (muon_megatron/optimizer/distributed.py's root).
        "source": str(Path(distributed.__file__).resolve().parents[2]),
        "layers": layers,
        "experts": experts,
        **muon_shape_facts(optimizers["muon"]),
        "muon_step_s": statistics.median(seconds["muon"]),
        "adamw_step_s": statistics.median(seconds["adamw"]),
        "muon_phases_s": statistics.median(phases),
        "newton_schulz_s": None if ns is None else sum(ns) / steps,  # several calls a step
        "muon_ops": ops["muon"]["step"],
        "muon_phase_ops": ops["muon"]["phases"],
        "adamw_ops": ops["adamw"]["step"],
        "steps": steps,
        "warmup": warmup,
    }


def main(argv: list[str] | None = None) -> int:
    """One configuration on one spawned rank; the record as JSON (`benchmarks/host_cost.py`
    runs this, with the checkout to measure first on PYTHONPATH)."""
    from muon_megatron.runtime.launch import spawn

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--layers", type=int, required=True)
    p.add_argument("--experts", type=int, required=True)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--muon", type=json.loads, default={"muon_ns_dtype": "fp32"},
                   help="MuonConfig fields, as a JSON object.")
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args(argv)
    (record,) = spawn(measure_one_rank, 1, args.layers, args.experts, args.muon, args.steps,
                      args.warmup)
    args.json.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
