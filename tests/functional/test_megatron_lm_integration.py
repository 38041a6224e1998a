"""Megatron-LM's own argument parsing, validation and optimizer construction with
`muon_megatron.megatron_lm.install()`. Needs Megatron-LM's `megatron.training` (a
Megatron-LM checkout on PYTHONPATH, not pip's megatron-core): skipped, with the reason,
where it is missing.
"""

from __future__ import annotations

import sys

import pytest

pytest.importorskip(
    "megatron.training",
    reason="Megatron-LM (megatron.training) is not importable: megatron-core's wheel does not "
    "ship it; put a Megatron-LM checkout (see patches/README.md for the tag) on PYTHONPATH",
)

from muon_megatron.arguments import muon_extra_args_provider  # noqa: E402
from muon_megatron.config import MuonConfig  # noqa: E402
from muon_megatron.testing.launch import spawn  # noqa: E402

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

    from muon_megatron import builder, megatron_lm, tiny_gpt

    megatron_lm.install()
    sys.argv = MEGATRON_ARGV
    args = parse_args(extra_args_provider=muon_extra_args_provider)
    global_vars.set_args(args)
    layout = tiny_gpt.Layout()
    tiny_gpt.initialize_parallel(layout, seed=0)
    model = tiny_gpt.build_model(tiny_gpt.ModelSpec(), layout)
    config = tiny_gpt.optimizer_config(optimizer="muon")
    optimizer = training.get_megatron_optimizer(config, model, use_gloo_process_groups=True)
    return [type(o).__name__ for o in builder.muon_optimizers(optimizer)]


def test_training_modules_optimizer_builder_returns_muon_distributed_optimizer() -> None:
    names = spawn(_build_through_megatron_lm, 1)[0]
    assert names and set(names) == {"MuonDistributedOptimizer"}
