"""Muon's metrics in Megatron-LM's own log: the log line, TensorBoard and wandb.

`install()` wraps `megatron.training.training.training_log`. At every `--log-interval`
iteration, after Megatron's own line, the rank that prints it (the last one: it holds the
TensorBoard and wandb writers) prints

    [muon] iteration       10 | update rms: 0.1987 | ns time (s): 0.0123 | skipped steps: 0

(with `--qk-clip` or `--log-max-attention-logit`, also `| max attention logit: 12.34`, the
step's max before the clip, model-wide, and with `--qk-clip` `| qk-clipped heads: 0`:
`qk_clip.py`) and writes every `builder.muon_metrics` value under its name
(`muon/update_rms`, ...) to TensorBoard (`add_scalar`) and wandb (`log`), at the same step
as Megatron's own scalars. The figures are the last step's, of the optimizer this process
built: with pipeline parallelism, the last stage's matrices. Nothing here communicates, so
logging can never make ranks wait on each other.
"""

from __future__ import annotations

import argparse
import functools
import weakref
from collections.abc import Callable
from typing import Any

from muon_megatron.optimizer.timing import with_muon_timers

__all__ = [
    "built_optimizer",
    "format_muon_log_line",
    "logging_muon_metrics",
    "logging_muon_timers",
    "print_plan_summary",
    "remember_optimizer",
]

_built: list[weakref.ref] = []


def remember_optimizer(optimizer: Any) -> None:
    """Record the optimizer the Megatron-LM hook built, for `training_log` to report on."""
    _built[:] = [weakref.ref(optimizer)]


def print_plan_summary(optimizer: Any) -> None:
    """`muon-megatron plan`'s lines for this rank's stage (`costmodel.startup`), printed by
    rank 0 when the hook has built the optimizer."""
    import torch.distributed as dist

    from muon_megatron.costmodel.startup import plan_summary

    if dist.is_initialized() and dist.get_rank() == 0:
        for line in plan_summary(optimizer):
            print(line, flush=True)


def built_optimizer() -> Any | None:
    """The optimizer the hook built in this process, while it lives."""
    return _built[0]() if _built else None


def format_muon_log_line(iteration: int, metrics: dict[str, float]) -> str:
    rms = metrics.get("muon/update_rms")
    parts = [
        f" [muon] iteration {iteration:8d}",
        f"update rms: {'-' if rms is None else f'{rms:.4f}'}",
        f"ns time (s): {metrics.get('muon/ns_seconds', 0.0):.4f}",
        f"skipped steps: {int(metrics.get('muon/skipped_steps', 0))}",
    ]
    if "muon/max_attention_logit" in metrics:
        parts.append(f"max attention logit: {metrics['muon/max_attention_logit']:.6g}")
    if "muon/qk_clipped_heads" in metrics:
        parts.append(f"qk-clipped heads: {int(metrics['muon/qk_clipped_heads'])}")
    return " | ".join(parts)


def logging_muon_metrics(
    original: Callable[..., Any], get_args: Callable[[], argparse.Namespace]
) -> Callable[..., Any]:
    @functools.wraps(original)
    def training_log(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        iteration = kwargs["iteration"] if "iteration" in kwargs else args[3]
        interval = getattr(get_args(), "log_interval", 0)
        optimizer = built_optimizer()
        if optimizer is not None and interval and iteration % interval == 0:
            _report(int(iteration), optimizer)
        return result

    return training_log


def _report(iteration: int, optimizer: Any) -> None:
    import torch
    from megatron.training import global_vars

    from muon_megatron.megatron_lm import qk_clip
    from muon_megatron.optimizer.builder import muon_metrics

    metrics = muon_metrics(optimizer)
    clip = qk_clip.current()
    if metrics and clip is not None and clip.last_stats is not None:
        metrics["muon/max_attention_logit"] = clip.last_stats.max_attention_logit
        if clip.clip:
            metrics["muon/qk_clipped_heads"] = float(clip.last_stats.clipped_heads)
    if not metrics:
        return
    last = torch.distributed.get_rank() == torch.distributed.get_world_size() - 1
    if not last:
        return
    print(format_muon_log_line(iteration, metrics), flush=True)
    writer = global_vars.get_tensorboard_writer()
    if writer is not None:
        for name, value in metrics.items():
            writer.add_scalar(name, value, iteration)
    wandb_writer = global_vars.get_wandb_writer()
    if wandb_writer is not None:
        wandb_writer.log(metrics, iteration)


def logging_muon_timers(original: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap megatron-core's `Timers.log` / `Timers.write` (first argument: the names) so
    that the training log's list also names Muon's timers of the run's
    `--timing-log-level` (`optimizer.timing.with_muon_timers`)."""

    @functools.wraps(original)
    def logging(self: Any, names: Any, *args: Any, **kwargs: Any) -> Any:
        return original(self, with_muon_timers(names, self._log_level), *args, **kwargs)

    return logging
