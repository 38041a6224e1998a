"""Optimizer benchmark: our ZeRO-1 Muon vs megatron-core's distributed AdamW, side by side.

Step time of `optimizer.step()`, bytes per rank per step of every collective it issues,
Newton-Schulz FLOPs per rank and in copies of the model, optimizer state bytes per param and
the transient memory of the gather / scatter buffers, for DP4, TP2 x DP2 and an MoE
EP2 x DP2 on 4 gloo processes. Prints one table, writes JSON (`--out`, default
outputs/bench.json) and ends with a one-line summary of the targets of issue 7.

The benchmark lives in the package (`muon_megatron.tools.bench`) so that `muon-megatron bench`
works from any install; this script is the same entry from a checkout:

    python benchmarks/optimizer_bench.py                 # ~4 min on 2 CPU cores
    python benchmarks/optimizer_bench.py --layouts dp4 --steps 5   # a quick look
    muon-megatron bench --help
"""

import sys

from muon_megatron.tools.bench import main

if __name__ == "__main__":
    sys.exit(main())
