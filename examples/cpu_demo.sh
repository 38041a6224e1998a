#!/usr/bin/env bash
# Tiny MoE with Muon on CPU: 4 gloo processes, TP2 x EP2 with sequence parallelism (DP 2),
# 4 experts top-2, byte-level Python stdlib text. About 2 minutes on 2 cores; ends by
# printing where the loss curve went. (`muon-megatron demo` runs the same thing.)
#
#   bash examples/cpu_demo.sh            # Muon
#   OPTIMIZER=adam bash examples/cpu_demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OPTIMIZER=${OPTIMIZER:-muon}

PARALLEL_ARGS=(
    --world-size 4                        # CPU only: gloo processes to spawn (torchrun sets it on GPUs)
    --tensor-model-parallel-size 2
    --expert-model-parallel-size 2
    --sequence-parallel                   # megatron requires it for MoE with TP > 1
    --use-distributed-optimizer           # implied: muon-megatron is a ZeRO-1 optimizer
)
MODEL_ARGS=(
    --num-layers 2 --hidden-size 64 --ffn-hidden-size 128
    --num-attention-heads 4 --group-query-attention --num-query-groups 2
    --num-experts 4 --moe-router-topk 2 --moe-ffn-hidden-size 128
    --moe-token-dispatcher-type allgather
    --swiglu --disable-bias-linear --normalization RMSNorm
    --hidden-dropout 0 --attention-dropout 0
    --seq-length 64
)
TRAIN_ARGS=(
    --micro-batch-size 4 --global-batch-size 16 --train-iters 300
    --lr-warmup-iters 30 --lr-decay-style cosine
    --clip-grad 1.0 --seed 1234
    --log-interval 20 --eval-interval 60 --eval-iters 4
    --output-dir runs/cpu_demo
)
if [ "$OPTIMIZER" = muon ]; then
    OPTIMIZER_ARGS=(
        --optimizer muon                  # AdamW: --optimizer adam
        --lr 3e-3 --min-lr 3e-4           # AdamW: the same lr (Muon's update RMS is matched to AdamW's)
        --weight-decay 0.1                # AdamW: the same weight decay
        --muon-momentum 0.95              # AdamW: --adam-beta1 0.9 --adam-beta2 0.999
        --muon-coefficients quintic       # (no AdamW counterpart)
        --muon-scale-mode moonlight       # 0.2 * sqrt(max(A, B)): AdamW-like update RMS
    )
else
    # The AdamW counterpart: same lr, weight decay and schedule.
    OPTIMIZER_ARGS=(--optimizer adam --lr 3e-3 --min-lr 3e-4 --weight-decay 0.1
                    --adam-beta1 0.9 --adam-beta2 0.999 --adam-eps 1e-8)
fi

exec "$PYTHON" examples/pretrain_moe.py \
    "${PARALLEL_ARGS[@]}" "${MODEL_ARGS[@]}" "${TRAIN_ARGS[@]}" "${OPTIMIZER_ARGS[@]}" "$@"
