"""Megatron-LM integration: `--optimizer muon` builds muon-megatron's ZeRO-1 Muon.

Megatron-LM's `setup_model_and_optimizer` (megatron/training/training.py) builds the
optimizer through names it imported into `megatron.training.training`: `get_megatron_optimizer`
(every version) and, in the releases that ship megatron-core's own Muon (core_v0.15 /
core_v0.16), `get_megatron_muon_optimizer` for any `--optimizer` containing "muon".
`install()` rebinds both names there to a dispatcher: `--optimizer muon` goes to
`muon_megatron.get_muon_optimizer` (with the `--muon-*` flags as `MuonConfig`), everything
else (adam, sgd, Megatron's own `dist_muon`) to the original function, unchanged.

`validate_args` rejects `--optimizer muon` together with `--use-distributed-optimizer`
("Muon optimizer does not support distributed optimizer for now") -- a statement about
megatron-core's own Muon. `install()` wraps `validate_args` where `initialize_megatron`
looks it up so that, for `--optimizer muon`, Megatron validates the run exactly as the
ZeRO-1 AdamW run it is underneath (muon-megatron's own checks run when the optimizer is
built: `builder.check_supported`). `patches/` has the same change as a source patch for
those who would rather patch Megatron-LM than wrap it.

Use from a Megatron-LM training script:

    from muon_megatron.arguments import chain_extra_args_providers, muon_extra_args_provider
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
import os
import runpy
import sys
import types
from collections.abc import Callable
from typing import Any

from muon_megatron.arguments import chain_extra_args_providers, muon_extra_args_provider
from muon_megatron.config import MuonConfig

__all__ = ["install", "is_installed", "MUON_OPTIMIZER_NAME"]

MUON_OPTIMIZER_NAME = "muon"
"""The `--optimizer` value that selects muon-megatron (Megatron-LM's `dist_muon` stays theirs)."""

_MARK = "__muon_megatron_hook__"
_BUILDER_NAMES = ("get_megatron_optimizer", "get_megatron_muon_optimizer")
# Keyword arguments Megatron-LM passes that get_muon_optimizer does not take, and why they
# can be dropped: a debugging dump, and the layer-wise optimizer of Megatron's own dist_muon.
_DROPPED_KWARGS = ("dump_param_to_param_group_map", "layer_wise_distributed_optimizer")


def _import_megatron_lm() -> dict[str, types.ModuleType]:
    try:
        from megatron.training import arguments, global_vars, initialize, training
    except ImportError as exc:
        raise ImportError(
            "muon_megatron.megatron_lm needs Megatron-LM's `megatron.training` package "
            "(a Megatron-LM checkout on PYTHONPATH); megatron-core alone does not ship it."
        ) from exc
    return {
        "training": training,
        "initialize": initialize,
        "arguments": arguments,
        "global_vars": global_vars,
    }


def is_installed() -> bool:
    """Whether `install()` has hooked Megatron-LM in this process."""
    training = sys.modules.get("megatron.training.training")
    return training is not None and getattr(training.get_megatron_optimizer, _MARK, False)


def install(*, add_args: bool = False, wrap_validate_args: bool = True) -> None:
    """Hook Megatron-LM so that `--optimizer muon` builds muon-megatron's optimizer.

    Idempotent. With `add_args=True` the `--muon-*` flags are also added to every parse of
    Megatron-LM's arguments (no `extra_args_provider` needed). `wrap_validate_args=False`
    leaves `validate_args` alone, for a Megatron-LM with `patches/`'s patch applied. Raises
    ImportError when Megatron-LM (`megatron.training`) is not importable.
    """
    modules = _import_megatron_lm()
    _install_into(
        training=modules["training"],
        validators=(modules["initialize"], modules["arguments"]) if wrap_validate_args else (),
        get_args=modules["global_vars"].get_args,
        parsers=(modules["initialize"], modules["arguments"]) if add_args else (),
    )


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
        original = getattr(training, name, None)
        if original is not None and not getattr(original, _MARK, False):
            setattr(training, name, _dispatching_builder(original, get_args))
    for module in validators:
        original = getattr(module, "validate_args", None)
        if original is not None and not getattr(original, _MARK, False):
            module.validate_args = _validating(original)
    for module in parsers:
        original = getattr(module, "parse_args", None)
        if original is not None and not getattr(original, _MARK, False):
            module.parse_args = _parsing_with_muon_flags(original)


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
                "layer_wise_distributed_optimizer=True belongs to Megatron's own 'dist_muon'; "
                "use --optimizer muon --use-distributed-optimizer for muon-megatron."
            )
        from muon_megatron.builder import get_muon_optimizer

        muon_config = _muon_config_from(get_args())
        known = {k: v for k, v in kwargs.items() if k not in _DROPPED_KWARGS}
        return get_muon_optimizer(config, model_chunks, muon_config, **known)

    return _marked(build)


def _muon_config_from(args: argparse.Namespace) -> MuonConfig:
    import dataclasses

    missing = [f.name for f in dataclasses.fields(MuonConfig) if not hasattr(args, f.name)]
    if missing:
        raise ValueError(
            f"Megatron-LM's arguments lack {missing}: pass "
            "extra_args_provider=muon_megatron.arguments.muon_extra_args_provider to pretrain() "
            "or call muon_megatron.megatron_lm.install(add_args=True)."
        )
    return MuonConfig.from_namespace(args)


def _validating(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def validate_args(args: argparse.Namespace, *rest: Any, **kwargs: Any) -> Any:
        if getattr(args, "optimizer", None) != MUON_OPTIMIZER_NAME:
            return original(args, *rest, **kwargs)
        if not getattr(args, "use_distributed_optimizer", False):
            raise ValueError(
                "--optimizer muon (muon-megatron) is a ZeRO-1 DistributedOptimizer: add "
                "--use-distributed-optimizer (or use --optimizer dist_muon for Megatron's own)."
            )
        # Megatron's Muon checks describe megatron-core's Muon, not this one: validate the run
        # as the ZeRO-1 AdamW run it is underneath, then restore the name.
        args.optimizer = "adam"
        try:
            result = original(args, *rest, **kwargs)
        finally:
            args.optimizer = MUON_OPTIMIZER_NAME
        if result is not None and result is not args:
            result.optimizer = MUON_OPTIMIZER_NAME
        return result

    return _marked(validate_args)


def _parsing_with_muon_flags(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def parse_args(extra_args_provider: Any = None, *rest: Any, **kwargs: Any) -> Any:
        provider = chain_extra_args_providers(muon_extra_args_provider, extra_args_provider)
        return original(provider, *rest, **kwargs)

    return _marked(parse_args)


def main(argv: list[str] | None = None) -> None:
    """`python -m muon_megatron.megatron_lm SCRIPT.py [args]`: install, then run SCRIPT."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or not argv[0].endswith(".py"):
        raise SystemExit("usage: python -m muon_megatron.megatron_lm pretrain_gpt.py [args...]")
    # As `python SCRIPT.py` would: the script's directory (the Megatron-LM checkout) first.
    sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
    install(add_args=True)
    sys.argv = argv
    runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
