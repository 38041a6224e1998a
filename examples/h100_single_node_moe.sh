#!/usr/bin/env bash
# One node, 8 x H100: a 2.6 B-total / 0.66 B-active MoE with Muon, TP2 x EP4 x PP1.
#
#   world 8 = TP 2 x PP 1 x DP 4; experts: EP 4 x expert-TP 1 (expert-DP 2)
#   nccl, bf16, Transformer Engine layers when TE is installed (local layers otherwise).
#
# Sizes from `python examples/count_params.py "${MODEL_ARGS[@]}"`:
#   total parameters: 2,640,053,760 (2.64 B); active per token: 658,245,120 (0.66 B);
#   96.2 % of them are 2-D hidden weights updated by Muon.
#
# Data is the training entry's byte-level stdlib corpus (about 2.6 MB, so a run this size
# sees it many times over): this script shows the launch and the layout, not a recipe for
# a useful model. Run from the repository root:
#
#   bash examples/h100_single_node_moe.sh               # Muon
#   OPTIMIZER=adam bash examples/h100_single_node_moe.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OPTIMIZER=${OPTIMIZER:-muon}
export CUDA_DEVICE_MAX_CONNECTIONS=1      # what megatron asks for with sequence parallelism

PARALLEL_ARGS=(
    --tensor-model-parallel-size 2
    --pipeline-model-parallel-size 1
    --expert-model-parallel-size 4
    --expert-tensor-parallel-size 1
    --sequence-parallel
    --use-distributed-optimizer           # implied: muon-megatron is a ZeRO-1 optimizer
)
MODEL_ARGS=(
    --num-layers 16 --hidden-size 1536 --ffn-hidden-size 8192
    --num-attention-heads 16 --group-query-attention --num-query-groups 4
    --num-experts 32 --moe-router-topk 4 --moe-ffn-hidden-size 1024
    --moe-shared-expert-intermediate-size 2048
    --moe-layer-freq '([0]*1+[1]*15)'     # first layer dense, then MoE (DeepSeek-style)
    --moe-grouped-gemm                    # TEGroupedMLP with TE; Muon splits it per expert
    --moe-token-dispatcher-type alltoall
    --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 1e-3
    --swiglu --disable-bias-linear --normalization RMSNorm
    --untie-embeddings-and-output-weights --vocab-size 32768
    --hidden-dropout 0 --attention-dropout 0
    --seq-length 4096
)
TRAIN_ARGS=(
    --bf16
    --micro-batch-size 2 --global-batch-size 256 --train-iters 2000
    --lr-warmup-iters 200 --lr-decay-style cosine
    --clip-grad 1.0 --seed 1234
    --log-interval 10 --eval-interval 200 --eval-iters 10
    --output-dir runs/h100_moe_${OPTIMIZER}
)
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

exec torchrun --nproc-per-node 8 --nnodes 1 --standalone \
    examples/pretrain_moe.py \
    "${PARALLEL_ARGS[@]}" "${MODEL_ARGS[@]}" "${TRAIN_ARGS[@]}" "${OPTIMIZER_ARGS[@]}" "$@"
