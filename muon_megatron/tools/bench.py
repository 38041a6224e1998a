"""`muon-megatron bench`: our Muon next to megatron-core's AdamW and megatron-core's own Muon.

One launch of gloo processes per world size trains a small megatron-core GPT (and an MoE)
under each layout (DP2 and TP2 on 2 ranks; DP4, TP2 x DP2 and MoE EP2 x DP2 on 4) with each
optimizer, from the same initial weights on the same batches (`tiny.global_batch`). The
optimizers of a layout live side by side and their steps are interleaved (step s of every
optimizer, then step s+1), so a noisy spell of the machine hits them alike. Every optimizer
gets `warmup` steps, then `steps` measured ones. Forward and backward run every step and are
not measured; around `optimizer.step()` only, each rank records:

* wall time (after a barrier, so every rank starts together); a step's time is the slowest
  rank's, the reported figure the median over the measured steps;
* the time in `prepare_grads` (the non-finite check used to add a pass there);
* bytes sent and received by every `torch.distributed` collective (`comm_counter`); our extra
  bytes are Muon's minus AdamW's on the same rank;
* Newton-Schulz FLOPs, from the shapes actually passed to `newton_schulz` (cross-checked
  against the optimizer's own `owner_loads()`), and one copy of every logical
  matrix counted independently from the model spec (`expected_logical_shapes`);
* the peak bytes the pipelined step held, against the largest bucket;
* after the last step, the bytes of every tensor in the optimizer state and of the fp32 main
  params.

Muon variants: `muon` (bf16 Newton-Schulz, bf16 communication), `muon_fp32comm` (bf16 NS,
fp32 communication: `MuonConfig`'s defaults), `muon_fp32` (fp32 NS and communication) and
`muon_match` (the configuration megatron-core's Muon runs too, `tools.mcore_muon`).
`mcore_muon` is megatron-core's own Muon (dense layouts), where emerging-optimizers is
installed (the `bench` extra); ours / theirs is reported per layout.

Modules: `bench_config` (what runs), `bench_rank` (what each rank measures), `bench_report`
(rows, checks, the table); this one runs them and is the command.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from muon_megatron.tools.bench_config import (
    DEFAULT_MODEL,
    LAYOUT_WORLDS,
    LAYOUTS,
    MCORE_MUON,
    OPTIMIZERS,
    BenchConfig,
    expected_logical_shapes,
)
from muon_megatron.tools.bench_report import format_table, summarize, summary_line

__all__ = [
    "LAYOUTS",
    "OPTIMIZERS",
    "BenchConfig",
    "expected_logical_shapes",
    "format_table",
    "main",
    "mcore_muon_status",
    "run_bench",
    "summarize",
    "summary_line",
]

# Warnings every CPU rank prints on every step that say nothing about the run.
_CPU_NOISE = (
    "ignore:Transformer Engine and Apex are not installed",
    "ignore:Apex is not installed",
    "ignore::FutureWarning",
    "ignore::DeprecationWarning",
    "ignore:The .grad attribute of a Tensor that is not a leaf Tensor",
)


def mcore_matching() -> dict[str, Any]:
    """The configuration in which ours and megatron-core's Muon run the same algorithm."""
    from muon_megatron.tools import mcore_muon

    return {"megatron-core": {**mcore_muon.MATCHING, "coefficient_type": mcore_muon.COEFFICIENT_TYPE},
            "ours": OPTIMIZERS["muon_match"]}


def mcore_muon_status() -> tuple[bool, str]:
    """Whether megatron-core's own Muon can run here (`tools.mcore_muon`), and if not, why."""
    from muon_megatron.tools import mcore_muon

    return mcore_muon.status()


