"""The hang watch names the collective a rank has waited in for too long."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from muon_megatron.runtime import hang_watch


def _run(code: str, timeout_s: str) -> subprocess.CompletedProcess:
    # A fresh interpreter: the watch thread and its counters are per process.
    env = {"MUON_MEGATRON_HANG_TIMEOUT_S": timeout_s, "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=120, env={**env, "PYTHONPATH": ":".join(sys.path)},
    )  # fmt: skip


def test_a_collective_past_the_timeout_is_reported_with_its_name_call_number_and_stacks() -> None:
    out = _run(
        """
        import time
        from muon_megatron.runtime.hang_watch import watched
        with watched("quick all_reduce"):
            pass
        with watched("quick all_reduce"):
            time.sleep(1.0)  # stands in for a collective some rank never entered
        """,
        timeout_s="0.2",
    )
    assert out.returncode == 0, out.stderr
    assert "has waited" in out.stderr and "'quick all_reduce' (call #2 of it" in out.stderr
    assert "over the ranks [this process only]" in out.stderr
    assert "Current thread" in out.stderr or "Thread 0x" in out.stderr  # faulthandler's stacks
    assert out.stderr.count("has waited") == 1  # once per call


def test_collectives_within_the_timeout_print_nothing() -> None:
    out = _run(
        """
        from muon_megatron.runtime.hang_watch import watched
        for _ in range(100):
            with watched("fast"):
                pass
        """,
        timeout_s="5",
    )
    assert out.returncode == 0 and out.stderr == "", out.stderr


def test_zero_turns_the_watch_off_and_bad_values_name_the_variable(monkeypatch) -> None:
    monkeypatch.setenv(hang_watch.TIMEOUT_ENV, "0")
    with hang_watch.watched("off"):
        assert hang_watch.hang_timeout_s() == 0
    monkeypatch.setenv(hang_watch.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="MUON_MEGATRON_HANG_TIMEOUT_S='soon'"):
        hang_watch.hang_timeout_s()


def test_a_work_still_running_on_the_device_after_its_wait_returned_is_reported() -> None:
    """Under NCCL `work.wait()` returns at once (it orders streams); the call stays watched
    until `Work.is_completed()`: here a Work that never completes, as when a peer never
    enters the collective, is reported after the block ended; one that completes is not."""
    out = _run(
        """
        import time
        from muon_megatron.runtime.hang_watch import watched

        class Work:
            def __init__(self, completes_after_s):
                self.until = time.monotonic() + completes_after_s
            def wait(self):
                return True  # NCCL: the host does not wait
            def is_completed(self):
                return time.monotonic() >= self.until

        for name, after in (("done on the device", 0.05), ("stuck on the device", 1e9)):
            work = Work(after)
            with watched(name, None, [work]):
                work.wait()
        time.sleep(1.5)
        """,
        timeout_s="0.5",
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("has waited") == 1, out.stderr
    assert "'stuck on the device' (call #1 of it" in out.stderr
