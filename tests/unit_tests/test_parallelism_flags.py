"""Interleaved pipelines (virtual pipeline stages) and context parallelism are accepted by
all three doors: `get_muon_optimizer`, the training entry (`examples/pretrain_moe.py`) and
the Megatron-LM hook (tests/functional/test_interleaved_pipeline.py and test_cp_parity.py
train them). The training entry refuses, before any process starts, only what it cannot run:
interleaved layouts megatron-core's schedule cannot run, megatron-core's local attention
under CP, and a sequence that does not split into 2 x CP equal chunks."""

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
from muon_megatron.training.interleaving import virtual_pipeline_size

VPP = "--num-layers-per-virtual-pipeline-stage"
STAGES = "--num-virtual-stages-per-pipeline-rank"
CP = "--context-parallel-size 2"


def _chunk(cp: int = 1) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        ddp_config=types.SimpleNamespace(), config=types.SimpleNamespace(context_parallel_size=cp),
        named_parameters=lambda: iter(()),
    )


def _config() -> OptimizerConfig:
    return OptimizerConfig(optimizer="muon", use_distributed_optimizer=True)


@pytest.mark.parametrize("chunks", [[_chunk(cp=2)], [_chunk(), _chunk()]],
                         ids=["context-parallel", "two-model-chunks"])
def test_get_muon_optimizer_passes_them_on_to_megatron(chunks, monkeypatch) -> None:
    """A CP2 model chunk, and two model chunks on a rank (an interleaved pipeline), get past
    Muon's own checks to megatron-core's optimizer builder."""
    import megatron.core.optimizer as mcore_optimizer

    class Reached(Exception):
        pass

    def reached(*args: object, **kwargs: object) -> None:
        raise Reached

    monkeypatch.setattr(mcore_optimizer, "get_megatron_optimizer", reached)
    with pytest.raises(Reached):
        builder.get_muon_optimizer(_config(), chunks)


def _no_spawn(monkeypatch) -> None:
    from muon_megatron.runtime import launch

    def no_spawn(*args: object, **kwargs: object) -> None:
        raise AssertionError("a rank was spawned before the layout was refused")

    monkeypatch.setattr(launch, "spawn", no_spawn)


def test_training_entry_refuses_context_parallelism_on_local_attention(monkeypatch) -> None:
    _no_spawn(monkeypatch)
    argv = ["--optimizer", "muon", *CP.split(), "--transformer-impl", "local"]
    message = "needs Transformer Engine's attention"
    with pytest.raises(ValueError, match=message):
        entry.main(argv)
    with pytest.raises(ValueError, match=message):
        validate_args(build_parser().parse_args(argv), world_size=4)


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


INTERLEAVED = ["--pipeline-model-parallel-size", "2", "--num-layers", "4"]


@pytest.mark.parametrize("optimizer", ["muon", "adam"])
@pytest.mark.parametrize("flags", [[VPP, "1"], [STAGES, "2"]], ids=["layers-per-stage", "stages"])
def test_training_entry_accepts_an_interleaved_pipeline(flags, optimizer) -> None:
    """PP2 with two virtual stages of one layer each; a global batch of 8 in micro-batches of
    2 is 4 micro-batches per step at DP1, a multiple of PP."""
    args = build_parser().parse_args(["--optimizer", optimizer, *INTERLEAVED, *flags])
    validate_args(args, world_size=2)
    assert virtual_pipeline_size(args) == 2


@pytest.mark.parametrize(
    "flags, size",
    [([VPP, "4"], None), ([STAGES, "1"], None), ([VPP, "2"], 2), ([VPP, "1"], 4),
     ([STAGES, "4"], 4)],
)
def test_virtual_stages_derive_as_megatron_lm_derives_them(flags, size) -> None:
    """Megatron-LM's validate_args: layers per stage / layers per virtual stage, or the
    stages given; 1 means no interleaving."""
    args = build_parser().parse_args([*INTERLEAVED[:2], "--num-layers", "8", *flags])
    assert virtual_pipeline_size(args) == size


@pytest.mark.parametrize(
    "argv, world, message",
    [([*INTERLEAVED, STAGES, "2", "--global-batch-size", "6"], 2,
      "3 micro-batches per step"),
     (["--num-layers", "4", STAGES, "2"], 1, "--pipeline-model-parallel-size >= 2"),
     ([*INTERLEAVED, VPP, "1", STAGES, "2"], 2, "both set"),
     ([*INTERLEAVED, STAGES, "3"], 2, "not divisible by pp x --num-virtual-stages"),
     ([*INTERLEAVED, VPP, "3"], 2, "not divisible by pp x --num-layers-per-virtual"),
     ([*INTERLEAVED, STAGES, "2", "--decoder-first-pipeline-num-layers", "1"], 2,
      "--decoder-first/last-pipeline-num-layers")],
    ids=["micro-batches", "pp1", "both-flags", "stages-split", "layers-split", "uneven"],
)
def test_training_entry_refuses_interleaved_layouts_it_cannot_run(
    argv, world, message, monkeypatch
) -> None:
    _no_spawn(monkeypatch)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        validate_args(build_parser().parse_args(["--optimizer", "muon", *argv]), world)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        entry.main(["--optimizer", "muon", f"--world-size={world}", *argv])


def _megatron_lm_args(**overrides: object) -> argparse.Namespace:
    args = muon_extra_args_provider(argparse.ArgumentParser()).parse_args([])
    args.optimizer, args.use_distributed_optimizer = "muon", True
    args.fp16 = args.optimizer_cpu_offload = args.use_precision_aware_optimizer = False
    args.ckpt_format, args.save, args.load = "torch_dist", None, None
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


@pytest.mark.parametrize(
    "overrides",
    [{"num_layers_per_virtual_pipeline_stage": 2},
     {"num_virtual_stages_per_pipeline_rank": 2},
     {"virtual_pipeline_model_parallel_size": 2},
     {"context_parallel_size": 2}],
    ids=["layers-per-virtual-stage", "virtual-stages-per-rank", "derived-vpp", "context-parallel"],
)
def test_megatron_lm_hook_accepts_them(overrides: dict) -> None:
    """Megatron-LM builds the model chunks, its interleaved schedule and the CP split itself;
    `_check_muon_run` (the hook's validate_args and optimizer builder) lets them through."""
    hooks._check_muon_run(_megatron_lm_args(**overrides))
