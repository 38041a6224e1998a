"""`muon-megatron plan <Megatron-LM flags>`: the plan of every pipeline stage, printed.

For each pipeline stage, `world.build_rank` builds the stage's first rank (model, DDP buffers,
`MuonDistributedOptimizer`) in a fake world of the user's size; `costmodel` turns its plan
into per-rank figures and the event model's times; this module adds the model's FLOPs per
iteration and prints one table per stage, the comparison with megatron-core's Muon and
Moonlight's scheme, and a verdict (JSON with `--json PATH`).

The flags are the training entry's (Megatron-LM's names and the `--muon-*` flags), plus the
world (`--world-size`, or `--nnodes` x the GPU's GPUs per node) and the hardware
(`costmodel.hardware`). Flags the planner does not model are listed, not refused, so a
user's whole launch line works (`python -m muon_megatron.megatron_lm --plan ...`).

Layers: Megatron-LM builds Transformer Engine layers on GPUs (its default), whose grouped
experts hold one weight per expert. The planner builds megatron-core's local layers, the
only ones that exist without CUDA, and for `--transformer-impl transformer_engine` (the
default here too) builds the experts as one weight per expert (SequentialMLP), the same
parameters TE's TEGroupedMLP has, in place of the local GroupedMLP's stacked weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["plan_parser", "main", "plan", "model_cost"]

_CHILD = "MUON_MEGATRON_PLANNER_CHILD"


def plan_parser(prog: str = "muon-megatron plan") -> argparse.ArgumentParser:
    from muon_megatron.costmodel.hardware import add_hardware_args
    from muon_megatron.training.args import build_parser
    from muon_megatron.training.indexed_data import add_data_args

    # Data and tokenizer flags are not modelled: they stay unknown (listed as ignored), and
    # their attributes keep the training entry's defaults (the model's vocabulary is then
    # --vocab-size).
    parser = build_parser(data=False)
    data_defaults = argparse.ArgumentParser(add_help=False)
    add_data_args(data_defaults)
    parser.set_defaults(**vars(data_defaults.parse_args([])))
    parser.prog = prog
    parser.description = (
        "What Muon costs on a cluster: memory, bytes, Newton-Schulz work and time per rank, "
        "from the optimizer's own plan built for one rank of each pipeline stage."
    )
    g = parser.add_argument_group("plan")
    g.add_argument("--nnodes", type=int, default=None,
                   help="Nodes; the world is nnodes x the GPU's GPUs per node (unless "
                   "--world-size is given).")
    g.add_argument("--json", default=None, metavar="PATH", help="Also write the plan as JSON.")
    g.add_argument("--model", default=None, metavar="PRESET",
                   help="A named model's flags (planner.presets: moonlight-16b-a3b, kimi-k2, "
                   "gpt-7b), replaced in place: flags after it win.")
    parser.set_defaults(optimizer="muon", transformer_impl="transformer_engine")
    add_hardware_args(parser)
    return parser


def _world_size(args: argparse.Namespace, gpus_per_node: int) -> int:
    if args.world_size is not None:
        return args.world_size
    if args.nnodes is not None:
        return args.nnodes * gpus_per_node
    raise ValueError("give the world: --world-size N, or --nnodes N (x GPUs per node)")


def model_cost(args: argparse.Namespace, stage_models: list[list], world_size: int):
    """Forward-backward FLOPs of one iteration: 6 x active params x tokens (embedding
    lookups excluded, the output layer's matmul included; an expert's params count
    topk / experts of the time) plus causal attention's scores, 3 x seq x heads x
    (qk dim + v dim) per layer and token (half of the seq x seq scores, forward and
    backward)."""
    from muon_megatron.costmodel.report import ModelCost

    total = active = 0
    output_counted = False
    share = args.moe_router_topk / args.num_experts if args.num_experts else 1.0
    tp = args.tensor_model_parallel_size
    etp = args.expert_tensor_parallel_size or tp
    for chunks in stage_models:
        for chunk in chunks:
            for name, p in chunk.named_parameters():
                expert = not getattr(p, "allreduce", True)
                # One rank holds 1/TP of a TP-split tensor and 1/EP of the experts.
                n = p.numel() * (args.expert_model_parallel_size if expert else 1)
                if getattr(p, "tensor_model_parallel", False):
                    n *= etp if expert else tp
                total += n
                if "embedding" in name:
                    continue
                if "output_layer" in name:
                    output_counted = True
                active += n * (share if expert else 1.0)
    if not output_counted:  # tied embeddings: the output matmul uses the word embedding
        active += args.vocab_size * args.hidden_size
    tokens = args.global_batch_size * args.seq_length
    if args.multi_latent_attention:
        qk, v = args.qk_head_dim + args.qk_pos_emb_head_dim, args.v_head_dim
    else:
        qk = v = args.kv_channels or args.hidden_size // args.num_attention_heads
    attention = 3 * args.seq_length * args.num_attention_heads * (qk + v) * args.num_layers
    flops = 6.0 * active * tokens + attention * tokens
    return ModelCost(total, int(active), tokens, flops, world_size)


def _as_built(args: argparse.Namespace) -> argparse.Namespace:
    """The flags the stage is built with: TE's per-expert weights as local SequentialMLP."""
    built = copy.copy(args)
    if args.transformer_impl == "transformer_engine":
        built.moe_grouped_gemm = False
    built.transformer_impl = "local"
    return built


