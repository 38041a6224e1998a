"""Context parallelism (`--context-parallel-size 2`) with Muon: the loss and gradient, the
parity with the single-device reference, a bitwise resume, and the training entry.

megatron-core's local attention refuses CP, so every run here builds megatron-core's TE layer
spec on the CPU stand-in of tests/te_stand_in, whose DotProductAttention computes what TE's
`cp_comm_type="all_gather"` computes (K/V all-gathered over the CP group, the causal mask
from the load-balanced chunk positions). The training entry's `step.forward_backward` hands
each CP rank its share of every sequence (megatron-core's `get_batch_on_this_cp_rank`).

What the grid is under CP: the ZeRO-1 optimizer shards over megatron-core's
data-and-context-parallel group, so the grid spans TP x DP x CP; each logical matrix is
orthogonalized once in it (checked below from the Newton-Schulz calls themselves).
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
import torch

from muon_megatron.config import MuonConfig
from muon_megatron.runtime.launch import spawn
from muon_megatron.testing import tiny
from muon_megatron.tools.verify import VerifySpec, run_verify

TE = tiny.ModelSpec(transformer_impl="transformer_engine")
FP32 = MuonConfig(muon_ns_dtype="fp32")
STEPS = 3

# The grid over DP x CP (world 4), and over TP x CP with sequence parallelism (world 4).
LAYOUTS: dict[str, VerifySpec] = {
    "cp2xdp2": VerifySpec(layout=tiny.Layout(cp=2), dp=2, model=TE, steps=STEPS),
    "tp2xcp2-sp": VerifySpec(
        layout=tiny.Layout(tp=2, cp=2, sequence_parallel=True), dp=1, model=TE, steps=STEPS
    ),
}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def cp_run(request, te_stand_in) -> dict:
    return te_stand_in.in_te_process(run_verify, LAYOUTS[request.param], FP32, timeout_s=600)


def test_cp_parity_with_reference(cp_run: dict, assert_fp32_parity) -> None:
    """Each family within NOISE_GAIN x the run's own measured fp32 noise (floor
    FP32_TOLERANCE, ceiling NOISE_CEILING: verify.py says why)."""
    assert_fp32_parity(cp_run)


def test_cp_grid_orthogonalizes_every_logical_matrix_exactly_once(cp_run: dict) -> None:
    """Across all ranks of the TP x DP x CP grid, Newton-Schulz runs once per logical matrix
    per step, and the plan has as many logical matrices as the reference counts on one
    device; the grid holds every rank of the world (CP ranks included)."""
    counted: Counter = Counter()
    for per_rank in cp_run["ns_counts_per_rank"]:
        counted.update(per_rank)
    planned = set().union(*cp_run["planned_matrices_per_rank"])
    assert len(planned) == cp_run["ref_logical_matrices"]
    assert counted == Counter({key: cp_run["steps"] for key in planned})
    grids = {key[0] for key in planned}
    assert grids == {tuple(range(4))}, grids


# ---------------------------------------------------------------------------------------
# The loss and the gradient under CP: the whole sequence's mean, with uneven loss masks
# ---------------------------------------------------------------------------------------

# Only the fp32 summation order differs between CP2 and one rank (attention over gathered
# keys, DP x CP gradient reduction): measured 1e-8..1e-7 relative (loss and gradient norm).
# A gradient averaged per CP rank over its own tokens instead of over the whole sequence (the
# loss function Megatron-LM's pretrain_gpt.py returns) is off by the CP ranks' token
# imbalance: measured 3.9e-3 and 4.5e-3 in the gradient norm of the two steps below; a
# missing CP factor halves it.
CP_RTOL = 1e-5
# Rows 0 and 1 carry no loss on their first 12 positions: CP rank 0 (chunks 0 and 3 of 8
# positions) loses 8 of its 16 tokens, CP rank 1 (chunks 1 and 2) 4.
MASKED = 12


def _masked_batch(step: int) -> dict[str, torch.Tensor]:
    batch = tiny.global_batch(step, TE, 4, seed=5)
    batch["loss_mask"][:2, :MASKED] = 0
    return batch


def _loss_and_grad_norm(rank: int, world: int, cp: int) -> list[tuple[float, float]]:
    layout = tiny.Layout(cp=cp)
    tiny.initialize_parallel(layout, seed=3)
    model = tiny.build_model(TE, layout)
    optimizer = tiny.build_optimizer(model, tiny.optimizer_config(), FP32)
    out = []
    for step in range(2):
        optimizer.zero_grad()
        loss = tiny.forward_backward(model, _masked_batch(step), TE, micro_batch_size=2)
        ok, grad_norm, _ = optimizer.step()
        assert ok
        out.append((loss, float(grad_norm)))
    return out


def _cp_against_one_rank() -> tuple[list, list]:
    return spawn(_loss_and_grad_norm, 2, 2)[0], spawn(_loss_and_grad_norm, 1, 1)[0]


def test_cp2_loss_and_gradient_equal_one_rank_with_uneven_masks(te_stand_in) -> None:
    """Two steps at CP2 and on one rank from the same weights and batches (loss masks that
    leave the CP ranks 8 and 12 of their 16 tokens): the mean loss and the gradient norm
    (before clipping; the second step also checks the first update) agree to fp32 order."""
    cp2, one = te_stand_in.in_te_process(_cp_against_one_rank, timeout_s=600)
    for (loss, norm), (ref_loss, ref_norm) in zip(cp2, one):
        assert loss == pytest.approx(ref_loss, rel=CP_RTOL, abs=0)
        assert norm == pytest.approx(ref_norm, rel=CP_RTOL, abs=0)


# ---------------------------------------------------------------------------------------
# Bitwise resume at CP2 (test_checkpoint's training run, on the TE spec)
# ---------------------------------------------------------------------------------------


def _cp2_save_and_resume(root: str) -> dict:
    import test_checkpoint as tc

    job = {"layout": {"cp": 2}, "spec": {"transformer_impl": "transformer_engine"}}
    full, bucket = os.path.join(root, "cp2_full"), os.path.join(root, "cp2_dp")
    saving = spawn(tc._run, 2, tc.Job(saves=[(full, "fully_reshardable"),
                                             (bucket, "dp_reshardable")], **job))
    resumed = {sharding: spawn(tc._run, 2, tc.Job(load=path, **job))
               for sharding, path in (("fully_reshardable", full), ("dp_reshardable", bucket))}
    return {"saving": saving, "resumed": resumed}


def test_cp2_resume_is_bitwise(te_stand_in, tmp_path) -> None:
    """Save at step 3 of 6 in both formats, resume in fresh processes: the state after the
    load and every param, main param, momentum and AdamW state at the end equal the
    uninterrupted run's, bit for bit, on both CP ranks."""
    import test_checkpoint as tc

    runs = te_stand_in.in_te_process(_cp2_save_and_resume, str(tmp_path), timeout_s=900)
    for sharding, resumed in runs["resumed"].items():
        for rank, (saving, result) in enumerate(zip(runs["saving"], resumed)):
            tc._assert_bitwise(saving["at_save"], result["after_load"], f"{sharding} rank{rank}")
        tc._assert_runs_equal(runs["saving"], resumed)
    names = runs["saving"][0]["muon_names"]
    assert tc._momentum(runs["resumed"]["fully_reshardable"][0]["final"], names)


