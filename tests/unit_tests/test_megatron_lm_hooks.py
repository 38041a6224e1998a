"""The Megatron-LM hooks' own logic, on stand-in modules (no Megatron-LM needed).

These pin what the hooks do with what Megatron-LM hands them; the real integration is
tests/functional/test_megatron_lm_integration.py, which needs Megatron-LM itself.
"""

from __future__ import annotations

import argparse
import types

import pytest

from muon_megatron import builder, megatron_lm
from muon_megatron.arguments import muon_extra_args_provider
from muon_megatron.config import MuonConfig


def _megatron_args(**overrides: object) -> argparse.Namespace:
    args = muon_extra_args_provider(argparse.ArgumentParser()).parse_args([])
    args.optimizer = "muon"
    args.use_distributed_optimizer = True
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def _stand_ins(args: argparse.Namespace) -> tuple[types.SimpleNamespace, list, list]:
    calls: list = []
    seen_optimizer_names: list = []

    def get_megatron_optimizer(config, model_chunks, **kwargs):
        calls.append(("megatron", config.optimizer, kwargs))
        return "megatron-optimizer"

    def validate_args(a, defaults={}):  # noqa: B006 (Megatron-LM's signature)
        seen_optimizer_names.append(a.optimizer)
        if "muon" in a.optimizer and a.use_distributed_optimizer:
            raise AssertionError("Muon optimizer does not support distributed optimizer for now.")
        return a

    training = types.SimpleNamespace(get_megatron_optimizer=get_megatron_optimizer)
    initialize = types.SimpleNamespace(validate_args=validate_args)
    megatron_lm._install_into(training=training, validators=(initialize,), get_args=lambda: args)
    mods = types.SimpleNamespace(training=training, initialize=initialize)
    return mods, calls, seen_optimizer_names


def test_muon_routes_to_get_muon_optimizer_with_flags_as_muon_config(monkeypatch) -> None:
    args = _megatron_args(muon_momentum=0.9, muon_coefficients="polar_express")
    mods, calls, _ = _stand_ins(args)
    received = {}

    def fake_get_muon_optimizer(config, model_chunks, muon_config, **kwargs):
        received.update(config=config, muon_config=muon_config, kwargs=kwargs)
        return "muon-optimizer"

    monkeypatch.setattr(builder, "get_muon_optimizer", fake_get_muon_optimizer)
    config = types.SimpleNamespace(optimizer="muon")
    out = mods.training.get_megatron_optimizer(
        config, ["chunk"], config_overrides={"k": 1}, use_gloo_process_groups=False,
        dump_param_to_param_group_map=None,
    )
    assert out == "muon-optimizer" and calls == []
    assert received["muon_config"] == MuonConfig(muon_momentum=0.9,
                                                 muon_coefficients="polar_express")
    assert received["kwargs"] == {"config_overrides": {"k": 1}, "use_gloo_process_groups": False}


def test_other_optimizers_reach_megatron_unchanged() -> None:
    mods, calls, _ = _stand_ins(_megatron_args())
    for name in ("adam", "sgd", "dist_muon"):
        assert mods.training.get_megatron_optimizer(
            types.SimpleNamespace(optimizer=name), [], use_gloo_process_groups=True
        ) == "megatron-optimizer"
    assert [c[1] for c in calls] == ["adam", "sgd", "dist_muon"]


def test_validate_args_accepts_muon_with_the_distributed_optimizer() -> None:
    args = _megatron_args()
    mods, _, seen = _stand_ins(args)
    assert mods.initialize.validate_args(args, {}) is args
    assert seen == ["adam"] and args.optimizer == "muon"


def test_validate_args_names_the_fix_without_the_distributed_optimizer() -> None:
    args = _megatron_args(use_distributed_optimizer=False)
    mods, _, _ = _stand_ins(args)
    with pytest.raises(ValueError, match="--use-distributed-optimizer"):
        mods.initialize.validate_args(args, {})


def test_missing_muon_flags_name_the_provider() -> None:
    args = argparse.Namespace(optimizer="muon", use_distributed_optimizer=True)
    mods, _, _ = _stand_ins(args)
    with pytest.raises(ValueError, match="muon_extra_args_provider"):
        mods.training.get_megatron_optimizer(types.SimpleNamespace(optimizer="muon"), [])


def test_install_into_is_idempotent() -> None:
    args = _megatron_args()
    mods, _, _ = _stand_ins(args)
    hooked = mods.training.get_megatron_optimizer
    megatron_lm._install_into(training=mods.training, validators=(mods.initialize,),
                              get_args=lambda: args)
    assert mods.training.get_megatron_optimizer is hooked
