"""What the checkpoint checksums cost: CRC-32 at save and the check at load, against the save
and the load themselves, at the benchmark's model.

    python benchmarks/checksum_cost.py                  # DP2, both sharding types, 3 repeats
    python benchmarks/checksum_cost.py --world 4 --repeats 5 --json out.json

`--world` gloo processes on CPU build `muon-megatron bench`'s dense model
(`muon_megatron.tools.bench_config.DEFAULT_MODEL`: 4 layers, hidden 256, bf16 params with
fp32 main params) with Muon, take one step so that every momentum exists, then save and load
it with `muon_megatron.training.checkpointing` (torch_dist) `--repeats` times per sharding
type, each save into a fresh directory. Wrappers installed by this script time, on every
rank, `record_checksums` inside `save_checkpoint` and `verify_checkpoint` inside
`load_checkpoint`; the report gives, for the slowest rank (the one the others wait for),
the fastest repeat's save and load and the checksum's part of each, and the rate of the
rank that hashed the most bytes at save (its bytes over its whole `record_checksums` time).
Wall clock on whatever the machine is doing: compare rows of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHARDINGS = ("fully_reshardable", "dp_reshardable")


def _timed(module: Any, name: str, record: dict[str, float]) -> None:
    original = getattr(module, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            record[name] = record.get(name, 0.0) + time.perf_counter() - start

    setattr(module, name, wrapper)


def _measure(rank: int, world: int, options: dict[str, Any]) -> list[dict[str, Any]]:
    import torch

    from muon_megatron.config import MuonConfig
    from muon_megatron.integrity import checksums
    from muon_megatron.testing import tiny
    from muon_megatron.tools.bench_config import DEFAULT_MODEL
    from muon_megatron.training import checkpointing, step

    inside: dict[str, float] = {}
    _timed(checkpointing, "record_checksums", inside)
    _timed(checkpointing, "verify_checkpoint", inside)
    spec, layout = tiny.ModelSpec(**DEFAULT_MODEL), tiny.Layout()
    tiny.initialize_parallel(layout, 1234)
    model = tiny.build_model(spec, layout)
    optimizer = step.build_optimizer(tiny.optimizer_config(lr=1e-3, weight_decay=0.1), model, MuonConfig())
    optimizer.zero_grad()
    tiny.forward_backward(model, tiny.global_batch(0, spec, 8, 7), spec, 8 // world)
    optimizer.step()
    rows = []
    for sharding in SHARDINGS:
        for repeat in range(options["repeats"]):
            ckpt_dir = os.path.join(options["root"], f"{sharding}_{repeat}")
            inside.clear()
            torch.distributed.barrier()
            start = time.perf_counter()
            checkpointing.save_checkpoint(ckpt_dir, model, optimizer, None, 1, sharding)
            save_s = time.perf_counter() - start
            torch.distributed.barrier()
            start = time.perf_counter()
            checkpointing.load_checkpoint(ckpt_dir, model, optimizer)
            load_s = time.perf_counter() - start
            with open(os.path.join(ckpt_dir, checksums.sidecar_name(rank)), encoding="utf-8") as f:
                hashed = sum(e["bytes"] for e in json.load(f)["files"].values())
            total = sum(p.stat().st_size for p in Path(ckpt_dir).iterdir() if p.suffix == ".distcp")
            rows.append(
                {
                    "rank": rank,
                    "sharding": sharding,
                    "repeat": repeat,
                    "save_s": save_s,
                    "record_s": inside["record_checksums"],
                    "load_s": load_s,
                    "verify_s": inside["verify_checkpoint"],
                    "hashed_bytes_at_save": hashed,
                    "checkpoint_bytes": total,
                }
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="write every rank's rows here")
    args = parser.parse_args(argv)
    from muon_megatron.runtime.launch import spawn

    with tempfile.TemporaryDirectory() as root:
        per_rank = spawn(_measure, args.world, {"root": root, "repeats": args.repeats})
    rows = [row for rank_rows in per_rank for row in rank_rows]
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"world {args.world}, bench model, fastest of {args.repeats} (slowest rank of each repeat)")
    print(f"{'sharding':18s} {'ckpt MB':>8s} {'save s':>7s} {'crc s':>7s} {'share':>6s} "
          f"{'crc MB/s':>9s} {'load s':>7s} {'verify s':>8s} {'share':>6s}")  # fmt: skip
    for sharding in SHARDINGS:
        repeats = []
        for repeat in range(args.repeats):
            ranks = [r for r in rows if r["sharding"] == sharding and r["repeat"] == repeat]
            slowest_save = max(ranks, key=lambda r: r["save_s"])
            slowest_load = max(ranks, key=lambda r: r["load_s"])
            repeats.append((slowest_save, slowest_load, ranks))
        save, load, ranks = min(repeats, key=lambda x: x[0]["save_s"])
        busiest = max(ranks, key=lambda r: r["hashed_bytes_at_save"])
        rate = busiest["hashed_bytes_at_save"] / busiest["record_s"] / 1e6
        print(
            f"{sharding:18s} {ranks[0]['checkpoint_bytes'] / 1e6:8.1f} {save['save_s']:7.3f} "
            f"{save['record_s']:7.3f} {save['record_s'] / save['save_s']:6.1%} {rate:9.0f} "
            f"{load['load_s']:7.3f} {load['verify_s']:8.3f} {load['verify_s'] / load['load_s']:6.1%}"
        )


if __name__ == "__main__":
    main()
