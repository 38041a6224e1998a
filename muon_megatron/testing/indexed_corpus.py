"""A small indexed dataset and a HuggingFace tokenizer, made here without any download.

`train_tokenizer(out_dir, texts)` trains a byte-level BPE with the `tokenizers` package and
saves it as a HuggingFace tokenizer directory (`tokenizer.json` + `tokenizer_config.json`,
end of document `<|endoftext|>`), which `--tokenizer-type HuggingFaceTokenizer
--tokenizer-model out_dir` loads through megatron-core (and `transformers`).
`write_indexed_dataset(prefix, documents)` writes `prefix.bin` / `prefix.idx` with
megatron-core's own `IndexedDatasetBuilder`, one document per entry with the end-of-document
id appended, as Megatron-LM's `tools/preprocess_data.py --append-eod` does.
`stdlib_indexed_corpus(out_dir)` does both over Python standard-library sources: one
dataset per package group, so that a blend has two to mix.
"""

from __future__ import annotations

import json
import os
import pathlib
import sysconfig
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = [
    "EOD_TOKEN",
    "train_tokenizer",
    "write_indexed_dataset",
    "stdlib_texts",
    "stdlib_indexed_corpus",
]

EOD_TOKEN = "<|endoftext|>"


def train_tokenizer(out_dir: str, texts: Iterable[str], vocab_size: int = 512) -> str:
    """Train a byte-level BPE of `vocab_size` ids on `texts`, save it as a HuggingFace
    tokenizer directory `out_dir`, return `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer)
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOD_TOKEN,
              "bos_token": EOD_TOKEN, "model_max_length": 1 << 30}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh)
    return out_dir


def write_indexed_dataset(prefix: str, documents: Iterable[Sequence[int]], eod: int,
                          vocab_size: int) -> str:
    """Write `prefix.bin` / `prefix.idx` (megatron-core's IndexedDatasetBuilder, the smallest
    dtype for `vocab_size`), each document followed by `eod`; return `prefix`."""
    import torch
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(vocab_size))
    for ids in documents:
        builder.add_item(torch.tensor([*ids, eod], dtype=torch.int64))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


def stdlib_texts(packages: Sequence[str]) -> list[str]:
    """The `.py` sources of standard-library `packages`, sorted by path."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    return [p.read_text(encoding="utf-8", errors="replace")
            for package in packages for p in sorted((root / package).rglob("*.py"))
            if "test" not in p.relative_to(root).parts]


def stdlib_indexed_corpus(
    out_dir: str,
    groups: Sequence[Sequence[str]] = (("json", "email"), ("logging", "http")),
    vocab_size: int = 512,
) -> tuple[str, list[str]]:
    """A tokenizer trained on all `groups` and one indexed dataset per group, under
    `out_dir`; returns (tokenizer directory, [dataset prefixes])."""
    from megatron.core.tokenizers import MegatronTokenizer

    texts = [stdlib_texts(group) for group in groups]
    tokenizer_dir = train_tokenizer(os.path.join(out_dir, "tokenizer"),
                                    [t for group in texts for t in group], vocab_size)
    tokenizer = MegatronTokenizer.from_pretrained(
        tokenizer_path=tokenizer_dir, metadata_path={"library": "huggingface"})
    prefixes = []
    for group, group_texts in zip(groups, texts):
        prefix = os.path.join(out_dir, "_".join(group) + "_text_document")
        documents = (np.asarray(tokenizer.tokenize(t), dtype=np.int64) for t in group_texts)
        prefixes.append(write_indexed_dataset(prefix, documents, tokenizer.eod,
                                              tokenizer.vocab_size))
    return tokenizer_dir, prefixes
