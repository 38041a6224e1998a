"""`install()`: Megatron-LM's `--optimizer muon` builds muon-megatron's ZeRO-1 Muon.

Megatron-LM's `setup_model_and_optimizer` (megatron/training/training.py) builds the
optimizer through names it imported into `megatron.training.training`: `get_megatron_optimizer`
(every version) and, in the releases that ship megatron-core's own Muon (core_v0.15 /
core_v0.16), `get_megatron_muon_optimizer` for any `--optimizer` containing "muon".
`install()` rebinds both names there to a dispatcher: `--optimizer muon` goes to
`muon_megatron.get_muon_optimizer` (with the `--muon-*` flags as `MuonConfig`), everything
else (adam, sgd) to the original function, unchanged. It also rebinds, in the same module,
`training_log` (metrics, `metrics.py`), `load_checkpoint` (damaged checkpoints refused,
optimizer and EP switches, `checkpoints.py`), `clip_qk` and `train_step` (`--qk-clip`,
`qk_clip.py`), megatron-core's `Timers.log` / `write` (Muon's phase timers in
`--timing-log-level`'s output); and `dist_checkpointing.save` (each save records its CRC-32s).

`validate_args` rejects `--optimizer muon` with `--use-distributed-optimizer` (core_v0.19
turns the run into its layer-wise optimizer instead): statements about megatron-core's own
Muon. `install()` wraps `validate_args` where `initialize_megatron` looks it up so that, for
`--optimizer muon`, muon-megatron's checks run first (every `--muon-*` flag Megatron-LM
defines honoured or refused, the checkpoint format, the optimizer settings), then Megatron
validates the ZeRO-1 AdamW run it is underneath; its argument dump still prints `muon`.
`patches/` has a source patch for those who would rather patch Megatron-LM than wrap it; the
patched path calls `require_installed()`, so forgetting `install()` fails at validation.

Use from a Megatron-LM training script:

    from muon_megatron.megatron_lm.arguments import chain_extra_args_providers, muon_extra_args_provider
    from muon_megatron.megatron_lm import install

    install()
    pretrain(..., extra_args_provider=chain_extra_args_providers(muon_extra_args_provider,
                                                                 your_provider_or_None))

or without editing the script (the flags are added to Megatron-LM's parser for you):

    torchrun ... -m muon_megatron.megatron_lm pretrain_gpt.py --optimizer muon \
        --use-distributed-optimizer --muon-momentum 0.95 ...
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import runpy
import subprocess
import sys
import types
from collections.abc import Callable
from typing import Any

from muon_megatron.config import MuonConfig
from muon_megatron.config_flags import defaults_differing_from_megatron_lm, muon_config_from_args
from muon_megatron.megatron_lm.arguments import chain_extra_args_providers, muon_extra_args_provider

__all__ = ["install", "is_installed", "require_installed", "main", "MUON_OPTIMIZER_NAME"]

logger = logging.getLogger(__name__)

MUON_OPTIMIZER_NAME = "muon"
"""The `--optimizer` value that selects muon-megatron."""

_MARK = "__muon_megatron_hook__"
_BUILDER_NAMES = ("get_megatron_optimizer", "get_megatron_muon_optimizer")
# Keyword arguments Megatron-LM passes that get_muon_optimizer does not take, and why they
# can be dropped: the layer-wise optimizer of Megatron's own dist_muon (refused above when
# set). Everything else goes on to megatron-core's get_megatron_optimizer.
_DROPPED_KWARGS = ("layer_wise_distributed_optimizer",)
# The only checkpoint format whose optimizer path (sharded_state_dict) carries Muon momentum:
# 'torch' goes through save_parameter_state (a legacy file per DP group), the others are FSDP's.
_SUPPORTED_CKPT_FORMAT = "torch_dist"


def _import_megatron_lm() -> dict[str, types.ModuleType]:
    try:
        from megatron.core import dist_checkpointing, timers
        from megatron.training import arguments, global_vars, initialize, training
    except ImportError as exc:
        raise ImportError(
            "muon_megatron.megatron_lm needs Megatron-LM's `megatron.training` package "
            "(a Megatron-LM checkout on PYTHONPATH); megatron-core alone does not ship it."
        ) from exc
    return {"training": training, "initialize": initialize, "arguments": arguments,
            "global_vars": global_vars, "timers": timers, "dist_checkpointing": dist_checkpointing}


def is_installed() -> bool:
    """Whether `install()` has hooked Megatron-LM in this process."""
    training = sys.modules.get("megatron.training.training")
    return training is not None and getattr(training.get_megatron_optimizer, _MARK, False)


def require_installed() -> None:
    """Raise ValueError unless `install()` has run: what `patches/`'s patched validate_args
    calls for `--optimizer muon --use-distributed-optimizer`, so that forgetting `install()`
    fails at validation instead of reaching megatron-core's own Muon."""
    if not is_installed():
        raise ValueError(
            "--optimizer muon --use-distributed-optimizer is muon-megatron's ZeRO-1 Muon, but "
            "muon_megatron.megatron_lm.install() has not run in this process: call it before "
            "pretrain(...), or launch with `python -m muon_megatron.megatron_lm "
            "pretrain_gpt.py ...`."
        )


