"""GPU figures of issue 7: Newton-Schulz throughput against the measured matmul peak, and the
Muon / AdamW optimizer step-time ratio of a ~1B-parameter GPT on one GPU.

Needs CUDA; on a machine without it the script refuses with a message and exit code 2
(`--cpu-dry-run` runs the same code at toy sizes on CPU to check it, and measures nothing).

    python benchmarks/gpu_ns_throughput.py --out outputs/gpu.json

1. Newton-Schulz (`muon_megatron.ops.newton_schulz.newton_schulz`, 5 quintic steps, bf16) on
   n x n and n x 4n matrices for n = 1024 ... 8192; FLOPs from `ns_flops`; throughput against
   the best bf16 `torch.matmul` of the same sizes (the peak this GPU reaches in practice).
2. A ~1B GPT (megatron-core local layers, bf16 params / fp32 main params, one process,
   ZeRO-1 optimizer over a data-parallel group of 1): median `optimizer.step()` time over
   20 steps after 3 warm-up steps, for `get_muon_optimizer` (bf16 NS) and megatron-core's
   AdamW, each on real gradients of the same batches.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

CPU_REFUSAL = (
    "gpu_ns_throughput.py measures GPU figures and CUDA is not available here "
    "(torch {version}, torch.cuda.is_available() is False). Run it on a CUDA machine: "
    "python benchmarks/gpu_ns_throughput.py --out outputs/gpu.json  "
    "(--cpu-dry-run checks the code path at toy sizes and measures nothing)."
)


def _time_ms(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    """Median wall time of `fn` in ms (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def ns_throughput(sizes: Sequence[int], repeats: int, device: torch.device) -> list[dict]:
    """Newton-Schulz TFLOP/s per shape, against bf16 matmul TFLOP/s of the same sizes."""
    from muon_megatron.ops.newton_schulz import newton_schulz, ns_flops

    rows = []
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        mm_ms = _time_ms(lambda: a @ a, repeats)
        peak = 2 * n**3 / (mm_ms * 1e-3) / 1e12
        for rows_, cols in ((n, n), (n, 4 * n)):
            x = torch.randn(rows_, cols, device=device, dtype=torch.float32)
            ms = _time_ms(lambda: newton_schulz(x, steps=5, dtype="bf16"), repeats)
            tflops = ns_flops(rows_, cols, 5) / (ms * 1e-3) / 1e12
            rows.append({"shape": [rows_, cols], "ns_ms": ms, "ns_tflops": tflops,
                         "matmul_tflops_nxn": peak, "fraction_of_matmul": tflops / peak})
            print(f"  NS {rows_:5d} x {cols:5d}: {ms:8.2f} ms, {tflops:7.1f} TFLOP/s = "
                  f"{tflops / peak:5.1%} of bf16 matmul {n}^3 ({peak:.1f} TFLOP/s)", flush=True)
        del a, x
    return rows


def _init_single_process() -> None:
    if torch.distributed.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(0)
        backend = "nccl"
    torch.distributed.init_process_group(backend, rank=0, world_size=1)


def step_time_ratio(spec_kwargs: dict, steps: int, warmup: int, gbs: int, mbs: int) -> dict:
    """Median optimizer.step() ms of Muon and AdamW on one device, same model and batches."""
    from muon_megatron.config import MuonConfig
    from muon_megatron.testing import tiny
    from muon_megatron.training.model import local_parameter_count

    _init_single_process()
    spec = tiny.ModelSpec(bf16=True, **spec_kwargs)
    layout = tiny.Layout()
    out: dict[str, Any] = {"spec": spec_kwargs}
    for name in ("adamw", "muon"):
        tiny.initialize_parallel(layout, seed=1234)
        model = tiny.build_model(spec, layout)  # on the current CUDA device
        out["parameters"] = local_parameter_count(model)
        config = tiny.optimizer_config(lr=1e-4, weight_decay=0.1, bf16=True)
        muon_config = MuonConfig(muon_ns_dtype="bf16") if name == "muon" else None
        optimizer = tiny.build_optimizer(model, config, muon_config)
        times = []
        for step in range(warmup + steps):
            batch = tiny.global_batch(step, spec, gbs, seed=1234)
            optimizer.zero_grad()
            tiny.forward_backward(model, batch, spec, mbs)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            optimizer.step()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if step >= warmup:
                times.append(1e3 * (time.perf_counter() - t0))
        out[f"{name}_step_ms"] = statistics.median(times)
        print(f"  {name}: optimizer.step() median {out[f'{name}_step_ms']:.1f} ms "
              f"({out['parameters'] / 1e9:.2f} B params)", flush=True)
        del optimizer, model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    out["muon_over_adamw"] = out["muon_step_ms"] / out["adamw_step_ms"]
    return out


# ~1.0 B parameters: 20 layers x (GQA attention + SwiGLU 2048 -> 5632), vocab 32000.
ONE_B = dict(num_layers=20, hidden_size=2048, num_attention_heads=16, num_query_groups=8,
             ffn_hidden_size=5632, vocab_size=32000, seq_length=2048)
DRY_RUN = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
               ffn_hidden_size=128, vocab_size=256, seq_length=32)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--skip-model", action="store_true", help="Only the Newton-Schulz part.")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="Run at toy sizes on CPU to check the code path (measures nothing).")
    p.add_argument("--out", default=os.path.join("outputs", "gpu.json"))
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    if not torch.cuda.is_available() and not args.cpu_dry_run:
        print(CPU_REFUSAL.format(version=torch.__version__), file=sys.stderr)
        return 2
    dry = not torch.cuda.is_available()
    device = torch.device("cuda" if not dry else "cpu")
    result: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if not dry else "cpu (dry run, not a measurement)",
        "torch": torch.__version__,
    }
    print(f"> {result['device']}, torch {torch.__version__}", flush=True)
    sizes = [64, 128] if dry else args.sizes
    result["newton_schulz"] = ns_throughput(sizes, 2 if dry else args.repeats, device)
    if not args.skip_model:
        spec, gbs = (DRY_RUN, 2) if dry else (ONE_B, 8)
        result["step_time"] = step_time_ratio(spec, 2 if dry else args.steps, 1 if dry else 3,
                                              gbs=gbs, mbs=1 if dry else 2)
        print(f"> Muon / AdamW optimizer step time: {result['step_time']['muon_over_adamw']:.2f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)
    print(f"> json: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
