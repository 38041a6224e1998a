#!/usr/bin/env bash
# The Megatron-Bridge tests (Bridge's own setup_optimizer and checkpoint save/load with
# muon-megatron's optimizer) in the newest-core venv (.venv-newest-core, made by
# tests/newest_core.sh, which runs first).
#
# megatron-bridge 0.6.2 declares Python >= 3.12 and ~30 dependencies, CUDA ones among them
# (transformer-engine, flashinfer, mamba-ssm, ...). As tests/newest_core.sh installs
# megatron-core, pip installs the release with --ignore-requires-python and without its
# declared dependencies, then tests/bridge_packages.txt (each --no-deps): only what Bridge's
# training modules import, pinned. torch stays the venv's CPU build. Transformer Engine is
# the tests' stand-in (tests/te_stand_in), in the ranks only. MUON_MEGATRON_REQUIRE_BRIDGE=1
# turns "Bridge is not installed" from a skip into a failure, so a Bridge test cannot skip
# here.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-newest-core
if [ ! -x "$venv/bin/python" ]; then
  echo "tests/bridge.sh: $venv is missing; run tests/newest_core.sh first" >&2
  exit 2
fi
"$venv/bin/pip" install -q --no-deps --ignore-requires-python megatron-bridge==0.6.2
"$venv/bin/pip" install -q --no-deps -r tests/bridge_packages.txt
"$venv/bin/python" -c "import importlib.metadata as m; print('+ megatron-bridge', m.version('megatron-bridge'), '/ megatron-core', m.version('megatron-core'), '/ torch', m.version('torch'))"
MUON_MEGATRON_REQUIRE_BRIDGE=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider -rs \
  tests/functional/test_bridge_provide.py::test_bridge_setup_optimizer_builds_it_and_steps_equal \
  tests/functional/test_bridge_checkpoint.py