def install(*, add_args: bool = False, wrap_validate_args: bool = True) -> None:
    """Hook Megatron-LM so that `--optimizer muon` builds muon-megatron's optimizer.

    Idempotent. With `add_args=True` the `--muon-*` flags are also added to every parse of
    Megatron-LM's arguments (no `extra_args_provider` needed). `wrap_validate_args=False`
    leaves `validate_args` alone, for a Megatron-LM with `patches/`'s patch applied (our
    checks then run when the optimizer is built). Raises ImportError when Megatron-LM
    (`megatron.training`) is not importable.
    """
    from muon_megatron.megatron_lm import checkpoints, metrics, qk_clip

    modules = _import_megatron_lm()
    get_args = modules["global_vars"].get_args
    training = modules["training"]
    _install_into(
        training=training,
        validators=(modules["initialize"], modules["arguments"]) if wrap_validate_args else (),
        get_args=get_args,
        parsers=(modules["initialize"], modules["arguments"]) if add_args else (),
    )
    _rebind(training, "training_log", lambda f: metrics.logging_muon_metrics(f, get_args))
    _rebind(training, "load_checkpoint", lambda f: checkpoints.checking_before_load(f, get_args))
    _rebind(modules["dist_checkpointing"], "save", checkpoints.recording_checksums)
    _rebind(training, "clip_qk", qk_clip.clipping_with_muon)
    _rebind(training, "train_step", qk_clip.resetting_before_step)
    for name in ("log", "write"):  # Muon's phases in --timing-log-level's output
        _rebind(modules["timers"].Timers, name, metrics.logging_muon_timers)


def _install_into(
    *,
    training: Any,
    validators: tuple[Any, ...],
    get_args: Callable[[], argparse.Namespace],
    parsers: tuple[Any, ...] = (),
) -> None:
    """Rebind the builders in `training`, `validate_args` in each of `validators` and
    (optionally) `parse_args` in each of `parsers`. Split out of `install` so that the hooks
    are unit-tested without Megatron-LM."""
    for name in _BUILDER_NAMES:
        _rebind(training, name, lambda f: _dispatching_builder(f, get_args))
    for module in validators:
        _rebind(module, "validate_args", _validating)
    for module in parsers:
        _rebind(module, "parse_args", _parsing_with_muon_flags)


