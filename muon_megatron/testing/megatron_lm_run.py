"""Run Megatron-LM's own `pretrain_gpt.py` on CPU, as a user would, and read its log.

`run_pretrain_gpt(nproc, args)` launches

    python -m torch.distributed.run --nproc-per-node N --master-port PORT \
        -m muon_megatron.megatron_lm MEGATRON_LM_DIR/pretrain_gpt.py ARGS

(the Megatron-LM checkout and this repository on PYTHONPATH, one intra-op thread per rank);
`muon_megatron.megatron_lm` installs muon-megatron's hook and, without CUDA, the CPU shims
of `muon_megatron.runtime.megatron_lm_shims`. `tiny_gpt_args()` is a tiny GPT (2 layers,
hidden 64, mock data) that such a run trains in seconds; `logged_losses(output)` reads back
the per-iteration `lm loss` Megatron-LM printed.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Sequence

from muon_megatron.runtime.launch import _free_port

__all__ = [
    "megatron_lm_dir",
    "run_pretrain_gpt",
    "tiny_gpt_args",
    "logged_losses",
    "logged_values",
]

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Megatron-LM's per-iteration line (training.py `training_log`, core_v0.16.1 2034-2085):
#  [...] iteration        3/      10 | ... | lm loss: 7.623970E+00 | ... | grad norm: 1.234 |
_ITERATION_RE = re.compile(r"\biteration\s+(\d+)/\s*\d+ \|(.*)$", re.MULTILINE)


def megatron_lm_dir() -> str | None:
    """`$MEGATRON_LM_DIR` if it is a Megatron-LM checkout (holds pretrain_gpt.py and
    megatron/training), else None."""
    path = os.environ.get("MEGATRON_LM_DIR")
    if not path:
        return None
    if os.path.isfile(os.path.join(path, "pretrain_gpt.py")) and os.path.isdir(
        os.path.join(path, "megatron", "training")
    ):
        return os.path.abspath(path)
    return None


def skip_without_megatron_lm() -> None:
    """Skip the calling pytest module, saying why, without a Megatron-LM checkout
    (`megatron_lm_dir`) or the packages its `megatron.training` imports and megatron-core
    does not (tokenizers, yaml arguments, megatron.rl)."""
    import importlib.util

    import pytest

    if megatron_lm_dir() is None:
        pytest.skip(
            "Megatron-LM not found: set MEGATRON_LM_DIR to a checkout of NVIDIA/Megatron-LM "
            "(core_v0.16.1 or core_v0.19.x)",
            allow_module_level=True,
        )
    needed = ("six", "regex", "yaml", "pydantic")
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(
            f"Megatron-LM's training package needs {missing}: pip install six regex pyyaml "
            "pydantic",
            allow_module_level=True,
        )


def run_pretrain_gpt(
    nproc: int,
    args: Sequence[str],
    *,
    mlm_dir: str | None = None,
    timeout_s: float = 600.0,
    env: dict[str, str] | None = None,
) -> tuple[int, str]:
    """Run `pretrain_gpt.py ARGS` on `nproc` CPU ranks; return (returncode, stdout+stderr).

    A run that exceeds `timeout_s` is killed, the launcher and every process under it (torchrun
    starts each rank in a session of its own, out of reach of a process-group kill), and
    reported with returncode -9 and what it printed so far.
    """
    mlm_dir = mlm_dir or megatron_lm_dir()
    if mlm_dir is None:
        raise ValueError("no Megatron-LM checkout: set MEGATRON_LM_DIR or pass mlm_dir")
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1",
        "--master-port", str(_free_port()),
        "-m", "muon_megatron.megatron_lm",
        os.path.join(mlm_dir, "pretrain_gpt.py"),
        *args,
    ]  # fmt: skip
    run_env = dict(os.environ)
    pythonpath = [mlm_dir, _REPO_ROOT, *filter(None, [run_env.get("PYTHONPATH")])]
    run_env.update(
        PYTHONPATH=os.pathsep.join(pythonpath),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        CUDA_DEVICE_MAX_CONNECTIONS="1",
        PYTHONUNBUFFERED="1",
    )
    run_env.update(env or {})
    # A new session, so that a timeout kills the launcher and every rank it started.
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=run_env,
        cwd=mlm_dir,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        for pid in [*_descendants(proc.pid), proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        output, _ = proc.communicate()
        return -9, output + f"\n[megatron_lm_run] killed after {timeout_s:.0f} s\n"
    return proc.returncode, output


def _descendants(pid: int) -> list[int]:
    """Every process under `pid`, read from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                with open(f"/proc/{entry}/stat") as stat:
                    # pid (comm) state ppid ...: comm may hold spaces, so split after ')'.
                    ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
                parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def tiny_gpt_args(
    *,
    optimizer: str = "muon",
    lr: float = 1e-2,
    global_batch_size: int = 8,
    train_iters: int = 10,
    save: str | None = None,
    load: str | None = None,
    save_interval: int | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """Arguments for a tiny, deterministic GPT that Megatron-LM trains on CPU over gloo.

    A constant `lr` of 1e-2 takes the loss from ~7.69 (about ln 2176, the padded vocabulary)
    to ~7.1 in 10 steps. Dropout is off: it would draw from the CPU generator, which a resumed
    run has advanced differently (see `megatron_lm_shims`). The vocabulary (2048, padded to
    2176) x hidden 64 makes the word embedding (139,264 elements) larger than one DP4 slice of
    the single gradient bucket (241,408 elements in all, 60,352 a rank), so ZeRO-1 shard
    boundaries fall inside a matrix. Single-threaded gloo runs on CPU are deterministic
    without `--deterministic-mode`, which asks for an NCCL_ALGO.
    """
    args = [
        "--distributed-backend", "gloo",
        "--transformer-impl", "local",
        "--num-layers", "2",
        "--hidden-size", "64",
        "--num-attention-heads", "4",
        "--seq-length", "32",
        "--max-position-embeddings", "32",
        "--micro-batch-size", "2",
        "--global-batch-size", str(global_batch_size),
        "--mock-data",
        "--tokenizer-type", "NullTokenizer",
        "--vocab-size", "2048",
        "--optimizer", optimizer,
        "--use-distributed-optimizer",
        "--lr", str(lr),
        "--min-lr", str(lr),
        "--lr-decay-style", "constant",
        "--train-iters", str(train_iters),
        "--log-interval", "1",
        "--eval-iters", "0",
        "--eval-interval", str(10 * train_iters),
        "--split", "1,0,0",
        "--seed", "1234",
        "--no-gradient-accumulation-fusion",
        "--no-bias-gelu-fusion",
        "--no-bias-dropout-fusion",
        "--no-masked-softmax-fusion",
        "--no-rope-fusion",
        "--no-persist-layer-norm",
        "--attention-dropout", "0",
        "--hidden-dropout", "0",
        "--ckpt-format", "torch_dist",
        "--num-workers", "0",
    ]  # fmt: skip
    if save is not None:
        args += ["--save", save]
    if load is not None:
        args += ["--load", load]
    if save_interval is not None:
        args += ["--save-interval", str(save_interval)]
    return args + list(extra)


def logged_values(output: str, key: str = "lm loss") -> dict[int, str]:
    """{iteration: the printed value of `key`} from Megatron-LM's per-iteration log lines,
    as printed (e.g. '7.623970E+00'), so that runs can be compared without re-rounding.

    Averaged keys (`lm loss`) are averages since the previous logged line, except that the
    first line a run logs does not reset the accumulators (training.py:1797, `should_reset`):
    with `--log-interval 1`, a run's second line averages its first two iterations, e.g.
    iteration 7 of a run resumed at 5. Per-step values (`grad norm`) have no such quirk.
    """
    values: dict[int, str] = {}
    field = re.compile(rf"(?:^|\|)\s*{re.escape(key)}:\s*([^|\s]+)\s*(?=\||$)")
    for match in _ITERATION_RE.finditer(output):
        found = field.search(match.group(2))
        if found is not None:
            values[int(match.group(1))] = found.group(1)
    return values


def logged_losses(output: str) -> dict[int, float]:
    """{iteration: lm loss} from Megatron-LM's per-iteration log lines."""
    return {it: float(value) for it, value in logged_values(output, "lm loss").items()}
