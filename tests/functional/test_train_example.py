"""The training entry (examples/pretrain_moe.py) and `muon-megatron demo`, end to end on CPU.

Each test runs the real command in a subprocess: 4 gloo processes, TP2 x EP2 with sequence
parallelism (DP 2), a MoE with 4 experts and top-2 routing, on byte-level stdlib text.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from muon_megatron.testing.checkpoint_tensors import checkpoint_tensors
from muon_megatron.training.demo import DEMO_FLAGS

ROOT = pathlib.Path(__file__).resolve().parents[2]
STEPS = 30
# Over 30 steps from ~5.3 nats/byte (near-uniform over 256 bytes is 5.55) both optimizers
# reach ~3.0 at this lr; a fall of 0.5 between the first and last 5-step means leaves a wide
# margin for run-to-run and machine-to-machine differences.
MIN_FALL = 0.5
WINDOW = 5
# Budget (not asserted, the machine is shared): ~35-40 s per run on 2 busy cores.


def _run(cmd: list[str], timeout: float = 300) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


@pytest.mark.parametrize("optimizer", ["muon", "adam"])
def test_loss_falls_under_tp2_ep2_moe(optimizer: str, tmp_path: pathlib.Path) -> None:
    out = tmp_path / optimizer
    stdout = _run([
        sys.executable, "examples/pretrain_moe.py", *DEMO_FLAGS, "--optimizer", optimizer,
        "--train-iters", str(STEPS), "--lr-warmup-iters", "3", "--log-interval", "10",
        "--eval-interval", "0", "--output-dir", str(out),
    ])
    log = json.loads((out / f"{optimizer}.json").read_text())
    assert (log["world_size"], log["data_parallel_size"]) == (4, 2)
    assert log["args"]["tensor_model_parallel_size"] == 2
    assert log["args"]["expert_model_parallel_size"] == 2 and log["args"]["num_experts"] == 4
    losses = [r["loss"] for r in log["iterations"]]
    assert len(losses) == STEPS
    first, last = sum(losses[:WINDOW]) / WINDOW, sum(losses[-WINDOW:]) / WINDOW
    assert last < first - MIN_FALL, (first, last, losses)
    if optimizer == "muon":
        # Muon ran (its metrics exist) and its update RMS is near Moonlight's 0.2 target.
        rms = [r["update_rms"] for r in log["iterations"]]
        assert all(r is not None and 0.1 < r <= 0.21 for r in rms), rms
        # The plan's summary of rank 0's stage, once, before training (docs/scale.md).
        assert stdout.count("[muon plan] per step on H100 SXM: Newton-Schulz ideal") == 1
        assert "[muon plan] dense TP2xDP2" in stdout
        assert stdout.index("[muon plan]") < stdout.index(" iteration ")
        # The routing table, printed once by rank 0 when the optimizer is built.
        assert stdout.count(" Muon params (") == 1
        assert "experts.linear_fc1.weight: gate,up" in stdout
        assert stdout.index("[muon routing]") < stdout.index(" iteration ")
    else:
        assert all(r["update_rms"] is None for r in log["iterations"])
        assert "[muon plan]" not in stdout and "[muon routing]" not in stdout
    assert " iteration       30/      30 |" in stdout and "lm loss:" in stdout


def test_demo_runs_end_to_end_and_writes_the_plot(tmp_path: pathlib.Path) -> None:
    stdout = _run([sys.executable, "-m", "muon_megatron.tools.cli", "demo", "--train-iters", "5",
                      "--output-dir", str(tmp_path)])
    png = tmp_path / "loss_muon.png"
    assert f"> loss plot: {png}" in stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "muon.json").read_text())["summary"]["final_loss"] > 0


# MoE without biases: the expert optimizer holds Muon matrices only, so its checkpoint has
# no AdamW 'step' of its own, which megatron's ChainedOptimizer must still find consistent.
RESUME_LAYOUTS = {
    "dense-dp2": [],
    "moe-ep2": ["--expert-model-parallel-size", "2", "--num-experts", "4",
                "--moe-router-topk", "2"],
    # An interleaved pipeline: two model chunks of one layer per rank, megatron-core's
    # interleaved schedule (8 / 2 = 4 micro-batches per step, a multiple of PP).
    "pp2-vpp2": ["--pipeline-model-parallel-size", "2", "--num-layers", "4",
                 "--num-virtual-stages-per-pipeline-rank", "2"],
}


@pytest.mark.parametrize("layout", list(RESUME_LAYOUTS))
def test_save_then_load_continues_bitwise_like_an_uninterrupted_run(
    layout: str, tmp_path: pathlib.Path,
) -> None:
    """--save at iteration 4, --load to 6: iterations 5 and 6 match a straight 6-step run
    bit for bit: loss and lr in the log, and every tensor of the final checkpoints (params,
    main params, Muon momentum, AdamW moments). 2 processes (DP 2, EP 2 with expert DP 1, or
    PP 2 with two virtual stages per rank), Muon."""
    flags = [
        sys.executable, "examples/pretrain_moe.py", "--world-size", "2", "--swiglu",
        *RESUME_LAYOUTS[layout],
        "--disable-bias-linear", "--hidden-dropout", "0", "--attention-dropout", "0",
        "--optimizer", "muon", "--log-interval", "1", "--eval-interval", "0",
        "--lr-warmup-iters", "1", "--lr-decay-style", "cosine", "--lr-decay-iters", "6",
    ]
    ckpt = tmp_path / "ckpt"
    final_straight, final_resumed = tmp_path / "final_straight", tmp_path / "final_resumed"
    _run([*flags, "--train-iters", "6", "--save", str(final_straight),
          "--output-dir", str(tmp_path / "straight")])
    _run([*flags, "--train-iters", "4", "--save", str(ckpt), "--output-dir", str(tmp_path / "a")])
    stdout = _run([*flags, "--train-iters", "6", "--load", str(ckpt), "--save", str(final_resumed),
                   "--output-dir", str(tmp_path / "b")])
    assert f"> loaded {ckpt / 'iter_0000004'} (iteration 4)" in stdout
    straight = json.loads((tmp_path / "straight" / "muon.json").read_text())["iterations"][4:]
    resumed = json.loads((tmp_path / "b" / "muon.json").read_text())["iterations"]
    assert [(r["iteration"], r["loss"], r["lr"]) for r in resumed] == [
        (r["iteration"], r["loss"], r["lr"]) for r in straight
    ]
    a = checkpoint_tensors(final_straight / "iter_0000006", tmp_path / "a.pt")
    b = checkpoint_tensors(final_resumed / "iter_0000006", tmp_path / "b.pt")
    assert any("muon_momentum" in k for k in a) and any("exp_avg" in k for k in a), sorted(a)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# One process (DP 1, the entry's default world for a dense model), 3 iterations saved every 2:
# the last iteration is not a multiple of the interval, so only the final save writes it.
FINAL_SAVE_FLAGS = [
    sys.executable, "examples/pretrain_moe.py", "--optimizer", "muon", "--train-iters", "3",
    "--save-interval", "2", "--eval-interval", "2", "--log-interval", "1",
]


def test_eval_iters_0_runs_no_evaluation_and_writes_the_final_checkpoint(
    tmp_path: pathlib.Path,
) -> None:
    """`--eval-iters 0` (Megatron-LM's "no evaluation") with an --eval-interval that falls
    inside the run: no evaluation at all (it used to divide by zero at the first one and lose
    the run), the interval checkpoint at 2 and the final one at 3, with the tracker at 3."""
    save = tmp_path / "ckpt"
    stdout = _run([*FINAL_SAVE_FLAGS, "--eval-iters", "0", "--save", str(save),
                   "--output-dir", str(tmp_path / "out")])
    log = json.loads((tmp_path / "out" / "muon.json").read_text())
    assert [r["iteration"] for r in log["iterations"]] == [1, 2, 3]
    assert log["validation"] == [] and "validation loss" not in stdout
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "3"
    assert sorted(p.name for p in save.glob("iter_*")) == ["iter_0000002", "iter_0000003"]


def test_final_checkpoint_is_written_before_the_final_evaluation(tmp_path: pathlib.Path) -> None:
    """With evaluation on, the final checkpoint (iteration 3) is saved before the final
    evaluation starts, as Megatron-LM's `pretrain` orders them, so a failing evaluation cannot
    lose it; the evaluations are still those at every --eval-interval and at the end."""
    save = tmp_path / "ckpt"
    stdout = _run([*FINAL_SAVE_FLAGS, "--eval-iters", "1", "--save", str(save),
                   "--output-dir", str(tmp_path / "out")])
    log = json.loads((tmp_path / "out" / "muon.json").read_text())
    assert [v["iteration"] for v in log["validation"]] == [2, 3]
    saved_final = stdout.index(f"> saved {save / 'iter_0000003'}")
    evaluated_final = stdout.index("validation loss at iteration      3")
    assert saved_final < evaluated_final, stdout
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "3"
