"""The byte-level stdlib corpus and its sampling: deterministic, split by file, sharded by DP."""

from __future__ import annotations

import numpy as np
import torch

from muon_megatron.training.data import VOCAB_SIZE, global_offsets, local_batch, stdlib_corpus


def test_corpus_is_deterministic_and_split_by_whole_files() -> None:
    a, b = stdlib_corpus(), stdlib_corpus()
    assert a.sha256 == b.sha256 and np.array_equal(a.train, b.train)
    assert not set(a.train_files) & set(a.valid_files)
    assert len(a.valid) > 0 and len(a.train) > 10 * 1024 * 1024 // 10
    assert int(a.train.max()) < VOCAB_SIZE


def test_dp_ranks_take_disjoint_slices_of_the_same_global_batch() -> None:
    tokens = stdlib_corpus().train
    whole = local_batch(tokens, 32, 8, iteration=3, seed=7, dp_rank=0, dp_size=1)
    parts = [
        local_batch(tokens, 32, 8, iteration=3, seed=7, dp_rank=r, dp_size=4) for r in range(4)
    ]
    for key in ("tokens", "labels"):
        assert torch.equal(torch.cat([p[key] for p in parts]), whole[key])
    # labels are the next byte
    assert torch.equal(whole["tokens"][:, 1:], whole["labels"][:, :-1])


def test_batches_differ_between_iterations_and_seeds() -> None:
    def offsets(iteration: int, seed: int) -> np.ndarray:
        return global_offsets(10_000, 32, 8, iteration, seed)

    assert not np.array_equal(offsets(1, 0), offsets(2, 0))
    assert not np.array_equal(offsets(1, 0), offsets(1, 1))
    assert np.array_equal(offsets(1, 0), offsets(1, 0))
