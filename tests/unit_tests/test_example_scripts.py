"""The launch scripts in examples/.

`cpu_demo.sh` runs the training entry: its flags parse and validate for its world size.
`h100_single_node_moe.sh` and `moonlight_multinode.sbatch` run Megatron-LM's own
`pretrain_gpt.py` through `python -m muon_megatron.megatron_lm`: each passes `bash -n`, is run
with stand-ins for torchrun / srun / scontrol on PATH that record the command line, and that
command line is checked (the hook, --data-path, the tokenizer, save/load, TensorBoard, the AdamW
counterpart with the same lr and weight decay); with MEGATRON_LM_DIR, the flags go through
Megatron-LM's own `parse_args` (with `muon_extra_args_provider`) and `validate_args` (as
`install()` wraps it) for the script's world size. The sizes the scripts quote are what
`count_parameters` computes.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from muon_megatron.testing.megatron_lm_run import megatron_lm_dir
from muon_megatron.training.args import build_parser, validate_args
from muon_megatron.training.model_size import count_parameters

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
# script -> (world size, GPUs per node)
MEGATRON_LM_SCRIPTS = {"h100_single_node_moe.sh": (8, 8), "moonlight_multinode.sbatch": (32, 8)}
DATA_PATH = "0.7 /data/web_text_document 0.3 /data/code_text_document"

# torchrun / srun / scontrol stand-ins: torchrun writes its argv, NUL-separated, and the
# CUDA_DEVICE_MAX_CONNECTIONS the script exported, to $ARGV_OUT; srun runs its command.
_STUBS = {
    "torchrun": '#!/usr/bin/env bash\n'
                'printf "%s\\0" "CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-}" '
                '"$@" > "$ARGV_OUT"\n',
    "srun": '#!/usr/bin/env bash\nwhile [[ "$1" == -* ]]; do shift; done\nexec "$@"\n',
    "scontrol": '#!/usr/bin/env bash\necho node0\n',
}


def _array(text: str, name: str, closing: str = "\n)") -> list[str]:
    body = re.search(rf"{name}=\(\n(.*?){re.escape(closing)}", text, re.S).group(1)
    words = "\n".join(line.split(" #")[0] for line in body.splitlines())
    return shlex.split(words)


def test_cpu_demo_flags_validate_for_its_world_size() -> None:
    text = (EXAMPLES / "cpu_demo.sh").read_text()
    subprocess.run(["bash", "-n", str(EXAMPLES / "cpu_demo.sh")], check=True)
    names = ("PARALLEL_ARGS", "MODEL_ARGS", "TRAIN_ARGS")
    flags = [word for name in names for word in _array(text, name)]
    muon = build_parser().parse_args(flags + _array(text, "OPTIMIZER_ARGS", "\n    )"))
    validate_args(muon, 4)
    assert muon.optimizer == "muon" and "examples/pretrain_moe.py" in text
    # The AdamW counterpart uses the same lr and weight decay (Moonlight's recipe).
    adam_line = re.search(r"OPTIMIZER_ARGS=\(--optimizer adam(.*?)\)", text, re.S).group(1)
    adam = build_parser().parse_args(["--optimizer", "adam", *shlex.split(adam_line)])
    assert (adam.lr, adam.min_lr, adam.weight_decay) == (muon.lr, muon.min_lr, muon.weight_decay)


def launch_line(script: str, tmp_path: pathlib.Path, args: tuple[str, ...] = (),
                **env: str) -> list[str]:
    """What `script ARGS` hands torchrun (after "CUDA_DEVICE_MAX_CONNECTIONS=..."), run with
    the stand-ins on PATH, a fake Megatron-LM checkout and DATA_PATH, plus `env`."""
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    for name, body in _STUBS.items():
        (stubs / name).write_text(body)
        (stubs / name).chmod(0o755)
    mlm = tmp_path / "Megatron-LM"
    mlm.mkdir(exist_ok=True)
    out = tmp_path / f"argv-{len(list(tmp_path.glob('argv-*')))}"
    run_env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OPTIMIZER"))}
    run_env.update(PATH=f"{stubs}{os.pathsep}{os.environ['PATH']}", ARGV_OUT=str(out),
                   MEGATRON_LM_DIR=str(mlm), DATA_PATH=DATA_PATH, SLURM_NNODES="4",
                   SLURM_JOB_ID="7", SLURM_JOB_NODELIST="node[0-3]", SLURM_SUBMIT_DIR=str(ROOT))
    run_env.update(env)
    subprocess.run(["bash", str(EXAMPLES / script), *args], check=True, env=run_env,
                   cwd=tmp_path)
    return out.read_bytes().decode().split("\0")[:-1]


def pretrain_flags(line: list[str]) -> list[str]:
    """The flags after `-m muon_megatron.megatron_lm <checkout>/pretrain_gpt.py`."""
    at = line.index("muon_megatron.megatron_lm")
    assert line[at - 1] == "-m" and line[at + 1].endswith("/Megatron-LM/pretrain_gpt.py"), line
    return line[at + 2 :]


def _value(flags: list[str], name: str) -> str:
    return flags[len(flags) - 1 - flags[::-1].index(name) + 1]


@pytest.mark.parametrize("script", list(MEGATRON_LM_SCRIPTS))
def test_script_launches_pretrain_gpt_on_indexed_data_with_checkpoints_and_tensorboard(
    script: str, tmp_path: pathlib.Path
) -> None:
    subprocess.run(["bash", "-n", str(EXAMPLES / script)], check=True)
    world, per_node = MEGATRON_LM_SCRIPTS[script]
    line = launch_line(script, tmp_path)
    assert line[0] == "CUDA_DEVICE_MAX_CONNECTIONS=1"
    assert _value(line, "--nproc-per-node") == str(per_node)
    flags = pretrain_flags(line)
    at = flags.index("--data-path")
    assert flags[at + 1 : at + 5] == DATA_PATH.split() and flags[at + 5].startswith("--")
    assert _value(flags, "--tokenizer-type") == "HuggingFaceTokenizer"
    assert _value(flags, "--tokenizer-model") and _value(flags, "--split")
    assert _value(flags, "--save") == _value(flags, "--load")
    assert _value(flags, "--ckpt-format") == "torch_dist" and int(_value(flags, "--save-interval"))
    assert _value(flags, "--tensorboard-dir").endswith("tensorboard")
    assert {"--optimizer", "--use-distributed-optimizer", "--bf16"} <= set(flags)
    assert _value(flags, "--optimizer") == "muon"
    adam = pretrain_flags(launch_line(script, tmp_path, OPTIMIZER="adam"))
    assert _value(adam, "--optimizer") == "adam"
    assert not [f for f in adam if f.startswith("--muon-")]
    for name in ("--lr", "--min-lr", "--weight-decay", "--lr-decay-style", "--train-iters"):
        assert _value(adam, name) == _value(flags, name), name
    # Extra flags go last, so that they win; DEVICE=cpu swaps bf16 / grouped GEMM / TE for
    # gloo and the local layers, and WANDB_PROJECT adds wandb.
    cpu = pretrain_flags(launch_line(script, tmp_path, DEVICE="cpu", WANDB_PROJECT="p",
                                     GPUS_PER_NODE="2"))
    assert "--bf16" not in cpu and "--moe-grouped-gemm" not in cpu
    assert _value(cpu, "--distributed-backend") == "gloo"
    assert _value(cpu, "--transformer-impl") == "local" and _value(cpu, "--wandb-project") == "p"
    extra = pretrain_flags(launch_line(script, tmp_path, args=("--num-layers", "2")))
    assert extra == [*flags, "--num-layers", "2"]


@pytest.mark.parametrize("script", list(MEGATRON_LM_SCRIPTS))
def test_quoted_parameter_counts_match_the_helper(script: str) -> None:
    text = (EXAMPLES / script).read_text()
    vocab = re.search(r'count_params.py "\$\{MODEL_ARGS\[@\]\}" --vocab-size (\d+)', text).group(1)
    args = build_parser().parse_args([*_array(text, "MODEL_ARGS"), "--vocab-size", vocab])
    count = count_parameters(args)
    assert f"{count.total:,}" in text and f"{count.active:,}" in text


def test_moonlight_config_is_16b_total_3b_active() -> None:
    text = (EXAMPLES / "moonlight_multinode.sbatch").read_text()
    args = build_parser().parse_args([*_array(text, "MODEL_ARGS"), "--vocab-size", "163840"])
    count = count_parameters(args)
    assert round(count.total / 1e9) == 16 and round(count.active / 1e9) == 3


# Run in a subprocess: Megatron-LM's checkout goes first on sys.path there, as
# `python -m muon_megatron.megatron_lm` puts it, with the CPU shims that import it without CUDA.
# validate_args asks the GPU for its compute capability (for grouped GEMM and a few kernels):
# the stand-in answers as an H100 would.
_PARSE = """
import json, os, sys, types
sys.path.insert(0, os.environ["MEGATRON_LM_DIR"])
from muon_megatron.runtime.megatron_lm_shims import install_megatron_lm_cpu_shims
install_megatron_lm_cpu_shims()
import torch
torch.cuda.get_device_capability = lambda *a: (9, 0)
torch.cuda.get_device_properties = lambda *a: types.SimpleNamespace(major=9, minor=0)
from megatron.training.arguments import parse_args, validate_args
from muon_megatron.megatron_lm.arguments import muon_extra_args_provider
from muon_megatron.megatron_lm.hooks import _validating
results = []
for world, line in json.loads(sys.stdin.read()):
    env, flags = line[0].split("=", 1), line
    os.environ.update(WORLD_SIZE=str(world), RANK="0", LOCAL_RANK="0")
    os.environ[env[0]] = env[1]
    sys.argv = ["pretrain_gpt.py", *flags[flags.index("muon_megatron.megatron_lm") + 2:]]
    args = parse_args(muon_extra_args_provider)
    args = _validating(validate_args)(args) or args
    results.append({k: getattr(args, k) for k in (
        "optimizer", "data_path", "split", "tokenizer_type", "data_parallel_size",
        "padded_vocab_size", "save", "load", "tensorboard_dir", "lr", "weight_decay",
        "muon_momentum", "num_experts", "transformer_impl")})
