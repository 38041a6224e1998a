"""`--data-path`: Megatron's indexed datasets (`.bin` / `.idx`) for the training entry.

The datasets are megatron-core's own: `GPTDataset` (and `BlendedDataset` for a blend) built
by `BlendedMegatronDatasetBuilder` from `--data-path` (one prefix, `W1 P1 W2 P2 ...`, or
`P1 P2 ...` weighted by size) and `--split`, with the tokenizer megatron-core builds from
`--tokenizer-type` / `--tokenizer-model` (`megatron.core.tokenizers`, the code behind
Megatron-LM's `build_tokenizer`). The flags keep Megatron-LM's names, defaults and meaning;
without `--data-path` the entry trains on the byte-level stdlib corpus (`training.data`).

The model's vocabulary is the tokenizer's, padded as Megatron-LM pads it: up to a multiple
of `--make-vocab-size-divisible-by` x the tensor-parallel size (`--padded-vocab-size` sets
it outright).

Which samples a rank reads is Megatron-LM's `MegatronPretrainingSampler` order: iteration
`i` (1-based) takes the global batch of samples `[(i-1) gbs, i gbs)`; within it, micro-step
`m` takes `mbs x dp` consecutive samples and data-parallel rank `r` the `r`-th `mbs` of them.
Validation reads the first `--eval-iters` global batches of the validation split at every
evaluation (the same batches each time, as the byte corpus does; Megatron-LM instead moves
on through the validation split).

megatron-core's index builders need its compiled dataset helpers (`helpers_cpp`), which
its PyPI wheels ship (0.16.1 and 0.19.2 both do); a source install must build them with
`make -C <megatron/core/datasets>`, and `IndexedData` says so when they are missing.
"""

from __future__ import annotations

import argparse
import os
import types
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "TOKENIZER_TYPES",
    "LEGACY_DEFAULT_SPLIT",
    "add_data_args",
    "data_errors",
    "resolve_vocabulary",
    "build_tokenizer",
    "padded_vocab_size",
    "model_vocab_size",
    "local_sample_indices",
    "IndexedData",
]

TOKENIZER_TYPES: tuple[str, ...] = (
    "HuggingFaceTokenizer",
    "GPT2BPETokenizer",
    "SentencePieceTokenizer",
    "GPTSentencePieceTokenizer",
    "Llama2Tokenizer",
    "TikTokenizer",
    "NullTokenizer",
)
"""Megatron-LM's `--tokenizer-type` values for GPT text that megatron-core builds itself."""

LEGACY_DEFAULT_SPLIT = "969, 30, 1"
"""What Megatron-LM uses (with a warning) for `--data-path` without `--split`."""

_NEEDS_MODEL = ("HuggingFaceTokenizer", "SentencePieceTokenizer", "GPTSentencePieceTokenizer",
                "Llama2Tokenizer", "TikTokenizer")
_REMOTE = ("s3://", "msc://")


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """Megatron-LM's data and tokenizer flags that the training entry honours."""
    g = parser.add_argument_group(
        "data (Megatron's indexed datasets; without --data-path: the byte-level stdlib corpus)")
    g.add_argument("--data-path", nargs="*", default=None,
                   help="Indexed dataset prefixes (PREFIX.bin / PREFIX.idx, made by Megatron-LM's "
                   "tools/preprocess_data.py): one prefix, 'W1 P1 W2 P2 ...' (a blend), or "
                   "'P1 P2 ...' (weighted by size).")
    g.add_argument("--split", default=None,
                   help="Train, validation, test proportions of --data-path, e.g. '98,2,0' "
                   f"(Megatron-LM's default: '{LEGACY_DEFAULT_SPLIT}', with a warning).")
    g.add_argument("--data-cache-path", default=None,
                   help="Where the dataset index caches go (default: beside the data).")
    g.add_argument("--eod-mask-loss", action="store_true",
                   help="No loss on end-of-document tokens.")
    g.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default=None,
                   help="The tokenizer --data-path was made with (needed with --data-path).")
    g.add_argument("--tokenizer-model", default=None,
                   help="HuggingFace tokenizer directory or name, SentencePiece or TikToken file.")
    g.add_argument("--vocab-file", default=None)
    g.add_argument("--merge-file", default=None)
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="Pad the tokenizer's vocabulary to a multiple of this x TP size.")
    g.add_argument("--padded-vocab-size", type=int, default=None,
                   help="The model's vocabulary outright (default: computed from the "
                   "tokenizer, or --vocab-size for the byte corpus).")


