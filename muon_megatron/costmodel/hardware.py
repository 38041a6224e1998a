"""The GPU and network the cost model assumes, with named presets and stated efficiencies.

Peaks are the vendors' published dense figures; efficiencies are assumptions, printed with
every plan and overridable from the command line (`add_hardware_args`):

- `ns_efficiency`: the share of the matmul peak Newton-Schulz reaches. Its matmuls are
  square-ish and large (n >= 1024 for the models planned here); 0.6 is the target the GPU
  issue sets for bf16 and what large cuBLAS GEMMs reach on H100.
- `mfu`: the model FLOPs utilization of the forward-backward (0.4: what large Megatron MoE
  runs report on H100 in bf16).
- `link_efficiency`: the share of a link's bandwidth an all-to-all reaches (0.8).
- Latencies: an exchange pays `collective_latency_us` once and `peer_latency_us` (NVLink)
  or `ib_peer_latency_us` (InfiniBand) per peer it exchanges with. Muon's exchanges are
  point-to-point between the pairs with a payload; an all-to-all (torch's NCCL
  all_to_all_single posts a send and a receive to every member, payload or not) would pay
  every member's latency.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

__all__ = ["Hardware", "PRESETS", "add_hardware_args", "hardware_from_args"]


@dataclass(frozen=True)
class Hardware:
    """One GPU model in a cluster of nodes of `gpus_per_node` GPUs."""

    name: str
    bf16_tflops: float
    """Dense bf16 tensor-core peak (TFLOP/s)."""
    fp32_tflops: float
    """fp32 matmul peak without TF32 (TFLOP/s): Newton-Schulz with --muon-ns-dtype fp32."""
    hbm_gbps: float
    """HBM bandwidth (GB/s): elementwise work (momentum, apply, wire copies)."""
    hbm_gib: float
    nvlink_gbps: float
    """NVLink bandwidth per GPU and direction (GB/s)."""
    ib_gbps: float
    """InfiniBand bandwidth per GPU and direction (GB/s): one 400 Gb/s NIC per GPU is 50."""
    gpus_per_node: int = 8
    collective_latency_us: float = 10.0
    peer_latency_us: float = 1.0
    ib_peer_latency_us: float = 4.0
    ns_efficiency: float = 0.6
    link_efficiency: float = 0.8
    mfu: float = 0.4

    def describe(self) -> str:
        return (
            f"{self.name}: bf16 {self.bf16_tflops:g} TFLOP/s (Newton-Schulz at "
            f"{self.ns_efficiency:.0%}, model at MFU {self.mfu:.0%}), HBM {self.hbm_gbps:g} GB/s "
            f"{self.hbm_gib:g} GiB, NVLink {self.nvlink_gbps:g} GB/s, IB {self.ib_gbps:g} GB/s "
            f"per GPU (links at {self.link_efficiency:.0%}), {self.gpus_per_node} GPUs/node, "
            f"latency {self.collective_latency_us:g} us per collective + "
            f"{self.peer_latency_us:g} (NVLink) / {self.ib_peer_latency_us:g} (IB) us per peer"
        )


PRESETS: dict[str, Hardware] = {
    # NVIDIA H100 SXM5 80GB (datasheet: 989 TFLOP/s dense bf16, 67 fp32, 3.35 TB/s; NVLink 4
    # 900 GB/s bidirectional), one ConnectX-7 400 Gb/s NIC per GPU.
    "h100-sxm": Hardware("H100 SXM", 989.0, 67.0, 3350.0, 80.0, 450.0, 50.0),
    # NVIDIA H200 SXM 141GB: the H100's compute and links, 4.8 TB/s HBM3e.
    "h200": Hardware("H200 SXM", 989.0, 67.0, 4800.0, 141.0, 450.0, 50.0),
}


def add_hardware_args(parser: argparse.ArgumentParser) -> None:
    """`--gpu PRESET` and one override flag per `Hardware` field (`--gpu-bf16-tflops` ...)."""
    g = parser.add_argument_group("hardware (the cost model's assumptions)")
    g.add_argument("--gpu", choices=sorted(PRESETS), default="h100-sxm")
    for f in dataclasses.fields(Hardware):
        if f.name == "name":
            continue
        g.add_argument(f"--gpu-{f.name.replace('_', '-')}", dest=f"gpu_{f.name}",
                       type=int if f.type in (int, "int") else float, default=None,
                       help=f"Override the preset's {f.name}.")


def hardware_from_args(args: argparse.Namespace) -> Hardware:
    base = PRESETS[args.gpu]
    overrides = {
        f.name: getattr(args, f"gpu_{f.name}")
        for f in dataclasses.fields(Hardware)
        if f.name != "name" and getattr(args, f"gpu_{f.name}", None) is not None
    }
    for name, value in overrides.items():
        if not value > 0 or value != value or value == float("inf"):
            raise ValueError(f"--gpu-{name.replace('_', '-')} {value}: must be finite and > 0.")
    return dataclasses.replace(base, **overrides)
