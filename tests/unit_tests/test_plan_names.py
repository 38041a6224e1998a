"""`plan.plan_names`: a rank's matrices named by global layer, whatever its model chunks.

Two chunks shaped like an interleaved pipeline's (megatron-core numbers each chunk's layers
from 0 in the module tree and keeps the global number in `layer_number`, 1-based), wrapped
as DDP / Float16Module wrap them (`module.` prefixes)."""

from __future__ import annotations

import pytest
import torch

from muon_megatron.optimizer.plan import plan_names


class _Layer(torch.nn.Module):
    def __init__(self, layer_number: int) -> None:
        super().__init__()
        self.layer_number = layer_number
        self.self_attention = torch.nn.Linear(2, 2, bias=False)
        self.self_attention.layer_number = layer_number  # attention modules carry it too


class _Block(torch.nn.Module):
    def __init__(self, numbers: list[int]) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(_Layer(n) for n in numbers)


class _Chunk(torch.nn.Module):
    def __init__(self, numbers: list[int], embedding: bool) -> None:
        super().__init__()
        if embedding:
            self.embedding = torch.nn.Embedding(4, 2, _weight=torch.zeros(4, 2))
        self.decoder = _Block(numbers)


def _wrapped(module: torch.nn.Module) -> torch.nn.Module:
    outer = torch.nn.Module()
    outer.module = module
    return outer


def test_chunk_local_layer_numbers_become_global() -> None:
    """PP rank 0 of PP2 x VPP2 with 8 layers: chunk 0 holds layers 0-1, chunk 1 layers 4-5,
    both as `decoder.layers.0/1` in the module tree."""
    chunks = [_wrapped(_Chunk([1, 2], embedding=True)), _wrapped(_Chunk([5, 6], embedding=False))]
    names = plan_names(chunks)
    assert sorted(names.values()) == [
        "decoder.layers.0.self_attention.weight",
        "decoder.layers.1.self_attention.weight",
        "decoder.layers.4.self_attention.weight",
        "decoder.layers.5.self_attention.weight",
        "embedding.weight",
    ]
    second = dict(chunks[1].named_parameters())
    assert names[second["module.decoder.layers.0.self_attention.weight"]] == (
        "decoder.layers.4.self_attention.weight"
    )


def test_names_that_stay_shared_are_refused() -> None:
    """Two chunks whose layers claim the same global number cannot be told apart."""
    chunks = [_Chunk([1], embedding=False), _Chunk([1], embedding=False)]
    with pytest.raises(RuntimeError, match="decoder.layers.0"):
        plan_names(chunks)
