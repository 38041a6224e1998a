"""Real text without downloads: the Python standard library's own sources, byte-tokenized.

The corpus is the `.py` files of a fixed list of standard-library packages (`STDLIB_PACKAGES`),
sorted by path, test directories left out. Each file goes whole to one split (every
`VALID_EVERY`-th file to validation), so no validation text is seen in training. Tokens are
bytes (vocab 256); Python sources are ASCII almost everywhere, so a byte is a character.

Sampling is deterministic and layout-independent: the global batch of iteration `i` is
`global_batch_size` windows of `seq_length + 1` bytes at offsets drawn from a generator
seeded with (seed, i); each data-parallel rank materialises only its own rows. The corpus
differs between Python versions (their standard libraries differ); `ByteCorpus.sha256`
identifies it in the run log.
"""

from __future__ import annotations

import hashlib
import pathlib
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "VOCAB_SIZE",
    "STDLIB_PACKAGES",
    "VALID_EVERY",
    "ByteCorpus",
    "stdlib_corpus",
    "global_offsets",
    "local_batch",
    "ByteBatches",
]

VOCAB_SIZE = 256
"""Byte-level tokenizer: token id = byte value."""

STDLIB_PACKAGES: tuple[str, ...] = (
    "asyncio",
    "email",
    "json",
    "logging",
    "concurrent",
    "http",
    "urllib",
    "xml",
    "unittest",
    "multiprocessing",
    "importlib",
)
"""About 2.6 MB of source on Python 3.11."""

VALID_EVERY = 10


@dataclass(frozen=True)
class ByteCorpus:
    """Train and validation token streams (uint8) and the files they came from."""

    train: np.ndarray
    valid: np.ndarray
    train_files: tuple[str, ...]
    valid_files: tuple[str, ...]
    sha256: str


def _source_files(root: pathlib.Path, packages: Sequence[str]) -> list[pathlib.Path]:
    files = []
    for package in packages:
        directory = root / package
        if not directory.is_dir():
            raise ValueError(
                f"standard-library package {package!r} not found under {root}; pick packages "
                "that this Python ships."
            )
        for path in sorted(directory.rglob("*.py")):
            parts = path.relative_to(root).parts
            if not any(part in ("test", "tests", "idle_test") for part in parts):
                files.append(path)
    return files


def stdlib_corpus(
    packages: Sequence[str] = STDLIB_PACKAGES, valid_every: int = VALID_EVERY
) -> ByteCorpus:
    """The byte corpus of `packages` from this interpreter's standard library."""
    if valid_every < 2:
        raise ValueError(f"valid_every={valid_every} must be >= 2 (every n-th file validates)")
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = _source_files(root, packages)
    train_parts: list[bytes] = []
    valid_parts: list[bytes] = []
    train_names: list[str] = []
    valid_names: list[str] = []
    digest = hashlib.sha256()
    for index, path in enumerate(files):
        name = path.relative_to(root).as_posix()
        text = path.read_bytes()
        digest.update(name.encode() + b"\0" + text)
        if index % valid_every == valid_every - 1:
            valid_parts.append(text)
            valid_names.append(name)
        else:
            train_parts.append(text)
            train_names.append(name)
    return ByteCorpus(
        train=np.frombuffer(b"\n".join(train_parts), dtype=np.uint8),
        valid=np.frombuffer(b"\n".join(valid_parts), dtype=np.uint8),
        train_files=tuple(train_names),
        valid_files=tuple(valid_names),
        sha256=digest.hexdigest(),
    )


def global_offsets(
    num_tokens: int, seq_length: int, global_batch_size: int, iteration: int, seed: int
) -> np.ndarray:
    """Start offsets of the `global_batch_size` windows of `iteration` (same on every rank)."""
    span = num_tokens - (seq_length + 1)
    if span <= 0:
        raise ValueError(
            f"seq_length={seq_length} does not fit a corpus split of {num_tokens} tokens; "
            "use a shorter --seq-length."
        )
    rng = np.random.default_rng([seed, iteration])
    return rng.integers(0, span + 1, size=global_batch_size)


def local_batch(
    tokens: np.ndarray,
    seq_length: int,
    global_batch_size: int,
    iteration: int,
    seed: int,
    dp_rank: int,
    dp_size: int,
) -> dict[str, torch.Tensor]:
    """This data-parallel rank's rows `[dp_rank*n, (dp_rank+1)*n)` of the global batch.

    Returns int64 `tokens`, `labels` (next byte), float `loss_mask` and `position_ids`, each
    [n, seq_length] with n = global_batch_size / dp_size.
    """
    if global_batch_size % dp_size != 0:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by the data-parallel size "
            f"{dp_size}; pick a multiple of it."
        )
    n = global_batch_size // dp_size
    offsets = global_offsets(len(tokens), seq_length, global_batch_size, iteration, seed)
    mine = offsets[dp_rank * n : (dp_rank + 1) * n]
    windows = np.stack([tokens[o : o + seq_length + 1] for o in mine]).astype(np.int64)
    stream = torch.from_numpy(windows)
    return {
        "tokens": stream[:, :-1].contiguous(),
        "labels": stream[:, 1:].contiguous(),
        "loss_mask": torch.ones(n, seq_length),
        "position_ids": torch.arange(seq_length).expand(n, seq_length).contiguous(),
    }


class ByteBatches:
    """This rank's batches of the byte corpus, the training entry's default data: the same
    `batch(split, i)` / `describe()` as `indexed_data.IndexedData`. Validation batch `i` is
    drawn with seed + 1, so it never repeats a training window's draw."""

    title = "byte-level LM on Python stdlib sources"
    unit = "byte"

    def __init__(self, seq_length: int, global_batch_size: int, seed: int, dp_rank: int,
                 dp_size: int) -> None:
        self.corpus = stdlib_corpus()
        self.seq_length, self.global_batch_size, self.seed = seq_length, global_batch_size, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size

    def batch(self, split: str, iteration: int) -> dict[str, torch.Tensor]:
        """This rank's rows of training iteration `iteration` or validation batch `iteration`."""
        tokens = self.corpus.train if split == "train" else self.corpus.valid
        seed = self.seed if split == "train" else self.seed + 1
        return local_batch(tokens, self.seq_length, self.global_batch_size, iteration, seed,
                           self.dp_rank, self.dp_size)

    def describe(self) -> dict[str, object]:
        """What the run log records about the data, and the run's first line says."""
        c = self.corpus
        files = len(c.train_files) + len(c.valid_files)
        return {
            "kind": "stdlib bytes", "title": self.title, "unit": self.unit,
            "train_tokens": len(c.train), "valid_tokens": len(c.valid), "sha256": c.sha256,
            "files": files,
            "summary": f"corpus {len(c.train):,} train / {len(c.valid):,} valid bytes "
                       f"({files} stdlib files)",
        }
