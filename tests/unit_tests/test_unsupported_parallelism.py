"""Interleaved pipelines (virtual pipeline stages) are refused before training, naming the
flag and why, by all three doors: `get_muon_optimizer`, the training entry
(`examples/pretrain_moe.py`) and the Megatron-LM hook: a rank's virtual stages repeat
chunk-local parameter names, which key the plan (issue 22). Context parallelism is accepted by
all three (tests/functional/test_cp_parity.py runs it); the training entry refuses only what
cannot run: megatron-core's local attention under CP, and a sequence that does not split into
2 x CP equal chunks."""

from __future__ import annotations

import argparse
import re
import types

import pytest
from megatron.core.optimizer import OptimizerConfig

from muon_megatron.megatron_lm import hooks
from muon_megatron.megatron_lm.arguments import muon_extra_args_provider
from muon_megatron.optimizer import builder
from muon_megatron.training import entry
from muon_megatron.training.args import build_parser, validate_args

VPP = "--num-layers-per-virtual-pipeline-stage"
CP = "--context-parallel-size 2"


def test_messages_name_the_flags_and_why() -> None:
    assert builder.parallelism_errors(1) == []
    (vpp,) = builder.parallelism_errors(2)
    assert VPP in vpp and "2 model chunks" in vpp and "never been tested" in vpp


def _chunk(cp: int = 1) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        ddp_config=types.SimpleNamespace(), config=types.SimpleNamespace(context_parallel_size=cp)
    )


def _config() -> OptimizerConfig:
    return OptimizerConfig(optimizer="muon", use_distributed_optimizer=True)


def test_get_muon_optimizer_refuses_virtual_stages() -> None:
    """Two model chunks on a rank (what megatron-core's model builder returns for an
    interleaved pipeline) are refused before megatron's optimizer is built."""
    with pytest.raises(ValueError, match=VPP):
        builder.get_muon_optimizer(_config(), [_chunk(), _chunk()])


def test_get_muon_optimizer_passes_context_parallelism_on_to_megatron(monkeypatch) -> None:
    """A CP2 model chunk gets past Muon's own checks to megatron-core's optimizer builder."""
    import megatron.core.optimizer as mcore_optimizer

    class Reached(Exception):
        pass

    def reached(*args: object, **kwargs: object) -> None:
        raise Reached

    monkeypatch.setattr(mcore_optimizer, "get_megatron_optimizer", reached)
    with pytest.raises(Reached):
        builder.get_muon_optimizer(_config(), [_chunk(cp=2)])


@pytest.mark.parametrize(
    "argv, flag",
    [([VPP, "1", "--pipeline-model-parallel-size", "2", "--num-layers", "4"], VPP),
     (["--num-virtual-stages-per-pipeline-rank", "2"], VPP),
     ([*CP.split(), "--transformer-impl", "local"], "needs Transformer Engine's attention")],
    ids=["layers-per-virtual-stage", "virtual-stages-per-rank", "context-parallel-local"],
)
def test_training_entry_refuses_before_any_process_starts(argv, flag, monkeypatch) -> None:
    from muon_megatron.runtime import launch

    def no_spawn(*args: object, **kwargs: object) -> None:
        raise AssertionError("a rank was spawned before the flag was refused")

    monkeypatch.setattr(launch, "spawn", no_spawn)
    with pytest.raises(ValueError, match=flag):
        entry.main(["--optimizer", "muon", *argv])
    with pytest.raises(ValueError, match=flag):
        validate_args(build_parser().parse_args(["--optimizer", "muon", *argv]), world_size=4)


@pytest.mark.parametrize("optimizer", ["muon", "adam"])
def test_training_entry_takes_context_parallelism_with_te_attention(optimizer: str) -> None:
    args = build_parser().parse_args(
        ["--optimizer", optimizer, *CP.split(), "--transformer-impl", "transformer_engine",
         "--seq-length", "64", "--tensor-model-parallel-size", "2", "--sequence-parallel"])
    validate_args(args, world_size=8)  # TP2 x CP2 x DP2


@pytest.mark.parametrize(
    "argv, message",
    [(["--seq-length", "30"], "--seq-length 30 is not divisible by 2 x cp = 4"),
     (["--seq-length", "36", "--tensor-model-parallel-size", "4", "--sequence-parallel"],
      "--seq-length 36 / cp=2 is not divisible by tp=4")],
    ids=["two-chunks-per-rank", "sequence-parallel-share"],
)
def test_training_entry_refuses_a_sequence_cp_cannot_split(argv: list, message: str) -> None:
    args = build_parser().parse_args(
        ["--optimizer", "muon", *CP.split(), "--transformer-impl", "transformer_engine", *argv])
    with pytest.raises(ValueError, match=re.escape(message)):
        validate_args(args, world_size=8)


def test_training_entry_refuses_interleaving_with_adam_too() -> None:
    """The entry builds one model chunk per rank, whatever the optimizer."""
    args = build_parser().parse_args(["--optimizer", "adam", VPP, "1"])
    with pytest.raises(ValueError, match="one model chunk"):
        validate_args(args, world_size=1)


def _megatron_lm_args(**overrides: object) -> argparse.Namespace:
    args = muon_extra_args_provider(argparse.ArgumentParser()).parse_args([])
    args.optimizer, args.use_distributed_optimizer = "muon", True
    args.fp16 = args.optimizer_cpu_offload = args.use_precision_aware_optimizer = False
    args.ckpt_format, args.save, args.load = "torch_dist", None, None
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


@pytest.mark.parametrize(
    "overrides, flag",
    [({"num_layers_per_virtual_pipeline_stage": 2}, VPP),
     ({"num_virtual_stages_per_pipeline_rank": 2}, VPP),
     ({"virtual_pipeline_model_parallel_size": 2}, VPP)],
    ids=["layers-per-virtual-stage", "virtual-stages-per-rank", "derived-vpp"],
)
def test_megatron_lm_hook_refuses(overrides: dict, flag: str) -> None:
    """`_check_muon_run` runs in the hook's validate_args (before Megatron-LM's own) and in
    its optimizer builder."""
    with pytest.raises(ValueError, match=flag):
        hooks._check_muon_run(_megatron_lm_args(**overrides))
    hooks._check_muon_run(_megatron_lm_args(context_parallel_size=1))


def test_megatron_lm_hook_takes_context_parallelism() -> None:
    hooks._check_muon_run(_megatron_lm_args(context_parallel_size=2))
