"""benchmarks/gpu_ns_throughput.py is ready for a GPU node: its code path runs under torchrun
(here at toy sizes, `--cpu-dry-run`, over gloo) and, without CUDA and without the dry-run
flag, it refuses with exit code 2 instead of reporting CPU figures as GPU ones."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_ns_throughput.py"


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, check=False)


def test_gpu_script_runs_under_torchrun_on_two_ranks(tmp_path) -> None:
    out_json = tmp_path / "gpu.json"
    out = _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2", str(SCRIPT), "--cpu-dry-run", "--out", str(out_json)])
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    result = json.loads(out_json.read_text())
    assert result["world"] == 2 and result["step_time"]["world"] == 2
    assert result["device"].startswith("cpu (dry run")
    for name in ("adamw", "muon"):
        share = result["step_time"][f"{name}_optimizer_share"]
        assert 0 < share < 1
    assert [r["shape"] for r in result["newton_schulz"]] == [[64, 64], [64, 256], [128, 128],
                                                             [128, 512]]


def test_gpu_script_refuses_without_cuda() -> None:
    out = _run([sys.executable, str(SCRIPT), "--skip-model"])
    assert out.returncode == 2
    assert "CUDA is not available" in out.stderr and "--cpu-dry-run" in out.stderr
