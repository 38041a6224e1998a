"""A real training entry on megatron-core: GPT / MoE on indexed datasets or byte-level text,
Muon or AdamW.

Flags are Megatron-LM's names (`--tensor-model-parallel-size`, `--num-experts`, `--lr`,
`--lr-decay-style`, ...) plus the `--muon-*` flags generated from `MuonConfig`, so a
Megatron-LM launch line moves over with little change and switching to Muon is
`--optimizer muon`. `examples/pretrain_moe.py` and `muon-megatron demo` both call `main`.

What one run does, rank by rank:

* processes: under `torchrun` (RANK / WORLD_SIZE / LOCAL_RANK set) each process joins with
  nccl when CUDA is available (gloo otherwise); without torchrun on CPU, `--world-size` gloo
  processes are spawned (`muon_megatron.runtime.launch`). The CPU shims for megatron-core are
  installed only when CUDA is absent.
* model: megatron-core's `GPTModel` (Transformer Engine layers when TE imports and CUDA is
  there, megatron's local layers otherwise), MoE layers per `--moe-layer-freq`, wrapped in
  megatron's DDP with ZeRO-1 buffers (`--use-distributed-optimizer` is implied).
* optimizer: `get_muon_optimizer` for `--optimizer muon` (Muon for 2-D hidden weights, AdamW
  for the rest), `get_megatron_optimizer` for `--optimizer adam`; lr and weight decay follow
  megatron's `OptimizerParamScheduler` (warmup, then the decay style) for both.
* data: `--data-path` (Megatron's indexed datasets through megatron-core's GPTDataset,
  `training.indexed_data`), or by default the stdlib sources as bytes (`training.data`);
  each DP rank reads its own rows, and with `--context-parallel-size` each of its CP ranks
  its share of every sequence (`training.step`).
* output: Megatron-style log lines on rank 0; TensorBoard / wandb scalars with
  `--tensorboard-dir` / `--wandb-project` (`training.writers`); `<output-dir>/<optimizer>.json`
  (every iteration's loss, lr, grad norm, update RMS, throughput, the validation losses and
  the arguments) and `<output-dir>/loss_<optimizer>.png`.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from muon_megatron.runtime.optional_packages import (
    MISSING_PACKAGE_WARNINGS,
    missing_packages_line,
    quiet_missing_package_warnings,
)
from muon_megatron.training.args import build_parser, default_world_size, validate_args
from muon_megatron.training.indexed_data import resolve_vocabulary
from muon_megatron.training.outputs import plot_losses, trailing_mean, write_outputs
from muon_megatron.training.writers import Writers

__all__ = ["build_parser", "main", "run", "plot_losses", "trailing_mean"]


def main(argv: Sequence[str] | None = None) -> int:
    """Parse Megatron-LM-style flags and train; returns a process exit code."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    announce_missing_packages()
    summary = launch(args)
    return 0 if summary is not None and math.isfinite(summary["final_loss"]) else 1


def announce_missing_packages() -> None:
    """Silence megatron-core's missing-package warnings in this process and, on the launching
    process (rank 0 under torchrun), print the one line that names what is missing."""
    quiet_missing_package_warnings()
    line = missing_packages_line()
    if line and os.environ.get("RANK", "0") == "0":
        print(line, flush=True)


