"""Convergence parity: Muon vs AdamW on the training example, several seeds, one plot.

Both optimizers train the same tiny MoE (megatron-core GPTModel, byte-level Python stdlib
text, `muon_megatron.training.entry`) from the same initial weights on the same batches (one
`--seed` per pair drives both), with Moonlight's recipe: the *same* lr, schedule and weight
decay for Muon and AdamW, Muon's update RMS matched to AdamW's (0.2 sqrt(max(A, B))). The
AdamW hyper-parameters (beta2 0.95, wd 0.1) are Moonlight's pretraining ones; the lr is the
demo's and was not tuned for either optimizer.

Reported (and written to `<out>/convergence.json`, plot `<out>/convergence.png`):

* steps-to-AdamW's-final-loss ratio: the first iteration at which Muon's smoothed training
  loss (trailing mean over `--smooth` iterations) is <= AdamW's smoothed loss at its last
  iteration, divided by AdamW's number of iterations; per seed and on the seed-mean curves.
  The same on the validation loss (held-out files, every `--eval-interval` iterations).
* final smoothed training loss and final validation loss, mean +- std over seeds.

    python benchmarks/convergence.py                     # ~20 min on 2 CPU cores
    python benchmarks/convergence.py --train-iters 300 --seeds 1   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from muon_megatron.training.demo import DEMO_MODEL_FLAGS
from muon_megatron.training.entry import trailing_mean

__all__ = [
    "MODEL_FLAGS",
    "RECIPE_FLAGS",
    "training_flags",
    "run_pair",
    "trailing_mean",
    "steps_to_reach",
    "summarize",
    "main",
]

# The demo's MoE, on one process (the optimizers' arithmetic does not depend on the layout:
# tests/functional/test_muon_parity.py), so that the CPU time goes into steps.
MODEL_FLAGS: tuple[str, ...] = (
    "--world-size", "1",
    *DEMO_MODEL_FLAGS,
    "--micro-batch-size", "16",
    "--global-batch-size", "16",
)
# Moonlight's recipe: one lr / wd / schedule for both optimizers.
RECIPE_FLAGS: tuple[str, ...] = (
    "--lr", "3e-3", "--min-lr", "3e-4", "--lr-decay-style", "cosine",
    "--weight-decay", "0.1", "--adam-beta1", "0.9", "--adam-beta2", "0.95",
    "--clip-grad", "1.0",
)
OPTIMIZERS = ("muon", "adam")


def training_flags(
    optimizer: str, seed: int, train_iters: int, eval_interval: int, eval_iters: int,
    output_dir: str,
) -> list[str]:
    """The training entry's flags for one run."""
    return [
        *MODEL_FLAGS, *RECIPE_FLAGS,
        "--optimizer", optimizer,
        "--seed", str(seed),
        "--train-iters", str(train_iters),
        "--lr-warmup-iters", str(max(1, train_iters // 10)),
        "--log-interval", str(max(1, train_iters // 10)),
        "--eval-interval", str(eval_interval),
        "--eval-iters", str(eval_iters),
        "--output-dir", output_dir,
    ]


def _run_all(jobs: list[tuple[str, int, list[str], str]], parallel: int) -> None:
    """Run each (optimizer, seed, flags, log path) as `python -m muon_megatron.training.entry`,
    at most `parallel` at once (each is one single-threaded process)."""
    pending, running = list(jobs), []
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    while pending or running:
        while pending and len(running) < parallel:
            optimizer, seed, flags, log_path = pending.pop(0)
            log = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 (closed below)
            proc = subprocess.Popen([sys.executable, "-m", "muon_megatron.training.entry", *flags],
                                    stdout=log, stderr=subprocess.STDOUT, env=env)
            running.append((proc, log, optimizer, seed, log_path))
            print(f"> convergence: started {optimizer} seed {seed} (log {log_path})", flush=True)
        time.sleep(0.5)
        for item in list(running):
            proc, log, optimizer, seed, log_path = item
            if proc.poll() is None:
                continue
            log.close()
            running.remove(item)
            if proc.returncode != 0:
                with open(log_path, encoding="utf-8") as fh:
                    tail = fh.read()[-3000:]
                raise RuntimeError(f"{optimizer} seed {seed} failed ({proc.returncode}):\n{tail}")
            print(f"> convergence: finished {optimizer} seed {seed}", flush=True)


def run_pair(
    seeds: Sequence[int], train_iters: int, output_dir: str, *, eval_interval: int = 0,
    eval_iters: int = 8, parallel: int = 2,
) -> dict[str, dict[int, dict[str, Any]]]:
    """Train Muon and AdamW for every seed; returns {optimizer: {seed: training log}}."""
    jobs = []
    for seed in seeds:
        for optimizer in OPTIMIZERS:
            out = os.path.join(output_dir, f"seed{seed}")
            os.makedirs(out, exist_ok=True)
            flags = training_flags(optimizer, seed, train_iters, eval_interval, eval_iters, out)
            jobs.append((optimizer, seed, flags, os.path.join(out, f"{optimizer}.log")))
    _run_all(jobs, parallel)
    logs: dict[str, dict[int, dict[str, Any]]] = {o: {} for o in OPTIMIZERS}
    for seed in seeds:
        for optimizer in OPTIMIZERS:
            path = os.path.join(output_dir, f"seed{seed}", f"{optimizer}.json")
            with open(path, encoding="utf-8") as fh:
                logs[optimizer][seed] = json.load(fh)
    return logs


def steps_to_reach(iterations: Sequence[int], curve: Sequence[float], target: float) -> int | None:
    """First iteration at which `curve` <= `target`; None if it never does."""
    for it, value in zip(iterations, curve):
        if value <= target:
            return it
    return None


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": list(values),
    }


def _curves(log: dict[str, Any], smooth: int) -> dict[str, list]:
    its = [r["iteration"] for r in log["iterations"]]
    train = trailing_mean([r["loss"] for r in log["iterations"]], smooth)
    val_its = [v["iteration"] for v in log["validation"]]
    val = [v["loss"] for v in log["validation"]]
    return {"its": its, "train": train, "val_its": val_its, "val": val}


def _ratio(step: int | None, total: int) -> float | None:
    return None if step is None else step / total


def summarize(logs: dict[str, dict[int, dict[str, Any]]], smooth: int) -> dict[str, Any]:
    """Steps-to-AdamW's-final-loss ratios and final losses (see the module docstring)."""
    seeds = sorted(logs["adam"])
    per_seed, curves = {}, {o: {s: _curves(logs[o][s], smooth) for s in seeds} for o in logs}
    for s in seeds:
        mu, ad = curves["muon"][s], curves["adam"][s]
        total = ad["its"][-1]
        row = {
            "adam_final_train": ad["train"][-1],
            "muon_final_train": mu["train"][-1],
            "muon_steps_to_adam_final_train": steps_to_reach(mu["its"], mu["train"],
                                                             ad["train"][-1]),
        }
        row["ratio_train"] = _ratio(row["muon_steps_to_adam_final_train"], total)
        if ad["val"] and mu["val"]:
            row["adam_final_val"], row["muon_final_val"] = ad["val"][-1], mu["val"][-1]
            step = steps_to_reach(mu["val_its"], mu["val"], ad["val"][-1])
            row["muon_steps_to_adam_final_val"] = step
            row["ratio_val"] = _ratio(step, total)
        per_seed[s] = row
    # The same on the seed-mean curves.
    mean = {
        o: {k: [statistics.fmean(c[s][k][i] for s in seeds) for i in range(len(c[seeds[0]][k]))]
            for k in ("train", "val")}
        for o, c in curves.items()
    }
    its, val_its = curves["adam"][seeds[0]]["its"], curves["adam"][seeds[0]]["val_its"]
    total = its[-1]
    out: dict[str, Any] = {
        "seeds": seeds,
        "train_iters": total,
        "smooth_window": smooth,
        "per_seed": per_seed,
        "mean_curve_ratio_train": _ratio(
            steps_to_reach(its, mean["muon"]["train"], mean["adam"]["train"][-1]), total),
        "final_train": {o: _mean_std([per_seed[s][f"{o}_final_train"] for s in seeds])
                        for o in ("muon", "adam")},
    }
    ratios = [per_seed[s]["ratio_train"] for s in seeds]
    out["ratio_train"] = _mean_std(ratios) if None not in ratios else {"values": ratios}
    if val_its:
        out["mean_curve_ratio_val"] = _ratio(
            steps_to_reach(val_its, mean["muon"]["val"], mean["adam"]["val"][-1]), total)
        out["final_val"] = {o: _mean_std([per_seed[s][f"{o}_final_val"] for s in seeds])
                            for o in ("muon", "adam")}
        ratios = [per_seed[s]["ratio_val"] for s in seeds]
        out["ratio_val"] = _mean_std(ratios) if None not in ratios else {"values": ratios}
    out["_curves"] = {"its": its, "val_its": val_its, "per_seed": curves}
    return out


def plot(summary: dict[str, Any], path: str, title: str) -> str | None:
    """Seed-mean smoothed training loss with a min-max band, and validation loss."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("> matplotlib is not installed (pip install 'muon-megatron[plot]'): no plot")
        return None
    curves = summary["_curves"]
    seeds = summary["seeds"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for optimizer, color in (("adam", "C1"), ("muon", "C0")):
        for ax, key, its in ((axes[0], "train", curves["its"]), (axes[1], "val", curves["val_its"])):
            if not its:
                continue
            rows = [curves["per_seed"][optimizer][s][key] for s in seeds]
            cols = list(zip(*rows))
            mean = [statistics.fmean(c) for c in cols]
            std = [statistics.stdev(c) if len(c) > 1 else 0.0 for c in cols]
            ax.plot(its, mean, color=color, label=f"{optimizer} (mean of {len(seeds)} seeds)")
            ax.fill_between(its, [m - s for m, s in zip(mean, std)],
                            [m + s for m, s in zip(mean, std)], color=color, alpha=0.25,
                            label=f"{optimizer} ± 1 std")
    axes[0].axhline(summary["final_train"]["adam"]["mean"], color="C1", ls=":", lw=0.8)
    axes[0].set_title(f"training loss (trailing mean of {summary['smooth_window']} iterations)")
    axes[1].set_title("validation loss (held-out stdlib files)")
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.set_ylabel("loss (nats / byte)")
        ax.grid(alpha=0.3)
        ax.legend()
    lo = min(summary["final_train"][o]["mean"] for o in ("muon", "adam"))
    axes[0].set_ylim(lo - 0.15, lo + 1.2)
    if curves["val_its"]:
        lo = min(summary["final_val"][o]["mean"] for o in ("muon", "adam"))
        axes[1].set_ylim(lo - 0.15, lo + 1.2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _fmt(stats: dict[str, Any]) -> str:
    if "mean" not in stats:
        return "not reached in every seed: " + ", ".join(
            "-" if v is None else f"{v:.3f}" for v in stats["values"])
    return f"{stats['mean']:.3f} +- {stats['std']:.3f}"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3, help="Seeds 1..N.")
    p.add_argument("--train-iters", type=int, default=2000)
    p.add_argument("--eval-interval", type=int, default=100)
    p.add_argument("--eval-iters", type=int, default=8)
    p.add_argument("--smooth", type=int, default=50, help="Trailing-mean window (iterations).")
    p.add_argument("--parallel", type=int, default=2, help="Runs at once (one core each).")
    p.add_argument("--out", default=os.path.join("outputs", "convergence"))
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    seeds = list(range(1, args.seeds + 1))
    logs = run_pair(seeds, args.train_iters, args.out, eval_interval=args.eval_interval,
                    eval_iters=args.eval_iters, parallel=args.parallel)
    summary = summarize(logs, args.smooth)
    summary["wall_seconds"] = time.perf_counter() - t0
    summary["flags"] = {"model": list(MODEL_FLAGS), "recipe": list(RECIPE_FLAGS)}
    png = plot(summary, os.path.join(args.out, "convergence.png"),
               f"tiny MoE (4 experts top-2, hidden 64) on byte-level stdlib text, "
               f"{args.train_iters} iterations, lr 3e-3 cosine, wd 0.1, same for both")
    curves = summary.pop("_curves")
    summary["png"] = png
    with open(os.path.join(args.out, "convergence.json"), "w", encoding="utf-8") as fh:
        json.dump({**summary, "curves": curves}, fh, indent=1)
    print(f"> seeds {seeds}, {args.train_iters} iterations each, "
          f"{summary['wall_seconds']:.0f} s")
    for s, row in summary["per_seed"].items():
        print(f">   seed {s}: final train (smoothed) muon {row['muon_final_train']:.4f} "
              f"adam {row['adam_final_train']:.4f}; muon reaches adam's final at "
              f"{row['muon_steps_to_adam_final_train']} -> ratio {row['ratio_train']}")
    for key in ("final_train", "final_val"):
        if key in summary:
            print(f"> {key}: " + ", ".join(f"{o} {_fmt(summary[key][o])}" for o in ("muon", "adam")))
    print(f"> steps-to-AdamW-final ratio (train, per seed): {_fmt(summary['ratio_train'])}; "
          f"on seed-mean curves {summary['mean_curve_ratio_train']}")
    if "ratio_val" in summary:
        print(f"> steps-to-AdamW-final ratio (validation, per seed): "
              f"{_fmt(summary['ratio_val'])}; on seed-mean curves "
              f"{summary['mean_curve_ratio_val']}")
    print(f"> plot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
