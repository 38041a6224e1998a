"""pip, asked to install muon-megatron next to a newer megatron-core, keeps it.

Run offline: a fresh virtual environment (no pip of its own; this interpreter's pip drives it
with `--python`) gets metadata-only stand-in wheels of megatron-core 0.20.0 and of setup.py's
other requirements installed; then `pip install --dry-run --no-index --report` of a
muon-megatron wheel whose requirements are setup.py's `install_requires` (read from its
source) says what pip would install. With the old `megatron-core<=0.19.2` pin the same run
plans the downgrade to 0.19.2, so the check can fail. (`get_muon_optimizer`'s warning about
the untested 0.20.0 is tested in test_megatron_core_versions.py.)
"""

from __future__ import annotations

import ast
import json
import os
import pathlib
import subprocess
import sys
import venv
import zipfile

import pytest
from packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).resolve().parents[2]
NEWER = "0.20.0"
# No pip configuration of this machine (its find-links, indexes) may add candidates.
_OFFLINE_ENV = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
_OFFLINE_ENV["PIP_CONFIG_FILE"] = os.devnull
OLD_PIN = "megatron-core<=0.19.2"


def _install_requires() -> list[str]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            return list(ast.literal_eval(node.value))
    raise AssertionError("setup.py has no install_requires")


def _wheel(folder: pathlib.Path, name: str, version: str, requires: list[str] = ()) -> None:
    """A wheel with metadata and nothing else."""
    dist = f"{name.replace('-', '_')}-{version}"
    files = {
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        + "".join(f"Requires-Dist: {r}\n" for r in requires),
        f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\n"
        "Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{dist}.dist-info/RECORD"] = "".join(f"{path},,\n" for path in files) + (
        f"{dist}.dist-info/RECORD,,\n")
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as whl:
        for path, text in files.items():
            whl.writestr(path, text)


def _pip(env: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(env / "bin" / "python"),
         "--disable-pip-version-check", "--no-input", *args],
        capture_output=True, text=True, timeout=300, env=_OFFLINE_ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def env_with_newer_core(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, ...]:
    tmp = tmp_path_factory.mktemp("pip")
    common = tmp / "wheels"
    others = [Requirement(r).name for r in _install_requires() if Requirement(r).name
              != "megatron-core"]
    for name in others:
        _wheel(common, name, "99.0")  # satisfies any lower bound setup.py sets
    for version in (NEWER, "0.19.2"):
        _wheel(common, "megatron-core", version)
    _wheel(tmp / "now", "muon-megatron", "9.9", _install_requires())
    old = [OLD_PIN if Requirement(r).name == "megatron-core" else r for r in _install_requires()]
    _wheel(tmp / "old", "muon-megatron", "9.9", old)
    env = tmp / "env"
    venv.create(env, with_pip=False)
    _pip(env, "install", "--no-index", "--find-links", str(common),
         f"megatron-core=={NEWER}", *others)
    return env, common, tmp / "now", tmp / "old"


def _planned(env: pathlib.Path, common: pathlib.Path, project: pathlib.Path) -> dict[str, str]:
    report = env.parent / f"report-{project.name}.json"
    _pip(env, "install", "--dry-run", "--no-index", "--find-links", str(common),
         "--find-links", str(project), "--report", str(report), "muon-megatron")
    return {item["metadata"]["name"]: item["metadata"]["version"]
            for item in json.loads(report.read_text())["install"]}


def test_pip_install_keeps_a_newer_megatron_core(env_with_newer_core) -> None:
    env, common, now, _ = env_with_newer_core
    assert _planned(env, common, now) == {"muon-megatron": "9.9"}


def test_the_old_pin_would_have_downgraded_it(env_with_newer_core) -> None:
    env, common, _, old = env_with_newer_core
    assert _planned(env, common, old) == {"muon-megatron": "9.9", "megatron-core": "0.19.2"}
