"""Flags of the training entry: Megatron-LM's names and defaults, plus the `--muon-*` flags.

Only the Megatron-LM flags the entry acts on are defined; each keeps Megatron-LM's spelling
and default (except the model size, which defaults to a tiny GPT so that a bare run works
on a laptop). The `--muon-*` flags come from `MuonConfig` via `add_muon_config_args`.
`validate_args` raises ValueError naming the value and the fix, before any process starts.
"""

from __future__ import annotations

import argparse
import math
import re
from typing import Any

from muon_megatron.config_flags import add_muon_config_args, muon_config_from_args
from muon_megatron.training.data import VOCAB_SIZE
from muon_megatron.training.indexed_data import add_data_args, data_errors
from muon_megatron.training.interleaving import interleaved_batch_errors, virtual_pipeline_errors
from muon_megatron.training.layout_checks import context_parallel_errors, mla_errors
from muon_megatron.training.writers import add_writer_args, writer_errors

__all__ = ["build_parser", "layout_errors", "validate_args", "default_world_size",
           "moe_layer_pattern", "model_dims"]


def _moe_layer_freq(text: str) -> int | list[int]:
    """Megatron-LM's `--moe-layer-freq`: an int N (every N-th layer is MoE) or a list
    pattern such as `([0]*1+[1]*26)` (0 dense, 1 MoE)."""
    text = text.strip()
    if re.fullmatch(r"\d+", text):
        return int(text)
    if re.search(r"[^,\d\[\]\(\)\+\*\s]", text):
        raise argparse.ArgumentTypeError(
            f"--moe-layer-freq {text!r}: use an int or a pattern like '([0]*1+[1]*26)'"
        )
    value = eval(text, {"__builtins__": {}}, {})  # noqa: S307 (digits, brackets, + and * only)
    if not isinstance(value, list) or any(v not in (0, 1) for v in value):
        raise argparse.ArgumentTypeError(f"--moe-layer-freq {text!r} must give a list of 0/1")
    return value


def _topk_scaling_factor(text: str) -> float | str:
    """`--moe-router-topk-scaling-factor`: a positive float, or 'moonlight'."""
    if text == "moonlight":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--moe-router-topk-scaling-factor {text!r}: give a number or 'moonlight'"
        ) from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"--moe-router-topk-scaling-factor {text} must be > 0")
    return value


FUSION_FLAGS = (
    "no-bias-gelu-fusion", "no-bias-swiglu-fusion", "no-bias-dropout-fusion",
    "no-masked-softmax-fusion", "no-rope-fusion", "no-gradient-accumulation-fusion",
    "no-persist-layer-norm",
)  # fmt: skip
"""Megatron-LM's switches for its fused kernels, which it turns on by default on GPU."""


