"""`transformer_engine.pytorch.distributed`: TE's TP attribute setter (reproduced line for
line, it is what megatron-core's layers end up marked with), its world-size helper and an
RNG-states tracker on torch's default generator."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = [
    "CudaRNGStatesTracker",
    "activation_recompute_forward",
    "get_distributed_world_size",
    "set_tensor_model_parallel_attributes",
]

# TE v2.11 transformer_engine/pytorch/distributed.py L57-61.
_MODEL_PARALLEL_ATTRIBUTE_DEFAULTS = {
    "tensor_model_parallel": False,
    "partition_dim": -1,
    "partition_stride": 1,
}


def set_tensor_model_parallel_attributes(
    tensor: torch.Tensor, is_parallel: bool, dim: int, stride: int
) -> None:
    """TE v2.11 distributed.py L145-154: refuse a tensor already marked, then mark it."""
    for attribute in _MODEL_PARALLEL_ATTRIBUTE_DEFAULTS:
        if hasattr(tensor, attribute):
            raise AssertionError(f"tensor already has {attribute} (TE asserts it has not)")
    setattr(tensor, "tensor_model_parallel", is_parallel)
    setattr(tensor, "partition_dim", dim)
    setattr(tensor, "partition_stride", stride)


@contextlib.contextmanager
def activation_recompute_forward(activation_recompute: bool = False,
                                 recompute_phase: bool = False) -> Iterator[None]:
    """TE marks FP8 recompute phases with it (megatron-core imports it at import and uses it
    with FP8 only): no FP8 here, nothing to mark."""
    yield


def get_distributed_world_size(group=None) -> int:
    """TE v2.11 distributed.py L157-162: 1 without torch.distributed."""
    if not torch.distributed.is_initialized():
        return 1
    return torch.distributed.get_world_size(group=group)


class CudaRNGStatesTracker:
    """Named RNG states forked around a block (TE's tracker, on torch's default generator,
    which megatron's CPU shims also route the CUDA RNG calls to)."""

    def __init__(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def reset(self) -> None:
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_ or name in self.states_:
            raise ValueError(f"RNG state {name!r} / seed {seed} already added")
        self.seeds_.add(seed)
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
        if name not in self.states_:
            raise KeyError(f"RNG state {name!r} was never added")
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)
