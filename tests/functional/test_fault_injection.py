"""kill -9 of one rank at a chosen point, then a resume equal to the uninterrupted run, bit for bit.

Through the training entry (examples/pretrain_moe.py flags), 2 gloo ranks (dense GPT, DP2,
Muon), 6 iterations saving every 2. Each rank is its own process started as torchrun starts
one; rank 1 runs `tests/functional/fault_rank.py`, which kills it with SIGKILL at the point
named in MUON_TEST_FAULT, deterministically (no timer). Rank 0 is then killed as torchrun's
agent kills the survivors of a failed rank. The resume is an ordinary run of the entry with
`--load` and `--save` on the same directory, as a user would restart the job.

What must hold after each point:
* the tracker names the last complete checkpoint (the interrupted save never advanced it);
* the resumed iterations' loss, lr and grad norm equal the uninterrupted run's exactly, and
  so does every tensor of the final checkpoints (params, main params, Muon momentum, AdamW
  moments): the same arithmetic on the same inputs, so the comparison is `==`.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

import pytest
import torch

from muon_megatron.testing.checkpoint_tensors import checkpoint_tensors

ROOT = pathlib.Path(__file__).resolve().parents[2]
TRAIN_ITERS, SAVE_INTERVAL = 6, 2
FLAGS = [
    "--swiglu", "--disable-bias-linear", "--hidden-dropout", "0", "--attention-dropout", "0",
    "--optimizer", "muon", "--log-interval", "1", "--eval-interval", "0",
    "--lr-warmup-iters", "1", "--lr-decay-style", "cosine", "--lr-decay-iters", "6",
    "--train-iters", str(TRAIN_ITERS), "--save-interval", str(SAVE_INTERVAL),
]  # fmt: skip
# point -> (MUON_TEST_FAULT, the iteration the tracker must name after the kill)
FAULTS = {
    "mid-save, after this rank's first shard file": ("save-file:2", 2),
    "between a bucket's gather and its scatter": ("before-scatter:5", 4),
    "after the optimizer step, before the param all-gather": ("before-param-gather:5", 4),
}
# Seconds rank 0 may take to notice its peer is gone before it is killed, as torchrun would.
SURVIVOR_GRACE_S = 30
RUN_TIMEOUT_S = 300


def _env(**extra: str) -> dict[str, str]:
    path = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", **extra)


def _entry(args: list[str], output_dir: pathlib.Path) -> str:
    cmd = [sys.executable, "examples/pretrain_moe.py", "--world-size", "2", *FLAGS, *args,
           "--output-dir", str(output_dir)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)  # fmt: skip
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_with_rank_1_killed(fault: str, save: pathlib.Path, logs: pathlib.Path) -> None:
    """Both ranks as torchrun workers, each in its own session (so that the writer processes
    megatron-core forks go with it); rank 1 under fault_rank.py. Returns once rank 1 died of
    SIGKILL and rank 0 and every process either forked are gone."""
    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
    args = [*FLAGS, "--save", str(save), "--output-dir", str(logs), "--timeout-s", "120"]
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for rank in (0, 1):
        env = _env(RANK=str(rank), LOCAL_RANK=str(rank), **rendezvous)
        script = "examples/pretrain_moe.py"
        if rank == 1:
            env["MUON_TEST_FAULT"] = fault
            script = "tests/functional/fault_rank.py"
        with open(logs / f"rank{rank}.log", "w") as log:
            procs.append(subprocess.Popen([sys.executable, script, *args], cwd=ROOT, env=env,
                                          stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))  # fmt: skip
    survivor, victim = procs
    victim_code = None  # None: still running after RUN_TIMEOUT_S
    try:
        with contextlib.suppress(subprocess.TimeoutExpired):
            victim_code = victim.wait(timeout=RUN_TIMEOUT_S)
            survivor.wait(timeout=SURVIVOR_GRACE_S)
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    outputs = [(logs / f"rank{rank}.log").read_text()[-4000:] for rank in (0, 1)]
    assert victim_code == -signal.SIGKILL, (victim_code, outputs[1], outputs[0])


def _iterations(output_dir: pathlib.Path) -> list[tuple]:
    log = json.loads((output_dir / "muon.json").read_text())
    return [(r["iteration"], r["loss"], r["lr"], r["grad_norm"]) for r in log["iterations"]]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict:
    """The uninterrupted run: its iterations and its final checkpoint."""
    root = tmp_path_factory.mktemp("straight")
    _entry(["--save", str(root / "ckpt")], root / "out")
    return {"iterations": _iterations(root / "out"), "final": root / "ckpt" / "iter_0000006"}


@pytest.mark.parametrize("point", list(FAULTS))
def test_a_rank_killed_at_the_point_resumes_bitwise_like_the_uninterrupted_run(
    point: str, straight: dict, tmp_path: pathlib.Path
) -> None:
    fault, last_complete = FAULTS[point]
    save = tmp_path / "ckpt"
    _run_with_rank_1_killed(fault, save, tmp_path / "killed")
    assert (save / "latest_checkpointed_iteration.txt").read_text() == str(last_complete)

    stdout = _entry(["--load", str(save), "--save", str(save)], tmp_path / "resumed")
    assert f"> loaded {save / f'iter_{last_complete:07d}'} (iteration {last_complete})" in stdout
    resumed = _iterations(tmp_path / "resumed")
    assert [r[0] for r in resumed] == list(range(last_complete + 1, TRAIN_ITERS + 1))
    assert resumed == straight["iterations"][last_complete:]
    a = checkpoint_tensors(straight["final"], tmp_path / "a.pt")
    b = checkpoint_tensors(save / "iter_0000006", tmp_path / "b.pt")
    assert any("muon_momentum" in k for k in a) and any("exp_avg" in k for k in a), sorted(a)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
