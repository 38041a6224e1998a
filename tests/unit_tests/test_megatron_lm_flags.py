"""Every `--muon-*` flag Megatron-LM defines for megatron-core's Muon is honoured with
Megatron's meaning or refused with an error that names ours (no Megatron-LM needed: its
flag definitions are restated here as they are in the two tags we support; the functional
test_megatron_lm_integration checks the real parser when Megatron-LM is present)."""

from __future__ import annotations

import argparse

import pytest

from muon_megatron.config import MuonConfig
from muon_megatron.megatron_lm.arguments import (
    MEGATRON_LM_MUON_FLAGS,
    muon_config_from_args,
    muon_extra_args_provider,
)


def _megatron_lm_parser(tag: str, with_ours: bool = True) -> argparse.ArgumentParser:
    """Megatron-LM's `--muon-*` flags (megatron/training/arguments.py, `_add_training_args`)
    at `tag`, then (`with_ours`) our provider, as `pretrain(extra_args_provider=...)`
    applies it."""
    parser = argparse.ArgumentParser(allow_abbrev=False)
    group = parser.add_argument_group("training")
    group.add_argument("--muon-momentum", type=float, default=0.9)
    group.add_argument("--muon-no-split-qkv", action="store_false", default=True,
                       dest="muon_split_qkv")
    if tag == "core_v0.16.1":
        group.add_argument("--muon-use-nesterov", action="store_true")
    else:
        group.add_argument("--muon-nesterov", action="store_true")
    group.add_argument("--muon-scale-mode", type=str, default="spectral",
                       choices=["spectral", "unit_rms_norm", "shape_scaling"])
    group.add_argument("--muon-fp32-matmul-prec", type=str, default="medium",
                       choices=["low", "medium", "high"])
    if tag != "core_v0.16.1":
        group.add_argument("--muon-coefficient-type", type=str, default="quintic")
    group.add_argument("--muon-num-ns-steps", type=int, default=5)
    group.add_argument("--muon-tp-mode", type=str, default="blockwise",
                       choices=["blockwise", "duplicated", "distributed"])
    group.add_argument("--muon-extra-scale-factor", type=float, default=1.0)
    if tag != "core_v0.16.1":
        group.add_argument("--muon-scalar-optimizer", type=str, default="adam",
                           choices=["adam", "lion"])
    return muon_extra_args_provider(parser) if with_ours else parser


TAGS = ["core_v0.16.1", "core_v0.19.0"]
NESTEROV = {"core_v0.16.1": "--muon-use-nesterov", "core_v0.19.0": "--muon-nesterov"}

# (argv, the MuonConfig fields it must give); Megatron's meaning, ours by name.
HONOURED = [
    (["--muon-momentum", "0.8"], {"muon_momentum": 0.8}),
    (["--muon-no-split-qkv"], {"muon_split_qkv": False}),
    (["--muon-num-ns-steps", "3"], {"muon_ns_steps": 3}),
    (["--muon-extra-scale-factor", "0.5"], {"muon_extra_scale_factor": 0.5}),
    (["--muon-scale-mode", "shape_scaling"], {"muon_scale_mode": "shape_scaling"}),
    (["--muon-scale-mode", "unit_rms_norm"], {"muon_scale_mode": "unit_rms_norm"}),
    # Full-matrix Newton-Schulz is what 'duplicated' and 'distributed' compute.
    (["--muon-tp-mode", "duplicated"], {}),
    (["--muon-tp-mode", "distributed"], {}),
]
HONOURED_V19 = [
    (["--muon-coefficient-type", "quintic"], {}),
    (["--muon-scalar-optimizer", "adam"], {}),
]
# (argv, text the error must contain: the flag of ours that does the same thing)
REFUSED = [
    (["--muon-scale-mode", "spectral"], "--muon-scale-mode moonlight --muon-matched-adamw-rms 1.0"),
    (["--muon-tp-mode", "blockwise"], "Drop --muon-tp-mode"),
    (["--muon-fp32-matmul-prec", "high"], "--muon-ns-dtype"),
    (["--muon-fp32-matmul-prec", "medium"], "--muon-ns-dtype"),
]
REFUSED_V19 = [
    (["--muon-coefficient-type", "polar_express"], "--muon-coefficients"),
    (["--muon-coefficient-type", "aol"], "--muon-coefficients"),
    (["--muon-coefficient-type", "quintic", "--muon-coefficients", "polar_express"],
     "--muon-coefficients"),
    (["--muon-scalar-optimizer", "lion"], "AdamW"),
]


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings if o.startswith("--muon-")}


