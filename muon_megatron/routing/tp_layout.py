"""How megatron-core split a parameter over tensor parallelism, read from the module that owns
it: the layer's class and what megatron-core built it with, not the parameter's attributes.

The plan of a Muon matrix must know whether each TP rank holds a slice of the weight (and
along which dimension) or the whole of it. megatron-core's parameters carry that as the
attributes `tensor_model_parallel` / `partition_dim`, but with Transformer Engine (TE) they
are set by TE, which marks every weight `is_parallel=True, dim = 1 if parallel_mode == "row"
else 0` (TE 2.x linear.py `reset_parameters`, likewise LayerNormLinear and GroupedLinear)
and is told `parallel_mode=None` in two cases where megatron-core handles TP itself
(megatron-core 0.16.1 extensions/transformer_engine.py):

* `TELinear(parallel_mode="duplicated")` (MLA's `linear_q_down_proj` / `linear_kv_down_proj`,
  MoE latent projections): the weight is whole on every TP rank, yet marked split on dim 0
  (L603-608);
* experts with expert-TP > 1 or EP > 1 ("explicit expert comm", L611-619 and L1521-1529):
  megatron-core divides the sizes itself, so a row-parallel fc2, split along dim 1, is
  marked dim 0.

`module_tp_layout(module, param_name)` answers from the module instead, for megatron-core's
local layers, its TE layers and the legacy GroupedMLP; `TPLayouts` maps every parameter of
the model chunks to its owning module once, cross-checks the attributes (the module wins, a
debug line says so) and collects the parameters whose layout nothing determines (an unknown
module under TP > 1) for one error naming them all (`raise_undetermined`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from muon_megatron.routing.rules import canonical_name

__all__ = ["TPLayout", "TPLayouts", "attribute_tp_layout", "module_tp_layout", "param_owners"]

logger = logging.getLogger(__name__)

_GROUPED_WEIGHT = re.compile(r"weight\d+$")


@dataclass(frozen=True)
class TPLayout:
    """A parameter's TP layout: split along `dim` of the stored tensor over `group` (the
    layer's TP group: the expert-TP group for experts), or whole on every TP rank; `layer`
    says which class and rule decided it."""

    partitioned: bool
    dim: int | None
    layer: str
    group: Any = None

    @property
    def partition_dim(self) -> int | None:
        """What `routing.splits.matrix_split` takes: the split dim, None when whole."""
        return self.dim if self.partitioned else None

    def describe(self) -> str:
        return f"split dim {self.dim}" if self.partitioned else "whole on every TP rank"


def _split(dim: int, layer: str, group) -> TPLayout:
    return TPLayout(True, dim, layer, group)


def _whole(layer: str) -> TPLayout:
    return TPLayout(False, None, layer)


def _te_layers():
    """megatron-core's TE wrapper classes, or None without Transformer Engine (its extension
    module then holds MagicMock stand-ins that isinstance cannot take)."""
    from megatron.core.extensions import transformer_engine as te_ext

    return te_ext if te_ext.HAVE_TE else None


def _te_layout(module: torch.nn.Module, name: str, te) -> TPLayout | None:
    """The TP layout of a TE layer's weight, from megatron-core's wrapper class."""
    kind = type(module).__name__
    group = getattr(module, "_tp_group", None)
    grouped = te.TEGroupedLinear is not None and isinstance(module, te.TEGroupedLinear)
    if grouped:
        if not _GROUPED_WEIGHT.fullmatch(name):
            return None
        explicit = " (expert comm explicit: TE told parallel_mode=None)" if getattr(
            module, "explicit_expert_comm", False) else ""
        if isinstance(module, te.TEColumnParallelGroupedLinear):
            return _split(0, f"{kind}: column-parallel experts{explicit}", group)
        if isinstance(module, te.TERowParallelGroupedLinear):
            return _split(1, f"{kind}: row-parallel experts{explicit}", group)
        return None  # the base class: megatron-core builds none (its mode is not kept)
    if name != "weight":
        return None
    if isinstance(module, te.TELayerNormColumnParallelLinear):
        return _split(0, f"{kind}: column-parallel", group)
    if isinstance(module, te.TEColumnParallelLinear):
        return _split(0, f"{kind}: column-parallel", group)
    if isinstance(module, te.TERowParallelLinear):
        return _split(1, f"{kind}: row-parallel", group)
    if isinstance(module, te.TELinear):
        # megatron-core passes "column" / "row" on to TE (which keeps it), except for
        # "duplicated" and explicit expert comm, where TE gets None; of those two only
        # "duplicated" picks the data-parallel RNG tracker (transformer_engine.py L590-599,
        # which TE keeps as `rng_tracker_name`).
        from megatron.core.tensor_parallel.random import get_data_parallel_rng_tracker_name

        mode = getattr(module, "parallel_mode", None)
        if mode == "column":
            return _split(0, f"{kind}(parallel_mode='column')", group)
        if mode == "row":
            return _split(1, f"{kind}(parallel_mode='row')", group)
        if getattr(module, "rng_tracker_name", None) == get_data_parallel_rng_tracker_name():
            return _whole(f"{kind}(parallel_mode='duplicated')")
        return None
    return None


def _local_layout(module: torch.nn.Module, name: str) -> TPLayout | None:
    """The TP layout of a weight of megatron-core's local layers, MoE router, shared-expert
    gate and plain torch layers."""
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
    )
    from megatron.core.transformer.moe import experts
    from megatron.core.transformer.moe.router import Router
    from megatron.core.transformer.moe.shared_experts import SharedExpertMLP

    kind = type(module).__name__
    group = getattr(module, "tp_group", None)
    grouped_mlp = getattr(experts, "GroupedMLP", None)  # gone from megatron-core 0.19
    if grouped_mlp is not None and isinstance(module, grouped_mlp):
        # experts.py GroupedMLP: weight1 [hidden, experts x ffn / TP] and weight2
        # [experts x ffn / TP, hidden], split over the expert-TP group.
        dims = {"weight1": 1, "weight2": 0}
        return _split(dims[name], f"{kind}: {name}", group) if name in dims else None
    if isinstance(module, SharedExpertMLP) and name == "gate_weight":
        return _whole(f"{kind}: shared-expert gate")
    if name != "weight":
        return None
    if isinstance(module, ColumnParallelLinear):
        return _split(0, f"{kind}: column-parallel", group)
    if isinstance(module, RowParallelLinear):
        return _split(1, f"{kind}: row-parallel", group)
    if isinstance(module, VocabParallelEmbedding):
        return _split(0, f"{kind}: vocab-parallel", group)
    if isinstance(module, Router):
        return _whole(f"{kind}: router")
    if type(module) in (torch.nn.Linear, torch.nn.Embedding):
        return _whole(f"torch.nn.{kind}")
    return None


def module_tp_layout(module: torch.nn.Module, param_name: str) -> TPLayout | None:
    """The TP layout of `module`'s own parameter `param_name` as megatron-core built it, or
    None when the module's class (or that parameter of it) is not one this knows."""
    te = _te_layers()
    if te is not None:
        layout = _te_layout(module, param_name, te)
        if layout is not None:
            return layout
    return _local_layout(module, param_name)


