"""Which parameters Muon updates, and the fused layout each one has, from its Megatron name.

Small named predicates, kept apart from the optimizer's step so each is tested on its own:
Moonlight keeps embeddings, the output head, norms and (DeepSeek-style MoE) the router on
AdamW; every other 2-D weight is a Muon matrix, MLA's projections included (each whole:
`linear_q_proj` or `linear_q_down_proj` / `linear_q_up_proj`, `linear_kv_down_proj`,
`linear_kv_up_proj`; their `q_layernorm` / `kv_layernorm` are norms). The shared experts'
gate (`shared_experts.gate_weight`, [1, hidden]) is a vector stored as a matrix: AdamW.
`muon_param_rule(muon_config)` is the predicate for a config (`--muon-router-optimizer`,
`--muon-include` / `--muon-exclude` name patterns); `route_reason` says where the rules send a
parameter and why (the routing table's words), and which 2-D weights they do not recognise
(not a Megatron layer they know: the default rule makes them whole Muon matrices).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from fnmatch import fnmatchcase
from typing import Literal

import torch

from muon_megatron.config import MuonConfig

__all__ = [
    "ADAMW_NAME_PARTS",
    "Kind",
    "canonical_name",
    "is_muon_param",
    "is_router_weight",
    "muon_param_rule",
    "param_kind",
    "require_matrix",
    "route_reason",
    "stacked_expert_errors",
]

# Substrings of parameter names that always stay on AdamW, whatever their shape
# (Moonlight: embeddings, output head, norms; DeepSeek-style MoE adds the router; the
# shared experts' sigmoid gate is one row, [1, hidden]: orthogonalizing it would only
# normalize it, a sign-like update at Muon's matrix scale).
ADAMW_NAME_PARTS: tuple[str, ...] = (
    "embedding",
    "output_layer",
    "router",
    "norm",
    "shared_experts.gate_weight",
)

Kind = Literal["plain", "qkv", "fc1", "grouped_fc1", "grouped_fc2", "mla_q", "mla_kv_up"]


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


def is_router_weight(name: str) -> bool:
    """The MoE router's weight ([num_experts, hidden], TP-replicated)."""
    return canonical_name(name).endswith("mlp.router.weight")


def muon_param_rule(muon_config: MuonConfig) -> Callable[[str, torch.Tensor], bool]:
    """The routing predicate for `muon_config`: `is_muon_param`, with the router weight on
    Muon when `muon_router_optimizer == 'muon'` (the Moonlight report compares the router's
    singular values under Muon and AdamW, arXiv 2502.16982 figure 10), and the parameters
    matching `muon_include` / `muon_exclude` sent to Muon / AdamW (`route_reason`)."""
    if muon_config.muon_include or muon_config.muon_exclude:
        return lambda name, param: route_reason(name, param, muon_config)[0]
    if muon_config.muon_router_optimizer == "adamw":
        return is_muon_param

    def is_muon_param_router_on_muon(name: str, param: torch.Tensor) -> bool:
        if is_router_weight(name) and param.ndim == 2:
            return True
        return is_muon_param(name, param)

    return is_muon_param_router_on_muon


# The 2-D weights of the Megatron layers the rules know (Muon by default): attention, MLA,
# dense and expert MLPs (SequentialMLP, TEGroupedMLP's weight{e}, GroupedMLP), MoE latents.
_KNOWN_MATRIX = re.compile(
    r"\.(linear_(qkv|proj|fc1|fc2|q_proj|q_down_proj|q_up_proj|kv_down_proj|kv_up_proj)"
    r"|fc[12]_latent_proj)\.weight\d*$|\.experts\.weight[12]$"
)
# Why an ADAMW_NAME_PARTS part keeps a 2-D parameter on AdamW.
_ADAMW_WHY = {
    "embedding": "embedding",
    "output_layer": "output layer",
    "router": "MoE router (--muon-router-optimizer adamw)",
    "norm": "norm",
    "shared_experts.gate_weight": "shared-expert gate (one row)",
}