@pytest.mark.parametrize("tag", TAGS)
def test_every_megatron_lm_muon_flag_is_in_the_table(tag) -> None:
    """Each flag Megatron-LM defines at `tag` has an entry (honoured or refused), and after
    our provider the parser still accepts every one of them."""
    theirs = _flags(_megatron_lm_parser(tag, with_ours=False))
    assert theirs - set(MEGATRON_LM_MUON_FLAGS) == set()
    assert theirs <= _flags(_megatron_lm_parser(tag))


def test_the_table_lists_only_megatron_lm_flags() -> None:
    theirs = set().union(*(_flags(_megatron_lm_parser(t, with_ours=False)) for t in TAGS))
    assert set(MEGATRON_LM_MUON_FLAGS) == theirs


@pytest.mark.parametrize("tag", TAGS)
def test_without_flags_the_config_is_muon_megatrons_default(tag) -> None:
    args = _megatron_lm_parser(tag).parse_args([])
    assert muon_config_from_args(args) == MuonConfig()


def _per_tag(common: list, v19_only: list) -> list:
    return [(tag, *case) for tag in TAGS for case in common + (v19_only if tag != TAGS[0] else [])]


@pytest.mark.parametrize(("tag", "argv", "fields"), _per_tag(HONOURED, HONOURED_V19))
def test_megatron_flags_are_honoured_with_megatrons_meaning(tag, argv, fields) -> None:
    args = _megatron_lm_parser(tag).parse_args(argv)
    assert muon_config_from_args(args) == MuonConfig(**fields)


@pytest.mark.parametrize("tag", TAGS)
def test_nesterov_flag_of_each_tag_turns_nesterov_on(tag) -> None:
    parser = _megatron_lm_parser(tag)
    on = parser.parse_args(["--no-muon-nesterov", NESTEROV[tag]])
    assert muon_config_from_args(on).muon_nesterov is True
    assert muon_config_from_args(parser.parse_args(["--no-muon-nesterov"])).muon_nesterov is False


@pytest.mark.parametrize(("tag", "argv", "ours"), _per_tag(REFUSED, REFUSED_V19))
def test_megatron_flags_we_do_not_honour_are_refused_naming_ours(tag, argv, ours) -> None:
    args = _megatron_lm_parser(tag).parse_args(argv)
    with pytest.raises(ValueError) as error:
        muon_config_from_args(args)
    assert ours in str(error.value) and argv[0] in str(error.value), str(error.value)


def test_the_old_bucket_flag_is_refused_naming_its_replacement() -> None:
    """`--muon-bucket-mb` capped a bucket in total; buckets are now capped per owner, so the
    old flag is refused (with its replacement named) rather than read with a new meaning."""
    import argparse

    import pytest

    from muon_megatron.config_flags import add_muon_config_args, muon_config_from_args

    parser = add_muon_config_args(argparse.ArgumentParser())
    with pytest.raises(ValueError, match="--muon-bucket-mb 64 .*--muon-owner-bucket-mb"):
        muon_config_from_args(parser.parse_args(["--muon-bucket-mb", "64"]))
    cfg = muon_config_from_args(parser.parse_args(["--muon-owner-bucket-mb", "8"]))
    assert cfg.muon_owner_bucket_mb == 8.0
