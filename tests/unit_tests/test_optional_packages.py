"""One line for missing Transformer Engine / Apex instead of megatron-core's repeated warnings.

The import checks run in fresh interpreters: megatron-core warns when its modules are first
imported, which in this test process may already have happened.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

from muon_megatron.runtime import optional_packages
from muon_megatron.runtime.optional_packages import (
    MISSING_PACKAGE_WARNINGS,
    missing_optional_packages,
    missing_packages_line,
)

ROOT = pathlib.Path(__file__).resolve().parents[2]
# The megatron-core modules that warn at import when TE / Apex are absent (0.16.1: the
# optimizer package, optimizer.py, clip_grads.py; the GPT model pulls in the layer specs).
_IMPORTS = "import megatron.core.optimizer, megatron.core.models.gpt"


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    run_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "RANK")}
    run_env.update(PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]), **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=run_env, timeout=300, cwd=ROOT)


def test_missing_packages_are_named_with_their_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: None if name == "apex" else object())
    assert missing_optional_packages() == ["apex"]
    assert missing_packages_line() == ("> optional packages not installed: apex "
                                       f"({optional_packages.OPTIONAL_PACKAGES['apex']})")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    assert missing_optional_packages() == [] and missing_packages_line() is None


@pytest.mark.skipif(not missing_optional_packages(), reason="TE and Apex are both installed: "
                    "megatron-core has nothing to warn about")
def test_entry_prints_one_line_and_no_megatron_core_warnings() -> None:
    """What the training entry does first (`announce_missing_packages`), then megatron-core's
    imports: stdout starts with the one line, stderr holds none of the warnings, while the
    same imports without it do warn (so the check is not vacuous)."""
    loud = _python(_IMPORTS)
    assert MISSING_PACKAGE_WARNINGS[0] in loud.stderr, loud.stderr[-2000:]
    quiet = _python("from muon_megatron.training.entry import announce_missing_packages\n"
                    f"announce_missing_packages()\n{_IMPORTS}\nprint('imported')")
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert quiet.stdout.splitlines() == [missing_packages_line(), "imported"]
    assert not [m for m in MISSING_PACKAGE_WARNINGS if m in quiet.stderr], quiet.stderr[-2000:]


@pytest.mark.skipif(not missing_optional_packages(), reason="TE and Apex are both installed")
def test_spawned_ranks_get_the_filter_and_other_ranks_print_nothing() -> None:
    """Spawned CPU ranks inherit the filter through PYTHONWARNINGS (the entry's _CPU_NOISE);
    a torchrun rank other than 0 stays silent."""
    from muon_megatron.training.entry import _CPU_NOISE

    child = _python(_IMPORTS, PYTHONWARNINGS=",".join(_CPU_NOISE))
    assert child.returncode == 0 and MISSING_PACKAGE_WARNINGS[0] not in child.stderr
    rank1 = _python("from muon_megatron.training.entry import announce_missing_packages\n"
                    f"announce_missing_packages()\n{_IMPORTS}", RANK="1")
    assert rank1.stdout == "" and MISSING_PACKAGE_WARNINGS[0] not in rank1.stderr
