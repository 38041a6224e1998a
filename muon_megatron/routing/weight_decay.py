"""Which parameters are weight-decayed: Megatron's rule, or Moonlight's (norm gammas decayed).

megatron-core 0.16.1 decides weight decay per param group from `config_overrides`: when a
caller passes none, `get_megatron_optimizer` uses `get_standard_config_overrides`, which
gives `wd_mult=0` to every 1-D parameter and every `*.bias` (or, with
`apply_wd_to_qk_layernorm`, to those minus the q/k layernorms). Megatron's scheduler then
sets each group's weight decay to `wd_mult * wd`. So norm gammas are never decayed.

The Moonlight report (arXiv 2502.16982, appendix D, "RMSNorm Gamma Weight Decay") found
decaying the RMSNorm gamma "crucial for ensuring training stability, as it effectively
prevents excessively high output RMS values in each layer". `--muon-norm-weight-decay`
keeps Megatron's rule except that norm gammas are decayed; biases and other 1-D params
stay undecayed. `weight_decay_overrides` is that rule in the form `get_megatron_optimizer`
takes; `no_weight_decay_rule` the same rule as a (name, param) predicate, for the
single-device reference's `no_weight_decay`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from muon_megatron.config import MuonConfig
from muon_megatron.routing.rules import canonical_name

__all__ = [
    "is_norm_gamma",
    "megatron_no_weight_decay",
    "no_weight_decay_rule",
    "weight_decay_overrides",
]


def is_norm_gamma(name: str, param: torch.Tensor) -> bool:
    """The scale (gamma) of a norm: a 1-D weight of a norm module (`input_layernorm.weight`,
    `final_layernorm.weight`, MLA's `kv_layernorm.weight`, TE's fused `layer_norm_weight`);
    never a bias."""
    name = canonical_name(name)
    if param.ndim != 1 or name.endswith("bias"):
        return False
    module, _, leaf = name.rpartition(".")
    return "norm" in leaf or "norm" in module.rpartition(".")[2]


def megatron_no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """megatron-core's default skip (`get_standard_config_overrides`): 1-D params, biases."""
    return param.ndim == 1 or canonical_name(name).endswith(".bias")


def no_weight_decay_rule(muon_config: MuonConfig) -> Callable[[str, torch.Tensor], bool]:
    """The (name, param) -> 'not decayed' predicate for `muon_config`."""
    if not muon_config.muon_norm_weight_decay:
        return megatron_no_weight_decay

    def no_weight_decay_but_norm_gammas(name: str, param: torch.Tensor) -> bool:
        return megatron_no_weight_decay(name, param) and not is_norm_gamma(name, param)

    return no_weight_decay_but_norm_gammas


def weight_decay_overrides(optimizer_config: Any, muon_config: MuonConfig) -> dict | None:
    """`config_overrides` for megatron's `get_megatron_optimizer`: None (megatron's own
    default) unless `muon_norm_weight_decay`; then megatron's standard overrides (the
    decoupled lr among them) with the weight-decay skip replaced by `no_weight_decay_rule`."""
    if not muon_config.muon_norm_weight_decay:
        return None
    if getattr(optimizer_config, "apply_wd_to_qk_layernorm", False):
        raise ValueError(
            "apply_wd_to_qk_layernorm=True with --muon-norm-weight-decay: the latter already "
            "decays every norm gamma, q/k layernorms included; drop one of the two."
        )
    from megatron.core.optimizer import get_standard_config_overrides
    from megatron.core.optimizer.optimizer_config import (
        ParamKey,
        ParamWithNamePredicate,
    )

    skip = no_weight_decay_rule(muon_config)
    overrides = {
        key: value
        for key, value in get_standard_config_overrides(optimizer_config).items()
        if dict(value) != {"wd_mult": 0.0}
    }
    key = ParamKey(
        with_name_predicate=ParamWithNamePredicate(
            name="no_wd_but_norm_gammas", fn=lambda param, name: skip(name, param)
        )
    )
    overrides[key] = {"wd_mult": 0.0}
    return overrides
