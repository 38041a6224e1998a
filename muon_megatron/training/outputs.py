"""What a training run leaves behind: its JSON log and its loss curve.

`write_outputs` writes `<output-dir>/<optimizer>.json` (every iteration's record, the
validation losses, the data and the arguments) and `<output-dir>/loss_<optimizer>.png`;
`plot_losses` draws one or more runs (matplotlib, optional: without it no plot is drawn and
the run says so).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from typing import Any

__all__ = ["write_outputs", "plot_losses", "trailing_mean"]



def write_outputs(args: argparse.Namespace, log: dict[str, Any]) -> dict[str, Any]:
    """Write `<optimizer>.json` and `loss_<optimizer>.png` under `args.output_dir`."""
    out = os.path.abspath(args.output_dir)
    os.makedirs(out, exist_ok=True)
    losses = [r["loss"] for r in log["iterations"]]
    k = max(1, min(10, len(losses) // 5))
    log["summary"] = {
        "first_loss": losses[0],
        "final_loss": losses[-1],
        f"mean_first_{k}": sum(losses[:k]) / k,
        f"mean_last_{k}": sum(losses[-k:]) / k,
        "final_validation_loss": log["validation"][-1]["loss"] if log["validation"] else None,
        "wall_seconds": log["wall_seconds"],
    }
    json_path = os.path.join(out, f"{args.optimizer}.json")
    with open(json_path, "w", encoding="utf-8") as fh:
        json.dump(log, fh, indent=1)
    png_path = plot_losses({args.optimizer: log}, os.path.join(out, f"loss_{args.optimizer}.png"),
                           title=log["data"]["title"], ylabel=f"loss (nats / {log['data']['unit']})")
    print(f"> training log: {json_path}", flush=True)
    if png_path is not None:
        print(f"> loss curve: {png_path}", flush=True)
    return {
        **log["summary"],
        "json": json_path,
        "png": png_path,
        "mean_first": log["summary"][f"mean_first_{k}"],
        "mean_last": log["summary"][f"mean_last_{k}"],
    }


def plot_losses(logs: dict[str, dict[str, Any]], path: str,
                title: str = "byte-level LM on Python stdlib sources",
                ylabel: str = "loss (nats / byte)") -> str | None:
    """Plot training (and validation) loss of each run in `logs`; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("> matplotlib is not installed (pip install 'muon-megatron[plot]'): no plot",
              flush=True)
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (label, log), color in zip(logs.items(), ("C0", "C1", "C2", "C3")):
        its = [r["iteration"] for r in log["iterations"]]
        ax.plot(its, [r["loss"] for r in log["iterations"]], color=color, alpha=0.35, lw=0.8)
        ax.plot(its, trailing_mean([r["loss"] for r in log["iterations"]]), color=color,
                label=f"{label} train (smoothed)")
        if log["validation"]:
            ax.plot([v["iteration"] for v in log["validation"]],
                    [v["loss"] for v in log["validation"]], "o--", color=color, ms=4,
                    label=f"{label} validation")
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def trailing_mean(values: Sequence[float], window: int = 10) -> list[float]:
    """Mean of the last `window` values at every position (fewer at the start)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out

