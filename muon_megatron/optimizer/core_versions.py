"""The megatron-core releases muon-megatron is tested on, and the one warning outside them.

`TESTED_MEGATRON_CORE` is the one place that names the range: setup.py requires its oldest
release and nothing newer is excluded, so `pip install muon-megatron` keeps a newer
megatron-core a user already has (pip leaves an installed release that satisfies every
requirement alone) instead of downgrading it. What an untested release may change is what
`MuonDistributedOptimizer` overrides inside megatron-core's `DistributedOptimizer`, so
`get_muon_optimizer` says so once per process, naming the release and the range, and how to
check it (`muon-megatron verify`). tests/unit_tests/test_megatron_core_versions.py pins that
setup.py, tests/newest_core.sh and the README agree with the range.
"""

from __future__ import annotations

import functools
import logging

from megatron.core.utils import log_single_rank
from packaging.version import InvalidVersion, Version

__all__ = [
    "TESTED_MEGATRON_CORE",
    "megatron_core_version",
    "untested_megatron_core_message",
    "warn_if_untested_megatron_core",
]

logger = logging.getLogger(__name__)

TESTED_MEGATRON_CORE: tuple[str, str] = ("0.16.1", "0.19.2")
"""Oldest and newest megatron-core release the suite runs on: the full suite on the oldest,
the core subset on the newest (tests/newest_core.sh; README's matrix)."""


def megatron_core_version() -> str:
    """The release of the megatron-core that is imported (`megatron.core.package_info`, so a
    Megatron-LM checkout on the path counts, not only a pip-installed one)."""
    from megatron.core import package_info

    return package_info.__version__


def untested_megatron_core_message(version: str) -> str | None:
    """The warning for megatron-core `version`, or None inside `TESTED_MEGATRON_CORE`."""
    low, high = TESTED_MEGATRON_CORE
    try:
        # The release alone: megatron-core 0.19's package_info appends a local label (the
        # git commit of the working directory, e.g. '0.19.2+e2a373d'), which would put the
        # tested 0.19.2 itself above the range.
        tested = Version(low) <= Version(Version(version).public) <= Version(high)
    except InvalidVersion:
        tested = False
    if tested:
        return None
    return (
        f"muon_megatron: megatron-core {version} is installed, outside the releases "
        f"muon-megatron is tested with ({low} to {high}: the full suite on {low}, the core "
        f"subset on {high}). MuonDistributedOptimizer overrides parts of megatron-core's "
        "DistributedOptimizer that a release may change: check a few steps against the "
        "single-device reference with `muon-megatron verify` (on GPUs: torchrun ... -m "
        "muon_megatron.tools.cli verify --backend nccl) before a long run."
    )


def warn_if_untested_megatron_core() -> None:
    """Log the warning (on rank 0, as megatron-core logs its own) when the imported
    megatron-core is outside the tested range; at most once per process."""
    message = untested_megatron_core_message(megatron_core_version())
    if message is not None:
        _warn_once(message)


@functools.cache
def _warn_once(message: str) -> None:
    log_single_rank(logger, logging.WARNING, message)