def build_parser(data: bool = True) -> argparse.ArgumentParser:
    """The parser of `examples/pretrain_moe.py` (Megatron-LM flag names); without `data`,
    no data / tokenizer flags (the planner, which does not model them)."""
    p = argparse.ArgumentParser(
        prog="pretrain_moe.py",
        description="Train a GPT / MoE with megatron-core on Megatron's indexed datasets "
        "(--data-path) or byte-level Python stdlib text (the default), with Muon "
        "(--optimizer muon) or AdamW (--optimizer adam).",
        allow_abbrev=False,
    )
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--expert-model-parallel-size", type=int, default=1)
    g.add_argument("--expert-tensor-parallel-size", type=int, default=None,
                   help="Default: the tensor-parallel size (as in Megatron-LM).")
    g.add_argument("--context-parallel-size", type=int, default=1,
                   help="Above 1 needs Transformer Engine's attention.")
    for vpp, what in (("layers-per-virtual-pipeline-stage", "layers per model chunk"),
                      ("virtual-stages-per-pipeline-rank", "model chunks per pipeline rank")):
        g.add_argument(f"--num-{vpp}", type=int, default=None, help=f"Interleaving: {what}.")
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None)
    g.add_argument("--decoder-last-pipeline-num-layers", type=int, default=None)
    g.add_argument("--use-distributed-optimizer", action="store_true", default=True,
                   help="Accepted for Megatron-LM compatibility; always on (ZeRO-1).")
    g.add_argument("--overlap-grad-reduce", action="store_true")
    g.add_argument("--overlap-param-gather", action="store_true")
    g.add_argument("--ddp-bucket-size", type=int, default=None,
                   help="Elements per DDP gradient bucket with --overlap-grad-reduce (default: "
                   "megatron's, max(40M, 1M x DP size)).")
    g.add_argument("--world-size", type=int, default=None,
                   help="Without torchrun (CPU only): number of gloo processes to spawn. "
                   "Default: the smallest world the parallel sizes need.")
    g.add_argument("--timeout-s", type=float, default=1800.0,
                   help="Process-group timeout and, when spawning on CPU, the run's limit.")

    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, default=2)
    g.add_argument("--hidden-size", type=int, default=64)
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="Default: 4 x hidden.")
    g.add_argument("--num-attention-heads", type=int, default=4)
    g.add_argument("--group-query-attention", action="store_true")
    g.add_argument("--num-query-groups", type=int, default=1)
    g.add_argument("--kv-channels", type=int, default=None)
    g.add_argument("--seq-length", type=int, default=64)
    g.add_argument("--max-position-embeddings", type=int, default=None)
    g.add_argument("--position-embedding-type", choices=("rope", "learned_absolute"),
                   default="rope")
    g.add_argument("--normalization", choices=("LayerNorm", "RMSNorm"), default="LayerNorm")
    g.add_argument("--norm-epsilon", type=float, default=1e-5)
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--disable-bias-linear", action="store_true")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="Byte corpus: embedding rows (default 256, the byte ids; a larger value "
                   "pads the table, e.g. to a production model's shapes). With --data-path: "
                   "Megatron-LM's meaning, NullTokenizer's / TikTokenizer's vocabulary.")
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--attention-dropout", type=float, default=0.1)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--transformer-impl", choices=("local", "transformer_engine"), default=None,
                   help="Default: transformer_engine when CUDA and TE are available, else local.")
    g.add_argument("--qk-layernorm", action="store_true",
                   help="Norms on queries and keys; with MLA, on the q and kv latents "
                   "(q_layernorm, kv_layernorm), as DeepSeek-V3 and Moonlight have.")
    g.add_argument("--rotary-base", type=int, default=10000)
    g.add_argument("--rope-type", choices=("rope", "yarn"), default=None,
                   help="MLA's RoPE: default megatron-core's (yarn).")

    g = p.add_argument_group("multi-latent attention (MLA)")
    g.add_argument("--multi-latent-attention", action="store_true",
                   help="DeepSeek-V3 / Moonlight attention (megatron-core's MLASelfAttention).")
    g.add_argument("--q-lora-rank", type=int, default=None,
                   help="Query latent rank; default None: one linear_q_proj, no q LoRA.")
    g.add_argument("--kv-lora-rank", type=int, default=32)
    g.add_argument("--qk-head-dim", type=int, default=128,
                   help="Per-head q/k dim without RoPE (HF qk_nope_head_dim).")
    g.add_argument("--qk-pos-emb-head-dim", type=int, default=64,
                   help="Per-head q/k RoPE dim (HF qk_rope_head_dim).")
    g.add_argument("--v-head-dim", type=int, default=128)

    g = p.add_argument_group("moe")
    g.add_argument("--num-experts", type=int, default=None)
    g.add_argument("--moe-router-topk", type=int, default=2)
    g.add_argument("--moe-ffn-hidden-size", type=int, default=None,
                   help="Default: --ffn-hidden-size.")
    g.add_argument("--moe-shared-expert-intermediate-size", type=int, default=None)
    g.add_argument("--moe-layer-freq", type=_moe_layer_freq, default=1)
    g.add_argument("--moe-grouped-gemm", action="store_true")
    g.add_argument("--moe-token-dispatcher-type", choices=("allgather", "alltoall"),
                   default="allgather")
    g.add_argument("--moe-router-load-balancing-type",
                   choices=("aux_loss", "seq_aux_loss", "none"), default="aux_loss")
    g.add_argument("--moe-aux-loss-coeff", type=float, default=0.0)
    g.add_argument("--moe-router-score-function", choices=("softmax", "sigmoid"),
                   default="softmax")
    g.add_argument("--moe-router-enable-expert-bias", action="store_true")
    g.add_argument("--moe-router-bias-update-rate", type=float, default=1e-3)
    g.add_argument("--moe-router-topk-scaling-factor", type=_topk_scaling_factor, default=None,
                   help="Scale of the normalized top-k gate (Moonlight 2.446, DeepSeek-V3 "
                   "2.5); 'moonlight' computes Moonlight's factor for --num-experts and "
                   "--moe-router-topk (arXiv 2502.16982, appendix C).")
    g.add_argument("--moe-shared-expert-gate", action="store_true",
                   help="A sigmoid gate on the shared experts' output (its [1, hidden] "
                   "weight stays on AdamW).")

    g = p.add_argument_group("fused kernels (on GPU; the CPU runs the plain paths)")
    for flag in FUSION_FLAGS:
        g.add_argument(f"--{flag}", action="store_true", help="As in Megatron-LM.")

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=2)
    g.add_argument("--global-batch-size", type=int, default=8)
    g.add_argument("--train-iters", type=int, default=100)
    g.add_argument("--optimizer", choices=("adam", "muon"), default="adam",
                   help="'muon': Muon for 2-D hidden weights, AdamW for the rest (Moonlight).")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-init", type=float, default=0.0)
    g.add_argument("--lr-decay-iters", type=int, default=None, help="Default: --train-iters.")
    g.add_argument("--lr-decay-style", choices=("constant", "linear", "cosine",
                                                "inverse-square-root"), default="linear")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true", help="Rejected: Muon needs bf16 or fp32.")
    g.add_argument("--seed", type=int, default=1234)

    g = p.add_argument_group("QK-Clip (MuonClip, Kimi K2; qk_clip/clip.py)")
    g.add_argument("--qk-clip", action="store_true",
                   help="After each step, rescale W_q / W_k of heads whose max logit > tau.")
    g.add_argument("--qk-clip-alpha", type=float, default=_tc_default("qk_clip_alpha"),
                   help="Share of the clip on W_q (W_k takes 1 - alpha).")
    g.add_argument("--qk-clip-threshold", type=float, default=_tc_default("qk_clip_threshold"),
                   help="tau: the max pre-softmax logit a head may keep.")
    g.add_argument("--log-max-attention-logit", action="store_true",
                   help="Log the max attention logit (implied by --qk-clip).")

    g = p.add_argument_group("logging, evaluation and checkpoints")
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--eval-interval", type=int, default=1000,
                   help="Evaluate every N iterations and once at the end, after the final "
                   "save; 0: never.")
    g.add_argument("--eval-iters", type=int, default=10,
                   help="Validation batches per evaluation; 0: no evaluation (as in "
                   "Megatron-LM).")
    g.add_argument("--output-dir", default="runs/pretrain_moe",
                   help="Where the JSON log and the loss-curve PNG go.")
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--save-interval", type=int, default=None)

    for add in (add_writer_args, add_data_args, add_muon_config_args):
        if data or add is not add_data_args:
            add(p)
    return p


