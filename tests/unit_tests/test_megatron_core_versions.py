"""The megatron-core releases we claim, the ones we test, the warning outside them, and what
differs between them."""

from __future__ import annotations

import ast
import importlib.metadata
import logging
import re
import types
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from muon_megatron.optimizer import builder, core_versions
from muon_megatron.optimizer.core_versions import TESTED_MEGATRON_CORE

ROOT = Path(__file__).resolve().parents[2]
LOW, HIGH = (Version(v) for v in TESTED_MEGATRON_CORE)


def _setup_requirement(name: str) -> Requirement:
    """setup.py's `install_requires` entry for `name`, read from its source (ast): the list
    pip reads, without running setup.py."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            for text in ast.literal_eval(node.value):
                requirement = Requirement(text)
                if requirement.name == name:
                    return requirement
    raise AssertionError(f"setup.py's install_requires has no {name}")


def _newest_tested() -> Version:
    match = re.search(
        r'NEWEST_CORE="\$\{NEWEST_CORE:-([\d.]+)\}"', (ROOT / "tests/newest_core.sh").read_text()
    )
    assert match, "tests/newest_core.sh must name its default release"
    return Version(match[1])


def test_setup_py_tests_and_readme_agree_with_the_tested_range() -> None:
    """setup.py requires the oldest tested release and sets no upper bound; the newest is
    what tests/newest_core.sh installs; the README's matrix names both."""
    specifier = _setup_requirement("megatron-core").specifier
    assert [(s.operator, Version(s.version)) for s in specifier] == [(">=", LOW)]
    assert _newest_tested() == HIGH
    readme = (ROOT / "README.md").read_text()
    for version in (LOW, HIGH):
        assert f"| {version} |" in readme, f"README's tested matrix lacks {version}"


@pytest.mark.parametrize("newer", ["0.20.0", "0.20.0rc0", "1.0.0"])
def test_pip_keeps_a_newer_megatron_core(newer: str) -> None:
    """pip (its default `only-if-needed` upgrade strategy) leaves an installed release alone
    when it satisfies the specifier of every requirement on it, and downgrades it when it does
    not: with setup.py's old `<=0.19.2`, installing muon-megatron next to megatron-core 0.20
    replaced it with 0.19.2. That a newer release satisfies setup.py's specifier is therefore
    what "pip keeps it" comes down to, checked here without a network (pre-releases count:
    pip keeps an installed one, it only does not pick one by itself)."""
    specifier = _setup_requirement("megatron-core").specifier
    assert specifier.contains(newer, prereleases=True), (newer, str(specifier))
    assert not specifier.contains("0.16.0"), "the lower bound stays"


def test_installed_release_is_in_the_tested_range() -> None:
    installed = Version(importlib.metadata.version("megatron-core"))
    assert LOW <= installed <= HIGH, (installed, LOW, HIGH)
    # megatron-core 0.19's package_info appends a local label (a git commit): the release
    # is the same.
    assert Version(core_versions.megatron_core_version()).public == installed.public
    assert core_versions.untested_megatron_core_message(f"{installed.public}+e2a373d") is None


@pytest.fixture
def fresh_warning():
    """The once-per-process warning, forgotten before and after the test."""
    core_versions._warn_once.cache_clear()
    yield
    core_versions._warn_once.cache_clear()


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == core_versions.__name__ and r.levelno == logging.WARNING]


@pytest.mark.parametrize("faked", ["0.20.0", "0.19.3", "0.16.0", "0.20.0rc0"])
def test_an_untested_release_is_warned_about_once_naming_it_and_the_range(
    faked: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    fresh_warning: None,
) -> None:
    monkeypatch.setattr(core_versions, "megatron_core_version", lambda: faked)
    with caplog.at_level(logging.WARNING, logger=core_versions.__name__):
        core_versions.warn_if_untested_megatron_core()
        core_versions.warn_if_untested_megatron_core()
    (message,) = _warnings(caplog)
    assert f"megatron-core {faked} is installed" in message
    assert f"({LOW} to {HIGH}" in message and "muon-megatron verify" in message


@pytest.mark.parametrize("version", [None, str(LOW), str(HIGH), "0.18.2"])
def test_no_warning_inside_the_tested_range(
    version: str | None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    fresh_warning: None,
) -> None:
    """None: the installed release itself, unfaked."""
    if version is not None:
        monkeypatch.setattr(core_versions, "megatron_core_version", lambda: version)
    with caplog.at_level(logging.WARNING, logger=core_versions.__name__):
        core_versions.warn_if_untested_megatron_core()
    assert _warnings(caplog) == []


def test_get_muon_optimizer_warns_before_it_builds(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, fresh_warning: None,
) -> None:
    """The warning comes from the call users make, before anything is built (here the
    config is refused right after it)."""
    monkeypatch.setattr(core_versions, "megatron_core_version", lambda: "0.20.0")
    with caplog.at_level(logging.WARNING, logger=core_versions.__name__):
        with pytest.raises(ValueError, match="optimizer='sgd'"):
            builder.get_muon_optimizer(types.SimpleNamespace(optimizer="sgd"), [])
    assert len(_warnings(caplog)) == 1


def test_grouped_gemm_without_the_legacy_grouped_mlp_is_refused(monkeypatch) -> None:
    """megatron-core 0.19 dropped the local GroupedMLP; its local spec would then build a
    SequentialMLP for --moe-grouped-gemm silently. The model builder refuses, naming the fix."""
    from megatron.core.transformer.moe import experts

    from muon_megatron.training import model

    if hasattr(experts, "GroupedMLP"):
        monkeypatch.delattr(experts, "GroupedMLP")
    with pytest.raises(ValueError, match="--moe-grouped-gemm.*transformer_engine.*SequentialMLP"):
        model._require_local_grouped_mlp()
