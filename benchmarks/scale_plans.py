"""Plan every docs/scale.md configuration and print one summary table.

    python benchmarks/scale_plans.py                      # this checkout
    python benchmarks/scale_plans.py --repo /tmp/before   # another checkout, side by side
    python benchmarks/scale_plans.py --only moonlight-1024 --out outputs/scale

Each configuration (`muon_megatron.planner.presets.SCALE_CONFIGS`) runs
`python -m muon_megatron.planner <flags> --json` with the checkout first on PYTHONPATH; the
table has, per configuration, the worst pipeline stage's Newton-Schulz ideal and critical
path (ms) and their ratio, the Muon phases' estimated time against megatron-core's Muon
and Moonlight's scheme, the busiest rank's memory (GiB) and extra bytes per step, and the
planner's own run time. With `--repo`, both checkouts are planned in the same run, one
configuration after the other, and the table shows both.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE))

from muon_megatron.planner.presets import SCALE_CONFIGS  # noqa: E402


def plan(repo: Path, argv: list[str], out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(repo), "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    # cwd: `python -m` puts the working directory first on the path, before PYTHONPATH.
    done = subprocess.run(
        [sys.executable, "-m", "muon_megatron.planner", *argv, f"--json={out.resolve()}"],
        env=env, capture_output=True, text=True, cwd=repo,
    )
    if done.returncode != 0:
        raise RuntimeError(f"plan {' '.join(argv)} failed:\n{done.stdout}\n{done.stderr}")
    data = json.loads(out.read_text())
    data["wall_seconds"] = time.perf_counter() - start
    data["code"] = repo
    return data


def row(name: str, label: str, data: dict) -> str:
    stages = data["stages"]
    worst = max(stages, key=lambda s: s["ratio"])
    muon = max(s["muon_seconds"] for s in stages)
    mcore = max(s["alternatives"][0]["seconds"] for s in stages)
    moon = max(s["alternatives"][1]["seconds"] for s in stages)
    memory = max(sum(s["memory"].values()) for s in stages) / 2**30
    extra = max(s["nvlink_bytes"] + s["ib_bytes"] for s in stages) / 1e9
    return (f"| {name} | {label} | {data['world_size']} | {len(stages)} | "
            f"{worst['ideal'] * 1e3:.2f} | {worst['ns_critical_path'] * 1e3:.2f} | "
            f"{worst['ratio']:.2f} | {muon * 1e3:.1f} | {mcore * 1e3:.1f} | {moon * 1e3:.1f} | "
            f"{memory:.1f} | {extra:.3f} | {data['wall_seconds']:.1f} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", type=Path, default=None,
                   help="Another checkout to plan beside this one (e.g. the code before).")
    p.add_argument("--only", nargs="*", default=None, help="Configuration names.")
    p.add_argument("--out", type=Path, default=None, help="Keep the JSON plans here.")
    args = p.parse_args()
    names = args.only or list(SCALE_CONFIGS)
    repos = [("this", HERE)] + ([("other", args.repo.resolve())] if args.repo else [])
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="scale-plans-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    print("| config | code | GPUs | stages | NS ideal ms | NS critical ms | ratio | Muon ms | "
          "mcore Muon ms | Moonlight ms | GiB/GPU | extra GB/rank | plan s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        for label, repo in repos:
            data = plan(repo, SCALE_CONFIGS[name], out_dir / f"{name}.{label}.json")
            print(row(name, label, data), flush=True)
    print(f"(JSON in {out_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