def _tc_default(name: str) -> Any:
    # megatron-core's TransformerConfig holds the QK-Clip defaults; not written twice.
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig.__dataclass_fields__[name].default


def moe_layer_pattern(args: argparse.Namespace) -> list[int]:
    """0/1 per layer (1 = MoE); all zeros for a dense model."""
    if args.num_experts is None:
        return [0] * args.num_layers
    freq = args.moe_layer_freq
    if isinstance(freq, int):
        return [1 if i % freq == 0 else 0 for i in range(args.num_layers)]
    return list(freq)


def _etp(args: argparse.Namespace) -> int:
    if args.expert_tensor_parallel_size is None:
        return args.tensor_model_parallel_size
    return args.expert_tensor_parallel_size


def default_world_size(args: argparse.Namespace) -> int:
    """Smallest world for the layout: dp is the least that lets ep x etp divide dp x cp x tp."""
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    cp = max(args.context_parallel_size, 1)
    experts = args.expert_model_parallel_size * _etp(args)
    dp = experts // math.gcd(experts, tp * cp)
    return dp * tp * pp * cp


def layout_errors(args: argparse.Namespace, world_size: int) -> list[str]:
    """What keeps the model from running under its parallel layout on `world_size` ranks,
    one message per problem naming the flag and the fix ([] when it can run)."""
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    cp = args.context_parallel_size
    ep, etp = args.expert_model_parallel_size, _etp(args)
    errors: list[str] = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            errors.append(message)

    need(cp >= 1, f"--context-parallel-size {cp} must be >= 1")
    errors.extend(virtual_pipeline_errors(args))
    need(world_size % (tp * pp * cp) == 0,
         f"world size {world_size} is not divisible by tp*pp*cp = {tp}*{pp}*{cp}")
    dp = world_size // (tp * pp * cp) if world_size % (tp * pp * cp) == 0 else 1
    need(args.num_attention_heads % tp == 0,
         f"--num-attention-heads {args.num_attention_heads} is not divisible by tp={tp}")
    if args.group_query_attention:
        need(args.num_query_groups % tp == 0,
             f"--num-query-groups {args.num_query_groups} is not divisible by tp={tp}")
    if args.multi_latent_attention:
        errors.extend(mla_errors(args, tp))
    need(not args.sequence_parallel or tp > 1, "--sequence-parallel needs tp > 1")
    need(not args.qk_clip or (args.qk_clip_threshold > 0 and 0 <= args.qk_clip_alpha <= 1),
         "--qk-clip needs --qk-clip-threshold > 0 and --qk-clip-alpha in [0, 1]")
    need(not (args.qk_clip or args.log_max_attention_logit)
         or args.transformer_impl != "transformer_engine",
         "--qk-clip / --log-max-attention-logit read the local attention's logits: use "
         "--transformer-impl local")
    if cp > 1:
        errors.extend(context_parallel_errors(args, tp, cp))
    else:
        need(not args.sequence_parallel or args.seq_length % tp == 0,
             f"--seq-length {args.seq_length} is not divisible by tp={tp} (sequence parallel)")
    uneven = (args.decoder_first_pipeline_num_layers, args.decoder_last_pipeline_num_layers)
    if uneven == (None, None):
        need(args.num_layers % pp == 0,
             f"--num-layers {args.num_layers} is not divisible by pp={pp}; set "
             "--decoder-first/last-pipeline-num-layers for an uneven split")
    if args.num_experts is None:
        need(ep == 1, f"--expert-model-parallel-size {ep} needs --num-experts")
    else:
        need(args.num_experts % ep == 0,
             f"--num-experts {args.num_experts} is not divisible by ep={ep}")
        need((dp * cp * tp) % (ep * etp) == 0,
             f"ep x etp = {ep} x {etp} must divide dp x cp x tp = {dp} x {cp} x {tp}; change "
             "--world-size or --expert-tensor-parallel-size")
        need(tp == 1 or args.sequence_parallel,
             f"megatron requires --sequence-parallel for MoE with tp={tp}")
        need(args.moe_router_topk <= args.num_experts,
             f"--moe-router-topk {args.moe_router_topk} > --num-experts {args.num_experts}")
        need(not args.moe_shared_expert_intermediate_size or args.disable_bias_linear,
             "megatron's shared experts take no bias: add --disable-bias-linear")
        need(args.moe_router_topk_scaling_factor is None or args.moe_router_topk > 1,
             "--moe-router-topk-scaling-factor scales the normalized top-k gate: it needs "
             "--moe-router-topk > 1")
        need(not args.moe_shared_expert_gate or bool(args.moe_shared_expert_intermediate_size),
             "--moe-shared-expert-gate needs --moe-shared-expert-intermediate-size")
        need(len(moe_layer_pattern(args)) == args.num_layers,
             f"--moe-layer-freq pattern has {len(moe_layer_pattern(args))} entries for "
             f"{args.num_layers} layers")
    return errors


