#!/usr/bin/env bash
# The core subset (tests/newest_core_subset.txt) on the newest megatron-core release, in a
# venv of its own (.venv-newest-core) next to the default one.
#
# megatron-core 0.17 and newer declare Python >= 3.12, and this machine's (and CI's) Python
# is 3.11: pip installs the release with --ignore-requires-python and without its declared
# dependencies, then the four that `import megatron.core` needs (numpy < 2.5, packaging,
# psutil, triton). The other choice, a Python 3.12 venv, would take torch from PyPI as a
# CUDA build (several GB); docs/megatron-core-versions.md has the figures.
set -euo pipefail
cd "$(dirname "$0")/.."
NEWEST_CORE="${NEWEST_CORE:-0.19.2}"
venv=.venv-newest-core
python3 -m venv "$venv"
"$venv/bin/pip" install -q torch==2.13.0
"$venv/bin/pip" install -q --no-deps --ignore-requires-python "megatron-core==$NEWEST_CORE"
"$venv/bin/pip" install -q "numpy<2.5" packaging psutil triton "pytest>=7" hypothesis
"$venv/bin/pip" install -q --no-deps -e .
"$venv/bin/python" -c "import importlib.metadata as m; print('+ megatron-core', m.version('megatron-core'))"
mapfile -t subset < <(grep -v '^\s*#' tests/newest_core_subset.txt | grep -v '^\s*$')
"$venv/bin/python" -m pytest -q -p no:cacheprovider "${subset[@]}"
