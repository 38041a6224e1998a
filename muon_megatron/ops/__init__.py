"""Muon's math on plain tensors: `newton_schulz` and `update` (momentum, scale, step)."""