def route_reason(name: str, param: torch.Tensor, muon_config: MuonConfig) -> tuple[bool, str]:
    """(Muon?, why) for a parameter under `muon_config`'s rules: a name pattern of
    `muon_exclude` (AdamW) or `muon_include` (Muon; ValueError for a parameter that is not
    2-D, or matched by both), else `muon_param_rule`'s defaults. The reason of a 2-D weight
    the rules do not recognise starts with 'unrecognised'."""
    name = canonical_name(name)
    exclude = [p for p in muon_config.muon_exclude if fnmatchcase(name, p)]
    include = [p for p in muon_config.muon_include if fnmatchcase(name, p)]
    if include and exclude:
        raise ValueError(
            f"{name} matches --muon-include {include[0]!r} and --muon-exclude {exclude[0]!r}: "
            "make the patterns disjoint."
        )
    if exclude:
        return False, f"--muon-exclude {exclude[0]!r}"
    if include:
        if param.ndim != 2:
            raise ValueError(
                f"--muon-include {include[0]!r} matches {name} of shape {tuple(param.shape)}: "
                "Muon needs a 2-D weight; narrow the pattern."
            )
        return True, f"--muon-include {include[0]!r}"
    if is_router_weight(name) and param.ndim == 2:
        if muon_config.muon_router_optimizer == "muon":
            return True, "MoE router (--muon-router-optimizer muon)"
    if name.endswith("bias"):
        return False, "bias"
    part = next((part for part in ADAMW_NAME_PARTS if part in name), None)
    if part is not None:
        return False, _ADAMW_WHY[part]
    if param.ndim != 2:
        return False, f"{param.ndim}-D"
    if _KNOWN_MATRIX.search(name):
        return True, "hidden weight"
    return True, "unrecognised 2-D weight: Muon by the default rule"


# megatron-core's single grouped expert weight (`moe_single_grouped_weight`, 0.19+ with
# TE >= 2.14): TEGroupedMLP's fc1 / fc2 as one [experts, out, in] parameter.
_STACKED_EXPERT = re.compile(r"\.experts\.linear_fc[12]\.weight$")


def stacked_expert_errors(named_params, muon_config: MuonConfig) -> list[str]:
    """The hidden expert weights stored stacked, all local experts in one 3-D parameter
    (`--moe-single-grouped-weight`), that no `--muon-exclude` pattern sends to AdamW: Muon
    does not split them per expert, and the default rule would leave an MoE's experts, most
    of its weights, on AdamW without a word. One message naming them and the two ways out
    ([] when there are none)."""
    names = []
    for name, param in named_params:
        name = canonical_name(name)
        if param.ndim == 3 and _STACKED_EXPERT.search(name):
            if not any(fnmatchcase(name, p) for p in muon_config.muon_exclude):
                names.append(name)
    if not names:
        return []
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return [
        f"{shown}: --moe-single-grouped-weight stacks each layer's local experts into one 3-D "
        "parameter, which Muon does not orthogonalize per expert; drop "
        "--moe-single-grouped-weight (TEGroupedMLP then has one 2-D weight per expert, on "
        "Muon), or keep the experts on AdamW knowingly with --muon-exclude "
        "'*.experts.linear_fc*.weight'."
    ]


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
    if name.endswith(("self_attention.linear_q_proj.weight", "self_attention.linear_q_up_proj.weight")):
        return "mla_q"
    if name.endswith("self_attention.linear_kv_up_proj.weight"):
        return "mla_kv_up"
    if name.endswith("linear_fc1.weight") or _TE_GROUPED_FC1.search(name):
        return "fc1"
    if name.endswith("experts.weight1"):
        return "grouped_fc1"
    if name.endswith("experts.weight2"):
        return "grouped_fc2"
    return "plain"
