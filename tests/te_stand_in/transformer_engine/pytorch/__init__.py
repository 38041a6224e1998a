"""`transformer_engine.pytorch`: the layers megatron-core 0.16.1's TE extension builds (see
the package's docstring for what is stood in for and what is out of reach)."""

from . import distributed, fp8, ops, router, tensor  # noqa: F401
from .attention import DotProductAttention
from .fp8 import fp8_autocast, fp8_model_init
from .linear import GroupedLinear, LayerNormLinear, Linear
from .norms import LayerNorm, RMSNorm

__all__ = [
    "DotProductAttention",
    "GroupedLinear",
    "LayerNorm",
    "LayerNormLinear",
    "Linear",
    "RMSNorm",
    "fp8_autocast",
    "fp8_model_init",
]