def _is_remote(prefix: str) -> bool:
    return prefix.startswith(_REMOTE)


def _blend(data_path: list[str]) -> tuple[list[str], list[float] | None]:
    """(prefixes, weights) of `--data-path`, as megatron-core's `get_blend_from_list` reads
    it; ValueError naming the entry when a weight is not a number."""
    if len(data_path) % 2 == 1:
        return list(data_path), None
    weights, prefixes = [], []
    for weight, prefix in zip(data_path[::2], data_path[1::2]):
        try:
            weights.append(float(weight))
        except ValueError:
            raise ValueError(
                f"--data-path {' '.join(data_path)}: {weight!r} is not a weight; give "
                "'W1 PREFIX1 W2 PREFIX2 ...', or an odd number of prefixes without weights"
            ) from None
        prefixes.append(prefix.strip())
    return prefixes, weights


def data_errors(args: argparse.Namespace) -> list[str]:
    """What keeps the data flags from working, one message per problem naming the flag and
    the fix ([] when they can run)."""
    errors: list[str] = []
    if args.data_path is None:
        for flag in ("split", "tokenizer_type", "tokenizer_model", "data_cache_path"):
            if getattr(args, flag) is not None:
                errors.append(f"--{flag.replace('_', '-')} is for --data-path: the byte-level "
                              "stdlib corpus (the default data) splits by file and tokenizes by "
                              "byte; add --data-path or drop the flag")
        return errors
    if not args.data_path:
        return ["--data-path is empty: give one or more dataset prefixes (PREFIX.bin/.idx)"]
    try:
        prefixes, weights = _blend(args.data_path)
    except ValueError as error:
        return [str(error)]
    if weights is not None and (min(weights) < 0 or sum(weights) <= 0):
        errors.append(f"--data-path weights {weights} must be >= 0 with a positive sum")
    for prefix in prefixes:
        if _is_remote(prefix):
            continue
        missing = [s for s in (".bin", ".idx") if not os.path.isfile(prefix + s)]
        if missing:
            errors.append(f"--data-path {prefix}: {' and '.join(prefix + s for s in missing)} "
                          "not found; make them with Megatron-LM's tools/preprocess_data.py "
                          "(--output-prefix), and pass the prefix without .bin/.idx")
    kind = args.tokenizer_type
    if kind is None:
        errors.append("--data-path needs --tokenizer-type (the tokenizer the data was made "
                      "with), e.g. --tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR")
    elif kind in _NEEDS_MODEL and not args.tokenizer_model:
        errors.append(f"--tokenizer-type {kind} needs --tokenizer-model")
    elif kind == "GPT2BPETokenizer" and not (args.vocab_file and args.merge_file):
        errors.append("--tokenizer-type GPT2BPETokenizer needs --vocab-file and --merge-file")
    elif kind == "NullTokenizer" and args.vocab_size is None:
        errors.append("--tokenizer-type NullTokenizer needs --vocab-size (its ids are the "
                      "data's token ids; end of document is --vocab-size)")
    if kind not in (None, "NullTokenizer", "TikTokenizer") and args.vocab_size is not None:
        errors.append(f"--vocab-size {args.vocab_size} with --tokenizer-type {kind}: the "
                      "tokenizer defines the vocabulary; drop --vocab-size (--padded-vocab-size "
                      "sets the model's embedding rows)")
    if args.make_vocab_size_divisible_by < 1:
        errors.append(f"--make-vocab-size-divisible-by {args.make_vocab_size_divisible_by} "
                      "must be >= 1")
    return errors