# ---------------------------------------------------------------------------------------
# The training entry (examples/pretrain_moe.py) at CP2 against one rank
# ---------------------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENTRY_FLAGS = [
    "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
    "--num-attention-heads", "4", "--seq-length", "64", "--global-batch-size", "4",
    "--micro-batch-size", "2", "--swiglu", "--disable-bias-linear", "--hidden-dropout", "0",
    "--attention-dropout", "0", "--transformer-impl", "transformer_engine", "--optimizer",
    "muon", "--muon-ns-dtype", "fp32", "--train-iters", "3", "--log-interval", "1",
    "--eval-interval", "0", "--lr-warmup-iters", "0",
]
# Three Muon steps of the byte-level model: the runs differ in fp32 summation order only
# (CP2's attention over gathered keys and gradient reduction), which Newton-Schulz amplifies
# from ~1e-7 to at most ~1e-5 of the update by the third step (verify.py's measured fp32
# noise); the loss moves far less. A CP rank training on the wrong rows, on its chunks
# without the other rank's keys, or on a wrongly weighted loss is off by 1e-2 or more.
ENTRY_LOSS_RTOL = 1e-5


def _entry_losses(tmp_path, world: int, cp: int) -> list[float]:
    import json
    import subprocess
    import sys

    out = tmp_path / f"cp{cp}"
    # A fresh interpreter with the stand-in first on its path: this process never sees it.
    path = [os.path.join(ROOT, "tests", "te_stand_in"), ROOT, os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
    argv = [sys.executable, "examples/pretrain_moe.py", *ENTRY_FLAGS, "--world-size", str(world),
            "--context-parallel-size", str(cp), "--output-dir", str(out)]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    assert f"x cp {cp} x dp 1" in done.stdout
    return [r["loss"] for r in json.loads((out / "muon.json").read_text())["iterations"]]


def test_training_entry_at_cp2_trains_as_one_rank(tmp_path) -> None:
    """examples/pretrain_moe.py with --context-parallel-size 2 (world 2, DP 1) and on one
    rank, on the same byte-level batches: the same loss at every iteration."""
    cp2, one = _entry_losses(tmp_path, 2, 2), _entry_losses(tmp_path, 1, 1)
    assert len(cp2) == len(one) == 3
    assert cp2 == pytest.approx(one, rel=ENTRY_LOSS_RTOL, abs=0)
