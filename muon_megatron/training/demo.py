"""`muon-megatron demo`: a tiny MoE trained with Muon on CPU in about two minutes.

Four gloo processes, TP2 x EP2 with sequence parallelism (data-parallel 2), 4 experts with
top-2 routing in every layer, SwiGLU, byte-level text from the Python standard library. It
runs the same training entry as `examples/pretrain_moe.py` (`muon_megatron.training.entry`) and ends
by printing where the loss curve went. `--compare-adam` trains the same model with AdamW at
the same lr and weight decay (Moonlight's recipe) and plots both curves together.

Any other flag is passed on to the training entry and overrides the demo's value, e.g.
`muon-megatron demo --hidden-size 128 --muon-coefficients polar_express`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence

__all__ = ["main", "DEMO_FLAGS", "DEMO_MODEL_FLAGS"]

# The demo's model in the training entry's (Megatron-LM's) flag names; benchmarks/convergence.py
# trains the same model on one process.
DEMO_MODEL_FLAGS: tuple[str, ...] = (
    "--num-layers", "2",
    "--hidden-size", "64",
    "--ffn-hidden-size", "128",
    "--num-attention-heads", "4",
    "--group-query-attention", "--num-query-groups", "2",
    "--num-experts", "4",
    "--moe-router-topk", "2",
    "--moe-ffn-hidden-size", "128",
    "--moe-token-dispatcher-type", "allgather",
    "--swiglu", "--disable-bias-linear", "--normalization", "RMSNorm",
    "--hidden-dropout", "0", "--attention-dropout", "0",
    "--seq-length", "64",
)
# The demo: that model under TP2 x EP2 with sequence parallelism, and its recipe.
DEMO_FLAGS: tuple[str, ...] = (
    "--tensor-model-parallel-size", "2",
    "--expert-model-parallel-size", "2",
    "--sequence-parallel",
    "--world-size", "4",
    *DEMO_MODEL_FLAGS,
    "--micro-batch-size", "4",
    "--global-batch-size", "16",
    "--lr", "3e-3", "--min-lr", "3e-4", "--lr-decay-style", "cosine",
    "--weight-decay", "0.1", "--clip-grad", "1.0",
    "--eval-iters", "4",
    "--seed", "1234",
)
DEFAULT_TRAIN_ITERS = 300


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="muon-megatron demo",
        description="Train a tiny MoE (TP2 x EP2, sequence parallel, 4 experts top-2) with "
        "Muon on CPU and plot its loss. Unknown flags go to the training entry "
        "(examples/pretrain_moe.py --help lists them).",
    )
    p.add_argument("--train-iters", type=int, default=DEFAULT_TRAIN_ITERS)
    p.add_argument("--compare-adam", action="store_true",
                   help="Also train with AdamW (same lr / wd) and plot both.")
    p.add_argument("--output-dir", default=os.path.join("runs", "demo"))
    return p


def _schedule_flags(train_iters: int) -> list[str]:
    # Warm up over ~10% of the run, log ~15 lines, validate ~5 times.
    return [
        "--train-iters", str(train_iters),
        "--lr-warmup-iters", str(train_iters // 10),
        "--log-interval", str(max(1, train_iters // 15)),
        "--eval-interval", str(max(1, train_iters // 5)),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns a process exit code."""
    from muon_megatron.training.entry import (
        announce_missing_packages,
        build_parser,
        launch,
        plot_losses,
    )

    own, rest = _parser().parse_known_args(list(argv or []))
    announce_missing_packages()
    if own.train_iters < 1:
        raise ValueError(f"--train-iters {own.train_iters} must be >= 1")
    optimizers = ["muon", "adam"] if own.compare_adam else ["muon"]
    summaries = {}
    t0 = time.perf_counter()
    for name in optimizers:
        flags = [*DEMO_FLAGS, *_schedule_flags(own.train_iters), "--optimizer", name,
                 "--output-dir", own.output_dir, *rest]
        print(f"> demo: training with {name}: pretrain_moe.py {' '.join(flags)}", flush=True)
        summaries[name] = launch(build_parser().parse_args(flags))
    wall = time.perf_counter() - t0
    plot = summaries["muon"]["png"]
    if own.compare_adam:
        logs = {}
        for name in optimizers:
            with open(summaries[name]["json"], encoding="utf-8") as fh:
                logs[name] = json.load(fh)
        plot = plot_losses(logs, os.path.join(os.path.abspath(own.output_dir),
                                              "loss_muon_vs_adam.png"))
    print("> demo summary:", flush=True)
    for name, s in summaries.items():
        val = s["final_validation_loss"]
        print(f">   {name:4s}: train loss {s['first_loss']:.3f} -> {s['final_loss']:.3f}"
              f" (mean of last steps {s['mean_last']:.3f}), validation loss "
              f"{'-' if val is None else f'{val:.3f}'}, training {s['wall_seconds']:.0f} s",
              flush=True)
    print(f"> demo finished in {wall:.0f} s", flush=True)
    print(f"> loss plot: {plot}", flush=True)
    return 0