def _megatron_lm_namespace(args: argparse.Namespace) -> types.SimpleNamespace:
    # megatron-core's build_tokenizer reads Megatron-LM's tokenizer arguments; the ones the
    # training entry does not define keep Megatron-LM's defaults.
    return types.SimpleNamespace(
        tokenizer_type=args.tokenizer_type, tokenizer_model=args.tokenizer_model,
        vocab_file=args.vocab_file, merge_file=args.merge_file, vocab_size=args.vocab_size,
        tokenizer_special_tokens=None, tokenizer_hf_use_fast=False, trust_remote_code=False,
        tokenizer_hf_include_special_tokens=False, tokenizer_sentencepiece_legacy=False,
        tokenizer_metadata=None, tiktoken_pattern=None, tiktoken_num_special_tokens=1000,
    )


def build_tokenizer(args: argparse.Namespace) -> Any:
    """megatron-core's tokenizer for `--tokenizer-type` (as Megatron-LM builds it)."""
    from megatron.core.tokenizers.text.utils.build_tokenizer import build_tokenizer as build

    try:
        return build(_megatron_lm_namespace(args))
    except ImportError as error:
        raise ImportError(
            f"--tokenizer-type {args.tokenizer_type} needs a package that is not installed "
            f"({error}); for HuggingFaceTokenizer: pip install transformers"
        ) from error


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron-LM's `_vocab_size_with_padding`: the next multiple of divisible_by x tp."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def resolve_vocabulary(args: argparse.Namespace) -> int:
    """The model's embedding rows, stored in `args.padded_vocab_size` when it is not given:
    for `--data-path`, the tokenizer's vocabulary padded Megatron-LM's way; for the byte
    corpus, `--vocab-size` (256 by default)."""
    from muon_megatron.training.data import VOCAB_SIZE

    if args.data_path is None:
        if args.padded_vocab_size is None:
            args.padded_vocab_size = args.vocab_size or VOCAB_SIZE
        return args.padded_vocab_size
    try:
        vocab = build_tokenizer(args).vocab_size
    except (ImportError, OSError, ValueError) as error:
        raise ValueError(
            f"--tokenizer-type {args.tokenizer_type} --tokenizer-model {args.tokenizer_model} "
            f"could not be loaded ({error}); the model's vocabulary comes from the tokenizer "
            "(or give it outright with --padded-vocab-size)") from error
    if args.padded_vocab_size is None:
        args.padded_vocab_size = padded_vocab_size(
            vocab, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size)
    elif args.padded_vocab_size < vocab:
        raise ValueError(f"--padded-vocab-size {args.padded_vocab_size} is below the "
                         f"tokenizer's vocabulary ({vocab}); raise it or drop it")
    return args.padded_vocab_size


def model_vocab_size(args: argparse.Namespace) -> int:
    """The model's embedding rows: `--padded-vocab-size`, else `resolve_vocabulary`'s."""
    if args.padded_vocab_size is not None:
        return args.padded_vocab_size
    return resolve_vocabulary(args)


