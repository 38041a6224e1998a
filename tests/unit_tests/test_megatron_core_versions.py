"""The megatron-core releases we claim, the ones we test, and what differs between them."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]


def _setup_range() -> tuple[Version, Version]:
    spec = re.search(r'"megatron-core>=([\d.]+),<=([\d.]+)"', (ROOT / "setup.py").read_text())
    assert spec, "setup.py must pin megatron-core to a closed range: >=low,<=high"
    return Version(spec[1]), Version(spec[2])


def _newest_tested() -> Version:
    match = re.search(
        r'NEWEST_CORE="\$\{NEWEST_CORE:-([\d.]+)\}"', (ROOT / "tests/newest_core.sh").read_text()
    )
    assert match, "tests/newest_core.sh must name its default release"
    return Version(match[1])


def test_setup_range_is_the_tested_range() -> None:
    """setup.py's range runs from the default release (the full suite) to the one CI tests
    the core subset on, and the README's matrix names both."""
    low, high = _setup_range()
    assert low == Version("0.16.1")
    assert high == _newest_tested()
    readme = (ROOT / "README.md").read_text()
    for version in (low, high):
        assert f"| {version} |" in readme, f"README's tested matrix lacks {version}"


def test_installed_release_is_in_the_range() -> None:
    low, high = _setup_range()
    installed = Version(importlib.metadata.version("megatron-core"))
    assert low <= installed <= high, (installed, low, high)


def test_grouped_gemm_without_the_legacy_grouped_mlp_is_refused(monkeypatch) -> None:
    """megatron-core 0.19 dropped the local GroupedMLP; its local spec would then build a
    SequentialMLP for --moe-grouped-gemm silently. The model builder refuses, naming the fix."""
    from megatron.core.transformer.moe import experts

    from muon_megatron.training import model

    if hasattr(experts, "GroupedMLP"):
        monkeypatch.delattr(experts, "GroupedMLP")
    with pytest.raises(ValueError, match="--moe-grouped-gemm.*transformer_engine.*SequentialMLP"):
        model._require_local_grouped_mlp()