def launch(args: argparse.Namespace) -> dict[str, Any] | None:
    """Run `run(args)` on every rank; returns rank 0's summary (None on other torchrun ranks)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return _run_under_torchrun(args)
    if torch.cuda.is_available():
        raise ValueError(
            "CUDA is available but RANK/WORLD_SIZE are not set: launch GPU runs with torchrun "
            "(see examples/h100_single_node_moe.sh)."
        )
    world_size = args.world_size or default_world_size(args)
    validate_args(args, world_size)
    resolve_vocabulary(args)
    from muon_megatron.runtime.launch import child_env_defaults, spawn

    # CUDA_DEVICE_MAX_CONNECTIONS=1 is what megatron asks for with sequence parallelism.
    quiet = {"PYTHONWARNINGS": ",".join(_CPU_NOISE), "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    with child_env_defaults(quiet):
        return spawn(_spawned_rank, world_size, args, timeout_s=args.timeout_s)[0]


# Warnings every CPU rank prints at import or on every step that say nothing about the run
# (no Transformer Engine / Apex on CPU, torch deprecations inside megatron-core).
_CPU_NOISE = (
    *(f"ignore:{message}" for message in MISSING_PACKAGE_WARNINGS),
    "ignore:`torch.distributed.all_gather_into_tensor` is deprecated",
    "ignore:`torch.distributed.reduce_scatter_tensor` is deprecated",
    "ignore:The .grad attribute of a Tensor that is not a leaf Tensor",
    "ignore:full scope is deprecated",
)


def _run_under_torchrun(args: argparse.Namespace) -> dict[str, Any] | None:
    world_size = int(os.environ["WORLD_SIZE"])
    if args.world_size is not None and args.world_size != world_size:
        raise ValueError(
            f"--world-size {args.world_size} disagrees with torchrun's WORLD_SIZE={world_size}; "
            "drop --world-size under torchrun."
        )
    validate_args(args, world_size)
    resolve_vocabulary(args)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        from muon_megatron.runtime.cpu_shims import install_cpu_shims

        install_cpu_shims()
        backend = "gloo"
    torch.distributed.init_process_group(
        backend, timeout=datetime.timedelta(seconds=args.timeout_s)
    )
    try:
        return run(args)
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()


def _spawned_rank(rank: int, world_size: int, args: argparse.Namespace) -> dict[str, Any] | None:
    return run(args)


# --------------------------------------------------------------------------------------------
# One rank's run
# --------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """Train on this rank (torch.distributed initialised); rank 0 returns the summary."""
    from megatron.core import parallel_state

    from muon_megatron.costmodel.startup import plan_summary
    from muon_megatron.qk_clip.clip import qk_clip_from_args
    from muon_megatron.training import model as gpt
    from muon_megatron.training import step

    t_start = time.perf_counter()
    gpt.initialize_parallel(args)
    model = gpt.build_model(args)
    optimizer, scheduler = step.build_optimizer_and_scheduler(args, model)
    if torch.distributed.get_rank() == 0:
        for line in plan_summary(optimizer):
            print(line, flush=True)
    qk_clip = qk_clip_from_args(args, model)
    start = load_if_present(args, model, optimizer, scheduler) if args.load else 0
    dp_size = parallel_state.get_data_parallel_world_size()
    rank = torch.distributed.get_rank()
    # Megatron-LM's `do_valid`: --eval-iters 0 means no evaluation at all; so does our
    # --eval-interval 0. Otherwise every --eval-interval iterations and once at the end.
    do_valid = bool(args.eval_iters > 0 and args.eval_interval)
    data = training_data(args, parallel_state.get_data_parallel_rank(), dp_size, do_valid)

    def batch(split: str, iteration: int) -> dict[str, torch.Tensor]:
        return {k: v.to(gpt.device()) for k, v in data.batch(split, iteration).items()}

    log: dict[str, Any] = {
        "optimizer": args.optimizer,
        "world_size": torch.distributed.get_world_size(),
        "data_parallel_size": dp_size,
        "data": data.describe(),
        "args": {k: v for k, v in vars(args).items() if _jsonable(v)},
        "start_iteration": start,
        "iterations": [],
        "validation": [],
    }
    if rank == 0:
        local = gpt.local_parameter_count(model)
        print(
            f"> {args.optimizer} | world {log['world_size']} = tp {args.tensor_model_parallel_size}"
            f" x pp {args.pipeline_model_parallel_size} x cp {args.context_parallel_size}"
            f" x dp {dp_size}"
            f" (ep {args.expert_model_parallel_size}) | params on rank 0: {local:,}"
            f" | {log['data']['summary']}",
            flush=True,
        )
        log["parameters_rank0"] = local

    writers = Writers(args) if rank == 0 else None

    def evaluate_and_print(iteration: int) -> None:
        val = step.evaluate(args, model, lambda i: batch("valid", i))
        log["validation"].append({"iteration": iteration, "loss": val})
        if writers is not None:
            writers.validation(val, iteration)
        if rank == 0:
            print(f" validation loss at iteration {iteration:6d} | lm loss: {val:.6E} |"
                  f" lm loss PPL: {math.exp(min(val, 50.0)):.6E}", flush=True)

    tokens_per_iter = args.global_batch_size * args.seq_length
    interval_time, interval_iters = 0.0, 0
    t_train = time.perf_counter()
    for iteration in range(start + 1, args.train_iters + 1):
        t0 = time.perf_counter()
        lr = max(group["lr"] for group in optimizer.param_groups)
        if qk_clip is not None:
            qk_clip.reset()  # the logits of this step's forwards only, not evaluation's
        loss = step.forward_backward(
            model,
            batch("train", iteration),
            seq_length=args.seq_length,
            micro_batch_size=args.micro_batch_size,
        )
        update_ok, grad_norm, _ = optimizer.step()
        clip_stats = None if qk_clip is None else qk_clip.apply(optimizer)
        scheduler.step(increment=args.global_batch_size)
        dt = time.perf_counter() - t0
        interval_time, interval_iters = interval_time + dt, interval_iters + 1
        record = {
            "iteration": iteration,
            "loss": loss,
            "lr": lr,
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "update_rms": step.update_rms(optimizer),
            "seconds": dt,
            "tokens_per_s": tokens_per_iter / dt,
            "skipped": not update_ok,
        }
        if clip_stats is not None:
            record["max_attention_logit"] = clip_stats.max_attention_logit
            if qk_clip.clip:
                record["qk_clipped_heads"] = clip_stats.clipped_heads
        log["iterations"].append(record)
        if writers is not None:
            writers.training(record, args.global_batch_size)
        if iteration % args.log_interval == 0 or iteration in (start + 1, args.train_iters):
            if rank == 0:
                per_iter = interval_time / interval_iters
                print(_log_line(args, record, per_iter, time.perf_counter() - t_train), flush=True)
            interval_time, interval_iters = 0.0, 0
        if do_valid and iteration % args.eval_interval == 0 and iteration != args.train_iters:
            evaluate_and_print(iteration)
        if args.save is not None and args.save_interval and iteration % args.save_interval == 0:
            save(args, model, optimizer, scheduler, iteration)
        if not math.isfinite(loss):
            break
    last = log["iterations"][-1]["iteration"]
    # The final checkpoint is written before the final evaluation, as Megatron-LM's `pretrain`
    # saves after `train` returns and only then evaluates: the checkpoint is what the run
    # trained for, and an evaluation that fails (a bad --eval-iters, a data error, a crash on
    # the validation set) must not lose it.
    if args.save is not None and not (args.save_interval and last % args.save_interval == 0):
        save(args, model, optimizer, scheduler, last)
    if do_valid and last == args.train_iters:
        evaluate_and_print(last)
    log["wall_seconds"] = time.perf_counter() - t_start
    if rank != 0:
        return None
    writers.close()
    return write_outputs(args, log)


def training_data(args: argparse.Namespace, dp_rank: int, dp_size: int,
                  do_valid: bool) -> Any:
    """This rank's data: `--data-path` through megatron-core's GPTDataset
    (`indexed_data.IndexedData`), else the byte-level stdlib corpus (`data.ByteBatches`)."""
    if args.data_path is not None:
        from muon_megatron.training.indexed_data import IndexedData

        return IndexedData(args, dp_rank, dp_size, do_valid)
    from muon_megatron.training.data import ByteBatches

    return ByteBatches(args.seq_length, args.global_batch_size, args.seed, dp_rank, dp_size)


TRACKER = "latest_checkpointed_iteration.txt"
"""Megatron-LM's name for the file in --save/--load that names the latest iteration."""


