"""examples/h100_single_node_moe.sh run end to end on CPU: Megatron-LM's own pretrain_gpt.py
through `python -m muon_megatron.megatron_lm`, on indexed data, at a tiny size.

Needs a Megatron-LM checkout (MEGATRON_LM_DIR). The data is made here without any download
(`muon_megatron.testing.indexed_corpus`: a 512-id byte-level BPE trained by `tokenizers`, two
indexed datasets written by megatron-core's builder), read through the script's own
`--data-path` blend and `--tokenizer-type HuggingFaceTokenizer`. `DEVICE=cpu` swaps the
script's GPU settings for gloo and the local layers; the flags after the script shrink the
model (TP1 x EP2 over 2 ranks, 2 layers, hidden 64, 4 experts) and the schedule (20
iterations, a checkpoint and an evaluation every 10).
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

from muon_megatron.optimizer.timing import muon_timer_names
from muon_megatron.testing.megatron_lm_run import logged_losses, megatron_lm_dir

ROOT = pathlib.Path(__file__).resolve().parents[2]
_MISSING = [m for m in ("tokenizers", "transformers") if importlib.util.find_spec(m) is None]
pytestmark = [
    pytest.mark.skipif(megatron_lm_dir() is None, reason="set MEGATRON_LM_DIR to a Megatron-LM "
                       "checkout to run the launch script through its pretrain_gpt.py"),
    pytest.mark.skipif(bool(_MISSING), reason=f"the HuggingFace tokenizer needs {_MISSING}"),
]
ITERS = 20
# Seen on this machine: lm loss 6.25 at iteration 1, 5.52 at 20 (ln 512 = 6.24 at the start).
# The mean of the last three logged losses must fall 0.3 below the first three's: under half
# the fall seen.
MIN_FALL = 0.3
TINY = [
    "--tensor-model-parallel-size", "1", "--expert-model-parallel-size", "2",
    "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
    "--num-attention-heads", "4", "--num-query-groups", "2", "--num-experts", "4",
    "--moe-router-topk", "2", "--moe-ffn-hidden-size", "64",
    "--moe-shared-expert-intermediate-size", "64", "--moe-layer-freq", "([0]*1+[1]*1)",
    "--seq-length", "64", "--max-position-embeddings", "64",
    "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", str(ITERS),
    "--lr-warmup-iters", "2", "--lr", "3e-3", "--min-lr", "3e-4", "--log-interval", "2",
    "--eval-interval", "10", "--eval-iters", "2", "--save-interval", "10", "--split", "90,10,0",
    "--timing-log-level", "2",
]  # fmt: skip


def test_h100_script_trains_on_indexed_data_through_pretrain_gpt(tmp_path: pathlib.Path) -> None:
    """The loss Megatron-LM logs falls by MIN_FALL; Muon's own line is printed; the validation
    ran; checkpoints of iterations 10 and 20 are in CHECKPOINT_DIR; with tensorboard
    installed, TENSORBOARD_DIR holds an event file; --timing-log-level 2's timer log lists
    Muon's step and phases."""
    from muon_megatron.testing.indexed_corpus import stdlib_indexed_corpus

    tokenizer, (a, b) = stdlib_indexed_corpus(str(tmp_path / "data"))
    env = dict(
        os.environ, DEVICE="cpu", GPUS_PER_NODE="2", MEGATRON_LM_DIR=megatron_lm_dir(),
        TOKENIZER_MODEL=tokenizer, DATA_PATH=f"0.7 {a} 0.3 {b}", RUN_DIR=str(tmp_path / "run"),
        PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]]),
        PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
    )
    proc = subprocess.run(["bash", str(ROOT / "examples" / "h100_single_node_moe.sh"), *TINY],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    losses = logged_losses(output)
    # Megatron-LM logs iteration 1 and then every --log-interval (2).
    steps = sorted(losses)
    assert steps == [1, *range(2, ITERS + 1, 2)], steps
    first = sum(losses[i] for i in steps[:3]) / 3
    last = sum(losses[i] for i in steps[-3:]) / 3
    assert last < first - MIN_FALL, losses
    assert "[muon] iteration" in output and "validation loss at iteration 10" in output
    for timer in muon_timer_names(2):
        assert f"    {timer} ." in output, timer
    checkpoints = tmp_path / "run" / "checkpoints"
    assert {p.name for p in checkpoints.glob("iter_*")} == {"iter_0000010", "iter_0000020"}
    if importlib.util.find_spec("tensorboard") is not None:
        assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
