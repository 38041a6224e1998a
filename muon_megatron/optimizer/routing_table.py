"""The routing table: where each parameter of a built optimizer went, and why.

`routing_rows(optimizer, model_chunks, muon_config)` describes every trainable parameter of
this rank's model chunks: Muon or AdamW, the reason (`routing.rules.route_reason`: a known
hidden weight, a name pattern of `--muon-include` / `--muon-exclude`, embedding, norm, bias,
router, ... or "unrecognised" for a 2-D weight the rules do not know), for a Muon matrix its
logical matrices (whole; Q,K,V; gate,up; per expert; MLA's parts) as the optimizer's plan
split it, and its TP layout as the module that owns it was built (`routing.tp_layout`).
`routing_table_lines` groups them into one line per kind of parameter with counts, and
`--muon-print-routing` adds one line per parameter. `get_muon_optimizer` prints them at rank
0 when it has built the optimizer: rank 0's view, its pipeline stage and its experts.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from muon_megatron.config import MuonConfig
from muon_megatron.routing.rules import canonical_name, param_kind, route_reason
from muon_megatron.routing.splits import MatrixSplit
from muon_megatron.routing.tp_layout import TPLayouts

__all__ = ["ParamRoute", "routing_rows", "routing_table_lines"]

PREFIX = "[muon routing]"
_LAYER = re.compile(r"^decoder\.(layers\.\d+\.)?|(?<=experts\.)local_experts\.\d+\.")
_CONTAINERS = re.compile(r"(^|\.)(mlp|self_attention)\.")


@dataclass(frozen=True)
class ParamRoute:
    """One parameter's row: its name and shape, 'Muon' or 'AdamW', why, what it is (the
    layer, and for Muon how it splits), its logical matrices and its TP layout."""

    name: str
    shape: tuple[int, ...]
    optimizer: str
    why: str
    kind: str
    matrices: int
    tp: str

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.optimizer, self.kind, self.tp, self.why)


def _layer(name: str) -> str:
    """The parameter's place in any layer: `decoder.layers.3.mlp.experts.local_experts.1.
    linear_fc1.weight` -> `experts.linear_fc1.weight`, TEGroupedMLP's `weight3` -> `weight{e}`."""
    short = _CONTAINERS.sub(r"\1", _LAYER.sub("", name))
    return re.sub(r"(?<=linear_fc[12]\.weight)\d+$", "{e}", short)


def _split_words(name: str, split: MatrixSplit) -> str:
    """How the plan splits a Muon parameter into logical matrices."""
    kind, groups = param_kind(name), len(split.row_groups)
    if split.tp_mode == "per_rank" or (kind == "qkv" and groups > 3):
        return "per head"
    words = {
        "qkv": {3: "Q,K,V"},
        "fc1": {2: "gate,up"},
        "mla_q": {2: "q-nope,q-rope"},
        "mla_kv_up": {2: "k-nope,v"},
        "grouped_fc1": {2: f"{split.batch} experts x gate,up", 1: f"{split.batch} experts"},
        "grouped_fc2": {1: f"{split.batch} experts"},
    }.get(kind, {})
    return words.get(groups, "whole")


def _tp_words(tp_layouts: TPLayouts, param: torch.nn.Parameter, on_muon: bool) -> str:
    """The TP layout as the owning module was built: of every Muon matrix (unknown ones
    named), of an AdamW parameter where known."""
    layout = tp_layouts.layout(param)
    if layout is None:
        if not on_muon:
            return ""
        owner = tp_layouts.owners.get(param)
        return f"TP unknown ({type(owner[1]).__name__ if owner else 'no module'})"
    layer = layout.layer.split(":")[0].split("(")[0]
    if not layout.partitioned:
        return f"TP whole ({layer})"
    size = layout.group.size() if layout.group is not None else "?"
    return f"TP dim {layout.dim} / {size} ({layer})"


def routing_rows(
    optimizer,
    model_chunks: Sequence[torch.nn.Module],
    muon_config: MuonConfig,
    is_muon: Callable[[str, torch.Tensor], bool] | None = None,
) -> list[ParamRoute]:
    """A row per trainable parameter of `model_chunks` (in model order): where `optimizer`'s
    plan put it and why. `is_muon`: the rule the optimizer was built with, when not the
    config's own (its choices are then reported as its)."""
    from muon_megatron.optimizer.builder import muon_optimizers

    planned = {m.param: m for o in muon_optimizers(optimizer) for m in o._matrices}
    tp_layouts = TPLayouts(model_chunks, tp_size=1)
    rows, seen = [], set()
    for chunk in model_chunks:
        for full_name, param in chunk.named_parameters():
            if not param.requires_grad or param in seen:
                continue
            seen.add(param)
            name = canonical_name(full_name)
            on_muon, why = route_reason(name, param, muon_config)
            matrix = planned.get(param)
            if is_muon is not None and bool(is_muon(name, param)) != on_muon:
                on_muon, why = bool(is_muon(name, param)), "is_muon given to get_muon_optimizer"
            kind = _layer(name)
            if matrix is not None:
                kind = f"{kind}: {_split_words(name, matrix.split)}"
            rows.append(
                ParamRoute(
                    name=name,
                    shape=tuple(param.shape),
                    optimizer="Muon" if matrix is not None else "AdamW",
                    why=why,
                    kind=kind,
                    matrices=len(matrix.split.logical_shapes()) if matrix is not None else 0,
                    tp=_tp_words(tp_layouts, param, matrix is not None),
                )
            )
    return rows


def routing_table_lines(rows: Sequence[ParamRoute], per_param: bool = False) -> list[str]:
    """One line per kind of parameter (optimizer, layer and split, TP layout, why; counts of
    parameters and logical matrices), unrecognised 2-D weights first among Muon's; with
    `per_param`, then one line per parameter."""
    kinds: dict[tuple[str, str, str, str], list[ParamRoute]] = {}
    for row in rows:
        kinds.setdefault(row.key, []).append(row)
    muon = [r for r in rows if r.optimizer == "Muon"]
    lines = [
        f"{PREFIX} {len(muon)} Muon params ({sum(r.matrices for r in muon)} logical matrices), "
        f"{len(rows) - len(muon)} AdamW params (this rank's pipeline stage and experts)"
    ]
    order = sorted(kinds, key=lambda k: (k[0] != "Muon", not k[3].startswith("unrecognised"),
                                         rows.index(kinds[k][0])))
    width = max((len(k[1]) for k in kinds), default=0)
    for key in order:
        group = kinds[key]
        count = f"{len(group):>4} x"
        total = sum(r.matrices for r in group)
        matrices = f"{total:>4} {'matrix' if total == 1 else 'matrices'}"
        matrices = matrices if key[0] == "Muon" else ""
        tp = f"{key[2]}  " if key[2] else ""
        lines.append(
            f"{PREFIX}   {key[0]:<5} {count} {key[1]:<{width}}  {matrices:>13}  {tp}<- {key[3]}"
        )
    if per_param:
        for row in rows:
            shape = "x".join(map(str, row.shape))
            matrices = f" ({row.matrices} {'matrix' if row.matrices == 1 else 'matrices'})"
            lines.append(
                f"{PREFIX} {row.optimizer:<5} {row.name} [{shape}] {row.kind}"
                + (matrices if row.matrices else "")
                + (f"  {row.tp}" if row.tp else "")
                + f"  <- {row.why}"
            )
    return lines
