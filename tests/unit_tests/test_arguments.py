"""The `--muon-*` flags are generated from `MuonConfig` and cannot drift from it."""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import typing

import pytest

from muon_megatron.config import REFUSED_SCALE_MODES, MuonConfig
from muon_megatron.config_flags import flags_markdown_table, muon_flag
from muon_megatron.megatron_lm.arguments import chain_extra_args_providers, muon_extra_args_provider
from muon_megatron.tools import cli

FIELDS = dataclasses.fields(MuonConfig)
DOCS_FLAGS = pathlib.Path(__file__).resolve().parents[2] / "docs" / "flags.md"


def _parser() -> argparse.ArgumentParser:
    return muon_extra_args_provider(argparse.ArgumentParser(allow_abbrev=False))


def _actions_by_flag(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {opt: action for action in parser._actions for opt in action.option_strings}


def test_flag_defaults_equal_dataclass_and_constructor_defaults() -> None:
    args = _parser().parse_args([])
    constructed = MuonConfig()
    for f in FIELDS:
        assert getattr(args, f.name) == f.default == getattr(constructed, f.name), f.name
    assert MuonConfig.from_namespace(args) == constructed


def test_every_field_has_a_flag_with_the_field_help_text() -> None:
    actions = _actions_by_flag(_parser())
    for f in FIELDS:
        action = actions[muon_flag(f.name)]
        assert action.dest == f.name
        assert f.metadata["help"].strip(), f"{f.name} has no help text"
        assert action.help == f.metadata["help"]


def test_bools_have_on_and_off_flags() -> None:
    hints = typing.get_type_hints(MuonConfig)
    bools = [f for f in FIELDS if hints[f.name] is bool]
    assert bools, "MuonConfig has bool fields (nesterov, splits)"
    parser = _parser()
    for f in bools:
        on = parser.parse_args([muon_flag(f.name)])
        off = parser.parse_args(["--no-" + muon_flag(f.name)[2:]])
        assert getattr(on, f.name) is True and getattr(off, f.name) is False, f.name


def test_literal_fields_accept_exactly_their_choices() -> None:
    hints = typing.get_type_hints(MuonConfig)
    actions = _actions_by_flag(_parser())
    for f in FIELDS:
        if typing.get_origin(hints[f.name]) is typing.Literal:
            # Refused spellings get through argparse so that MuonConfig says why.
            refused = tuple(REFUSED_SCALE_MODES) if f.name == "muon_scale_mode" else ()
            choices = typing.get_args(hints[f.name]) + refused
            assert tuple(actions[muon_flag(f.name)].choices) == choices
    with pytest.raises(SystemExit):
        _parser().parse_args(["--muon-scale-mode", "adam"])


def test_values_reach_the_config() -> None:
    args = _parser().parse_args(
        ["--muon-momentum", "0.9", "--muon-ns-steps", "7", "--muon-coefficients", "polar_express",
         "--no-muon-split-qkv", "--muon-comm-dtype", "bf16"]
    )
    cfg = MuonConfig.from_namespace(args)
    assert (cfg.muon_momentum, cfg.muon_ns_steps, cfg.muon_coefficients) == (
        0.9, 7, "polar_express"
    )
    assert cfg.muon_split_qkv is False and cfg.muon_comm_dtype == "bf16"


def test_replaces_megatron_lm_flags_of_the_same_name() -> None:
    """Megatron-LM defines `--muon-momentum` (default 0.9), `--muon-scale-mode` (other
    choices) and `--muon-no-split-qkv` (dest muon_split_qkv) for megatron-core's own Muon.
    After our provider, the dataclass default and choices are the only ones."""
    parser = argparse.ArgumentParser(allow_abbrev=False)
    group = parser.add_argument_group("regularization")
    group.add_argument("--muon-momentum", type=float, default=0.9)
    group.add_argument("--muon-scale-mode", default="spectral",
                       choices=["spectral", "unit_rms_norm", "shape_scaling"])
    group.add_argument("--muon-no-split-qkv", action="store_false", default=True,
                       dest="muon_split_qkv")
    parser = muon_extra_args_provider(parser)
    args = parser.parse_args([])
    assert args.muon_momentum == MuonConfig().muon_momentum == 0.95
    assert args.muon_scale_mode == "moonlight"
    assert parser.parse_args(["--muon-scale-mode", "none"]).muon_scale_mode == "none"
    # Megatron-LM's spelling still works and agrees with ours.
    assert parser.parse_args(["--muon-no-split-qkv"]).muon_split_qkv is False


def test_chained_providers_apply_in_order() -> None:
    def extra(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser.add_argument("--my-flag", type=int, default=3)
        return parser

    parser = chain_extra_args_providers(muon_extra_args_provider, None, extra)(
        argparse.ArgumentParser()
    )
    args = parser.parse_args(["--my-flag", "4"])
    assert args.my_flag == 4 and args.muon_momentum == MuonConfig().muon_momentum


def test_verify_cli_has_every_muon_flag_with_the_dataclass_default() -> None:
    """`muon-megatron verify` takes every --muon-* flag generated from MuonConfig, each with
    the dataclass default, except Newton-Schulz in fp32: verify's tight check is fp32."""
    parser = cli.verify_parser()
    actions = _actions_by_flag(parser)
    args = parser.parse_args([])
    overridden = {"muon_ns_dtype": "fp32"}
    assert MuonConfig().muon_ns_dtype != overridden["muon_ns_dtype"]
    for f in FIELDS:
        action = actions[muon_flag(f.name)]
        assert action.dest == f.name and action.help == f.metadata["help"], f.name
        assert getattr(args, f.name) == overridden.get(f.name, f.default), f.name
    assert MuonConfig.from_namespace(args) == MuonConfig(**overridden)


def test_verify_cli_reads_the_muon_flags_before_it_starts_any_process() -> None:
    """`muon-megatron verify` parses every --muon-* flag into its MuonConfig: a bad value or
    a refused Megatron-LM flag stops it with the config's message, before any spawn."""
    with pytest.raises(ValueError, match="muon_ns_steps=0"):
        cli.main(["verify", "--muon-ns-steps", "0"])
    with pytest.raises(ValueError, match="Drop --muon-tp-mode"):
        cli.main(["verify", "--muon-tp-mode", "blockwise"])
    with pytest.raises(SystemExit):
        cli.main(["verify", "--muon-coefficients", "cubic"])


def test_docs_flags_table_matches_the_dataclass() -> None:
    """docs/flags.md embeds `flags_markdown_table()` verbatim between markers; regenerate
    with `python -m muon_megatron.config_flags` when MuonConfig changes."""
    text = DOCS_FLAGS.read_text(encoding="utf-8")
    begin, end = "<!-- flags-table:begin -->\n", "<!-- flags-table:end -->"
    assert begin in text and end in text, "docs/flags.md lost its table markers"
    embedded = text.split(begin, 1)[1].split(end, 1)[0]
    assert embedded == flags_markdown_table()


def test_fused_kernels_follow_megatron_lm_on_gpu_and_are_off_on_cpu() -> None:
    from muon_megatron.training.args import build_parser
    from muon_megatron.training.model import fusions

    args = build_parser().parse_args(["--swiglu"])
    assert not any(fusions(args, cuda=False).values())
    on_gpu = fusions(args, cuda=True)
    assert on_gpu["bias_activation_fusion"] and on_gpu["bias_dropout_fusion"]
    assert on_gpu["masked_softmax_fusion"]
    off = build_parser().parse_args(
        ["--swiglu", "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion",
         "--no-masked-softmax-fusion", "--no-rope-fusion", "--no-gradient-accumulation-fusion",
         "--no-persist-layer-norm"]
    )
    assert not any(fusions(off, cuda=True).values())
    # The gelu switch governs a gelu MLP only.
    gelu = build_parser().parse_args(["--no-bias-swiglu-fusion"])
    assert fusions(gelu, cuda=True)["bias_activation_fusion"]
