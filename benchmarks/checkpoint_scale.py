"""Checkpoint save / load time on one rank as the number of MoE experts grows.

    python benchmarks/checkpoint_scale.py                           # this checkout
    python benchmarks/checkpoint_scale.py --repo /tmp/ckpt-before   # and another, side by side
    python benchmarks/checkpoint_scale.py --experts 8 32 128 512 --sharding dp_reshardable

For each checkout, each number of experts and each sharding type, one gloo process (world
size 1, CPU) builds the tiny GPT of `muon_megatron.testing.tiny` as an MoE with megatron's
SequentialMLP (each expert's fc1 and fc2 its own Muon parameter), takes one Muon step so that
every momentum exists, then saves and loads it `--repeats` times with
`muon_megatron.training.checkpointing.save_checkpoint` / `load_checkpoint` (megatron-core's
`dist_checkpointing`, torch_dist, into a fresh directory each time) and reports the fastest
save and the fastest load, and of each the time spent in the optimizer's own calls
(`sharded_state_dict`, plus `load_state_dict` when loading); the rest is megatron-core's and
torch's `dist_checkpointing`. `--bucket-size N` gives megatron's DDP buckets of N elements
(with overlapped grad reduction, as Megatron-LM has them) instead of one bucket per buffer.

The counts and times below come from wrappers installed by this script in the measuring process,
never from state kept by the optimizer:

  hook calls  calls of `MuonCheckpointMixin._get_main_param_and_optimizer_states` and
              `_set_main_param_and_optimizer_states` (Megatron's per-parameter hooks) in the
              first save plus the first load of a row; `hook s`, the seconds spent inside
              them in one save plus one load (the fastest repeat);
  passes      complete iterations over a Muon optimizer's `_matrices` (the list of all its
              Muon matrices) in the first save plus the first load of a row: each member's
              `_matrices` is replaced by a list that counts its `iter()` calls. A
              per-parameter lookup that rebuilds its map from `_matrices` shows as one pass
              per hook call.

Each checkout is measured in its own subprocess with PYTHONPATH=<checkout>, so `--repo`
compares the code before a change with the code after it in one run. Timings are wall clock
on whatever the machine is doing: compare rows of one run.
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
from typing import Any

HERE = Path(__file__).resolve().parents[1]
SHARDINGS = ("fully_reshardable", "dp_reshardable")


# ------------------------------------------------------------------------------ in the rank
def _measure(rank: int, world_size: int, options: dict[str, Any]) -> list[dict[str, Any]]:
    import torch

    import muon_megatron
    from muon_megatron.config import MuonConfig
    from muon_megatron.optimizer.builder import muon_optimizers
    from muon_megatron.optimizer.checkpoint_state import MuonCheckpointMixin
    from muon_megatron.testing import tiny
    from muon_megatron.training import checkpointing

    calls = {"hooks": 0, "hook_s": 0.0, "passes": 0, "optimizer_s": 0.0}

    def counting(method):
        def wrapper(self, *args, **kwargs):
            calls["hooks"] += 1
            start = time.perf_counter()
            try:
                return method(self, *args, **kwargs)
            finally:
                calls["hook_s"] += time.perf_counter() - start

        return wrapper

    def timed(method):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                calls["optimizer_s"] += time.perf_counter() - start

        return wrapper

    class CountingList(list):
        def __iter__(self):
            calls["passes"] += 1
            return super().__iter__()

    for name in ("_get_main_param_and_optimizer_states", "_set_main_param_and_optimizer_states"):
        setattr(MuonCheckpointMixin, name, counting(getattr(MuonCheckpointMixin, name)))

    spec = tiny.ModelSpec(
        num_layers=options["layers"],
        hidden_size=options["hidden"],
        ffn_hidden_size=2 * options["hidden"],
        moe_ffn_hidden_size=options["hidden"],
        num_experts=options["experts"],
        moe_grouped_gemm=False,
    )
    layout = tiny.Layout()
    tiny.initialize_parallel(layout, seed=0)
    ddp = None
    if options["bucket_size"]:
        ddp = {"overlap_grad_reduce": True, "bucket_size": options["bucket_size"]}
    model = tiny.build_model(spec, layout, ddp_overrides=ddp)
    optimizer = tiny.build_optimizer(
        model, tiny.optimizer_config(), MuonConfig(muon_ns_dtype="fp32")
    )
    for name in ("sharded_state_dict", "load_state_dict"):
        setattr(optimizer, name, timed(getattr(optimizer, name)))
    scheduler = None
    tiny.train_step(model, optimizer, tiny.global_batch(0, spec, 2, seed=0), spec, layout, 2)
    members = muon_optimizers(optimizer)
    for member in members:
        member._matrices = CountingList(member._matrices)
    matrices = sum(len(m._matrices) for m in members)
    buckets = sum(len(buffer.buckets) for m in members for buffer in m.buffers)

    rows = []
    for sharding in options["shardings"]:
        saves, loads, hook_s, counts = [], [], [], {}
        for _ in range(options["repeats"]):
            with tempfile.TemporaryDirectory(prefix="ckpt-scale-") as root:
                ckpt = os.path.join(root, "ckpt")
                calls.update(hooks=0, hook_s=0.0, passes=0, optimizer_s=0.0)
                start = time.perf_counter()
                checkpointing.save_checkpoint(ckpt, model, optimizer, scheduler, 1, sharding)
                saves.append((time.perf_counter() - start, calls["optimizer_s"]))
                calls["optimizer_s"] = 0.0
                start = time.perf_counter()
                with torch.no_grad():
                    checkpointing.load_checkpoint(ckpt, model, optimizer, scheduler)
                loads.append((time.perf_counter() - start, calls["optimizer_s"]))
                hook_s.append(calls["hook_s"])
                counts = counts or {k: calls[k] for k in ("hooks", "passes")}
        rows.append(
            {
                "code": os.path.dirname(os.path.dirname(muon_megatron.__file__)),
                "experts": options["experts"],
                "sharding": sharding,
                "muon_matrices": matrices,
                "buckets": buckets,
                "save_s": min(saves)[0],
                "save_optimizer_s": min(saves)[1],
                "load_s": min(loads)[0],
                "load_optimizer_s": min(loads)[1],
                "hook_calls": counts["hooks"],
                "hook_s": min(hook_s),
                "passes": counts["passes"],
            }
        )
    return rows


def _worker(options: dict[str, Any]) -> int:
    from muon_megatron.runtime.launch import spawn

    rows = []
    for experts in options["experts"]:
        rows += spawn(_measure, 1, {**options, "experts": experts}, timeout_s=3600)[0]
    print(json.dumps(rows))
    return 0


# ------------------------------------------------------------------------------ the driver
def measure(repo: Path, options: dict[str, Any]) -> list[dict[str, Any]]:
    """Run the measurement with `repo` first on PYTHONPATH; its rows, one per (experts,
    sharding). Raises RuntimeError if the subprocess fails or measured another checkout."""
    env = {**os.environ, "PYTHONPATH": str(repo), "PYTHONWARNINGS": "ignore"}
    env.setdefault("OMP_NUM_THREADS", "1")
    done = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(options)],
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"measuring {repo} failed:\n{done.stdout}\n{done.stderr}")
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    for row in rows:
        if Path(row["code"]).resolve() != repo.resolve():
            raise RuntimeError(f"asked to measure {repo} but muon_megatron came from {row['code']}")
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", type=Path, action="append", default=[],
                   help="Another checkout to measure beside this one (repeatable).")
    p.add_argument("--experts", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--sharding", choices=SHARDINGS, nargs="+", default=list(SHARDINGS))
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=32, help="hidden size = expert FFN size")
    p.add_argument("--bucket-size", type=int, default=None,
                   help="DDP bucket size in elements (default: one bucket per buffer)")
    p.add_argument("--repeats", type=int, default=3, help="saves and loads per row (fastest kept)")
    p.add_argument("--json", type=Path, default=None, help="Also write the rows here.")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker is not None:
        return _worker(json.loads(args.worker))

    options = {
        "experts": args.experts,
        "shardings": args.sharding,
        "layers": args.layers,
        "hidden": args.hidden,
        "repeats": args.repeats,
        "bucket_size": args.bucket_size,
    }
    repos = [HERE] + [r.resolve() for r in args.repo]
    print("| code | experts | sharding | Muon matrices | buckets | save s | (optimizer s) | "
          "load s | (optimizer s) | hook calls | hook s | passes |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    results = []
    for repo in repos:
        for row in measure(repo, options):
            results.append(row)
            print(
                f"| {row['code']} | {row['experts']} | {row['sharding']} | "
                f"{row['muon_matrices']} | {row['buckets']} | {row['save_s']:.2f} | {row['save_optimizer_s']:.2f} | "
                f"{row['load_s']:.2f} | {row['load_optimizer_s']:.2f} | "
                f"{row['hook_calls']} | {row['hook_s']:.2f} | {row['passes']} |",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
