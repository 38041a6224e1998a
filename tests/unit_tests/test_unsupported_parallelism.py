"""Context parallelism is refused before training, naming the flag and why, by all three
doors: `get_muon_optimizer`, the training entry (`examples/pretrain_moe.py`) and the
Megatron-LM hook; it has not been run or tested with Muon (issue 22): it would put the grid
on megatron-core's data-and-context group. Interleaved pipelines (virtual pipeline stages)
are accepted by all three; the training entry refuses, before any process starts, the
interleaved layouts megatron-core's schedule cannot run (tests/functional/
test_interleaved_pipeline.py trains them)."""

from __future__ import annotations

import argparse
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


def test_messages_name_the_flags_and_why() -> None:
    assert builder.parallelism_errors(1) == []
    [cp] = builder.parallelism_errors(2)
    assert CP in cp and "context-parallel group" in cp and "use --context-parallel-size 1" in cp


def _chunk(cp: int = 1) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        ddp_config=types.SimpleNamespace(), config=types.SimpleNamespace(context_parallel_size=cp)
    )


def _config() -> OptimizerConfig:
    return OptimizerConfig(optimizer="muon", use_distributed_optimizer=True)


def test_get_muon_optimizer_refuses_context_parallelism() -> None:
    with pytest.raises(ValueError, match=CP):
        builder.get_muon_optimizer(_config(), [_chunk(cp=2)])


def test_training_entry_refuses_context_parallelism_before_any_process_starts(monkeypatch) -> None:
    from muon_megatron.runtime import launch

    def no_spawn(*args: object, **kwargs: object) -> None:
        raise AssertionError("a rank was spawned before the flag was refused")

    monkeypatch.setattr(launch, "spawn", no_spawn)
    with pytest.raises(ValueError, match=CP):
        entry.main(["--optimizer", "muon", *CP.split()])
    with pytest.raises(ValueError, match=CP):
        validate_args(build_parser().parse_args(["--optimizer", "muon", *CP.split()]), world_size=4)


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
    from muon_megatron.runtime import launch

    def no_spawn(*args: object, **kwargs: object) -> None:
        raise AssertionError("a rank was spawned before the layout was refused")

    monkeypatch.setattr(launch, "spawn", no_spawn)
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


def test_megatron_lm_hook_refuses_context_parallelism() -> None:
    """`_check_muon_run` runs in the hook's validate_args (before Megatron-LM's own) and in
    its optimizer builder."""
    with pytest.raises(ValueError, match=CP):
        hooks._check_muon_run(_megatron_lm_args(context_parallel_size=2))
    hooks._check_muon_run(_megatron_lm_args(context_parallel_size=1))


@pytest.mark.parametrize(
    "overrides",
    [{"num_layers_per_virtual_pipeline_stage": 2},
     {"num_virtual_stages_per_pipeline_rank": 2},
     {"virtual_pipeline_model_parallel_size": 2}],
    ids=["layers-per-virtual-stage", "virtual-stages-per-rank", "derived-vpp"],
)
def test_megatron_lm_hook_accepts_virtual_stages(overrides: dict) -> None:
    """Megatron-LM builds the model chunks and its interleaved schedule itself; the hook
    lets them through to `get_muon_optimizer`."""
    hooks._check_muon_run(_megatron_lm_args(**overrides))