def validate_args(args: argparse.Namespace, world_size: int) -> None:
    """Raise ValueError, naming the value and the fix, for settings that cannot run."""
    errors = layout_errors(args, world_size)

    def need(ok: bool, message: str) -> None:
        if not ok:
            errors.append(message)

    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    cp = args.context_parallel_size
    dp = world_size // (tp * pp * cp) if cp >= 1 and world_size % (tp * pp * cp) == 0 else 1
    need(args.global_batch_size % (args.micro_batch_size * dp) == 0,
         f"--global-batch-size {args.global_batch_size} must be a multiple of "
         f"--micro-batch-size x data-parallel size = {args.micro_batch_size} x {dp}")
    errors.extend([] if errors else interleaved_batch_errors(args, dp))
    need(not args.fp16, "--fp16 is not supported with muon-megatron; use --bf16")
    need(args.data_path is not None or (args.vocab_size or VOCAB_SIZE) >= VOCAB_SIZE,
         f"--vocab-size {args.vocab_size} is below the byte tokenizer's {VOCAB_SIZE}")
    errors.extend(data_errors(args) + writer_errors(args))
    decay = args.lr_decay_iters or args.train_iters
    need(args.lr_warmup_iters < decay,
         f"--lr-warmup-iters {args.lr_warmup_iters} must be below the decay iterations "
         f"({decay}, from --lr-decay-iters or --train-iters)")
    need(args.train_iters >= 1, f"--train-iters {args.train_iters} must be >= 1")
    need(args.log_interval >= 1, f"--log-interval {args.log_interval} must be >= 1")
    need(args.eval_iters >= 0,
         f"--eval-iters {args.eval_iters} must be >= 0 (0: no evaluation)")
    need(args.eval_interval >= 0,
         f"--eval-interval {args.eval_interval} must be >= 0 (0: no evaluation)")
    need(args.save_interval is None or args.save_interval >= 0,
         f"--save-interval {args.save_interval} must be >= 0 (0 or absent: save at the end "
         "only)")
    if args.optimizer == "muon":
        try:  # refused --muon-* flags (Megatron-LM's that we do not honour) and bad values
            muon_config_from_args(args)
        except ValueError as error:
            errors.append(str(error))
    if errors:
        raise ValueError("invalid training arguments:\n  " + "\n  ".join(errors))


def model_dims(args: argparse.Namespace) -> dict[str, Any]:
    """Sizes with Megatron-LM's derived defaults filled in."""
    ffn = args.ffn_hidden_size or 4 * args.hidden_size
    return {
        "ffn_hidden_size": ffn,
        "moe_ffn_hidden_size": args.moe_ffn_hidden_size or ffn,
        "kv_channels": args.kv_channels or args.hidden_size // args.num_attention_heads,
        "num_query_groups": (
            args.num_query_groups if args.group_query_attention else args.num_attention_heads
        ),
    }
