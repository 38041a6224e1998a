"""The training entry's checks of its own flags, before any process starts (no training)."""

from __future__ import annotations

import argparse

import pytest

from muon_megatron.training import step
from muon_megatron.training.args import build_parser, validate_args


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--eval-iters", "-1"], "--eval-iters -1 must be >= 0"),
        (["--eval-interval", "-5"], "--eval-interval -5 must be >= 0"),
        (["--save-interval", "-2"], "--save-interval -2 must be >= 0"),
    ],
)
def test_negative_eval_and_save_counts_are_refused(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_args(_args(*argv), world_size=1)


def test_eval_iters_0_is_a_valid_run() -> None:
    """Megatron-LM's spelling of "no evaluation" passes validation (the loop then skips it)."""
    validate_args(_args("--eval-iters", "0"), world_size=1)


def test_evaluate_with_no_batches_names_the_fix_instead_of_dividing_by_zero() -> None:
    with pytest.raises(ValueError, match="--eval-iters 0 means no evaluation"):
        step.evaluate(_args("--eval-iters", "0"), [], lambda i: {})
