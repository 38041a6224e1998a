"""`MuonConfig` refuses every bad value when it is built, naming the value, the allowed range,
why, and the default; the flags of the training entry and of Megatron-LM reach that check
before anything trains."""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing

import pytest

from muon_megatron.config import Bounds, MuonConfig
from muon_megatron.megatron_lm import hooks
from muon_megatron.megatron_lm.arguments import muon_config_from_args, muon_extra_args_provider
from muon_megatron.training import entry
from muon_megatron.training.args import build_parser, validate_args

FIELDS = {f.name: f for f in dataclasses.fields(MuonConfig)}
HINTS = typing.get_type_hints(MuonConfig)
NUMERIC = [name for name, hint in HINTS.items() if hint in (int, float)]

# The silent failures issue 23 names, each with the text its error must carry: the value as
# given, the allowed range and the default (Moonlight's value).
SILENT_BEFORE = [
    ("muon_matched_adamw_rms", -1.0, "(0, 10]", "0.2"),  # trained with a wrong update RMS
    ("muon_matched_adamw_rms", 0.0, "(0, 10]", "0.2"),  # froze every Muon weight
    ("muon_matched_adamw_rms", math.nan, "(0, 10]", "0.2"),  # NaN weights after step 1
    ("muon_extra_scale_factor", math.inf, "(0, 1000]", "1.0"),  # NaN weights after step 1
    ("muon_eps", -1.0, "[1e-12, 0.001]", "1e-07"),
]


@pytest.mark.parametrize(("name", "value", "allowed", "default"), SILENT_BEFORE)
def test_values_that_used_to_fail_silently_are_refused_naming_range_and_default(
    name: str, value: float, allowed: str, default: str
) -> None:
    with pytest.raises(ValueError) as error:
        MuonConfig(**{name: value})
    text = str(error.value)
    for part in (f"{name}={value!r}", allowed, f"the default, is {default}", "because"):
        assert part in text, (part, text)


@pytest.mark.parametrize("name", NUMERIC)
def test_every_number_field_has_bounds_holding_its_default_and_refuses_non_finite(
    name: str,
) -> None:
    """NaN and +-inf are refused: a ValueError for a float field, a TypeError (not an int)
    for an int field."""
    bounds = FIELDS[name].metadata["bounds"]
    assert isinstance(bounds, Bounds) and bounds.why.strip(), name
    assert FIELDS[name].default in bounds
    refused = ValueError if HINTS[name] is float else TypeError
    for value in (math.nan, math.inf, -math.inf):
        with pytest.raises(refused, match=f"{name}={value!r}"):
            MuonConfig(**{name: value})


@pytest.mark.parametrize("name", NUMERIC)
def test_each_end_of_a_range_is_accepted_when_closed_and_refused_when_open(name: str) -> None:
    bounds = FIELDS[name].metadata["bounds"]
    for end, is_open in ((bounds.low, bounds.low_open), (bounds.high, bounds.high_open)):
        if not math.isfinite(end):
            continue
        value = int(end) if HINTS[name] is int else end
        if is_open:
            with pytest.raises(ValueError, match=f"{name}="):
                MuonConfig(**{name: value})
        else:
            assert getattr(MuonConfig(**{name: value}), name) == value


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("muon_ns_steps", True),  # a bool is not a count
        ("muon_ns_steps", 5.0),  # nor is a float
        ("muon_momentum", False),
        ("muon_owner_bucket_mb", "64"),
        ("muon_nesterov", 1),  # a number is not a bool
        ("muon_split_qkv", "yes"),
        ("muon_scale_mode", ["moonlight"]),
        ("muon_ns_dtype", None),
    ],
)
def test_wrong_types_are_a_type_error_naming_the_value(name: str, value: object) -> None:
    with pytest.raises(TypeError, match=f"{name}={value!r}".replace("[", r"\[")):
        MuonConfig(**{name: value})


def test_ints_and_floats_are_both_numbers_for_a_float_field() -> None:
    assert MuonConfig(muon_momentum=0).muon_momentum == 0
    assert MuonConfig(muon_owner_bucket_mb=1).muon_owner_bucket_mb == 1


def test_a_built_config_cannot_be_changed_past_the_check() -> None:
    cfg = MuonConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.muon_eps = -1.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="muon_eps=-1.0"):
        dataclasses.replace(cfg, muon_eps=-1.0)


BAD_FLAGS = [
    (["--muon-matched-adamw-rms", "-1"], "muon_matched_adamw_rms=-1.0"),
    (["--muon-matched-adamw-rms", "nan"], "muon_matched_adamw_rms=nan"),
    (["--muon-extra-scale-factor", "inf"], "muon_extra_scale_factor=inf"),
    (["--muon-eps", "-1"], "muon_eps=-1.0"),
    (["--muon-ns-steps", "0"], "muon_ns_steps=0"),
    (["--muon-momentum", "1.5"], "muon_momentum=1.5"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_FLAGS)
def test_training_entry_refuses_a_bad_muon_flag_before_any_process_starts(
    argv: list[str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`examples/pretrain_moe.py` (`entry.main`): validation names the value, and no rank is
    spawned."""
    from muon_megatron.runtime import launch

    def no_spawn(*args: object, **kwargs: object) -> None:
        raise AssertionError("a rank was spawned before the bad flag was refused")

    monkeypatch.setattr(launch, "spawn", no_spawn)
    with pytest.raises(ValueError, match=message):
        entry.main(["--optimizer", "muon", *argv])
    with pytest.raises(ValueError, match="the default, is"):
        validate_args(build_parser().parse_args(["--optimizer", "muon", *argv]), world_size=1)


def _megatron_lm_args(argv: list[str]) -> argparse.Namespace:
    """Megatron-LM's parsed arguments after our provider, at the defaults its validation
    reads (as tests/unit_tests/test_megatron_lm_hooks.py builds them)."""
    args = muon_extra_args_provider(argparse.ArgumentParser()).parse_args(argv)
    args.optimizer, args.use_distributed_optimizer = "muon", True
    args.fp16 = args.optimizer_cpu_offload = args.use_precision_aware_optimizer = False
    args.ckpt_format, args.save, args.load = "torch_dist", None, None
    return args


@pytest.mark.parametrize(("argv", "message"), BAD_FLAGS)
def test_megatron_lm_validation_refuses_a_bad_muon_flag_before_its_own(
    argv: list[str], message: str
) -> None:
    """Through `install()`'s wrapped `validate_args`: ours refuses before Megatron-LM's own
    validation runs (which would go on to build the optimizer and train)."""
    seen: list[str] = []

    def validate_args(a, defaults={}):  # noqa: B006 (Megatron-LM's signature)
        seen.append(a.optimizer)
        return a

    initialize = argparse.Namespace(validate_args=validate_args)
    training = argparse.Namespace(get_megatron_optimizer=lambda *a, **k: None)
    args = _megatron_lm_args(argv)
    hooks._install_into(training=training, validators=(initialize,), get_args=lambda: args)
    with pytest.raises(ValueError, match=message):
        initialize.validate_args(args, {})
    assert seen == []
    with pytest.raises(ValueError, match=message):
        muon_config_from_args(args)
