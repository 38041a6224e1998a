"""Host cost of the Muon step per matrix: one rank, tiny matrices, Muon beside AdamW.

    python benchmarks/host_cost.py                          # this checkout, ~1 min on 2 cores
    python benchmarks/host_cost.py --repo /tmp/before       # and another checkout, side by side
    python benchmarks/host_cost.py --configs 2x4 2x64 --steps 5 --json outputs/host_cost.json

Each configuration LxE is a GPT of L layers with E experts per layer of tiny matrices (hidden
32, experts 16 wide, megatron's SequentialMLP: every expert is a Muon parameter of its own,
`step_probe.tiny_moe_spec`) on one CPU process (gloo, world size 1), so that what a step
costs is its host work: Python and one dispatch per torch operator. Muon
(`MuonConfig(muon_ns_dtype='fp32')` unless `--muon` says otherwise) and megatron's AdamW
step the same model alternately; per configuration the table has

- the Muon parameters, logical matrices (experts, Q/K/V, gate/up split apart), buckets;
- the median `optimizer.step()` time of each, and (Muon - AdamW) per Muon parameter and per
  logical matrix (on one rank every matrix is the rank's own). AdamW's step includes torch
  AdamW's per-parameter loop over the Muon matrices too (megatron's CPU fallback), which
  Muon's skips: this difference understates what the Muon phases cost;
- the Muon phases alone (`run_pipeline`, median) and Newton-Schulz's arithmetic in them;
- the aten operators one step dispatches (`step_probe.DispatchCounter`): the whole Muon
  step, its Muon phases, the whole AdamW step.

The default configurations are Moonlight's count of matrices (27 layers x 64 experts) and
2 layers x 4, 16 and 64 experts (1x, 4x, 16x) for the growth table: the operators of the
Muon phases against the number of matrices (issue 21's target: they grow with the distinct
shapes and buckets, not with the matrices).

Every configuration runs in a fresh interpreter with the checkout first on PYTHONPATH, and
with this checkout's `muon_megatron/tools/step_probe.py` (copied beside it as a module of its
own), so both checkouts are measured by the same probe even when the other has none. With
`--repo` the two run one after the other per configuration. Timings on a shared 2-core CPU
are noisy; the operator counts are exact.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
PROBE = HERE / "muon_megatron" / "tools" / "step_probe.py"
PROBE_MODULE = "_host_cost_step_probe"
MOONLIGHT = "27x64"
GROWTH = ("2x4", "2x16", "2x64")
TARGET_US_PER_MATRIX = 10.0


def code_label(repo: Path) -> str:
    """Short commit of `repo`, with '-dirty' when its work tree differs from it."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "?"
    return commit + ("-dirty" if git("status", "--porcelain") else "")


def measure(repo: Path, tag: str, probe_dir: Path, config: str, args: argparse.Namespace) -> dict:
    """One configuration on `repo`'s optimizer, in a fresh interpreter."""
    layers, experts = (int(n) for n in config.split("x"))
    out = probe_dir / f"{config}.{tag}.json"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(probe_dir), str(repo)]),
        "PYTHONWARNINGS": "ignore",
        "PYTHONDONTWRITEBYTECODE": "1",  # leave the other checkout as it was
    }
    argv = [f"--layers={layers}", f"--experts={experts}", f"--steps={args.steps}",
            f"--warmup={args.warmup}", f"--muon={args.muon}", f"--json={out}"]
    code = f"import sys, {PROBE_MODULE} as probe; sys.exit(probe.main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", code, *argv], env=env, cwd=probe_dir,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"{config} on {repo} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
        )
    record = json.loads(out.read_text())
    if Path(record["source"]) != repo:
        raise RuntimeError(f"measured {record['source']}, not {repo}: is muon_megatron installed "
                           "in a way that wins over PYTHONPATH?")
    return record


def per_matrix_us(record: dict, per: str) -> float:
    return (record["muon_step_s"] - record["adamw_step_s"]) / record[per] * 1e6


