"""Packaging for muon-megatron.

torch is deliberately *not* pinned to a CUDA build: install the torch you want first
(``pip install torch==2.13.0`` on a CPU machine), then this package.
"""

from setuptools import find_packages, setup

setup(
    name="muon-megatron",
    version="0.1.0",
    description="Muon optimizer (Moonlight recipe) as a ZeRO-1 DistributedOptimizer for megatron-core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["muon_megatron", "muon_megatron.*"]),
    install_requires=[
        "torch>=2.9",
        # The oldest tested release and no upper bound, so that pip keeps a newer megatron-core
        # a user has; get_muon_optimizer warns outside the tested range, which
        # muon_megatron/optimizer/core_versions.py names (TESTED_MEGATRON_CORE).
        "megatron-core>=0.16.1",
        "packaging",
        "psutil",
        "numpy",
    ],
    extras_require={
        # hypothesis: the property test of MuonConfig (tests/unit_tests/test_config_property.py);
        # tokenizers + transformers: the --data-path tests train a BPE and load it as
        # megatron-core's HuggingFaceTokenizer (tests/functional/test_train_indexed_data.py).
        "test": ["pytest>=7", "hypothesis", "tokenizers", "transformers"],
        "plot": ["matplotlib"],
        # megatron-core's own Muon, for `muon-megatron bench` only. Install it with
        # `pip install --no-deps --ignore-requires-python emerging-optimizers==0.3.0 absl-py`
        # (it declares Python >= 3.12 and would pull a CUDA torch): README's test command does.
        "bench": ["emerging-optimizers==0.3.0", "absl-py"],
        # Used when present on GPU clusters; never required on CPU.
        "gpu": ["transformer-engine[pytorch]", "apex"],
    },
    entry_points={"console_scripts": ["muon-megatron=muon_megatron.tools.cli:main"]},
)
