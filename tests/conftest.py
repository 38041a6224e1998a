"""Test-wide settings for the CPU harness (2 cores, up to 4 gloo ranks per test)."""

import os
import sys

# Every rank is its own process; more than one intra-op thread each only oversubscribes the
# cores. Set before torch is imported here or in any spawned rank (which inherits the env).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
# megatron warns on every TP/SP layer without it; it only matters for CUDA streams.
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")

# Make `muon_megatron` importable without installing the package; spawned ranks inherit
# sys.path from this process.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
