"""Command-line flags for Muon, generated from `MuonConfig` (defaults are never written twice).

* `add_muon_config_args(parser)` adds one `--muon-*` flag per `MuonConfig` field: bools as
  `--muon-x/--no-muon-x`, `Literal` fields with their choices, numbers with their type; the
  help text is the field's metadata.
* `muon_extra_args_provider(parser)` is the same thing in the shape Megatron-LM's
  `pretrain(..., extra_args_provider=...)` expects. Megatron-LM already defines a few
  `--muon-*` flags for megatron-core's own Muon. Each one either keeps megatron-core's
  meaning here or is refused with an error that names ours (`MEGATRON_LM_MUON_FLAGS`); a
  user's launch script never silently changes meaning. Ours replace those option strings
  (argparse's "resolve" conflict handler) so a flag means one thing and has the dataclass
  default.
* `muon_config_from_args(args)` checks the refused flags and builds the `MuonConfig`.
* `flags_markdown_table()` renders the flags as the Markdown table in docs/flags.md (a test
  keeps the two identical): `python -m muon_megatron.megatron_lm.arguments` prints it.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable
from typing import Any

from muon_megatron.config import REFUSED_SCALE_MODES, MuonConfig, NamePatterns

__all__ = [
    "MEGATRON_LM_MUON_FLAGS",
    "add_muon_config_args",
    "muon_config_from_args",
    "defaults_differing_from_megatron_lm",
    "muon_extra_args_provider",
    "chain_extra_args_providers",
    "muon_flag",
    "flags_markdown_table",
]

ExtraArgsProvider = Callable[[argparse.ArgumentParser], argparse.ArgumentParser]


# Every `--muon-*` flag Megatron-LM (core_v0.16.1 .. core_v0.19.x) defines for megatron-core's
# own Muon, and what it means here: the field it writes with megatron-core's meaning, or None
# where the flag is Megatron-LM-only and handled by `_check_megatron_only_flags`.
MEGATRON_LM_MUON_FLAGS: dict[str, str | None] = {
    "--muon-momentum": "muon_momentum",
    "--muon-no-split-qkv": "muon_split_qkv",
    "--muon-use-nesterov": "muon_nesterov",
    "--muon-scale-mode": "muon_scale_mode",  # megatron-core's names; 'spectral' refused
    "--muon-num-ns-steps": "muon_ns_steps",
    "--muon-extra-scale-factor": "muon_extra_scale_factor",
    "--muon-nesterov": "muon_nesterov",  # core_v0.19's spelling, ours too
    "--muon-tp-mode": None,
    "--muon-fp32-matmul-prec": None,
    "--muon-coefficient-type": None,  # core_v0.19
    "--muon-scalar-optimizer": None,  # core_v0.19
}
# Megatron-LM's spellings that are aliases of one of our flags (same dest, same meaning).
_ALIASES = {"muon_ns_steps": ("--muon-num-ns-steps",)}
# Megatron-LM-only flags: registered with default None ("not given") so that a value a user
# passes is seen, honoured where it means what we do and refused otherwise.
_TP_MODES = ("blockwise", "duplicated", "distributed")
_FP32_MATMUL_PRECS = ("low", "medium", "high")
# Megatron-LM's command-line defaults for megatron-core's Muon where ours differ (shown to the
# user at validation, so the move from megatron-core's Muon is never a silent one).
_MEGATRON_LM_DEFAULTS = {
    "muon_momentum": 0.9,
    "muon_nesterov": False,
    "muon_scale_mode": "spectral",
}


def muon_flag(field_name: str) -> str:
    """The command-line flag of a `MuonConfig` field (`muon_ns_steps` -> `--muon-ns-steps`)."""
    return "--" + field_name.replace("_", "-")


def _field_kind(hint: Any) -> tuple[str, Any]:
    """('bool', None), ('choice', choices), ('patterns', None) or ('value', type) for a field's
    type hint."""
    if hint is bool:
        return "bool", None
    if hint == NamePatterns:
        return "patterns", None
    if typing.get_origin(hint) is typing.Literal:
        return "choice", typing.get_args(hint)
    if hint in (int, float, str):
        return "value", hint
    raise TypeError(
        f"MuonConfig field type {hint!r} has no command-line form; use bool, int, float, str, "
        "NamePatterns or a Literal of str."
    )


class _AppendPattern(argparse.Action):
    """Each use of the flag adds one pattern to the tuple (argparse's own "append" cannot
    start from the dataclass's immutable default, ())."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, (*(getattr(namespace, self.dest, None) or ()), values))


def add_muon_config_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add one `--muon-*` flag per `MuonConfig` field (defaults from the dataclass).

    A flag of the same name already on `parser` (Megatron-LM defines some for megatron-core's
    own Muon) is replaced. Returns `parser`.
    """
    hints = typing.get_type_hints(MuonConfig)
    group = parser.add_argument_group(
        "muon-megatron",
        "Muon optimizer (used with --optimizer muon); defaults from muon_megatron.MuonConfig.",
        conflict_handler="resolve",
    )
    defaults: dict[str, Any] = {}
    for f in dataclasses.fields(MuonConfig):
        flag = muon_flag(f.name)
        kind, arg = _field_kind(hints[f.name])
        help_text = f.metadata["help"]
        flags = (flag, *_ALIASES.get(f.name, ()))
        if kind == "bool":
            group.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, help=help_text
            )
        elif kind == "patterns":
            group.add_argument(
                flag, dest=f.name, action=_AppendPattern, metavar="PATTERN", help=help_text
            )
        elif kind == "choice":
            # Refused spellings pass argparse so that MuonConfig explains why they are refused.
            refused = tuple(REFUSED_SCALE_MODES) if f.name == "muon_scale_mode" else ()
            group.add_argument(*flags, dest=f.name, choices=arg + refused, help=help_text)
        else:
            group.add_argument(*flags, dest=f.name, type=arg, help=help_text)
        defaults[f.name] = f.default
    group.add_argument(
        "--muon-use-nesterov",
        dest="muon_nesterov",
        action="store_true",
        help="Megatron-LM's spelling of --muon-nesterov.",
    )
    group.add_argument(
        "--muon-tp-mode",
        choices=_TP_MODES,
        default=None,
        help="Megatron-LM's flag for megatron-core's Muon. muon-megatron always orthogonalizes "
        "the full logical matrix (megatron-core's 'duplicated' / 'distributed' result); "
        "'blockwise' (per-TP-shard Newton-Schulz) is refused.",
    )
    group.add_argument(
        "--muon-coefficient-type",
        default=None,
        help="Megatron-LM's flag for megatron-core's Muon: 'quintic' is honoured (our default "
        "--muon-coefficients quintic); other tables are refused: use --muon-coefficients.",
    )
    group.add_argument(
        "--muon-scalar-optimizer",
        default=None,
        help="Megatron-LM's flag for megatron-core's Muon: 'adam' is what muon-megatron does "
        "(AdamW for embeddings, biases, norms); others are refused.",
    )
    group.add_argument(
        "--muon-bucket-mb",
        type=float,
        default=None,
        help="muon-megatron 0.1's total bucket size; refused: use --muon-owner-bucket-mb "
        "(per owner).",
    )
    group.add_argument(
        "--muon-fp32-matmul-prec",
        choices=_FP32_MATMUL_PRECS,
        default=None,
        help="Megatron-LM's flag for megatron-core's Muon; refused: use --muon-ns-dtype.",
    )
    # set_defaults also rewrites the default of any other flag writing the same dest (e.g.
    # Megatron-LM's `--muon-no-split-qkv`), so the dataclass default is the only one.
    parser.set_defaults(**defaults)
    return parser


def muon_config_from_args(args: argparse.Namespace) -> MuonConfig:
    """The `MuonConfig` of parsed arguments, after refusing Megatron-LM flags we do not honour.

    Raises ValueError naming the flag and ours for the same thing. Call it when the run is
    validated, before any training.
    """
    _check_megatron_only_flags(args)
    return MuonConfig.from_namespace(args)


def _check_megatron_only_flags(args: argparse.Namespace) -> None:
    bucket_mb = getattr(args, "muon_bucket_mb", None)
    if bucket_mb is not None:
        raise ValueError(
            f"--muon-bucket-mb {bucket_mb:g} capped a bucket in total, which left most "
            "owners of a large grid idle; buckets are now rounds of the whole grid, capped per "
            "owner. Use --muon-owner-bucket-mb (MiB each owner orthogonalizes per bucket; "
            f"default {MuonConfig.__dataclass_fields__['muon_owner_bucket_mb'].default:g}) and "
            "drop --muon-bucket-mb."
        )
    tp_mode = getattr(args, "muon_tp_mode", None)
    if tp_mode == "blockwise":
        raise ValueError(
            "--muon-tp-mode blockwise (megatron-core: Newton-Schulz on each tensor-parallel "
            "shard separately, an update that depends on the TP size) is not offered by "
            "muon-megatron, which orthogonalizes each full logical matrix once on its owning "
            "rank: megatron-core's 'duplicated' / 'distributed' result. Drop --muon-tp-mode "
            "(or pass duplicated)."
        )
    table = getattr(args, "muon_coefficient_type", None)
    if table is not None and (table, getattr(args, "muon_coefficients", None)) != ("quintic", "quintic"):
        raise ValueError(
            f"--muon-coefficient-type {table} (megatron-core's Newton-Schulz table) is not "
            "honoured with this combination: muon-megatron's table is --muon-coefficients "
            "{quintic,polar_express} ('quintic' is the same Keller Jordan coefficients). Use "
            "--muon-coefficients and drop --muon-coefficient-type."
        )
    scalar = getattr(args, "muon_scalar_optimizer", None)
    if scalar not in (None, "adam"):
        raise ValueError(
            f"--muon-scalar-optimizer {scalar}: muon-megatron updates every non-matrix "
            "parameter with megatron-core's distributed AdamW (--adam-beta1/2, --adam-eps); "
            "drop the flag or pass adam."
        )
    prec = getattr(args, "muon_fp32_matmul_prec", None)
    if prec is not None:
        raise ValueError(
            f"--muon-fp32-matmul-prec {prec} sets torch's fp32 matmul precision inside "
            "megatron-core's Newton-Schulz and is not honoured by muon-megatron: choose the "
            "Newton-Schulz compute dtype with --muon-ns-dtype bf16 (the default, like 'medium' "
            "on GPUs) or --muon-ns-dtype fp32 (full fp32, like 'highest'), and drop "
            "--muon-fp32-matmul-prec."
        )


def defaults_differing_from_megatron_lm(args: argparse.Namespace) -> list[str]:
    """The Muon knobs left at a default that differs from Megatron-LM's command-line default
    for megatron-core's Muon, as 'flag ours (Megatron-LM: theirs)' strings."""
    notes = []
    for name, theirs in _MEGATRON_LM_DEFAULTS.items():
        ours = getattr(args, name, None)
        default = next(f.default for f in dataclasses.fields(MuonConfig) if f.name == name)
        if ours == default != theirs:
            shown = [("on" if v else "off") if isinstance(v, bool) else v for v in (ours, theirs)]
            notes.append(f"{muon_flag(name)} {shown[0]} (Megatron-LM: {shown[1]})")
    return notes


def muon_extra_args_provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`extra_args_provider` for Megatron-LM's `pretrain(...)`: adds the `--muon-*` flags.

    `--optimizer muon` itself is Megatron-LM's flag; `muon_megatron.megatron_lm.install()`
    makes it build muon-megatron's optimizer. To keep a provider of your own, pass
    `chain_extra_args_providers(muon_extra_args_provider, yours)`.
    """
    return add_muon_config_args(parser)


def chain_extra_args_providers(*providers: ExtraArgsProvider | None) -> ExtraArgsProvider:
    """One `extra_args_provider` that applies `providers` in order (None entries skipped)."""

    def provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        for p in providers:
            if p is not None:
                parser = p(parser)
        return parser

    return provider


def _default_text(kind: str, default: Any) -> str:
    if kind == "bool":
        return "on" if default else "off"
    if kind == "patterns":
        return "none" if not default else " ".join(default)
    return repr(default) if isinstance(default, str) else str(default)


def flags_markdown_table() -> str:
    """The Markdown table of every `--muon-*` flag (docs/flags.md embeds it verbatim)."""
    hints = typing.get_type_hints(MuonConfig)
    lines = ["| flag | values | default | what it does |", "|---|---|---|---|"]
    for f in dataclasses.fields(MuonConfig):
        kind, arg = _field_kind(hints[f.name])
        flag = muon_flag(f.name)
        if kind == "bool":
            name = f"`{flag}` / `--no-{flag[2:]}`"
            values = "on / off"
        elif kind == "choice":
            name = f"`{flag}`"
            values = ", ".join(f"`{c}`" for c in arg)
        elif kind == "patterns":
            name = f"`{flag} PATTERN`"
            values = "name patterns (fnmatch), the flag repeated"
        else:
            name = f"`{flag}`"
            values = f"{arg.__name__} in {f.metadata['bounds']}"
        help_text = f.metadata["help"].replace("|", "\\|")
        lines.append(
            f"| {name} | {values} | `{_default_text(kind, f.default)}` | {help_text} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(flags_markdown_table(), end="")