def _rebind(module: Any, name: str, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    original = getattr(module, name, None)
    if original is not None and not getattr(original, _MARK, False):
        setattr(module, name, _marked(wrap(original)))


def _marked(fn: Callable[..., Any]) -> Callable[..., Any]:
    setattr(fn, _MARK, True)
    return fn


def _dispatching_builder(
    original: Callable[..., Any], get_args: Callable[[], argparse.Namespace]
) -> Callable[..., Any]:
    @functools.wraps(original)
    def build(config: Any, model_chunks: list, *args: Any, **kwargs: Any) -> Any:
        if getattr(config, "optimizer", None) != MUON_OPTIMIZER_NAME:
            return original(config, model_chunks, *args, **kwargs)
        if args:
            raise TypeError(
                "muon-megatron's Megatron-LM hook expects keyword arguments after "
                f"(config, model_chunks); got {len(args)} positional ones. Use a Megatron-LM "
                "release that calls the optimizer builder with keywords (core_v0.14 or later)."
            )
        if kwargs.get("layer_wise_distributed_optimizer"):
            raise ValueError(
                "layer_wise_distributed_optimizer=True belongs to megatron-core's own Muon; "
                "use --optimizer muon --use-distributed-optimizer for muon-megatron."
            )
        from muon_megatron.megatron_lm import metrics, qk_clip
        from muon_megatron.optimizer.builder import get_muon_optimizer

        # Checked again here: with patches/ applied, validate_args is not wrapped.
        args = get_args()
        muon_config = _check_muon_run(args)
        known = {k: v for k, v in kwargs.items() if k not in _DROPPED_KWARGS}
        optimizer = get_muon_optimizer(config, model_chunks, muon_config, **known)
        metrics.print_plan_summary(optimizer)
        metrics.remember_optimizer(optimizer)
        qk_clip.build_for(args, model_chunks)
        return optimizer

    return build


def _muon_config_from(args: argparse.Namespace) -> MuonConfig:
    import dataclasses

    missing = [f.name for f in dataclasses.fields(MuonConfig) if not hasattr(args, f.name)]
    if missing:
        raise ValueError(
            f"Megatron-LM's arguments lack {missing}: pass "
            "extra_args_provider=muon_megatron.megatron_lm.arguments.muon_extra_args_provider to pretrain() "
            "or call muon_megatron.megatron_lm.install(add_args=True)."
        )
    return muon_config_from_args(args)


def _check_muon_run(args: argparse.Namespace) -> MuonConfig:
    """muon-megatron's checks of a `--optimizer muon` run, before Megatron's own; returns
    the run's MuonConfig."""
    from muon_megatron.optimizer.builder import check_supported

    if not getattr(args, "use_distributed_optimizer", False):
        raise ValueError(
            "--optimizer muon (muon-megatron) is a ZeRO-1 DistributedOptimizer: add "
            "--use-distributed-optimizer."
        )
    muon_config = _muon_config_from(args)
    check_supported(args)  # the OptimizerConfig fields it reads are Megatron-LM's arg names
    for flag in ("use_torch_fsdp2", "use_megatron_fsdp"):
        if getattr(args, flag, False):
            raise ValueError(
                f"--{flag.replace('_', '-')} with --optimizer muon: muon-megatron is a ZeRO-1 "
                "DistributedOptimizer; use --use-distributed-optimizer without FSDP."
            )
    _check_qk_clip(args)
    ckpt_format = getattr(args, "ckpt_format", _SUPPORTED_CKPT_FORMAT)
    if ckpt_format != _SUPPORTED_CKPT_FORMAT and (getattr(args, "save", None) or getattr(args, "load", None)):
        raise ValueError(
            f"--ckpt-format {ckpt_format} cannot hold Muon momentum: it saves the distributed "
            "optimizer outside dist_checkpointing's sharded state dict. Use --ckpt-format "
            "torch_dist (Megatron-LM's default; add --dist-ckpt-optim-fully-reshardable to "
            "change TP/PP/EP on resume)."
        )
    return muon_config


def _check_qk_clip(args: argparse.Namespace) -> None:
    """Megatron-LM's own --qk-clip checks, as errors (its validate_args asserts them only
    after asserting TE >= 2.9, which muon-megatron's QK-Clip needs only for TE attention)."""
    if getattr(args, "qk_clip", False):
        if not 0.0 < args.qk_clip_alpha < 1.0:
            raise ValueError(
                f"--qk-clip-alpha {args.qk_clip_alpha}: Megatron-LM takes a value strictly "
                "between 0 and 1 (the share of the clip on W_q; 0.5 splits it evenly)."
            )
        if not args.qk_clip_threshold > 0:
            raise ValueError(
                f"--qk-clip-threshold {args.qk_clip_threshold}: it must be > 0 (Kimi K2 and "
                "megatron-core use 100)."
            )


# Megatron-LM's validate_args asserts TE >= 2.9 for these; with the local attention
# muon-megatron's QK-Clip computes the max logits itself (qk_clip/clip.py).
_QK_CLIP_FLAGS = ("qk_clip", "log_max_attention_logit")


def _validating(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def validate_args(args: argparse.Namespace, *rest: Any, **kwargs: Any) -> Any:
        optimizer = getattr(args, "optimizer", None)
        if optimizer != MUON_OPTIMIZER_NAME:
            if optimizer and "muon" in optimizer and hasattr(args, "muon_matched_adamw_rms"):
                raise ValueError(
                    f"--optimizer {optimizer} is megatron-core's own Muon, but muon-megatron's "
                    "--muon-* flags have replaced Megatron-LM's here, so megatron-core's Muon "
                    "would not see them. Use --optimizer muon --use-distributed-optimizer for "
                    "muon-megatron, or launch without muon_megatron for megatron-core's Muon."
                )
            return original(args, *rest, **kwargs)
        _check_muon_run(args)
        # Megatron's Muon checks describe megatron-core's Muon, not this one: validate the run
        # as the ZeRO-1 AdamW run it is underneath, and restore the name for the argument
        # dump Megatron prints at the end of validation, and afterwards.
        hidden = _hidden_from_megatron(args)
        with _validated_as_adam(original, args, hidden):
            result = original(args, *rest, **kwargs)
        if result is not None and result is not args:
            for name in hidden:
                setattr(result, name, getattr(args, name))
        differing = defaults_differing_from_megatron_lm(args)
        if differing and getattr(args, "rank", 0) == 0:
            logger.warning(
                "muon-megatron: Muon defaults that differ from Megatron-LM's defaults for "
                "megatron-core's Muon: %s.",
                "; ".join(differing),
            )
        return result

    return validate_args


def _hidden_from_megatron(args: argparse.Namespace) -> dict[str, Any]:
    """What Megatron's validation sees instead of the user's values: the optimizer as
    'adam', and the QK-Clip flags off when the attention is the local one."""
    hidden: dict[str, Any] = {"optimizer": "adam"}
    if getattr(args, "transformer_impl", None) == "local":
        hidden.update({flag: False for flag in _QK_CLIP_FLAGS if getattr(args, flag, False)})
    return hidden


class _validated_as_adam:
    """Inside `validate`, the `hidden` values (`args.optimizer` reads 'adam', ...); the
    user's own in its `_print_args` (the argument dump) and after it."""

    def __init__(
        self, validate: Callable[..., Any], args: argparse.Namespace, hidden: dict[str, Any]
    ) -> None:
        self.namespace = getattr(validate, "__globals__", {})
        self.printer = self.namespace.get("_print_args")
        self.args, self.hidden = args, hidden
        self.shown = {name: getattr(args, name) for name in hidden}

    def _set(self, values: dict[str, Any]) -> None:
        for name, value in values.items():
            setattr(self.args, name, value)

    def __enter__(self) -> None:
        self._set(self.hidden)
        if self.printer is not None:
            printer, args = self.printer, self.args

            def print_args(title: str, namespace: Any, *rest: Any, **kwargs: Any) -> Any:
                if namespace is args:
                    self._set(self.shown)
                try:
                    return printer(title, namespace, *rest, **kwargs)
                finally:
                    if namespace is args:
                        self._set(self.hidden)

            self.namespace["_print_args"] = print_args

    def __exit__(self, *exc: object) -> None:
        self._set(self.shown)
        if self.printer is not None:
            self.namespace["_print_args"] = self.printer


def _parsing_with_muon_flags(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def parse_args(extra_args_provider: Any = None, *rest: Any, **kwargs: Any) -> Any:
        provider = chain_extra_args_providers(muon_extra_args_provider, extra_args_provider)
        return original(provider, *rest, **kwargs)

    return parse_args


def _install_cpu_stand_ins_without_cuda() -> None:
    """On a machine without CUDA (CI, a laptop), Megatron-LM's training package needs CPU
    stand-ins (`muon_megatron.runtime.megatron_lm_shims`); a GPU run never loads them."""
    import torch

    if torch.cuda.is_available():
        return
    from muon_megatron.runtime.megatron_lm_shims import install_megatron_lm_cpu_shims

    install_megatron_lm_cpu_shims()


def main(argv: list[str] | None = None) -> None:
    """`python -m muon_megatron.megatron_lm SCRIPT.py [args]`: install, then run SCRIPT."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--plan":
        # The plan of the same launch line: the script is named, its flags are planned (by
        # `muon_megatron.planner`, a layer above this one, in its own process).
        rest = argv[1:]
        if rest and rest[0].endswith(".py"):
            rest = rest[1:]
        prog = "--prog=python -m muon_megatron.megatron_lm --plan"
        command = [sys.executable, "-m", "muon_megatron.planner", prog, *rest]
        raise SystemExit(subprocess.run(command).returncode)
    if not argv or not argv[0].endswith(".py"):
        raise SystemExit(
            "usage: python -m muon_megatron.megatron_lm [--plan] pretrain_gpt.py [args...]"
        )
    # As `python SCRIPT.py` would: the script's directory (the Megatron-LM checkout) first.
    sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
    _install_cpu_stand_ins_without_cuda()
    install(add_args=True)
    sys.argv = argv
    runpy.run_path(argv[0], run_name="__main__")
