"""`muon-megatron verify` and `bench` under torchrun: the path a GPU node takes (one process
per GPU over NCCL), run here with `--backend gloo` on CPU. `--backend nccl` needs GPUs and is
refused here, naming the fix. The NCCL run itself needs a GPU node (docs/performance.md)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# --standalone: a free port per job, so tests never collide on one.
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            "2", "-m", "muon_megatron.tools.cli"]


def _run(argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                          check=False)


def test_verify_runs_under_torchrun_with_one_process_per_rank() -> None:
    out = _run([*TORCHRUN, "verify", "--dp", "2", "--steps", "2", "--backend", "gloo"])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = [x for x in out.stdout.splitlines() if x.startswith("verify: max_rel_diff=")]
    assert len(lines) == 1, out.stdout  # rank 0 reports, once
    assert "layout=TP1xDP2xPP1xEP1" in lines[0]


def test_verify_under_torchrun_refuses_a_world_that_is_not_the_layout() -> None:
    out = _run([*TORCHRUN, "verify", "--tp", "2", "--dp", "2", "--steps", "1",
                "--backend", "gloo"])
    assert out.returncode != 0
    assert "--nproc-per-node 4" in out.stdout + out.stderr


def test_bench_runs_under_torchrun() -> None:
    out = _run([*TORCHRUN, "bench", "--layouts", "dp2", "tp2", "dp4", "--optimizers", "adamw",
                "muon_fp32", "--steps", "1", "--warmup", "1", "--num-layers", "2",
                "--hidden-size", "64", "--ffn-hidden-size", "128", "--backend", "gloo",
                "--out", os.devnull])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [x.split()[:2] for x in out.stdout.splitlines() if x.startswith(("dp", "tp"))]
    # The 2-rank job runs the 2-rank layouts; dp4 needs another launch.
    assert rows == [["dp2", "adamw"], ["dp2", "muon_fp32"], ["tp2", "adamw"],
                    ["tp2", "muon_fp32"]], out.stdout


@pytest.mark.parametrize("command", ["verify", "bench"])
def test_nccl_without_gpus_is_refused_naming_the_fix(command: str) -> None:
    out = _run([sys.executable, "-m", "muon_megatron.tools.cli", command, "--backend", "nccl",
                *(["--dp", "2"] if command == "verify" else [])], timeout=300)
    assert out.returncode != 0
    assert "--backend nccl needs CUDA GPUs" in out.stderr and "--backend gloo" in out.stderr