def load_if_present(args: argparse.Namespace, model: list, optimizer: Any, scheduler: Any) -> int:
    """Resume from `--load` (Megatron-LM layout: `iter_NNNNNNN/` + the tracker file); returns
    the iteration loaded, 0 when `--load` holds no checkpoint yet (as Megatron-LM does)."""
    from muon_megatron.training import checkpointing

    tracker = os.path.join(args.load, TRACKER)
    if not os.path.isfile(tracker):
        if torch.distributed.get_rank() == 0:
            print(f"> no checkpoint in {args.load} ({TRACKER} missing): starting from scratch",
                  flush=True)
        return 0
    with open(tracker, encoding="utf-8") as fh:
        iteration = int(fh.read().strip())
    ckpt_dir = os.path.join(args.load, f"iter_{iteration:07d}")
    loaded = checkpointing.load_checkpoint(ckpt_dir, model, optimizer, scheduler)
    if torch.distributed.get_rank() == 0:
        print(f"> loaded {ckpt_dir} (iteration {loaded})", flush=True)
    if loaded >= args.train_iters:
        raise ValueError(
            f"--load {args.load} is at iteration {loaded}, not below --train-iters "
            f"{args.train_iters}: raise --train-iters to train further."
        )
    return loaded


def save(args: argparse.Namespace, model: list, optimizer: Any, scheduler: Any,
         iteration: int) -> None:
    """Save to `--save/iter_NNNNNNN` and point the tracker file at it (collective)."""
    from muon_megatron.training import checkpointing

    ckpt_dir = os.path.join(args.save, f"iter_{iteration:07d}")
    checkpointing.save_checkpoint(ckpt_dir, model, optimizer, scheduler, iteration)
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(args.save, TRACKER), "w", encoding="utf-8") as fh:
            fh.write(str(iteration))
        print(f"> saved {ckpt_dir}", flush=True)
    torch.distributed.barrier()


def _log_line(args: argparse.Namespace, r: dict[str, Any], sec_per_iter: float,
              elapsed: float) -> str:
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    rms = "-" if r["update_rms"] is None else f"{r['update_rms']:.3f}"
    norm = "-" if r["grad_norm"] is None else f"{r['grad_norm']:.3f}"
    return (
        f" [{stamp}] iteration {r['iteration']:8d}/{args.train_iters:8d} |"
        f" consumed samples: {r['iteration'] * args.global_batch_size:12d} |"
        f" elapsed time per iteration (ms): {sec_per_iter * 1000:.1f} |"
        f" learning rate: {r['lr']:.6E} | global batch size: {args.global_batch_size:5d} |"
        f" lm loss: {r['loss']:.6E} | grad norm: {norm} | update rms: {rms} |"
        f" tokens/s: {args.global_batch_size * args.seq_length / sec_per_iter:.0f} |"
        f" elapsed: {elapsed:.1f} s |"
        + (f" max attention logit: {r['max_attention_logit']:.3f} |"
           if "max_attention_logit" in r else "")
        + (f" qk-clipped heads: {r['qk_clipped_heads']} |" if "qk_clipped_heads" in r else "")
    )


def _jsonable(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool, type(None), list, tuple))


if __name__ == "__main__":
    sys.exit(main())
