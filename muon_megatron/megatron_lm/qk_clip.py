"""QK-Clip (MuonClip) in Megatron-LM's own training loop, for `--optimizer muon`.

Megatron-LM's `train_step` calls `clip_qk(model, log_max_only=not args.qk_clip)` right after
`optimizer.step()` when `--qk-clip` or `--log-max-attention-logit` is set, and logs what it
returns as `max_attention_logit`. megatron-core's `clip_qk` reads only Transformer Engine's
max logits and rescales only the model params: under the ZeRO-1 distributed optimizer with
bf16 params, the next step's main -> model copy undoes the clip.

`install()` (hooks.py) rebinds two names in `megatron.training.training`:

- `clip_qk`: for a run whose optimizer muon-megatron built, muon-megatron's
  `qk_clip.clip.QKClip.apply(optimizer)` (local attention on any machine, TE's on a
  GPU; the model params and the optimizer's fp32 main shards rescaled) instead of
  megatron-core's; it returns the same figure, the max logit before the clip, model-wide.
  Any other run gets megatron-core's `clip_qk`, unchanged.
- `train_step`: forgets the max logits recorded since the last step (evaluation's forwards)
  before the step's own forwards, so that the clip sees exactly the step's micro-batches.

The `QKClip` is built, hooks included, when the optimizer is (`build_for`), on the model
chunks Megatron-LM passes to the optimizer builder: before the first forward.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from typing import Any

__all__ = ["build_for", "clipping_with_muon", "current", "resetting_before_step"]

_clip: list[Any] = []


def build_for(args: argparse.Namespace, model_chunks: list) -> None:
    """Record max logits on `model_chunks` for this muon-megatron run when its flags ask for
    QK-Clip or for the max logit alone; forget any earlier run's."""
    from muon_megatron.qk_clip.clip import qk_clip_from_args

    for old in _clip:
        old.remove()
    _clip[:] = []
    clip = qk_clip_from_args(args, model_chunks) if hasattr(args, "qk_clip") else None
    if clip is not None:
        _clip.append(clip)


def current() -> Any | None:
    """The QKClip of this process's muon-megatron run, or None."""
    return _clip[0] if _clip else None


def clipping_with_muon(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def clip_qk(model: list, log_max_only: bool = False) -> float:
        from muon_megatron.megatron_lm import metrics

        clip, optimizer = current(), metrics.built_optimizer()
        if clip is None or optimizer is None:
            return original(model, log_max_only=log_max_only)
        if clip.clip == log_max_only:
            raise RuntimeError(
                f"Megatron-LM asked clip_qk for log_max_only={log_max_only}, but muon-megatron's "
                f"QK-Clip was built with clip={clip.clip} from the same --qk-clip flag"
            )
        return clip.apply(optimizer).max_attention_logit

    return clip_qk


def resetting_before_step(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def train_step(*args: Any, **kwargs: Any) -> Any:
        clip = current()
        if clip is not None:
            clip.reset()
        return original(*args, **kwargs)

    return train_step
