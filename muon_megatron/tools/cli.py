"""The `muon-megatron` command: `verify` (parity self-test) and `demo` (the main job)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from muon_megatron.config_flags import add_muon_config_args, muon_config_from_args
from muon_megatron.runtime.torchrun import BACKENDS, launcher_rank

__all__ = ["add_muon_config_args", "main", "verify_parser"]


def verify_parser() -> argparse.ArgumentParser:
    """The `muon-megatron verify` flags: the layout, the model, the run, and every --muon-*
    flag of `MuonConfig` (Newton-Schulz in fp32 unless asked otherwise)."""
    parser = argparse.ArgumentParser(
        prog="muon-megatron verify",
        description="Parity of the ZeRO-1 Muon optimizer with the single-device reference.",
    )
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--cp", type=int, default=1,
                        help="context-parallel size (needs --transformer-impl transformer_engine)")
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--etp", type=int, default=None, help="expert TP size (default: TP)")
    parser.add_argument("--experts", type=int, default=None, help="MoE with this many experts")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dispatcher", choices=("allgather", "alltoall"), default="allgather")
    parser.add_argument("--grouped-gemm", action="store_true",
                        help="grouped experts: GroupedMLP (local), TEGroupedMLP (TE)")
    parser.add_argument("--transformer-impl", choices=("local", "transformer_engine"),
                        default="local", help="megatron-core's layer spec (TE needs TE installed)")
    parser.add_argument("--sequence-parallel", action="store_true")
    parser.add_argument("--bf16", action="store_true", help="bf16 params, fp32 main params")
    parser.add_argument(
        "--mla",
        action="store_true",
        help="Multi-latent attention (Moonlight's): q LoRA, kv latent, k-rope, latent norms.",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="Under torchrun: nccl (one GPU per rank), gloo, or auto (nccl where CUDA is "
        "available). Without torchrun the ranks are spawned gloo processes on this CPU.",
    )
    add_muon_config_args(parser)
    # The check is tight in fp32; `--muon-ns-dtype bf16` checks the bf16 path.
    parser.set_defaults(muon_ns_dtype="fp32")
    return parser


MLA_MODEL = {
    "multi_latent_attention": True,
    "q_lora_rank": 24,
    "kv_lora_rank": 16,
    "qk_head_dim": 16,
    "qk_pos_emb_head_dim": 8,
    "v_head_dim": 16,
    "qk_layernorm": True,
    "num_query_groups": 4,
}
"""`verify --mla`: the tiny model's MLA (4 heads, a q LoRA and latent norms)."""


def _verify(argv: Sequence[str]) -> int:
    parser = verify_parser()
    args = parser.parse_args(argv)
    if args.ep > 1 and not args.experts:
        parser.error(f"--ep {args.ep} needs --experts N (a MoE model).")
    if args.transformer_impl == "transformer_engine" and not _importable("transformer_engine"):
        parser.error("--transformer-impl transformer_engine: Transformer Engine is not "
                     "installed here; run on a GPU node that has it, or use local.")
    cfg = muon_config_from_args(args)  # bad --muon-* values stop here, before megatron loads
    from muon_megatron.testing.tiny import Layout, ModelSpec
    from muon_megatron.tools.verify import VerifySpec, run_verify

    layout = Layout(
        tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp, sequence_parallel=args.sequence_parallel,
        cp=args.cp,
    )
    model = ModelSpec(
        num_layers=2 * args.pp,
        num_experts=args.experts,
        moe_token_dispatcher_type=args.dispatcher,
        moe_grouped_gemm=args.grouped_gemm,
        bf16=args.bf16,
        transformer_impl=args.transformer_impl,
        **(MLA_MODEL if args.mla else {}),
    )
    spec = VerifySpec(layout=layout, dp=args.dp, model=model, steps=args.steps)
    try:  # the training entry's layout checks (CP with local attention, say), before any rank
        spec.distributed_layout().check(model, spec.world_size)
    except ValueError as error:
        parser.error(str(error))
    result = run_verify(spec, cfg, backend=args.backend)
    if launcher_rank() != 0:  # under torchrun, rank 0 reports
        return 0 if result["within_tolerance"] else 1
    for name, diff in sorted(result["diffs"].items()):
        print(f"  {name:70s} rel_diff={diff:.3e}")
    for family, diff in sorted(result["family_diffs"].items()):
        print(
            f"  family {family:8s} rel_diff={diff:.3e} tolerance={result['tolerances'][family]:.2e}"
            f" (measured fp32 noise {result['noise_diffs'][family]:.2e})"
        )
    if result["tensor_tolerance"] is not None:
        print(f"  every tensor: worst rel_diff={result['diffs'][result['worst_param']]:.3e} "
              f"({result['worst_param']}) tolerance={result['tensor_tolerance']:.2e}")
    print(f"losses dist={[round(x, 4) for x in result['dist_losses']]}")
    print(f"losses ref ={[round(x, 4) for x in result['ref_losses']]}")
    families = result["family_diffs"]
    worst = max(families, key=lambda f: families[f] / result["tolerances"][f])
    print(
        f"verify: max_rel_diff={result['max_rel_diff']:.3e} "
        f"tolerance={result['tolerances'][worst]:.2e} layout={result['layout']}"
    )
    return 0 if result["within_tolerance"] else 1


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _demo(argv: Sequence[str]) -> int:
    from muon_megatron.training import demo

    return demo.main(argv)


def _bench(argv: Sequence[str]) -> int:
    from muon_megatron.tools import bench

    return bench.main(argv)


def _plan(argv: Sequence[str]) -> int:
    from muon_megatron.planner import run

    return run.main(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"verify": _verify, "demo": _demo, "bench": _bench, "plan": _plan}
    if not argv or argv[0] not in commands:
        print(f"usage: muon-megatron {{{','.join(commands)}}} [options]", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
