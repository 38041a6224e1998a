"""FP8 recipes: the names megatron-core refers to at import (`TEDelayedScaling` subclasses
`DelayedScaling`). FP8 itself is out of reach on CPU: building a recipe is allowed, using it
is refused by `pytorch.fp8.fp8_autocast`."""

from __future__ import annotations

import enum

__all__ = ["DelayedScaling", "Format", "Recipe"]


class Format(enum.Enum):
    """FP8 formats (TE's `Format`)."""

    E4M3 = "E4M3"
    E5M2 = "E5M2"
    HYBRID = "HYBRID"


class Recipe:
    """Base of the recipes; records its keyword arguments."""

    def __init__(self, **kwargs) -> None:
        self.__dict__.update(kwargs)

    def delayed(self) -> bool:
        return isinstance(self, DelayedScaling)


class DelayedScaling(Recipe):
    """TE's delayed-scaling recipe, as a record of its arguments."""
