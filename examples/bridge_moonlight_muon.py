"""Moonlight-16B-A3B pre-training with Muon in Megatron-Bridge (docs/bridge.md).

Bridge's own Moonlight recipe with muon-megatron's optimizer config
(`muon_megatron.bridge.recipes.moonlight_16b_muon_pretrain_config`). Needs Megatron-Bridge
(`pip install megatron-bridge`, Python >= 3.12, Transformer Engine) and GPUs, e.g. on two
nodes of 8 H100 (the recipe's TP1 x EP8 layout):

    torchrun --nnodes 2 --nproc-per-node 8 ... examples/bridge_moonlight_muon.py \
        --data-path 0.7 /data/web_text_document 0.3 /data/code_text_document \
        --checkpoint-dir /ckpt/moonlight_muon

`--data-path` is Megatron's indexed datasets (PREFIX.bin / .idx, a prefix or a blend "W1 P1
W2 P2 ..."), made with Moonlight's tokenizer by Megatron-LM's `tools/preprocess_data.py`
(examples/moonlight_multinode.sbatch shows the command); without it the recipe's mock data
is used.
"""

import argparse

from megatron.bridge.training.gpt_step import forward_step
from megatron.bridge.training.pretrain import pretrain

from muon_megatron.bridge.recipes import moonlight_16b_muon_pretrain_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-path", nargs="+", default=None)
    parser.add_argument("--checkpoint-dir", default=None)
    parser.add_argument("--train-iters", type=int, default=None)
    args = parser.parse_args()
    cfg = moonlight_16b_muon_pretrain_config()
    if args.data_path:
        cfg.dataset.data_path = args.data_path
        cfg.dataset.blend = None
    if args.checkpoint_dir:
        cfg.checkpoint.save = cfg.checkpoint.load = args.checkpoint_dir
    if args.train_iters:
        cfg.train.train_iters = args.train_iters
    pretrain(config=cfg, forward_step_func=forward_step)


if __name__ == "__main__":
    main()