def run_bench(cfg: BenchConfig, timeout_s: float = 1800, backend: str = "auto") -> dict[str, Any]:
    """Run the benchmark; returns the summary (rows, checks) plus run information.

    Spawned gloo processes on this CPU, one launch per world size; or, under torchrun, the
    job's own ranks (NCCL on GPUs, `runtime.torchrun`) for the layouts of its world size."""
    from muon_megatron.runtime import torchrun
    from muon_megatron.runtime.launch import child_env_defaults, spawn
    from muon_megatron.tools.bench_rank import rank_main

    unknown = [x for x in cfg.layouts if x not in LAYOUTS]
    unknown += [x for x in cfg.optimizers if x not in OPTIMIZERS]
    if unknown:
        raise ValueError(f"unknown layouts/optimizers {unknown}; choose from {list(LAYOUTS)} "
                         f"and {list(OPTIMIZERS)}")
    if cfg.steps < 1 or cfg.warmup < 0:
        raise ValueError(f"steps={cfg.steps} must be >= 1 and warmup={cfg.warmup} >= 0")
    mcore = mcore_muon_status()
    if not mcore[0]:
        cfg = dataclasses.replace(cfg, optimizers=tuple(o for o in cfg.optimizers if o != MCORE_MUON))
    t0 = time.perf_counter()
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_DEVICE_MAX_CONNECTIONS": "1",
           "PYTHONWARNINGS": ",".join(_CPU_NOISE)}
    ranks_of: dict[str, list[dict[str, Any]]] = {}
    used_backend = "gloo"
    if torchrun.under_torchrun():
        with torchrun.torchrun_session(backend, timeout_s) as (rank, world, used_backend):
            layouts = tuple(x for x in cfg.layouts if cfg.world_of(x) == world)
            if not layouts:
                raise ValueError(
                    f"none of the layouts {list(cfg.layouts)} runs on {world} ranks; pick "
                    f"--layouts of that world size ({LAYOUT_WORLDS}) or change --nproc-per-node."
                )
            cfg = dataclasses.replace(cfg, layouts=layouts)
            launches = [torchrun.all_gather_objects(rank_main(rank, world, cfg))]
    else:
        torchrun.resolve_backend(backend)  # nccl on a machine without GPUs: refused here
        if backend == "nccl":
            raise ValueError("--backend nccl runs under torchrun (one process per GPU).")
        with child_env_defaults(env):
            # One launch per world size; each holds its layouts' optimizers side by side.
            launches = [
                spawn(rank_main, world, cfg, timeout_s=timeout_s)
                for world in sorted({cfg.world_of(layout) for layout in cfg.layouts})
            ]
    for per_rank in launches:
        for key in per_rank[0]:
            ranks_of[key] = [r[key] for r in per_rank]
    result = summarize(cfg, ranks_of, mcore)
    result["config"] = asdict(cfg)
    result["mcore_muon"] = {"available": mcore[0], "why": mcore[1]}
    result["wall_seconds"] = time.perf_counter() - t0
    result["machine"] = {"python": platform.python_version(), "cpus": os.cpu_count(),
                         "platform": platform.platform(), "backend": used_backend,
                         "mcore_matching": mcore_matching()}
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="muon-megatron bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    p.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    p.add_argument("--steps", type=int, default=BenchConfig.steps)
    p.add_argument("--warmup", type=int, default=BenchConfig.warmup)
    p.add_argument("--hidden-size", type=int, default=DEFAULT_MODEL["hidden_size"])
    p.add_argument("--ffn-hidden-size", type=int, default=DEFAULT_MODEL["ffn_hidden_size"])
    p.add_argument("--num-layers", type=int, default=DEFAULT_MODEL["num_layers"])
    p.add_argument("--num-experts", type=int, default=BenchConfig.num_experts)
    p.add_argument(
        "--moe-ffn-hidden-size", type=int, default=DEFAULT_MODEL["moe_ffn_hidden_size"]
    )
    p.add_argument("--fp32-params", action="store_true",
                   help="fp32 model params (default: bf16 params with fp32 main params).")
    p.add_argument("--muon-owner-bucket-mb", type=float,
                   default=BenchConfig.muon_owner_bucket_mb,
                   help="Muon's per-owner bucket cap here (the bench's default makes the model "
                        "several buckets; MuonConfig's own default is what a training run gets).")
    p.add_argument("--out", default=os.path.join("outputs", "bench.json"))
    p.add_argument("--backend", choices=("auto", "nccl", "gloo"), default="auto",
                   help="Under torchrun: nccl (one GPU per rank), gloo, or auto.")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    from muon_megatron.testing.tiny import ModelSpec

    model = ModelSpec(**{
        **DEFAULT_MODEL,
        "hidden_size": args.hidden_size,
        "ffn_hidden_size": args.ffn_hidden_size,
        "num_layers": args.num_layers,
        "moe_ffn_hidden_size": args.moe_ffn_hidden_size,
        "bf16": not args.fp32_params,
    })
    cfg = BenchConfig(
        layouts=tuple(args.layouts), optimizers=tuple(args.optimizers), steps=args.steps,
        warmup=args.warmup, model=model, num_experts=args.num_experts,
        muon_owner_bucket_mb=args.muon_owner_bucket_mb,
    )
    result = run_bench(cfg, backend=args.backend)
    from muon_megatron.runtime.torchrun import launcher_rank

    if launcher_rank() != 0:
        return 0
    print(f"> megatron-core Muon: {'runs' if result['mcore_muon']['available'] else 'left out'}:"
          f" {result['mcore_muon']['why']}")
    if result["mcore_muon"]["available"]:
        matching = result["machine"]["mcore_matching"]
        print(f"> matching configuration: megatron-core {matching['megatron-core']}")
        print(f">                         ours {matching['ours']}")
    print(format_table(result))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)
    print(f"> json: {args.out} ({result['wall_seconds']:.0f} s)")
    print(summary_line(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
