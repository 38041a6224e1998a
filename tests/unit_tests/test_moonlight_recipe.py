"""Moonlight's recipe options: gate scaling factor, routing of the router / shared gate,
norm-gamma weight decay, and the refused L2 (non-decoupled) weight decay."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from muon_megatron.config import MuonConfig
from muon_megatron.routing.rules import is_muon_param, muon_param_rule
from muon_megatron.routing.weight_decay import is_norm_gamma, no_weight_decay_rule
from muon_megatron.training.moonlight import gate_scaling_factor, gate_scaling_samples

PUBLISHED = 2.446  # arXiv 2502.16982 appendix C, 64 experts top-6; three decimals
ROUNDING = 5e-4  # half a unit of the published figure's last decimal
SAMPLES = 100_000


def test_gate_scaling_factor_reproduces_2446_within_monte_carlo_error() -> None:
    """The estimate lies within the published figure's rounding plus 4 Monte Carlo
    standard errors (SE = per-draw std / sqrt(N), measured from the draws themselves: ~7e-6
    for N = 1e5), so the check fails with probability < 1e-4 if the procedure is right."""
    draws = gate_scaling_samples(64, 6, SAMPLES, seed=1)
    standard_error = float(draws.std() / SAMPLES**0.5)
    assert standard_error < 1e-4
    assert abs(float(draws.mean()) - PUBLISHED) <= ROUNDING + 4 * standard_error
    assert gate_scaling_factor(64, 6, SAMPLES, seed=1) == float(draws.mean())


def test_gate_scaling_factor_is_sqrt_k_for_equal_scores_and_refuses_bad_input() -> None:
    assert gate_scaling_factor(64, 1) == pytest.approx(1.0, abs=1e-12)
    assert gate_scaling_factor(64, 6) < 6**0.5  # unequal scores: below sqrt(k)
    with pytest.raises(ValueError, match="topk"):
        gate_scaling_factor(4, 6)


GATE = ("decoder.layers.1.mlp.shared_experts.gate_weight", torch.zeros(1, 32))
ROUTER = ("module.decoder.layers.1.mlp.router.weight", torch.zeros(4, 32))


def test_shared_expert_gate_stays_on_adamw() -> None:
    for cfg in (MuonConfig(), MuonConfig(muon_router_optimizer="muon")):
        assert not muon_param_rule(cfg)(*GATE)


def test_router_on_adamw_by_default_and_on_muon_with_the_flag() -> None:
    assert not muon_param_rule(MuonConfig())(*ROUTER)
    assert muon_param_rule(MuonConfig()) is is_muon_param
    assert muon_param_rule(MuonConfig(muon_router_optimizer="muon"))(*ROUTER)
    with pytest.raises(ValueError, match="muon_router_optimizer"):
        MuonConfig(muon_router_optimizer="sgd")  # type: ignore[arg-type]


NORMS = [
    "decoder.layers.0.input_layernorm.weight",
    "decoder.final_layernorm.weight",
    "decoder.layers.0.self_attention.kv_layernorm.weight",
    "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight",
]
NOT_NORMS = ["decoder.layers.0.input_layernorm.bias", "decoder.layers.0.mlp.linear_fc1.bias"]


def test_norm_weight_decay_decays_gammas_only() -> None:
    vec = torch.zeros(8)
    default, moonlight = no_weight_decay_rule(MuonConfig()), no_weight_decay_rule(
        MuonConfig(muon_norm_weight_decay=True)
    )
    for name in NORMS:
        assert is_norm_gamma(name, vec) and default(name, vec) and not moonlight(name, vec)
    for name in NOT_NORMS:
        assert not is_norm_gamma(name, vec) and default(name, vec) and moonlight(name, vec)
    assert not moonlight("decoder.layers.0.mlp.linear_fc1.weight", torch.zeros(4, 4))


def test_l2_weight_decay_is_refused_for_muon() -> None:
    from muon_megatron.optimizer.builder import check_supported
    from muon_megatron.training.step import optimizer_config

    config = optimizer_config(lr=1e-3, weight_decay=0.1, bf16=False, optimizer="muon")
    check_supported(config)
    with pytest.raises(ValueError, match="decoupled_weight_decay=False.*decoupled_weight_decay=True"):
        check_supported(dataclasses.replace(config, decoupled_weight_decay=False))


def _wd_groups(rank: int, world_size: int, norm_wd: bool) -> dict[str, float]:
    from muon_megatron.optimizer.builder import get_muon_optimizer
    from muon_megatron.testing import tiny

    layout = tiny.Layout()
    tiny.initialize_parallel(layout, 0)
    model = tiny.build_model(tiny.ModelSpec(), layout)
    config = tiny.optimizer_config(optimizer="muon")
    cfg = MuonConfig(muon_norm_weight_decay=norm_wd)
    opt = get_muon_optimizer(config, model, cfg)  # the flag sets the overrides itself
    names = {p: n for n, p in model[0].named_parameters()}
    out: dict[str, float] = {}
    for member in opt.chained_optimizers:
        for index, group in enumerate(member.optimizer.param_groups):
            for param in member.model_fp32_groups[index] + member.model_float16_groups[index]:
                out[names[param]] = group["wd_mult"]
    return out


def test_norm_weight_decay_reaches_megatron_param_groups() -> None:
    """Built through get_muon_optimizer: with the flag, norm gammas are in a decayed group
    (wd_mult 1), without it in megatron's undecayed one (wd_mult 0)."""
    from muon_megatron.runtime.launch import spawn

    default = spawn(_wd_groups, 1, False)[0]
    moonlight = spawn(_wd_groups, 1, True)[0]
    gammas = [n for n in default if n.endswith("layernorm.weight")]
    assert gammas
    assert all(default[n] == 0.0 and moonlight[n] == 1.0 for n in gammas)
    matrices = [n for n in default if n.endswith("linear_fc1.weight")]
    assert all(default[n] == moonlight[n] == 1.0 for n in matrices)


def test_norm_weight_decay_refuses_overrides_of_your_own() -> None:
    from muon_megatron.runtime.launch import spawn

    with pytest.raises(RuntimeError, match="config_overrides of your own"):
        spawn(_own_overrides, 1)


def _own_overrides(rank: int, world_size: int) -> None:
    from muon_megatron.optimizer.builder import get_muon_optimizer
    from muon_megatron.testing import tiny

    tiny.initialize_parallel(tiny.Layout(), 0)
    model = tiny.build_model(tiny.ModelSpec(), tiny.Layout())
    get_muon_optimizer(tiny.optimizer_config(optimizer="muon"), model,
                       MuonConfig(muon_norm_weight_decay=True), config_overrides={})
