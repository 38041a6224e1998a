"""`--data-path` and the tokenizer flags of the training entry (training/indexed_data.py):
which samples a rank reads, how the vocabulary is padded, and that bad data flags are refused
by name before training. The end-to-end run is tests/functional/test_train_indexed_data.py."""

from __future__ import annotations

import pathlib

import pytest

from muon_megatron.training.args import build_parser, validate_args
from muon_megatron.training.indexed_data import (
    LEGACY_DEFAULT_SPLIT,
    data_errors,
    local_sample_indices,
    model_vocab_size,
    padded_vocab_size,
)


def _args(*flags: str):
    return build_parser().parse_args(list(flags))


def _dataset(tmp_path: pathlib.Path, name: str = "d_text_document") -> str:
    prefix = str(tmp_path / name)
    for suffix in (".bin", ".idx"):
        pathlib.Path(prefix + suffix).write_bytes(b"")
    return prefix


def test_ranks_read_megatron_lm_sampler_order_and_cover_each_global_batch_once() -> None:
    """gbs 8, mbs 2, DP 2: micro-step 0 is samples 0-3 (rank 0 takes 0,1; rank 1 takes 2,3),
    micro-step 1 is 4-7, as Megatron-LM's MegatronPretrainingSampler hands them out; the
    next global batch starts at 8."""
    assert local_sample_indices(0, 8, 2, 0, 2) == [0, 1, 4, 5]
    assert local_sample_indices(0, 8, 2, 1, 2) == [2, 3, 6, 7]
    assert local_sample_indices(1, 8, 2, 1, 2) == [10, 11, 14, 15]
    for dp in (1, 2, 4):
        rows = sorted(i for r in range(dp) for i in local_sample_indices(3, 16, 2, r, dp))
        assert rows == list(range(48, 64))
    with pytest.raises(ValueError, match="not a multiple of micro-batch size x data-parallel"):
        local_sample_indices(0, 6, 2, 0, 2)


def test_vocabulary_is_padded_as_megatron_lm_pads_it() -> None:
    assert padded_vocab_size(512, 128, 1) == 512
    assert padded_vocab_size(513, 128, 1) == 640
    assert padded_vocab_size(50257, 128, 2) == 50432  # GPT-2 at TP2, Megatron-LM's figure
    assert padded_vocab_size(163840, 128, 8) == 163840


def test_byte_corpus_keeps_its_vocab_size_meaning() -> None:
    """Without --data-path, --vocab-size is still the embedding rows (256 by default), and
    --padded-vocab-size sets them outright."""
    assert model_vocab_size(_args()) == 256
    assert model_vocab_size(_args("--vocab-size", "32768")) == 32768
    assert model_vocab_size(_args("--padded-vocab-size", "1024")) == 1024
    with pytest.raises(ValueError, match="--vocab-size 100 is below the byte tokenizer's 256"):
        validate_args(_args("--vocab-size", "100"), 1)


def test_data_flags_without_data_path_are_refused_by_name() -> None:
    for flag, value in (("--split", "98,2,0"), ("--tokenizer-type", "HuggingFaceTokenizer"),
                        ("--tokenizer-model", "gpt2"), ("--data-cache-path", "/tmp/c")):
        errors = data_errors(_args(flag, value))
        assert len(errors) == 1 and errors[0].startswith(f"{flag} is for --data-path"), errors


def test_data_path_problems_are_named_with_their_fix(tmp_path: pathlib.Path) -> None:
    prefix = _dataset(tmp_path)
    hf = ("--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "dir")
    assert data_errors(_args("--data-path", prefix, *hf)) == []
    assert data_errors(_args("--data-path", "0.3", prefix, "0.7", prefix, *hf)) == []

    missing = str(tmp_path / "missing")
    (error,) = data_errors(_args("--data-path", missing, *hf))
    assert f"{missing}.bin and {missing}.idx not found" in error
    assert "tools/preprocess_data.py" in error
    (error,) = data_errors(_args("--data-path", "x", prefix, "0.7", prefix, *hf))
    assert "'x' is not a weight" in error
    (error,) = data_errors(_args("--data-path", prefix))
    assert "--data-path needs --tokenizer-type" in error
    (error,) = data_errors(_args("--data-path", prefix, "--tokenizer-type",
                                 "HuggingFaceTokenizer"))
    assert "--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model" in error
    (error,) = data_errors(_args("--data-path", prefix, "--tokenizer-type", "NullTokenizer"))
    assert "NullTokenizer needs --vocab-size" in error
    (error,) = data_errors(_args("--data-path", prefix, "--tokenizer-type", "GPT2BPETokenizer"))
    assert "needs --vocab-file and --merge-file" in error
    (error,) = data_errors(_args("--data-path", prefix, *hf, "--vocab-size", "1000"))
    assert "the tokenizer defines the vocabulary" in error
    (error,) = data_errors(_args("--data-path", "-1", prefix, "1", prefix, *hf))
    assert "weights [-1.0, 1.0] must be >= 0" in error


def test_validate_args_reports_data_errors_before_training(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="--data-path needs --tokenizer-type"):
        validate_args(_args("--data-path", _dataset(tmp_path)), 1)


def test_split_defaults_to_megatron_lm_legacy_value() -> None:
    """Megatron-LM's own default for --data-path without --split (arguments.py)."""
    assert LEGACY_DEFAULT_SPLIT == "969, 30, 1"
    assert _args().split is None
