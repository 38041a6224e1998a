"""Named models and layouts for `muon-megatron plan --model NAME` and docs/scale.md.

A preset is the Megatron-LM model flags of a published model; the layout flags and the
world size stay the user's (a preset's own layout is its docs/scale.md default, written
after the model flags, so a user's flags, given later, win).

- `moonlight-16b-a3b`: moonshotai/Moonlight-16B-A3B's config.json (as in
  examples/moonlight_multinode.sbatch), with that script's layout (PP2 13+14, EP8).
- `kimi-k2`: Kimi K2's shapes (61 layers, hidden 7168, 384 experts of 2048 top-8 + 1
  shared, first layer dense of 18432, MLA with q LoRA 1536 / kv LoRA 512, 64 heads, vocab
  163840), laid out as its report trains it: PP16 (61 = 3 + 14 x 4 + 2), EP16.
- `gpt-7b`: a Llama-2-7B-shaped dense GPT (32 layers, hidden 4096, SwiGLU 11008, 32 heads,
  vocab 32000, sequence 4096).
"""

from __future__ import annotations

__all__ = ["MODELS", "SCALE_CONFIGS", "preset_argv"]

_MOONLIGHT = (
    "--num-layers 27 --hidden-size 2048 --ffn-hidden-size 11264 --num-attention-heads 16 "
    "--multi-latent-attention --kv-lora-rank 512 --qk-head-dim 128 --qk-pos-emb-head-dim 64 "
    "--v-head-dim 128 --qk-layernorm --rope-type rope --rotary-base 50000 "
    "--num-experts 64 --moe-router-topk 6 --moe-ffn-hidden-size 1408 "
    "--moe-shared-expert-intermediate-size 2816 --moe-layer-freq ([0]*1+[1]*26) "
    "--moe-grouped-gemm --moe-token-dispatcher-type alltoall --moe-router-score-function sigmoid "
    "--moe-router-enable-expert-bias --moe-router-topk-scaling-factor 2.446 "
    "--swiglu --disable-bias-linear --normalization RMSNorm --untie-embeddings-and-output-weights "
    "--vocab-size 163840 --seq-length 8192 --micro-batch-size 1 --global-batch-size 512 --bf16 "
    "--overlap-grad-reduce "
    "--pipeline-model-parallel-size 2 --decoder-first-pipeline-num-layers 13 "
    "--decoder-last-pipeline-num-layers 14 --expert-model-parallel-size 8 "
    "--expert-tensor-parallel-size 1"
)
_KIMI_K2 = (
    "--num-layers 61 --hidden-size 7168 --ffn-hidden-size 18432 --num-attention-heads 64 "
    "--multi-latent-attention --q-lora-rank 1536 --kv-lora-rank 512 --qk-head-dim 128 "
    "--qk-pos-emb-head-dim 64 --v-head-dim 128 --qk-layernorm --rope-type rope "
    "--rotary-base 50000 --num-experts 384 --moe-router-topk 8 --moe-ffn-hidden-size 2048 "
    "--moe-shared-expert-intermediate-size 2048 --moe-layer-freq ([0]*1+[1]*60) "
    "--moe-grouped-gemm --moe-token-dispatcher-type alltoall --moe-router-score-function sigmoid "
    "--moe-router-enable-expert-bias --swiglu --disable-bias-linear --normalization RMSNorm "
    "--untie-embeddings-and-output-weights --vocab-size 163840 --seq-length 4096 "
    "--micro-batch-size 1 --global-batch-size 4096 --bf16 --overlap-grad-reduce "
    "--pipeline-model-parallel-size 16 --decoder-first-pipeline-num-layers 3 "
    "--decoder-last-pipeline-num-layers 2 --expert-model-parallel-size 16 "
    "--expert-tensor-parallel-size 1"
)
_GPT_7B = (
    "--num-layers 32 --hidden-size 4096 --ffn-hidden-size 11008 --num-attention-heads 32 "
    "--swiglu --disable-bias-linear --normalization RMSNorm --untie-embeddings-and-output-weights "
    "--vocab-size 32000 --seq-length 4096 --micro-batch-size 1 --global-batch-size 1024 --bf16 "
    "--overlap-grad-reduce"
)
MODELS: dict[str, list[str]] = {
    "moonlight-16b-a3b": _MOONLIGHT.split(),
    "kimi-k2": _KIMI_K2.split(),
    "gpt-7b": _GPT_7B.split(),
}

SCALE_CONFIGS: dict[str, list[str]] = {
    "moonlight-32": ["--model", "moonlight-16b-a3b", "--world-size", "32"],
    "moonlight-128": ["--model", "moonlight-16b-a3b", "--world-size", "128"],
    "moonlight-512": ["--model", "moonlight-16b-a3b", "--world-size", "512"],
    "moonlight-1024": ["--model", "moonlight-16b-a3b", "--world-size", "1024"],
    "gpt7b-tp1-dp64": ["--model", "gpt-7b", "--world-size", "64"],
    "gpt7b-tp1-dp512": ["--model", "gpt-7b", "--world-size", "512"],
    "gpt7b-tp8-dp64": ["--model", "gpt-7b", "--world-size", "512",
                       "--tensor-model-parallel-size", "8", "--sequence-parallel"],
    "gpt7b-tp8-dp512": ["--model", "gpt-7b", "--world-size", "4096",
                        "--tensor-model-parallel-size", "8", "--sequence-parallel"],
    "kimi-k2-2048": ["--model", "kimi-k2", "--world-size", "2048"],
}
"""The configurations of docs/scale.md (`benchmarks/scale_plans.py` prints them)."""


def preset_argv(argv: list[str]) -> list[str]:
    """`argv` with `--model NAME` replaced by the preset's flags (in its place: flags after
    it override the preset's)."""
    out: list[str] = []
    it = iter(argv)
    for arg in it:
        name = None
        if arg == "--model":
            name = next(it, None)
        elif arg.startswith("--model="):
            name = arg.split("=", 1)[1]
        else:
            out.append(arg)
            continue
        if name not in MODELS:
            raise ValueError(f"--model {name!r}: not a preset; use one of {sorted(MODELS)}")
        out.extend(MODELS[name])
    return out
