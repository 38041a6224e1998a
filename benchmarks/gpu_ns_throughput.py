"""GPU figures of issues 7 and 13: Newton-Schulz throughput against the measured bf16 matmul
peak, and the optimizer's share of iteration time of a ~1B-parameter GPT, on 1 to 8 GPUs.

Needs CUDA; on a machine without it the script refuses with a message and exit code 2
(`--cpu-dry-run` runs the same code at toy sizes on CPU over gloo to check it, and measures
nothing).

    python benchmarks/gpu_ns_throughput.py --out outputs/gpu.json                 # 1 GPU
    torchrun --nproc-per-node 8 benchmarks/gpu_ns_throughput.py --out outputs/gpu8.json

1. Newton-Schulz (`muon_megatron.ops.newton_schulz.newton_schulz`, 5 quintic steps, bf16) on
   n x n and n x 4n matrices for n = 1024 ... 8192, on rank 0; FLOPs from `ns_flops`;
   throughput against the best bf16 `torch.matmul` of the same sizes (the peak this GPU
   reaches in practice).
2. A ~1B GPT (megatron-core local layers, bf16 params / fp32 main params) data parallel over
   every rank (NCCL, ZeRO-1): median `optimizer.step()` time and median iteration time
   (zero_grad, forward, backward, step) over 20 steps after 3 warm-up steps, slowest rank,
   for `get_muon_optimizer` (bf16 NS) and megatron-core's AdamW, on the same batches; the
   optimizer's share of the iteration and Muon / AdamW.
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
        mm_ms = _time_ms(lambda a=a: a @ a, repeats)
        peak = 2 * n**3 / (mm_ms * 1e-3) / 1e12
        for rows_, cols in ((n, n), (n, 4 * n)):
            x = torch.randn(rows_, cols, device=device, dtype=torch.float32)
            ms = _time_ms(lambda x=x: newton_schulz(x, steps=5, dtype="bf16"), repeats)
            tflops = ns_flops(rows_, cols, 5) / (ms * 1e-3) / 1e12
            rows.append({"shape": [rows_, cols], "ns_ms": ms, "ns_tflops": tflops,
                         "matmul_tflops_nxn": peak, "fraction_of_matmul": tflops / peak})
            print(f"  NS {rows_:5d} x {cols:5d}: {ms:8.2f} ms, {tflops:7.1f} TFLOP/s = "
                  f"{tflops / peak:5.1%} of bf16 matmul {n}^3 ({peak:.1f} TFLOP/s)", flush=True)
        del a, x
    return rows


def _as_a_torchrun_job() -> None:
    """Without torchrun, describe this process as torchrun's job of one process, so that
    `runtime.torchrun.torchrun_session` joins it either way (one GPU per rank over NCCL, the
    CPU shims and gloo on a machine without one)."""
    from muon_megatron.runtime import torchrun

    if torchrun.under_torchrun():
        return
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29517")):
        os.environ.setdefault(key, value)


def _slowest(ms: float) -> float:
    """The largest of every rank's `ms`."""
    t = torch.tensor([ms], dtype=torch.float64)
    if torch.cuda.is_available():
        t = t.cuda()
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t.item())


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def step_time_ratio(spec_kwargs: dict, steps: int, warmup: int, mbs: int) -> dict:
    """Median optimizer.step() and iteration ms of Muon and AdamW, data parallel over every
    rank (slowest rank), same model and batches."""
    from muon_megatron.config import MuonConfig
    from muon_megatron.testing import tiny
    from muon_megatron.training.model import local_parameter_count

    world = torch.distributed.get_world_size()
    gbs = 4 * mbs * world
    spec = tiny.ModelSpec(bf16=True, **spec_kwargs)
    layout = tiny.Layout()
    out: dict[str, Any] = {"spec": spec_kwargs, "world": world, "global_batch": gbs}
    for name in ("adamw", "muon"):
        tiny.initialize_parallel(layout, seed=1234)
        model = tiny.build_model(spec, layout)  # on the current CUDA device
        out["parameters"] = local_parameter_count(model)
        config = tiny.optimizer_config(lr=1e-4, weight_decay=0.1, bf16=True)
        muon_config = MuonConfig(muon_ns_dtype="bf16") if name == "muon" else None
        optimizer = tiny.build_optimizer(model, config, muon_config)
        step_ms, iter_ms = [], []
        for step in range(warmup + steps):
            batch = tiny.global_batch(step, spec, gbs, seed=1234)
            _sync()
            torch.distributed.barrier()
            t0 = time.perf_counter()
            optimizer.zero_grad()
            tiny.forward_backward(model, batch, spec, mbs)
            _sync()
            t1 = time.perf_counter()
            optimizer.step()
            _sync()
            t2 = time.perf_counter()
            if step >= warmup:
                step_ms.append(1e3 * (t2 - t1))
                iter_ms.append(1e3 * (t2 - t0))
        out[f"{name}_step_ms"] = _slowest(statistics.median(step_ms))
        out[f"{name}_iteration_ms"] = _slowest(statistics.median(iter_ms))
        out[f"{name}_optimizer_share"] = out[f"{name}_step_ms"] / out[f"{name}_iteration_ms"]
        if torch.distributed.get_rank() == 0:
            print(f"  {name}: optimizer.step() {out[f'{name}_step_ms']:.1f} ms of a "
                  f"{out[f'{name}_iteration_ms']:.1f} ms iteration "
                  f"({out[f'{name}_optimizer_share']:.1%}), {out['parameters'] / 1e9:.2f} B "
                  f"params, {world} rank(s)", flush=True)
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
    from muon_megatron.runtime import torchrun

    dry = not torch.cuda.is_available()
    _as_a_torchrun_job()
    with torchrun.torchrun_session("auto") as (rank, _, _):
        device = torch.device("cpu") if dry else torch.device("cuda", torch.cuda.current_device())
        result: dict[str, Any] = {
            "date": datetime.date.today().isoformat(),
            "device": "cpu (dry run, not a measurement)" if dry else torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "world": torch.distributed.get_world_size(),
        }
        if rank == 0:
            print(f"> {result['device']} x {result['world']}, torch {torch.__version__}",
                  flush=True)
            sizes = [64, 128] if dry else args.sizes
            result["newton_schulz"] = ns_throughput(sizes, 2 if dry else args.repeats, device)
        if not args.skip_model:
            spec = DRY_RUN if dry else ONE_B
            result["step_time"] = step_time_ratio(spec, 2 if dry else args.steps, 1 if dry else 3,
                                                  mbs=1 if dry else 2)
            if rank == 0:
                print(f"> Muon / AdamW optimizer step time: "
                      f"{result['step_time']['muon_over_adamw']:.2f}")
        if rank == 0:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w", encoding="utf-8") as fh:
                json.dump(result, fh, indent=1)
            print(f"> json: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
