"""Megatron-LM's own argument parsing, validation and optimizer construction with
`muon_megatron.megatron_lm.install()`. Needs Megatron-LM's `megatron.training` (a
Megatron-LM checkout on PYTHONPATH, not pip's megatron-core): skipped, with the reason,
where it is missing.
"""

from __future__ import annotations

import sys

import pytest

from muon_megatron.testing.megatron_lm_run import megatron_lm_dir  # noqa: E402

if megatron_lm_dir() is not None and megatron_lm_dir() not in sys.path:
    sys.path.insert(0, megatron_lm_dir())  # spawned ranks inherit sys.path
if megatron_lm_dir() is not None and not __import__("torch").cuda.is_available():
    from muon_megatron.runtime.megatron_lm_shims import install_megatron_lm_cpu_shims

    install_megatron_lm_cpu_shims()  # before megatron.training is first imported

pytest.importorskip(
    "megatron.training",
    reason="Megatron-LM (megatron.training) is not importable: megatron-core's wheel does not "
    "ship it; set MEGATRON_LM_DIR to a checkout of NVIDIA/Megatron-LM (core_v0.16.1)",
)

from muon_megatron.config import MuonConfig  # noqa: E402
from muon_megatron.megatron_lm.arguments import muon_extra_args_provider  # noqa: E402
from muon_megatron.runtime.launch import spawn  # noqa: E402

MEGATRON_ARGV = [
    "pretrain_gpt.py", "--optimizer", "muon", "--use-distributed-optimizer",
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "32", "--max-position-embeddings", "32", "--micro-batch-size", "2",
    "--global-batch-size", "4", "--lr", "1e-3", "--train-iters", "2",
    "--muon-momentum", "0.9", "--no-muon-nesterov", "--tokenizer-type", "NullTokenizer",
    "--vocab-size", "256",
]


def test_megatron_lm_parses_muon_flags_with_dataclass_defaults(monkeypatch) -> None:
    from megatron.training.arguments import parse_args

    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py"])
    args = parse_args(extra_args_provider=muon_extra_args_provider, ignore_unknown_args=True)
    assert MuonConfig.from_namespace(args) == MuonConfig()
    monkeypatch.setattr(sys, "argv", MEGATRON_ARGV)
    args = parse_args(extra_args_provider=muon_extra_args_provider)
    assert args.optimizer == "muon" and args.use_distributed_optimizer
    assert MuonConfig.from_namespace(args) == MuonConfig(muon_momentum=0.9, muon_nesterov=False)


def _build_through_megatron_lm(rank: int, world_size: int) -> list[str]:
    import megatron.training.training as training
    from megatron.training import global_vars
    from megatron.training.arguments import parse_args

    from muon_megatron import megatron_lm
    from muon_megatron.optimizer import builder
    from muon_megatron.runtime.megatron_lm_shims import install_megatron_lm_cpu_shims
    from muon_megatron.testing import tiny

    install_megatron_lm_cpu_shims()
    megatron_lm.install()
    sys.argv = MEGATRON_ARGV
    args = parse_args(extra_args_provider=muon_extra_args_provider)
    global_vars.set_args(args)
    layout = tiny.Layout()
    tiny.initialize_parallel(layout, seed=0)
    model = tiny.build_model(tiny.ModelSpec(), layout)
    config = tiny.optimizer_config(optimizer="muon")
    optimizer = training.get_megatron_optimizer(config, model, use_gloo_process_groups=True)
    return [type(o).__name__ for o in builder.muon_optimizers(optimizer)]


def test_training_modules_optimizer_builder_returns_muon_distributed_optimizer() -> None:
    names = spawn(_build_through_megatron_lm, 1)[0]
    assert names and set(names) == {"MuonDistributedOptimizer"}


def test_every_muon_flag_of_this_megatron_lm_is_honoured_or_refused(monkeypatch) -> None:
    """The real parser of the Megatron-LM on the path: each `--muon-*` flag it defines is in
    MEGATRON_LM_MUON_FLAGS (honoured or refused), or is one of ours."""
    import argparse
    import dataclasses

    from megatron.training import arguments

    from muon_megatron.megatron_lm.arguments import MEGATRON_LM_MUON_FLAGS, muon_flag

    captured: list[argparse.ArgumentParser] = []

    def provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        captured.append(parser)
        return parser

    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py"])
    arguments.parse_args(extra_args_provider=provider, ignore_unknown_args=True)
    theirs = {o for a in captured[0]._actions for o in a.option_strings if o.startswith("--muon-")}
    ours = {muon_flag(f.name) for f in dataclasses.fields(MuonConfig)}
    assert theirs, "this Megatron-LM defines no --muon-* flags"
    assert theirs - set(MEGATRON_LM_MUON_FLAGS) - ours == set()
