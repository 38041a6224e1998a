"""The launch scripts in examples/ pass flags the training entry accepts and validates for
their world size, and the sizes they quote are what `count_parameters` computes."""

from __future__ import annotations

import pathlib
import re
import shlex
import subprocess

import pytest

from muon_megatron.training.args import build_parser, validate_args
from muon_megatron.training.model_size import count_parameters

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"
SCRIPTS = {"cpu_demo.sh": 4, "h100_single_node_moe.sh": 8, "moonlight_multinode.sbatch": 32}


def _array(text: str, name: str, closing: str = "\n)") -> list[str]:
    body = re.search(rf"{name}=\(\n(.*?){re.escape(closing)}", text, re.S).group(1)
    words = "\n".join(line.split(" #")[0] for line in body.splitlines())
    words = words.replace("${OPTIMIZER}", "muon").replace("${SLURM_JOB_ID:-local}", "x")
    return shlex.split(words)


def _flags(text: str, optimizer_block: str) -> list[str]:
    names = ("PARALLEL_ARGS", "MODEL_ARGS", "TRAIN_ARGS")
    flags = [word for name in names for word in _array(text, name)]
    return flags + _array(text, "OPTIMIZER_ARGS", optimizer_block)


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_script_flags_validate_for_its_world_size(script: str) -> None:
    text = (EXAMPLES / script).read_text()
    subprocess.run(["bash", "-n", str(EXAMPLES / script)], check=True)
    muon = build_parser().parse_args(_flags(text, "\n    )"))
    validate_args(muon, SCRIPTS[script])
    assert muon.optimizer == "muon" and "examples/pretrain_moe.py" in text
    # The AdamW counterpart uses the same lr and weight decay (Moonlight's recipe).
    adam_line = re.search(r"OPTIMIZER_ARGS=\(--optimizer adam(.*?)\)", text, re.S).group(1)
    adam = build_parser().parse_args(["--optimizer", "adam", *shlex.split(adam_line)])
    assert (adam.lr, adam.min_lr, adam.weight_decay) == (muon.lr, muon.min_lr, muon.weight_decay)


@pytest.mark.parametrize("script", ["h100_single_node_moe.sh", "moonlight_multinode.sbatch"])
def test_quoted_parameter_counts_match_the_helper(script: str) -> None:
    text = (EXAMPLES / script).read_text()
    count = count_parameters(build_parser().parse_args(_array(text, "MODEL_ARGS")))
    assert f"{count.total:,}" in text and f"{count.active:,}" in text


def test_moonlight_config_is_16b_total_3b_active() -> None:
    text = (EXAMPLES / "moonlight_multinode.sbatch").read_text()
    count = count_parameters(build_parser().parse_args(_array(text, "MODEL_ARGS")))
    assert round(count.total / 1e9) == 16 and round(count.active / 1e9) == 3
