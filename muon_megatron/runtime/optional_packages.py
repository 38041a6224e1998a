"""Which optional packages megatron-core can use are missing, said once per run.

megatron-core warns at import, in every process, when Transformer Engine or NVIDIA Apex is
absent ("Transformer Engine and Apex are not installed. Falling back to ..."), once per
module that checks: four processes print it a dozen times before a run's first line.
`quiet_missing_package_warnings()` ignores exactly those warnings in the calling process
(call it before megatron-core is imported; child processes get `MISSING_PACKAGE_WARNINGS`
through PYTHONWARNINGS), and `missing_packages_line()` is the one line that replaces them.
"""

from __future__ import annotations

import importlib.util
import warnings

__all__ = [
    "MISSING_PACKAGE_WARNINGS",
    "OPTIONAL_PACKAGES",
    "missing_optional_packages",
    "missing_packages_line",
    "quiet_missing_package_warnings",
]

OPTIONAL_PACKAGES = {
    "transformer_engine": "Transformer Engine: megatron-core's local layers are used instead",
    "apex": "NVIDIA Apex: torch optimizers and local multi-tensor kernels are used instead",
}
"""Import name -> what megatron-core does without it."""

MISSING_PACKAGE_WARNINGS = (
    "Transformer Engine and Apex are not installed",
    "Apex is not installed",
)
"""The starts of megatron-core's import-time warnings about the packages above (0.16-0.19)."""


def missing_optional_packages() -> list[str]:
    """The import names in `OPTIONAL_PACKAGES` that cannot be found, in that order."""
    return [name for name in OPTIONAL_PACKAGES if importlib.util.find_spec(name) is None]


def missing_packages_line() -> str | None:
    """One line naming the missing optional packages and their fallbacks; None if none is."""
    missing = missing_optional_packages()
    if not missing:
        return None
    return "> optional packages not installed: " + "; ".join(
        f"{name} ({OPTIONAL_PACKAGES[name]})" for name in missing)


def quiet_missing_package_warnings() -> None:
    """Ignore megatron-core's missing-package warnings in this process; other warnings stay."""
    for message in MISSING_PACKAGE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)
