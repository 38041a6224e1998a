"""Command-line flags for Muon, generated from `MuonConfig` (defaults are never written twice).

* `add_muon_config_args(parser)` adds one `--muon-*` flag per `MuonConfig` field: bools as
  `--muon-x/--no-muon-x`, `Literal` fields with their choices, numbers with their type; the
  help text is the field's metadata.
* `muon_extra_args_provider(parser)` is the same thing in the shape Megatron-LM's
  `pretrain(..., extra_args_provider=...)` expects. Megatron-LM already defines a few
  `--muon-*` flags for megatron-core's own Muon (with `--muon-momentum` defaulting to 0.9
  where its config says 0.95); ours replace those option strings (argparse's "resolve"
  conflict handler) so a flag means one thing and has the dataclass default.
* `flags_markdown_table()` renders the flags as the Markdown table in docs/flags.md (a test
  keeps the two identical): `python -m muon_megatron.arguments` prints it.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable
from typing import Any

from muon_megatron.config import MuonConfig

__all__ = [
    "add_muon_config_args",
    "muon_extra_args_provider",
    "chain_extra_args_providers",
    "muon_flag",
    "flags_markdown_table",
]

ExtraArgsProvider = Callable[[argparse.ArgumentParser], argparse.ArgumentParser]


def muon_flag(field_name: str) -> str:
    """The command-line flag of a `MuonConfig` field (`muon_ns_steps` -> `--muon-ns-steps`)."""
    return "--" + field_name.replace("_", "-")


def _field_kind(hint: Any) -> tuple[str, Any]:
    """('bool', None), ('choice', choices) or ('value', type) for a field's type hint."""
    if hint is bool:
        return "bool", None
    if typing.get_origin(hint) is typing.Literal:
        return "choice", typing.get_args(hint)
    if hint in (int, float, str):
        return "value", hint
    raise TypeError(
        f"MuonConfig field type {hint!r} has no command-line form; use bool, int, float, str "
        "or a Literal of str."
    )


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
        if kind == "bool":
            group.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, help=help_text
            )
        elif kind == "choice":
            group.add_argument(flag, dest=f.name, choices=arg, help=help_text)
        else:
            group.add_argument(flag, dest=f.name, type=arg, help=help_text)
        defaults[f.name] = f.default
    # set_defaults also rewrites the default of any other flag writing the same dest (e.g.
    # Megatron-LM's `--muon-no-split-qkv`), so the dataclass default is the only one.
    parser.set_defaults(**defaults)
    return parser


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
        else:
            name = f"`{flag}`"
            values = arg.__name__
        help_text = f.metadata["help"].replace("|", "\\|")
        lines.append(
            f"| {name} | {values} | `{_default_text(kind, f.default)}` | {help_text} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(flags_markdown_table(), end="")