def local_sample_indices(iteration_index: int, global_batch_size: int, micro_batch_size: int,
                         dp_rank: int, dp_size: int) -> list[int]:
    """Global sample indices of rank `dp_rank`'s rows of global batch `iteration_index`
    (0-based), micro-batch after micro-batch, in `MegatronPretrainingSampler`'s order."""
    per_step = micro_batch_size * dp_size
    if global_batch_size % per_step:
        raise ValueError(f"global batch size {global_batch_size} is not a multiple of "
                         f"micro-batch size x data-parallel size = {per_step}")
    base = iteration_index * global_batch_size + dp_rank * micro_batch_size
    return [base + m * per_step + j
            for m in range(global_batch_size // per_step) for j in range(micro_batch_size)]


@dataclass(frozen=True)
class _Splits:
    train: Any
    valid: Any


class IndexedData:
    """This rank's batches from `--data-path` through megatron-core's `GPTDataset`.

    Built on every rank (a collective: megatron-core builds the index caches on rank 0
    first, then the other ranks read them). `batch(split, i)` gives the same dict as the
    byte corpus's `local_batch`: int64 `tokens` and `labels`, float `loss_mask`, int64
    `position_ids`, each [global_batch_size / dp, seq_length].
    """

    def __init__(self, args: argparse.Namespace, dp_rank: int, dp_size: int,
                 do_valid: bool) -> None:
        _require_dataset_helpers()
        from megatron.core.datasets.blended_megatron_dataset_builder import (
            BlendedMegatronDatasetBuilder,
        )
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

        self.args, self.dp_rank, self.dp_size = args, dp_rank, dp_size
        self.tokenizer = build_tokenizer(args)
        self.split = args.split
        if self.split is None:
            self.split = LEGACY_DEFAULT_SPLIT
            if torch.distributed.get_rank() == 0:
                print(f"WARNING: --data-path without --split: using Megatron-LM's legacy "
                      f"default '{LEGACY_DEFAULT_SPLIT}'", flush=True)
        gbs = args.global_batch_size
        valid = args.eval_iters * gbs if do_valid else 0
        self.blend = _blend(args.data_path)
        config = GPTDatasetConfig(
            random_seed=args.seed, sequence_length=args.seq_length, blend=self.blend,
            split=self.split, path_to_cache=args.data_cache_path, tokenizer=self.tokenizer,
            reset_position_ids=False, reset_attention_mask=False,
            eod_mask_loss=args.eod_mask_loss, create_attention_mask=False,
        )
        train, valid_ds, _ = BlendedMegatronDatasetBuilder(
            GPTDataset, [args.train_iters * gbs, valid, 0], lambda: True, config).build()
        if train is None or len(train) == 0:
            raise ValueError(f"--data-path {' '.join(args.data_path)} --split {self.split} "
                             "leaves no training samples: give the train split a share")
        if do_valid and (valid_ds is None or len(valid_ds) < valid):
            raise ValueError(f"--split {self.split} leaves no validation samples: give the "
                             "validation split a share, or --eval-iters 0")
        self.datasets = _Splits(train=train, valid=valid_ds)

    def describe(self) -> dict[str, Any]:
        """What the run log records about the data, and the run's first line says."""
        train = len(self.datasets.train)
        valid = 0 if self.datasets.valid is None else len(self.datasets.valid)
        vocab = self.tokenizer.vocab_size
        return {
            "kind": "indexed", "title": f"--data-path {' '.join(self.args.data_path)}"[:80],
            "unit": "token", "data_path": list(self.args.data_path), "split": self.split,
            "tokenizer_type": self.args.tokenizer_type,
            "tokenizer_model": self.args.tokenizer_model, "vocab_size": vocab,
            "padded_vocab_size": self.args.padded_vocab_size,
            "train_samples": train, "valid_samples": valid,
            "summary": f"data {' '.join(self.args.data_path)} (split {self.split}): {train:,} "
                       f"train / {valid:,} valid samples | {self.args.tokenizer_type} vocab "
                       f"{vocab:,} (padded {self.args.padded_vocab_size:,})",
        }

    def batch(self, split: str, iteration: int) -> dict[str, torch.Tensor]:
        """This rank's rows of training iteration `iteration` (1-based) or of validation
        batch `iteration` (0-based)."""
        dataset = self.datasets.train if split == "train" else self.datasets.valid
        index = iteration - 1 if split == "train" else iteration
        rows = [dataset[i] for i in local_sample_indices(
            index, self.args.global_batch_size, self.args.micro_batch_size,
            self.dp_rank, self.dp_size)]
        return {
            "tokens": torch.stack([r["tokens"] for r in rows]).long(),
            "labels": torch.stack([r["labels"] for r in rows]).long(),
            "loss_mask": torch.stack([r["loss_mask"] for r in rows]).float(),
            "position_ids": torch.stack([r["position_ids"] for r in rows]).long(),
        }


def _require_dataset_helpers() -> None:
    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
    except ImportError as error:
        import megatron.core.datasets as datasets

        raise ImportError(
            "megatron-core's compiled dataset helpers (megatron.core.datasets.helpers_cpp) are "
            f"missing ({error}): PyPI's megatron-core wheels ship them; for a source install "
            f"run `make -C {os.path.dirname(datasets.__file__)}` (needs pybind11 and a C++ "
            "compiler)"
        ) from error
