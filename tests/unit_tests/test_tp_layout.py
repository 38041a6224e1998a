"""routing/tp_layout.py: a parameter's TP layout from the megatron-core module that owns it.

megatron-core's local layers are made here without their constructors (which need process
groups): `isinstance` and the attributes megatron-core's constructors keep are what the
mapping reads. Transformer Engine's layers exist only where TE (or the tests' stand-in) is
importable: tests/functional/test_te_parity.py checks them on models megatron-core built.
"""

from __future__ import annotations

import logging

import pytest
import torch
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from megatron.core.transformer.moe import experts
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP

from muon_megatron.routing.tp_layout import TPLayouts, attribute_tp_layout, module_tp_layout


class _Group:
    """What the mapping asks of a process group: its size."""

    def __init__(self, size: int) -> None:
        self._size = size

    def size(self) -> int:
        return self._size


def _bare(cls: type, tp: int = 2, **params: tuple[int, ...]) -> torch.nn.Module:
    """An instance of megatron-core's `cls` without its constructor: its TP group (as
    megatron-core keeps it, `tp_group`) and parameters of the given shapes."""
    module = cls.__new__(cls)
    torch.nn.Module.__init__(module)
    module.tp_group = _Group(tp)
    for name, shape in params.items():
        setattr(module, name, torch.nn.Parameter(torch.zeros(shape)))
    return module


class Unknown(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(4, 4))


# The legacy GroupedMLP is gone from megatron-core 0.19 (its rows are then not generated).
GroupedMLP = getattr(experts, "GroupedMLP", None)
# (class, parameter, expected (partitioned, dim)): megatron-core 0.16.1's local layers.
LOCAL = [
    (ColumnParallelLinear, "weight", (True, 0)),
    (RowParallelLinear, "weight", (True, 1)),
    (VocabParallelEmbedding, "weight", (True, 0)),
    # experts.py GroupedMLP: weight1 [hidden, E x ffn / TP], weight2 [E x ffn / TP, hidden].
    *([(GroupedMLP, "weight1", (True, 1)), (GroupedMLP, "weight2", (True, 0))]
      if GroupedMLP is not None else []),
    (TopKRouter, "weight", (False, None)),
    (SharedExpertMLP, "gate_weight", (False, None)),
    (torch.nn.Linear, "weight", (False, None)),
    (torch.nn.Embedding, "weight", (False, None)),
]


@pytest.mark.parametrize(
    "cls, name, expected", LOCAL, ids=[f"{c.__name__}.{n}" for c, n, _ in LOCAL]
)
def test_local_layers(cls, name: str, expected) -> None:
    layout = module_tp_layout(_bare(cls, **{name: (4, 4)}), name)
    assert layout is not None
    assert (layout.partitioned, layout.partition_dim) == expected
    assert cls.__name__ in layout.layer


def test_unknown_module_or_parameter_is_undetermined() -> None:
    assert module_tp_layout(Unknown(), "weight") is None
    assert module_tp_layout(_bare(ColumnParallelLinear, weight=(4, 4)), "other") is None


def _model(*modules: torch.nn.Module) -> torch.nn.Module:
    model = torch.nn.Module()
    for i, m in enumerate(modules):
        model.add_module(f"m{i}", m)
    return model


def test_module_wins_over_attributes_with_a_debug_line(caplog) -> None:
    """A row-parallel weight marked dim 0 (what TE marks megatron-core's explicit-comm fc2):
    the plan splits it along dim 1, and says so at debug level."""
    row = _bare(RowParallelLinear, weight=(4, 2))
    row.weight.tensor_model_parallel, row.weight.partition_dim = True, 0
    layouts = TPLayouts([_model(row)], tp_size=2)
    with caplog.at_level(logging.DEBUG, logger="muon_megatron.routing.tp_layout"):
        layout = layouts.of("m0.weight", row.weight)
    assert layout.partition_dim == 1
    assert attribute_tp_layout(row.weight) == (True, 0)
    assert any("m0.weight" in r.message and "partition_dim=0" in r.message for r in caplog.records)


def test_agreeing_attributes_log_nothing(caplog) -> None:
    column = _bare(ColumnParallelLinear, weight=(2, 4))
    column.weight.tensor_model_parallel, column.weight.partition_dim = True, 0
    with caplog.at_level(logging.DEBUG, logger="muon_megatron.routing.tp_layout"):
        TPLayouts([_model(column)], tp_size=2).of("m0.weight", column.weight)
    assert not caplog.records


def test_unknown_modules_are_refused_under_tp_naming_them_all() -> None:
    a, b = Unknown(), Unknown()
    layouts = TPLayouts([_model(a, b)], tp_size=2)
    for name, module in (("m0.weight", a), ("m1.weight", b)):
        assert not layouts.of(name, module.weight).partitioned
    named = r"m0\.weight \(Unknown\), m1\.weight \(Unknown\).*--muon-exclude"
    with pytest.raises(ValueError, match=named):
        layouts.raise_undetermined()


def test_unknown_modules_are_whole_under_tp1() -> None:
    unknown = Unknown()
    layouts = TPLayouts([_model(unknown)], tp_size=1)
    assert not layouts.of("m0.weight", unknown.weight).partitioned
    layouts.raise_undetermined()  # nothing to refuse: TP 1 splits nothing


def test_a_split_over_another_tp_size_than_the_grid_is_refused() -> None:
    """An expert layer split over expert-TP 4 inside an optimizer whose grid has TP 2."""
    column = _bare(ColumnParallelLinear, tp=4, weight=(2, 4))
    with pytest.raises(ValueError, match="TP group of 4 ranks.*TP size of 2.*expert-tensor"):
        TPLayouts([_model(column)], tp_size=2).of("m0.weight", column.weight)
