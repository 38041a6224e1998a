"""Pretrain a GPT / MoE with megatron-core and Muon (or AdamW) on byte-level text.

Megatron-LM's flag names plus the `--muon-*` flags; `--help` lists them. On CPU it spawns
gloo processes itself; on GPUs launch it with torchrun (see the *.sh scripts beside it).
The training loop lives in the package (`muon_megatron.training.entry`) so that `muon-megatron demo`
works from an installed package; this file is only the entry point.

    python examples/pretrain_moe.py --tensor-model-parallel-size 2 \
        --expert-model-parallel-size 2 --sequence-parallel --num-experts 4 \
        --moe-router-topk 2 --optimizer muon --train-iters 100
"""

import sys

from muon_megatron.training.entry import main

if __name__ == "__main__":
    sys.exit(main())
