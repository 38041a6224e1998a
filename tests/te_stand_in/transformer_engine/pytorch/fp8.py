"""FP8 global state: always off. `fp8_autocast(enabled=True)` is refused (FP8 is out of
reach on CPU); megatron-core imports `FP8GlobalStateManager` and `fp8_autocast` at import."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["FP8GlobalStateManager", "fp8_autocast", "fp8_model_init"]


class FP8GlobalStateManager:
    """TE's FP8 state, which here never turns on."""

    @staticmethod
    def is_fp8_enabled() -> bool:
        return False

    @staticmethod
    def is_fp8_calibration() -> bool:
        return False

    @staticmethod
    def with_fp8_parameters() -> bool:
        return False

    @staticmethod
    def is_first_fp8_module() -> bool:
        return False

    @staticmethod
    def get_fp8_recipe():
        return None


@contextlib.contextmanager
def fp8_autocast(enabled: bool = True, **kwargs) -> Iterator[None]:
    if enabled:
        raise NotImplementedError("FP8 is out of reach in the TE stand-in (CPU): run without --fp8")
    yield


@contextlib.contextmanager
def fp8_model_init(enabled: bool = True, **kwargs) -> Iterator[None]:
    if enabled:
        raise NotImplementedError("FP8 params are out of reach in the TE stand-in (CPU)")
    yield
