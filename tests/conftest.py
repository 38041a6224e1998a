"""Test-wide settings for the CPU harness (2 cores, up to 4 gloo ranks per test)."""

import os
import sys

import pytest

# Every rank is its own process; more than one intra-op thread each only oversubscribes the
# cores. Set before torch is imported here or in any spawned rank (which inherits the env).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
# megatron warns on every TP/SP layer without it; it only matters for CUDA streams.
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")

# Make `muon_megatron` importable without installing the package; spawned ranks inherit
# sys.path from this process.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


@pytest.fixture(scope="session")
def te_stand_in():
    """tests/te_stand_in/run.py (`in_te_process`, `load_stand_in_as`), loaded by its path:
    its folder holds the TE stand-in (`transformer_engine`), which must never be on this
    process's sys.path."""
    import importlib.util

    name = "muon_megatron_tests_te_stand_in_run"
    if name not in sys.modules:
        path = os.path.join(_ROOT, "tests", "te_stand_in", "run.py")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def megatron_bridge() -> None:
    """For the tests that run Megatron-Bridge itself: skips them where `megatron.bridge` is
    not installed (the default venv: Bridge needs Python >= 3.12), and fails them instead
    when MUON_MEGATRON_REQUIRE_BRIDGE=1 (tests/bridge.sh, which installs it, sets it) so that
    CI cannot report a skipped Bridge test as a pass."""
    import importlib.util

    if importlib.util.find_spec("megatron.bridge") is None:
        message = ("Megatron-Bridge is not installed here; tests/bridge.sh installs it and "
                   "runs these tests")
        if os.environ.get("MUON_MEGATRON_REQUIRE_BRIDGE") == "1":
            pytest.fail(message + " (MUON_MEGATRON_REQUIRE_BRIDGE=1)")
        pytest.skip(message)


@pytest.fixture(scope="session")
def assert_fp32_parity():
    """Assert that a `run_verify` result is within verify's tolerance and, checked here
    rather than read from verify, each family within the fp32 limit derived from the run's
    measured noise: NOISE_GAIN x the larger family's noise, at least FP32_TOLERANCE, at most
    NOISE_CEILING (verify.py justifies the three)."""
    from muon_megatron.tools.verify import FP32_TOLERANCE, NOISE_CEILING, NOISE_GAIN

    def check(result: dict) -> None:
        assert result["within_tolerance"], (
            result["layout"], result["family_diffs"], result["tolerances"], result["worst_param"],
        )
        noise = max(result["noise_diffs"].values())
        limit = min(NOISE_CEILING, max(FP32_TOLERANCE, NOISE_GAIN * noise))
        for family, diff in result["family_diffs"].items():
            assert diff <= limit, (family, diff, limit, result["noise_diffs"])

    return check
