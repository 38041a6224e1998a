"""Megatron-LM's `extra_args_provider` for the `--muon-*` flags (`muon_megatron.config_flags`).

Use from a Megatron-LM training script:

    pretrain(..., extra_args_provider=chain_extra_args_providers(muon_extra_args_provider,
                                                                 your_provider_or_None))

The flag machinery itself (`add_muon_config_args`, `muon_config_from_args`, ...) lives beside
`MuonConfig` in `muon_megatron.config_flags`, which the training entry uses too; its public
names are importable from here as well.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from muon_megatron.config_flags import (
    MEGATRON_LM_MUON_FLAGS,
    add_muon_config_args,
    defaults_differing_from_megatron_lm,
    flags_markdown_table,
    muon_config_from_args,
    muon_flag,
)

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