def plan(args: argparse.Namespace, world_size: int) -> dict[str, Any]:
    """Build every stage and estimate it: {'stages': [StageEstimate], 'model': ModelCost,
    'seconds': [build+estimate seconds per stage]}."""
    from muon_megatron.costmodel.estimate import estimate_stage
    from muon_megatron.costmodel.figures import grid_figures
    from muon_megatron.costmodel.hardware import hardware_from_args
    from muon_megatron.costmodel.layout import RankLayout
    from muon_megatron.optimizer.builder import muon_optimizers
    from muon_megatron.planner.world import build_rank, fake_rank

    hw = hardware_from_args(args)
    built = _as_built(args)
    layout = RankLayout.of_args(built, world_size)
    stages, models, seconds = [], [], []
    for s, ranks in enumerate(layout.stages):
        start = time.perf_counter()
        with fake_rank(world_size, ranks[0]):
            model, optimizer = build_rank(built, world_size, ranks[0], layout)
            members = [m for m in muon_optimizers(optimizer) if m._matrices]
            grids = [grid_figures(m, "expert" if m.expert else "dense") for m in members]
            experts = [m.expert for m in members]
            placement = layout.placement(s, experts)
            stages.append(estimate_stage(
                s, grids, placement,
                lambda m, instance, e=experts: layout.grid_ranks(e[m], instance),
                hw, members[0].muon_config.muon_ns_steps if members else 5,
            ))
            models.append(model)
        seconds.append(time.perf_counter() - start)
    return {"stages": stages, "model": model_cost(args, models, world_size),
            "seconds": seconds, "hardware": hw, "layout": layout}


def _header(args: argparse.Namespace, world: int, result: dict[str, Any]) -> list[str]:
    from muon_megatron.training.interleaving import virtual_pipeline_size

    hw, model = result["hardware"], result["model"]
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    cp, ep = args.context_parallel_size, args.expert_model_parallel_size
    etp = args.expert_tensor_parallel_size or tp
    dp = world // (tp * pp * cp)
    virtual = virtual_pipeline_size(args)
    vpp = f" x VPP{virtual}" if virtual else ""
    return [
        f"muon-megatron plan: {world} GPUs ({world / hw.gpus_per_node:g} nodes x "
        f"{hw.gpus_per_node}), TP{tp} PP{pp}{vpp} CP{cp} DP{dp}"
        + (f", experts EP{ep} x ETP{etp} (expert DP {world // (etp * ep * pp)})"
           if args.num_experts else ""),
        f"model: {model.total_params / 1e9:.2f} B params, {model.active_params / 1e9:.2f} B "
        f"active per token; {model.flops / 1e15:.1f} PFLOP per iteration "
        f"({model.tokens} tokens) = {model.seconds(hw) * 1e3:.0f} ms per iteration at MFU "
        f"{hw.mfu:.0%}",
        f"hardware: {hw.describe()}",
        f"layers: {args.transformer_impl}"
        + (" (built as megatron-core's local layers with TE's per-expert weights)"
           if args.transformer_impl == "transformer_engine" and args.num_experts else ""),
    ]


def _run(argv: Sequence[str], prog: str) -> int:
    from muon_megatron.costmodel.report import as_json, stage_lines, verdict
    from muon_megatron.runtime.cpu_shims import install_cpu_shims
    from muon_megatron.training.args import layout_errors

    from muon_megatron.costmodel.hardware import hardware_from_args
    from muon_megatron.planner.presets import preset_argv

    parser = plan_parser(prog)
    try:
        args, unknown = parser.parse_known_args(preset_argv(list(argv)))
        world = _world_size(args, hardware_from_args(args).gpus_per_node)
        errors = layout_errors(args, world)
        if errors:
            raise ValueError("the layout cannot run:\n  " + "\n  ".join(errors))
    except ValueError as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 2
    install_cpu_shims()
    start = time.perf_counter()
    result = plan(args, world)
    hw = result["hardware"]
    lines = _header(args, world, result)
    if unknown:
        lines.append(f"not modelled (ignored): {' '.join(unknown)}")
    for est in result["stages"]:
        lines += [""] + stage_lines(est, hw)
    lines += ["", verdict(result["stages"], result["model"], hw)]
    elapsed = time.perf_counter() - start
    lines.append(f"(planned {len(result['stages'])} stages in {elapsed:.1f} s)")
    print("\n".join(lines))
    if args.json:
        data = as_json(result["stages"], result["model"], hw, world_size=world,
                       argv=list(argv), plan_seconds=elapsed)
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "muon-megatron plan") -> int:
    """Run the plan in a child process with CUDA hidden (megatron-core then builds through
    the CPU shims, and no GPU is touched), unless this is that child."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if os.environ.get(_CHILD) == "1":
        return _run(argv, prog)
    env = {**os.environ, _CHILD: "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONWARNINGS": os.environ.get("PYTHONWARNINGS", "ignore")}
    command = [sys.executable, "-m", "muon_megatron.planner", f"--prog={prog}", *argv]
    return subprocess.run(command, env=env).returncode
