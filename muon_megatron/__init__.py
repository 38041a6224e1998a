"""muon-megatron: the Muon optimizer (Moonlight recipe) as a ZeRO-1 DistributedOptimizer
for megatron-core.

The math (`newton_schulz`, `reference`) imports without megatron-core; the distributed
pieces are imported lazily so `import muon_megatron` stays light.
"""

from __future__ import annotations

from muon_megatron.config import MuonConfig

__all__ = ["MuonConfig", "MuonDistributedOptimizer", "get_muon_optimizer", "muon_optimizers"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "MuonDistributedOptimizer":
        from muon_megatron.optimizer.distributed import MuonDistributedOptimizer

        return MuonDistributedOptimizer
    if name in ("get_muon_optimizer", "muon_optimizers"):
        from muon_megatron.optimizer import builder

        return getattr(builder, name)
    raise AttributeError(f"module 'muon_megatron' has no attribute {name!r}")