def row(record: dict) -> str:
    r = record
    ns = "-" if r["newton_schulz_s"] is None else f"{r['newton_schulz_s'] * 1e3:.1f}"
    return (
        f"| {r['layers']}x{r['experts']} | {r['code']} | {r['params']} | {r['logical']} | "
        f"{r['buckets']} | {r['muon_step_s'] * 1e3:.1f} | {r['adamw_step_s'] * 1e3:.1f} | "
        f"{per_matrix_us(r, 'params'):.1f} | {per_matrix_us(r, 'logical'):.1f} | "
        f"{r['muon_phases_s'] * 1e3:.1f} | {r['muon_phases_s'] / r['params'] * 1e6:.1f} | "
        f"{ns} | {r['muon_ops']} | {r['muon_phase_ops']} | "
        f"{r['adamw_ops']} |"
    )


HEADER = (
    "| config | code | Muon params | logical | buckets | Muon step ms | AdamW step ms | "
    "(Muon-AdamW) us/param | us/logical | Muon phases ms | phases us/param | NS ms | "
    "aten ops: Muon step | in Muon phases | AdamW step |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def growth_table(records: list[dict], codes: list[str]) -> list[str]:
    """Operators of the Muon phases at 1x, 4x, 16x the experts, against the matrices."""
    lines = [
        "| code | logical 1x / 4x / 16x | buckets | shapes | phase ops 1x / 4x / 16x | "
        "phase ops, largest / 1x | logical, largest / 1x | phase ops per logical, 1x / "
        "largest |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for code in codes:
        by_config = {f"{r['layers']}x{r['experts']}": r for r in records if r["code"] == code}
        series = [by_config[c] for c in GROWTH if c in by_config]
        if len(series) < 2:
            continue
        first, last = series[0], series[-1]
        join = lambda key: " / ".join(str(r[key]) for r in series)  # noqa: E731
        lines.append(
            f"| {code} | {join('logical')} | {join('buckets')} | {join('shapes')} | "
            f"{join('muon_phase_ops')} | {last['muon_phase_ops'] / first['muon_phase_ops']:.2f} | "
            f"{last['logical'] / first['logical']:.2f} | "
            f"{first['muon_phase_ops'] / first['logical']:.1f} / "
            f"{last['muon_phase_ops'] / last['logical']:.1f} |"
        )
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", type=Path, default=None,
                   help="Another checkout to measure beside this one (e.g. the code before).")
    p.add_argument("--configs", nargs="*", default=[MOONLIGHT, *GROWTH],
                   help="LxE: layers x experts per layer (default: %(default)s).")
    p.add_argument("--steps", type=int, default=10, help="Measured steps (median).")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--muon", default='{"muon_ns_dtype": "fp32"}',
                   help="MuonConfig fields, a JSON object (default: %(default)s).")
    p.add_argument("--json", type=Path, default=None, help="Write every record here.")
    args = p.parse_args()
    repos = [HERE] + ([args.repo.resolve()] if args.repo else [])
    labels = {repo: ("this " if repo == HERE else "other ") + code_label(repo) for repo in repos}
    records = []
    with tempfile.TemporaryDirectory(prefix="host-cost-") as tmp:
        probe_dir = Path(tmp)
        shutil.copy(PROBE, probe_dir / f"{PROBE_MODULE}.py")
        print(HEADER, flush=True)
        for config in args.configs:
            for index, repo in enumerate(repos):
                record = measure(repo, str(index), probe_dir, config, args)
                record["code"] = labels[repo]
                records.append(record)
                print(row(record), flush=True)
    print()
    print("\n".join(growth_table(records, list(labels.values()))))
    for record in records:
        if f"{record['layers']}x{record['experts']}" == MOONLIGHT:
            us = per_matrix_us(record, "params")
            verdict = "PASS" if us <= TARGET_US_PER_MATRIX else "FAIL"
            own = record["muon_phases_s"] - (record["newton_schulz_s"] or 0.0)
            print(f"host cost at Moonlight's count, {record['code']}: {us:.1f} us per owned Muon "
                  f"param (Muon - AdamW; target <= {TARGET_US_PER_MATRIX:g}): {verdict}; Muon "
                  f"phases less Newton-Schulz: {own / record['params'] * 1e6:.1f} us per param")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"muon": json.loads(args.muon), "records": records},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
