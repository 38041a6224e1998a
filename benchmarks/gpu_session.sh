#!/usr/bin/env bash
# Every GPU figure issue 13 asks for, in one short run on a lent GPU node (1-8 GPUs):
#   1. `muon-megatron verify` under torchrun over NCCL (parity with the CPU reference);
#   2. `muon-megatron bench` under torchrun over NCCL (ours / megatron-core's Muon, Muon /
#      AdamW, prepare_grads, transient memory) for the layouts of the node's world size;
#   3. benchmarks/gpu_ns_throughput.py (bf16 Newton-Schulz against the matmul peak, and the
#      optimizer's share of a ~1B GPT's iteration);
#   4. the GPU-only tests (tests/functional/test_qk_clip_te.py: TE's max logits against the
#      local hook's; it skips, saying why, where TE >= 2.9 is not installed).
# Results go to $OUT (default outputs/gpu); record them in docs/performance.md with the date
# and the device. Usage: bash benchmarks/gpu_session.sh [NGPUS]
set -uo pipefail
cd "$(dirname "$0")/.."
NGPUS=${1:-$(python -c 'import torch; print(torch.cuda.device_count())')}
OUT=${OUT:-outputs/gpu}
mkdir -p "$OUT"
PY=${PY:-python}
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc-per-node "$NGPUS")
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/device.csv" 2>&1
if [ "$NGPUS" -ge 2 ]; then
  timeout 300 "${TORCHRUN[@]}" -m muon_megatron.tools.cli verify --dp "$NGPUS" --steps 5 \
    --backend nccl > "$OUT/verify_dp.txt" 2>&1; echo "verify dp: rc=$?"
  if [ $((NGPUS % 2)) -eq 0 ]; then
    timeout 300 "${TORCHRUN[@]}" -m muon_megatron.tools.cli verify --tp 2 --dp $((NGPUS / 2)) \
      --steps 5 --backend nccl > "$OUT/verify_tp2.txt" 2>&1; echo "verify tp2: rc=$?"
  fi
  case "$NGPUS" in 2) LAYOUTS="dp2 tp2";; 4) LAYOUTS="dp4 tp2xdp2 moe_ep2xdp2";; *) LAYOUTS="";; esac
  if [ -n "$LAYOUTS" ]; then
    timeout 600 "${TORCHRUN[@]}" -m muon_megatron.tools.cli bench --layouts $LAYOUTS \
      --backend nccl --out "$OUT/bench.json" > "$OUT/bench.txt" 2>&1; echo "bench: rc=$?"
  fi
fi
timeout 600 "${TORCHRUN[@]}" benchmarks/gpu_ns_throughput.py --out "$OUT/gpu_ns.json" \
  > "$OUT/gpu_ns.txt" 2>&1; echo "gpu_ns_throughput: rc=$?"
timeout 300 "$PY" -m pytest -q -rs tests/functional/test_qk_clip_te.py > "$OUT/gpu_tests.txt" 2>&1
echo "gpu tests: rc=$?"
tail -n 3 "$OUT"/*.txt