def attribute_tp_layout(param: torch.Tensor) -> tuple[bool, int | None]:
    """What the parameter's own attributes claim: (tensor_model_parallel, partition_dim)."""
    split = bool(getattr(param, "tensor_model_parallel", False))
    return split, (int(param.partition_dim) if split else None)


def param_owners(
    model_chunks: Iterable[torch.nn.Module],
) -> dict[torch.nn.Parameter, tuple[str, torch.nn.Module, str]]:
    """Each parameter -> (its owning module's name, the module, the parameter's name in it),
    from one walk of `named_modules()`; a parameter shared by two modules keeps the first."""
    owners: dict[torch.nn.Parameter, tuple[str, torch.nn.Module, str]] = {}
    for chunk in model_chunks:
        for module_name, module in chunk.named_modules():
            for local, param in module.named_parameters(recurse=False):
                owners.setdefault(param, (canonical_name(module_name), module, local))
    return owners


class TPLayouts:
    """The TP layouts of the Muon matrices of `model_chunks` on a grid of TP size `tp_size`.

    `of(name, param)` returns the module's layout; where the attributes claim another one it
    logs a debug line (the module wins). A parameter whose layout nothing determines (an
    unknown module holding it, under TP > 1) is recorded and comes back as whole, for
    `raise_undetermined()` to refuse them all at once before the plan is used. Under TP 1
    every parameter is whole on its rank, whatever holds it. A module split over a group of
    another size than the grid's TP (an expert layer whose expert-TP differs from the TP of
    the optimizer it landed in) is refused at once."""

    def __init__(self, model_chunks: Iterable[torch.nn.Module], tp_size: int) -> None:
        self.owners = param_owners(model_chunks)
        self.tp_size = tp_size
        self.undetermined: list[str] = []

    def layout(self, param: torch.nn.Parameter) -> TPLayout | None:
        """The owning module's layout of `param` (None: no module this knows owns it)."""
        owner = self.owners.get(param)
        return None if owner is None else module_tp_layout(owner[1], owner[2])

    def of(self, name: str, param: torch.nn.Parameter) -> TPLayout:
        layout = self.layout(param)
        if layout is None:
            owner = self.owners.get(param)
            held = f"{type(owner[1]).__name__}" if owner else "no module"
            if self.tp_size > 1:
                self.undetermined.append(f"{name} ({held})")
            return _whole(f"{held}: unknown module, TP 1")
        claimed = attribute_tp_layout(param)
        if claimed != (layout.partitioned, layout.partition_dim):
            logger.debug(
                "muon: %s: the parameter's attributes say tensor_model_parallel=%s, "
                "partition_dim=%s; %s built it %s, which the plan uses", name, claimed[0],
                claimed[1], layout.layer, layout.describe())
        group = layout.group
        if layout.partitioned and group is not None and group.size() != self.tp_size:
            raise ValueError(
                f"{name}: {layout.layer} is split over a TP group of {group.size()} ranks, but "
                f"the optimizer it belongs to has a TP size of {self.tp_size}: its expert-TP "
                "and TP differ while megatron-core put it with the dense parameters (EP 1); "
                "set --expert-tensor-parallel-size equal to --tensor-model-parallel-size, or "
                "use expert parallelism."
            )
        return layout

    def raise_undetermined(self) -> None:
        """ValueError naming every Muon parameter whose TP layout nothing determined."""
        if not self.undetermined:
            return
        raise ValueError(
            f"Muon cannot tell how tensor parallelism (TP {self.tp_size}) split these 2-D "
            f"parameters: their modules are not megatron-core layers it knows: "
            f"{', '.join(self.undetermined)}. Route them to AdamW by name "
            "(--muon-exclude PATTERN, or is_muon= in get_muon_optimizer), or build them "
            "with megatron-core's ColumnParallelLinear / RowParallelLinear (or TE's)."
        )
