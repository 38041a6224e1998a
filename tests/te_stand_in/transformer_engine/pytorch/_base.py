"""What TE's layers share (TE v2.11 transformer_engine/pytorch/module/base.py,
`TransformerEngineBaseModule`): per-parameter init metadata, initialization under the RNG
tracker, the TP group, and the (empty, FP8-less) extra state that checkpoints carry."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

__all__ = ["StandInModule", "default_init_method", "init_method_constant", "refuse"]


def default_init_method() -> Callable[[torch.Tensor], torch.Tensor]:
    """TE v2.11 utils.py L80-82: normal(0, 0.023) when the caller gives no init method."""
    return lambda t: torch.nn.init.normal_(t, mean=0.0, std=0.023)


def init_method_constant(value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """TE v2.11 utils.py L85-101."""
    return lambda t: torch.nn.init.constant_(t, value)


def refuse(what: str) -> None:
    raise NotImplementedError(f"{what} is out of reach in the TE stand-in (CPU tests only)")


@dataclasses.dataclass
class _ParameterInitMeta:
    """TE v2.11 module/_common.py L174-186."""

    init_fn: Callable | None = None
    get_rng_state_tracker: Callable | None = None
    fp8_meta_index: int | None = None

    def __post_init__(self) -> None:
        if self.init_fn is None:
            self.init_fn = default_init_method()


class StandInModule(torch.nn.Module):
    """TE's base module, less FP8 and CUDA (TE v2.11 base.py L601-628)."""

    def __init__(self) -> None:
        super().__init__()
        self.name = None
        self.fp8_initialized = False
        self.fp8 = False
        self.fp8_calibration = False
        self.fp8_meta = {"fp8_checkpoint": False, "fp8_group": None}
        self.tp_group = None
        self.tp_size = 1
        self.sequence_parallel = False
        self.param_init_meta: dict[str, _ParameterInitMeta] = {}
        self.primary_weights_in_fp8 = False
        self.rng_tracker_name: str | None = None

    def register_parameter(self, name, param, **kwargs) -> None:
        """TE v2.11 base.py L1197-1208: keep each parameter's init metadata."""
        super().register_parameter(name, param)
        if hasattr(self, "param_init_meta") and name not in self.param_init_meta:
            self.param_init_meta[name] = _ParameterInitMeta(**kwargs)

    def reset_parameters(self, defer_init: bool | None = False) -> None:
        """TE v2.11 base.py L1210-1239: each parameter initialized by its init_fn, inside the
        RNG tracker's fork of `rng_tracker_name` (or its default) when a tracker is given."""
        if defer_init:
            return
        for name, param in self.named_parameters(recurse=False):
            meta = self.param_init_meta[name]
            with torch.no_grad():
                if meta.get_rng_state_tracker is None:
                    meta.init_fn(param)
                elif self.rng_tracker_name:
                    with meta.get_rng_state_tracker().fork(self.rng_tracker_name):
                        meta.init_fn(param)
                else:
                    with meta.get_rng_state_tracker().fork():
                        meta.init_fn(param)

    def set_tensor_parallel_group(self, tp_group) -> None:
        """TE v2.11 base.py L946-957."""
        self.tp_group = tp_group
        self.tp_group_initialized = True

    def set_nccl_overlap_warning_if_tp(self) -> None:
        """TE warns about CUDA_DEVICE_MAX_CONNECTIONS: no CUDA streams here."""

    def init_fp8_metadata(self, num_gemms: int = 1) -> None:
        """TE v2.11 base.py L971-979, with FP8 always off."""
        self.fp8 = False
        self.fp8_calibration = False
        self.fp8_meta["fp8_checkpoint"] = False
        self.fp8_meta["num_gemms"] = num_gemms

    def get_extra_state(self) -> torch.Tensor:
        """TE v2.11 base.py L806-840: no FP8 state is an empty byte tensor."""
        return torch.empty(0, dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        """TE v2.11 base.py L867-880: an empty tensor (or None) carries nothing."""
        if state is None or (isinstance(state, torch.Tensor) and state.numel() == 0):
            return
        refuse("loading FP8 state from a checkpoint")
