"""`muon_megatron.bridge`: the optimizer config Megatron-Bridge asks for the optimizer, and
the Moonlight-16B recipe's settings. Megatron-Bridge is not importable here (0.6.2 needs
Python >= 3.12 and Transformer Engine): these tests hold the config to Bridge's call; the
functional test steps it (tests/functional/test_bridge_provide.py)."""

from __future__ import annotations

import importlib.util
import inspect

import pytest
from megatron.core.optimizer import OptimizerConfig

import muon_megatron.bridge as bridge
from muon_megatron.bridge import MuonOptimizerConfig
from muon_megatron.bridge.recipes import (
    MOONLIGHT_MUON,
    moonlight_16b_muon_pretrain_config,
    moonlight_muon_optimizer_config,
)

# Megatron-Bridge 0.6.2, training/optim.py::setup_optimizer: `hasattr(config, "provide")`,
# then this call.
BRIDGE_CALL = ("model_chunks", "config_overrides", "use_gloo_process_groups", "pg_collection")


def test_provide_takes_bridges_call() -> None:
    config = MuonOptimizerConfig(use_distributed_optimizer=True)
    assert isinstance(config, OptimizerConfig) and hasattr(config, "provide")
    inspect.signature(config.provide).bind(**{name: None for name in BRIDGE_CALL})
    assert list(inspect.signature(config.provide).parameters) == list(BRIDGE_CALL)


def test_bad_configs_are_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match="leave optimizer='adam'"):
        MuonOptimizerConfig(optimizer="muon", use_distributed_optimizer=True)
    with pytest.raises(ValueError, match="ZeRO-1 optimizer; set it True"):
        MuonOptimizerConfig(use_distributed_optimizer=False)
    config = MuonOptimizerConfig(use_distributed_optimizer=True)
    config.use_distributed_optimizer = False  # changed after construction, as Bridge allows
    with pytest.raises(ValueError, match="set it True"):
        config.finalize()


def test_provide_hands_bridges_arguments_to_get_muon_optimizer(monkeypatch) -> None:
    """provide() passes the config, its MuonConfig and Bridge's arguments on; with norm weight
    decay, Bridge's default weight-decay skips (wd_mult 0 only) are dropped, other overrides
    are kept."""
    calls = []
    monkeypatch.setattr(bridge, "get_muon_optimizer",
                        lambda *args, **kwargs: calls.append((args, kwargs)) or "optimizer")
    config = moonlight_muon_optimizer_config()
    chunks, groups = ["chunk"], object()
    skip, decoupled = {"wd_mult": 0.0}, {"max_lr": 1e-3}
    assert config.provide(chunks, {"bias": skip}, True, groups) == "optimizer"
    config.provide(chunks, {"bias": skip, "embedding": decoupled}, False, None)
    (args, kwargs), (_, kwargs2) = calls
    assert args == (config, chunks, config.muon)
    assert kwargs == {"config_overrides": None, "use_gloo_process_groups": True,
                      "pg_collection": groups}
    assert kwargs2["config_overrides"] == {"embedding": decoupled}


def test_moonlight_settings() -> None:
    """Moonlight's (arXiv 2502.16982; docs/moonlight.md): lr 3e-4 -> 3e-5, weight decay 0.1,
    momentum 0.95 Nesterov, update RMS matched to AdamW's 0.2, norm-gamma decay, router on
    AdamW; the same values as examples/moonlight_multinode.sbatch."""
    config = moonlight_muon_optimizer_config()
    assert (config.lr, config.min_lr, config.weight_decay) == (3e-4, 3e-5, 0.1)
    assert (config.adam_beta1, config.adam_beta2, config.use_distributed_optimizer) == (
        0.9, 0.95, True)
    muon = config.muon
    assert (muon.muon_momentum, muon.muon_nesterov, muon.muon_scale_mode,
            muon.muon_matched_adamw_rms) == (0.95, True, "moonlight", 0.2)
    assert muon.muon_norm_weight_decay and muon.muon_router_optimizer == "adamw"
    assert muon is not MOONLIGHT_MUON  # each config owns its MuonConfig
    assert moonlight_muon_optimizer_config(lr=1e-4).lr == 1e-4


@pytest.mark.skipif(importlib.util.find_spec("megatron.bridge") is not None,
                    reason="Megatron-Bridge is installed")
def test_recipe_without_bridge_names_the_install() -> None:
    with pytest.raises(ImportError, match="pip install megatron-bridge"):
        moonlight_16b_muon_pretrain_config()
