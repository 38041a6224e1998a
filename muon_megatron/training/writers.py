"""TensorBoard and wandb output of the training entry, with Megatron-LM's flags and names.

Flags (Megatron-LM's spelling and defaults): `--tensorboard-dir`, `--tensorboard-log-interval`
(1), `--tensorboard-queue-size` (1000), `--wandb-project`, `--wandb-exp-name` (required with
a project, as Megatron-LM requires it), `--wandb-save-dir` (default `<--save>/wandb`),
`--wandb-entity`. Scalars at every `--tensorboard-log-interval` iteration, under Megatron-LM's
`training_log` names: `lm loss`, `learning-rate`, `batch-size`, `grad-norm`,
`iteration-time`, `throughput` (tokens per second: this entry has no FLOP count), and
muon-megatron's `muon/update_rms`; at each evaluation `lm loss validation` and
`lm loss validation ppl`. Both go to TensorBoard (`add_scalar`) and wandb (`log`, step =
iteration).

Neither package is a dependency. As in Megatron-LM, TensorBoard is used when
`torch.utils.tensorboard` imports and otherwise the run goes on after one printed warning;
`--wandb-project` without `wandb` installed is refused at validation, with the fix. The
writers live on rank 0, the rank that prints the log (every rank holds the same loss here).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
from collections.abc import Mapping
from typing import Any

__all__ = ["add_writer_args", "writer_errors", "Writers"]


def add_writer_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("logging (TensorBoard / wandb)")
    g.add_argument("--tensorboard-dir", default=None,
                   help="Write TensorBoard scalars here (needs the tensorboard package).")
    g.add_argument("--tensorboard-log-interval", type=int, default=1)
    g.add_argument("--tensorboard-queue-size", type=int, default=1000)
    g.add_argument("--wandb-project", default="", help="Also log to this wandb project.")
    g.add_argument("--wandb-exp-name", default="")
    g.add_argument("--wandb-save-dir", default="")
    g.add_argument("--wandb-entity", default="")


def writer_errors(args: argparse.Namespace) -> list[str]:
    """What `validate_args` reports about the writer flags."""
    errors = []
    if args.tensorboard_log_interval < 1:
        errors.append(f"--tensorboard-log-interval {args.tensorboard_log_interval} must be >= 1")
    if args.wandb_project:
        if not args.wandb_exp_name:
            errors.append(f"--wandb-project {args.wandb_project} needs --wandb-exp-name "
                          "(Megatron-LM requires it too)")
        if not (args.wandb_save_dir or args.save):
            errors.append("--wandb-project needs --wandb-save-dir or --save (wandb's files "
                          "go to <--save>/wandb by default)")
        if importlib.util.find_spec("wandb") is None:
            errors.append(f"--wandb-project {args.wandb_project}: wandb is not installed; "
                          "pip install wandb, or drop --wandb-project")
    return errors


class Writers:
    """The run's TensorBoard writer and wandb run (either may be absent).

    `tensorboard` / `wandb` replace `torch.utils.tensorboard.SummaryWriter` / the `wandb`
    module: the constructor is called as Megatron-LM calls it."""

    def __init__(self, args: argparse.Namespace, tensorboard: Any = None, wandb: Any = None):
        self.interval = args.tensorboard_log_interval
        self.tensorboard = None
        self.wandb = None
        if args.tensorboard_dir:
            if tensorboard is None:
                try:
                    from torch.utils.tensorboard import SummaryWriter as tensorboard
                except ImportError:
                    print("WARNING: --tensorboard-dir is set but TensorBoard is not installed "
                          "(pip install tensorboard); no TensorBoard logs will be written.",
                          flush=True)
            if tensorboard is not None:
                self.tensorboard = tensorboard(log_dir=args.tensorboard_dir,
                                               max_queue=args.tensorboard_queue_size)
        if args.wandb_project:
            if wandb is None:
                import wandb
            save_dir = args.wandb_save_dir or os.path.join(args.save, "wandb")
            os.makedirs(save_dir, exist_ok=True)
            kwargs = {"dir": save_dir, "name": args.wandb_exp_name,
                      "project": args.wandb_project, "config": vars(args)}
            if args.wandb_entity:
                kwargs["entity"] = args.wandb_entity
            wandb.init(**kwargs)
            self.wandb = wandb

    def _write(self, values: Mapping[str, float | None], iteration: int) -> None:
        values = {k: float(v) for k, v in values.items() if v is not None}
        if self.tensorboard is not None:
            for name, value in values.items():
                self.tensorboard.add_scalar(name, value, iteration)
        if self.wandb is not None:
            self.wandb.log(values, step=iteration)

    def training(self, record: Mapping[str, Any], batch_size: int) -> None:
        """One iteration's record (the entry's JSON log entry), at the log interval."""
        if record["iteration"] % self.interval:
            return
        self._write({"lm loss": record["loss"], "learning-rate": record["lr"],
                     "batch-size": batch_size, "grad-norm": record["grad_norm"],
                     "iteration-time": record["seconds"], "throughput": record["tokens_per_s"],
                     "muon/update_rms": record["update_rms"]}, record["iteration"])

    def validation(self, loss: float, iteration: int) -> None:
        self._write({"lm loss validation": loss,
                     "lm loss validation ppl": math.exp(min(20.0, loss))}, iteration)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
