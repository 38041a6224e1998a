#!/usr/bin/env bash
# One node, 8 x H100: a 2.7 B-total / 0.71 B-active MoE with Muon, TP2 x EP4 x PP1, trained
# by Megatron-LM's own pretrain_gpt.py through muon-megatron's hook
# (`torchrun ... -m muon_megatron.megatron_lm pretrain_gpt.py --optimizer muon ...`).
#
#   world 8 = TP 2 x PP 1 x DP 4; experts: EP 4 x expert-TP 1 (expert-DP 2)
#   nccl, bf16, Transformer Engine layers (Megatron-LM's default).
#
# Sizes from `python examples/count_params.py "${MODEL_ARGS[@]}" --vocab-size 50432`:
#   total parameters: 2,694,317,568 (2.69 B); active per token: 712,508,928 (0.71 B);
#   94.2 % of them are 2-D hidden weights updated by Muon. (The model's vocabulary is the
#   tokenizer's, padded by Megatron-LM to a multiple of 128 x TP: 50,257 ids -> 50,432.)
#
# What it needs (environment variables):
#   MEGATRON_LM_DIR   a Megatron-LM checkout (core_v0.16.1 or newer; its pretrain_gpt.py runs)
#   TOKENIZER_MODEL   a HuggingFace tokenizer, a hub name or a local directory
#                     (default gpt2, GPT-2's 50,257 ids; no login needed)
#   DATA_PATH         Megatron indexed datasets (PREFIX.bin / PREFIX.idx), one prefix or a
#                     blend "W1 PREFIX1 W2 PREFIX2 ...", made with that tokenizer by
#                     Megatron-LM's tools/preprocess_data.py from JSON lines ({"text": ...}):
#
#     python $MEGATRON_LM_DIR/tools/preprocess_data.py --input corpus.jsonl \
#         --output-prefix /data/corpus --tokenizer-type HuggingFaceTokenizer \
#         --tokenizer-model "$TOKENIZER_MODEL" --append-eod --workers 32
#     # -> /data/corpus_text_document.bin/.idx: DATA_PATH=/data/corpus_text_document
#
#   CHECKPOINT_DIR    --save and --load (default runs/h100_moe_<optimizer>/checkpoints): a
#                     rerun resumes from the latest checkpoint there
#   TENSORBOARD_DIR   (default runs/h100_moe_<optimizer>/tensorboard); WANDB_PROJECT: also
#                     log to wandb (optional)
#   GPUS_PER_NODE     (default 8)
#   DEVICE=cpu        a smoke test of this script on a machine without GPUs: gloo, local
#                     layers, bf16, grouped GEMM and fused kernels off; shrink the model and
#                     the world with flags after the script (later flags win), e.g. as
#                     docs/megatron-lm.md shows
#
# Run from anywhere:
#   DATA_PATH=... MEGATRON_LM_DIR=... bash examples/h100_single_node_moe.sh    # Muon
#   OPTIMIZER=adam DATA_PATH=... MEGATRON_LM_DIR=... bash examples/h100_single_node_moe.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OPTIMIZER=${OPTIMIZER:-muon}
MEGATRON_LM_DIR=${MEGATRON_LM_DIR:?set MEGATRON_LM_DIR to a Megatron-LM checkout}
DATA_PATH=${DATA_PATH:?set DATA_PATH to indexed dataset prefixes (see the header)}
TOKENIZER_MODEL=${TOKENIZER_MODEL:-gpt2}
RUN_DIR=${RUN_DIR:-runs/h100_moe_${OPTIMIZER}}
CHECKPOINT_DIR=${CHECKPOINT_DIR:-$RUN_DIR/checkpoints}
TENSORBOARD_DIR=${TENSORBOARD_DIR:-$RUN_DIR/tensorboard}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
DEVICE=${DEVICE:-cuda}
export CUDA_DEVICE_MAX_CONNECTIONS=1      # what megatron asks for with sequence parallelism

