"""Which parameters Muon updates, and the fused layout each one has, from its Megatron name.

Small named predicates, kept apart from the optimizer's step so each is tested on its own:
Moonlight keeps embeddings, the output head, norms and (DeepSeek-style MoE) the router on
AdamW; every other 2-D weight is a Muon matrix.
"""

from __future__ import annotations

import re
from typing import Literal

import torch

__all__ = [
    "ADAMW_NAME_PARTS",
    "Kind",
    "canonical_name",
    "is_muon_param",
    "param_kind",
    "require_matrix",
]

# Substrings of parameter names that always stay on AdamW, whatever their shape
# (Moonlight: embeddings, output head, norms; DeepSeek-style MoE adds the router).
ADAMW_NAME_PARTS: tuple[str, ...] = ("embedding", "output_layer", "router", "norm")

Kind = Literal["plain", "qkv", "fc1", "grouped_fc1", "grouped_fc2"]


def canonical_name(name: str) -> str:
    """Strip the wrappers' prefixes (DDP / Float16Module add `module.`)."""
    while name.startswith("module."):
        name = name[len("module.") :]
    return name


def is_muon_param(name: str, param: torch.Tensor) -> bool:
    """Default routing: 2-D hidden weights go to Muon; everything else to AdamW."""
    name = canonical_name(name)
    if param.ndim != 2 or name.endswith("bias"):
        return False
    return not any(part in name for part in ADAMW_NAME_PARTS)


def require_matrix(name: str, shape: tuple[int, ...] | torch.Size) -> None:
    """Raise ValueError, naming the fix, if a parameter routed to Muon is not 2-D."""
    if len(shape) != 2:
        raise ValueError(
            f"{name}: Muon needs a 2-D parameter, got shape {tuple(shape)}; route it to AdamW "
            "(make is_muon return False for it)."
        )


_TE_GROUPED_FC1 = re.compile(r"\.linear_fc1\.weight\d+$")


def param_kind(name: str) -> Kind:
    """The fused layout a Muon parameter has, from its Megatron name."""
    name = canonical_name(name)
    if name.endswith("self_attention.linear_qkv.weight"):
        return "qkv"
    if name.endswith("linear_fc1.weight") or _TE_GROUPED_FC1.search(name):
        return "fc1"
    if name.endswith("experts.weight1"):
        return "grouped_fc1"
    if name.endswith("experts.weight2"):
        return "grouped_fc2"
    return "plain"
