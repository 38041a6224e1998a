"""The training entry on Megatron's indexed datasets (`--data-path`), end to end on CPU.

The data is made here, without any download: a byte-level BPE (512 ids) trained by the
`tokenizers` package on Python standard-library sources, and two indexed datasets written by
megatron-core's own `IndexedDatasetBuilder` (`muon_megatron.testing.indexed_corpus`). The
entry reads them through megatron-core's `BlendedMegatronDatasetBuilder` / `GPTDataset`
(`BlendedDataset` for the blend) and the tokenizer through megatron-core's
`HuggingFaceTokenizer` (which needs `transformers`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

_MISSING = [m for m in ("tokenizers", "transformers") if importlib.util.find_spec(m) is None]
if _MISSING:
    pytest.skip(f"the HuggingFace tokenizer needs {_MISSING}: pip install -e '.[test]'",
                allow_module_level=True)

ROOT = pathlib.Path(__file__).resolve().parents[2]
STEPS = 30
# A 512-id BPE starts near ln 512 = 6.24 nats per token; in 30 steps at lr 3e-3 the mean of
# the last 5 steps is ~1.5 nats below the first 5 (Muon and AdamW alike). Half of that leaves
# a wide margin for machine-to-machine differences.
MIN_FALL = 0.75
WINDOW = 5


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str]]:
    from muon_megatron.testing.indexed_corpus import stdlib_indexed_corpus

    return stdlib_indexed_corpus(str(tmp_path_factory.mktemp("indexed")))


def _run(cmd: list[str], timeout: float = 400) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _flags(tokenizer: str, data_path: list[str], out: pathlib.Path) -> list[str]:
    return [
        sys.executable, "examples/pretrain_moe.py", "--world-size", "2",
        "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "8",
        "--hidden-dropout", "0", "--attention-dropout", "0", "--swiglu",
        "--disable-bias-linear", "--normalization", "RMSNorm",
        "--optimizer", "muon", "--lr", "3e-3", "--min-lr", "3e-4", "--lr-decay-style", "cosine",
        "--lr-warmup-iters", "3", "--weight-decay", "0.1",
        "--train-iters", str(STEPS), "--log-interval", "10",
        "--eval-interval", str(STEPS), "--eval-iters", "2",
        "--data-path", *data_path, "--split", "90,10,0",
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer,
        "--output-dir", str(out), "--tensorboard-dir", str(out / "tensorboard"),
    ]


def test_loss_falls_at_dp2_on_a_blend_of_indexed_datasets(
    corpus: tuple[str, list[str]], tmp_path: pathlib.Path
) -> None:
    """Two processes (DP 2), a 0.7 / 0.3 blend of the two datasets, 90/10/0 split: the run
    reads megatron-core's datasets (the log records them and the padded vocabulary, 512 ids
    padded to 512) and the training loss falls by MIN_FALL; the final validation loss is
    finite and below the first training losses; with tensorboard installed, the event file
    (--tensorboard-dir) holds the same losses."""
    tokenizer, (a, b) = corpus
    proc = _run(_flags(tokenizer, ["0.7", a, "0.3", b], tmp_path))
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    log = json.loads((tmp_path / "muon.json").read_text())
    assert (log["world_size"], log["data_parallel_size"]) == (2, 2)
    data = log["data"]
    assert data["kind"] == "indexed" and data["data_path"] == ["0.7", a, "0.3", b]
    assert (data["vocab_size"], data["padded_vocab_size"]) == (512, 512)
    assert data["train_samples"] >= STEPS * 8 and data["valid_samples"] >= 2 * 8
    assert f"data 0.7 {a} 0.3 {b} (split 90,10,0)" in proc.stdout
    losses = [r["loss"] for r in log["iterations"]]
    assert len(losses) == STEPS
    first, last = sum(losses[:WINDOW]) / WINDOW, sum(losses[-WINDOW:]) / WINDOW
    assert last < first - MIN_FALL, (first, last, losses)
    assert log["validation"] and log["validation"][-1]["loss"] < first
    if importlib.util.find_spec("tensorboard") is not None:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(tmp_path / "tensorboard"))
        events.Reload()
        written = [e.value for e in events.Scalars("lm loss")]
        # The event file holds float32: the JSON log's losses to float32 precision.
        assert written == pytest.approx(losses, rel=1e-6)
        assert [e.step for e in events.Scalars("lm loss validation")] == [
            v["iteration"] for v in log["validation"]]


def test_a_missing_dataset_is_refused_before_any_process_starts(
    corpus: tuple[str, list[str]], tmp_path: pathlib.Path
) -> None:
    """A prefix without its .bin/.idx stops the run at validation, naming the files and
    Megatron-LM's tools/preprocess_data.py, before any rank is spawned."""
    tokenizer, _ = corpus
    missing = str(tmp_path / "nowhere_text_document")
    proc = _run(_flags(tokenizer, [missing], tmp_path), timeout=120)
    assert proc.returncode != 0
    assert f"{missing}.bin and {missing}.idx not found" in proc.stderr
    assert "tools/preprocess_data.py" in proc.stderr
    assert "iteration" not in proc.stdout