print("RESULTS" + json.dumps(results))
"""


@pytest.mark.skipif(megatron_lm_dir() is None, reason="set MEGATRON_LM_DIR to a Megatron-LM "
                    "checkout to parse the scripts with Megatron-LM's own parser")
@pytest.mark.parametrize("script", list(MEGATRON_LM_SCRIPTS))
def test_megatron_lm_parses_and_validates_the_script_for_its_world_size(
    script: str, tmp_path: pathlib.Path
) -> None:
    """Muon and AdamW launch lines through Megatron-LM's parse_args (with our flags) and
    validate_args (wrapped as install() wraps it): no unknown flag, no failed check, and the
    values a run would see: the world's DP size, the blend, the tokenizer, save/load, Muon's
    momentum for muon and the same lr and weight decay for adam."""
    world, _ = MEGATRON_LM_SCRIPTS[script]
    lines = [[world, launch_line(script, tmp_path)],
             [world, launch_line(script, tmp_path, OPTIMIZER="adam")]]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", _PARSE], input=json.dumps(lines),
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    muon, adam = json.loads(proc.stdout.split("RESULTS", 1)[1])
    tp_pp = {"h100_single_node_moe.sh": 2 * 1, "moonlight_multinode.sbatch": 1 * 2}[script]
    assert muon["data_parallel_size"] == adam["data_parallel_size"] == world // tp_pp
    assert muon["data_path"] == DATA_PATH.split()
    assert muon["tokenizer_type"] == "HuggingFaceTokenizer"
    assert muon["save"] == muon["load"] and muon["tensorboard_dir"]
    assert muon["transformer_impl"] == "transformer_engine"
    assert (muon["optimizer"], muon["muon_momentum"]) == ("muon", 0.95)
    assert adam["optimizer"] == "adam"
    assert (adam["lr"], adam["weight_decay"]) == (muon["lr"], muon["weight_decay"])