PARALLEL_ARGS=(
    --tensor-model-parallel-size 2
    --pipeline-model-parallel-size 1
    --expert-model-parallel-size 4
    --expert-tensor-parallel-size 1
    --sequence-parallel
    --use-distributed-optimizer           # required: muon-megatron is a ZeRO-1 optimizer
)
MODEL_ARGS=(
    --num-layers 16 --hidden-size 1536 --ffn-hidden-size 8192
    --num-attention-heads 16 --group-query-attention --num-query-groups 4
    --num-experts 32 --moe-router-topk 4 --moe-ffn-hidden-size 1024
    --moe-shared-expert-intermediate-size 2048
    --moe-layer-freq '([0]*1+[1]*15)'     # first layer dense, then MoE (DeepSeek-style)
    --moe-token-dispatcher-type alltoall
    --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 1e-3
    --swiglu --disable-bias-linear --normalization RMSNorm
    --position-embedding-type rope
    --untie-embeddings-and-output-weights
    --hidden-dropout 0 --attention-dropout 0
    --seq-length 4096 --max-position-embeddings 4096
)
DATA_ARGS=(
    --data-path $DATA_PATH                # unquoted: a blend is several words
    --split 989,10,1
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER_MODEL"
)
TRAIN_ARGS=(
    --micro-batch-size 2 --global-batch-size 256 --train-iters 2000
    --lr-warmup-iters 200 --lr-decay-style cosine
    --clip-grad 1.0 --seed 1234
    --log-interval 10 --eval-interval 200 --eval-iters 10
    --save "$CHECKPOINT_DIR" --load "$CHECKPOINT_DIR" --save-interval 500
    --ckpt-format torch_dist              # the format that holds Muon's momentum
    --tensorboard-dir "$TENSORBOARD_DIR"
    --log-throughput --log-validation-ppl-to-tensorboard
)
if [ -n "${WANDB_PROJECT:-}" ]; then
    TRAIN_ARGS+=(--wandb-project "$WANDB_PROJECT" --wandb-exp-name "h100_moe_${OPTIMIZER}")
fi
if [ "$DEVICE" = cpu ]; then
    DEVICE_ARGS=(--distributed-backend gloo --transformer-impl local
                 --no-gradient-accumulation-fusion --no-bias-swiglu-fusion
                 --no-bias-dropout-fusion --no-masked-softmax-fusion --no-rope-fusion
                 --no-persist-layer-norm --num-workers 0)
else
    DEVICE_ARGS=(--bf16 --moe-grouped-gemm) # TEGroupedMLP; Muon splits it per expert
fi
if [ "$OPTIMIZER" = muon ]; then
    OPTIMIZER_ARGS=(
        --optimizer muon                  # AdamW: --optimizer adam
        --lr 6e-4 --min-lr 6e-5           # AdamW: the same lr (Muon's update RMS is matched to AdamW's)
        --weight-decay 0.1                # AdamW: the same weight decay
        --muon-momentum 0.95              # AdamW: --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-8
        --muon-coefficients quintic
        --muon-ns-dtype bf16              # Newton-Schulz matmuls in bf16 on the tensor cores
        --muon-comm-dtype fp32            # bf16 halves the gather/scatter bytes
    )
else
    # The AdamW counterpart: same lr, weight decay and schedule.
    OPTIMIZER_ARGS=(--optimizer adam --lr 6e-4 --min-lr 6e-5 --weight-decay 0.1
                    --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-8)
fi

exec torchrun --nproc-per-node "$GPUS_PER_NODE" --nnodes 1 --standalone \
    -m muon_megatron.megatron_lm "$MEGATRON_LM_DIR/pretrain_gpt.py" \
    "${PARALLEL_ARGS[@]}" "${MODEL_ARGS[@]}" "${DATA_ARGS[@]}" "${TRAIN_ARGS[@]}" \
    "${DEVICE_ARGS[@]}" "${OPTIMIZER_ARGS[@]}" "$@"
