"""The package's layering, read from its imports (ast), and its import-time behaviour.

Each folder of `muon_megatron/` is one layer and imports only from its own layer and the
layers below it (docs/design.md, "The house"). The test harness (`muon_megatron.testing`)
is imported only by `tools/` and the tests; the old-path facades (`muon_megatron.distributed`,
`muon_megatron.arguments`, the lazy names of `muon_megatron/__init__`) only by users.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "muon_megatron"

# Bottom to top. A module may import modules of its own layer and of the layers before it.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("muon_megatron.config", "muon_megatron.config_flags"),
    ("muon_megatron.ops",),
    ("muon_megatron.routing",),
    ("muon_megatron.reference",),
    ("muon_megatron.runtime",),
    ("muon_megatron.qk_clip",),
    ("muon_megatron.optimizer",),
    ("muon_megatron.costmodel",),
    ("muon_megatron.integrity",),
    ("muon_megatron.megatron_lm",),
    ("muon_megatron.bridge",),
    ("muon_megatron.training",),
    ("muon_megatron.planner",),
    ("muon_megatron.testing",),
    ("muon_megatron.tools",),
    # Old import paths and the lazy public names: for users, never imported from inside.
    ("muon_megatron.distributed", "muon_megatron.arguments", "muon_megatron"),
)
FACADES = LAYERS[-1]
HARNESS = "muon_megatron.testing"
MAY_IMPORT_HARNESS = ("muon_megatron.testing", "muon_megatron.tools")
MAX_MODULE_LINES = 400


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer_of(name: str) -> int:
    """Index in LAYERS of the most specific prefix of `name` (the facades match exactly)."""
    best, best_len = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            exact_only = prefixes is FACADES
            hit = name == prefix if exact_only else _within(name, prefix)
            if hit and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best is None:
        raise AssertionError(f"{name} is in no layer: add it to LAYERS in this test")
    return best


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every muon_megatron import in the file, wherever it is (function
    bodies included); `from muon_megatron.x import y` yields x.y when y is a module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if _within(a.name, "muon_megatron")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if not _within(node.module, "muon_megatron"):
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                is_module = (PACKAGE.parent / Path(*sub.split("."))).with_suffix(
                    ".py"
                ).exists() or (PACKAGE.parent / Path(*sub.split(".")) / "__init__.py").exists()
                found.append((node.lineno, sub if is_module else node.module))
    return found


def _package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer() -> None:
    for path in _package_files():
        layer_of(_module_name(path))


def test_no_module_imports_a_higher_layer() -> None:
    violations = []
    for path in _package_files():
        me = _module_name(path)
        mine = layer_of(me)
        for line, target in imported_modules(path):
            if layer_of(target) > mine:
                violations.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {me} -> {target}")
    assert not violations, "lower layer imports a higher one:\n  " + "\n  ".join(violations)


def test_only_tools_and_testing_import_the_harness() -> None:
    violations = []
    for path in _package_files():
        me = _module_name(path)
        if any(_within(me, allowed) for allowed in MAY_IMPORT_HARNESS):
            continue
        for line, target in imported_modules(path):
            if _within(target, HARNESS):
                violations.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {target}")
    assert not violations, "the test harness imported from:\n  " + "\n  ".join(violations)


def test_nothing_inside_imports_the_facades() -> None:
    violations = []
    for path in _package_files():
        me = _module_name(path)
        if me in FACADES:
            continue
        for line, target in imported_modules(path):
            if target in FACADES:
                violations.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {target}")
    assert not violations, "facade imported from inside:\n  " + "\n  ".join(violations)


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """The check itself: imports anywhere in a file are found (function bodies too), a
    module named in `from x import module` counts as that module, and the layers order an
    optimizer module below the harness."""
    source = tmp_path / "probe.py"
    source.write_text(
        "from muon_megatron.testing import tiny\n"
        "def f():\n"
        "    import muon_megatron.training.model\n"
        "    from muon_megatron.config import MuonConfig\n"
    )
    assert [target for _, target in imported_modules(source)] == [
        "muon_megatron.testing.tiny",
        "muon_megatron.training.model",
        "muon_megatron.config",
    ]
    assert layer_of("muon_megatron.optimizer.plan") < layer_of("muon_megatron.testing.tiny")
    assert layer_of("muon_megatron.training.model") > layer_of("muon_megatron.megatron_lm")
    assert layer_of("muon_megatron") == len(LAYERS) - 1
    assert layer_of("muon_megatron.tools.bench") < layer_of("muon_megatron.distributed")


def test_modules_stay_small() -> None:
    long = {
        str(p.relative_to(PACKAGE.parent)): n
        for p in _package_files()
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


@pytest.mark.parametrize(
    "module",
    [
        "muon_megatron.testing.tiny",
        "muon_megatron.training.model",
        "muon_megatron.training.step",
        "muon_megatron.tools.verify",
        "muon_megatron.megatron_lm",
    ],
)
def test_importing_installs_no_cpu_shims(module: str) -> None:
    """Whoever launches on CPU applies the shims; importing any module applies nothing."""
    probe = (
        f"import {module}\n"
        "from muon_megatron.runtime.cpu_shims import shims_installed\n"
        "import torch\n"
        "assert not shims_installed(), 'shims installed at import'\n"
        "assert torch.cuda.current_device.__module__.startswith('torch'), "
        "torch.cuda.current_device.__module__\n"
    )
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent), "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
