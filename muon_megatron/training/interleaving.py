"""Interleaved pipelines (virtual pipeline stages) in the training entry's arguments.

Megatron-LM's two flags, `--num-layers-per-virtual-pipeline-stage` and
`--num-virtual-stages-per-pipeline-rank`, give the number of model chunks per pipeline rank
(`virtual_pipeline_size`, derived as Megatron-LM derives `virtual_pipeline_model_parallel_size`);
the errors are those of the layouts the entry cannot build or megatron-core's interleaved
schedule cannot run, each naming the flag and the fix.
"""

from __future__ import annotations

import argparse

__all__ = [
    "virtual_pipeline_size",
    "virtual_pipeline_errors",
    "interleaved_batch_errors",
    "interleaved_microbatch_error",
]


def virtual_pipeline_size(args: argparse.Namespace) -> int | None:
    """Model chunks (virtual stages) per pipeline rank, derived as Megatron-LM's
    `validate_args` derives `virtual_pipeline_model_parallel_size` (None: not interleaved;
    a derived 1 is None too). Call after `virtual_pipeline_errors` found nothing."""
    per_stage = args.num_layers_per_virtual_pipeline_stage
    if per_stage is not None:
        size = args.num_layers // args.pipeline_model_parallel_size // per_stage
    else:
        size = args.num_virtual_stages_per_pipeline_rank
    return size if size is not None and size > 1 else None


def virtual_pipeline_errors(args: argparse.Namespace) -> list[str]:
    """What keeps the interleaved pipeline the flags ask for from being built."""
    per_stage = args.num_layers_per_virtual_pipeline_stage
    stages = args.num_virtual_stages_per_pipeline_rank
    if per_stage is None and stages is None:
        return []
    pp, layers = args.pipeline_model_parallel_size, args.num_layers
    if per_stage is not None and stages is not None:
        return ["--num-layers-per-virtual-pipeline-stage and --num-virtual-stages-per-"
                "pipeline-rank both set: give one of them"]
    if (per_stage or stages) < 1:
        return [f"--num-layers-per-virtual-pipeline-stage / --num-virtual-stages-per-pipeline-"
                f"rank {per_stage or stages} must be >= 1"]
    errors = []
    if args.decoder_first_pipeline_num_layers or args.decoder_last_pipeline_num_layers:
        errors.append("the training entry splits an interleaved pipeline evenly: drop "
                      "--decoder-first/last-pipeline-num-layers or the virtual-stage flag")
    if per_stage is not None and layers % (pp * per_stage):
        errors.append(f"--num-layers {layers} is not divisible by pp x "
                      f"--num-layers-per-virtual-pipeline-stage = {pp} x {per_stage}")
    if stages is not None and layers % (pp * stages):
        errors.append(f"--num-layers {layers} is not divisible by pp x "
                      f"--num-virtual-stages-per-pipeline-rank = {pp} x {stages}")
    if not errors and virtual_pipeline_size(args) is not None and pp < 2:
        errors.append("an interleaved pipeline (virtual stages) needs "
                      f"--pipeline-model-parallel-size >= 2, got {pp}; drop the virtual-stage "
                      "flag")
    return errors


def interleaved_microbatch_error(num_microbatches: int, pp: int) -> str | None:
    """Why megatron-core's interleaved schedule cannot run `num_microbatches` micro-batches
    per step on `pp` pipeline ranks (it takes them in groups of `pp`, one group per model
    chunk in turn, and refuses a partial group), or None."""
    if num_microbatches % pp == 0:
        return None
    return (f"an interleaved pipeline runs the micro-batches of a step in groups of pp={pp}: "
            f"{num_microbatches} micro-batches per step (global batch / (micro-batch size x "
            f"data-parallel size)) is not a multiple of {pp}; change --global-batch-size or "
            "--micro-batch-size")


def interleaved_batch_errors(args: argparse.Namespace, dp: int) -> list[str]:
    """`interleaved_microbatch_error` for the batch flags at data-parallel size `dp` ([] when
    the pipeline is not interleaved). Call after the batch sizes were found to divide."""
    if virtual_pipeline_size(args) is None:
        return []
    micro = args.global_batch_size // (args.micro_batch_size * dp)
    error = interleaved_microbatch_error(micro, args.pipeline_model_parallel_size)
    return [error] if error else []
