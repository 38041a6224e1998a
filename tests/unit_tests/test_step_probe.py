"""`tools.step_probe`: the operator counter and the wrappers the host-cost checks rely on."""

from __future__ import annotations

import types

import pytest
import torch

from muon_megatron.tools.step_probe import DispatchCounter, counting_dispatch_in, timing_calls_of


def test_dispatch_counter_counts_one_per_operator_call_views_included() -> None:
    a = torch.ones(3)
    many = [torch.ones(2) for _ in range(10)]
    with DispatchCounter() as counter:
        _ = a + 1
        torch._foreach_mul_(many, 2.0)  # one call over ten tensors: one operator
        _ = a.view(3, 1)
        _ = a[1:]
        _ = a.float()  # already fp32: no operator
    assert counter.counts == {
        "aten.add.Tensor": 1,
        "aten._foreach_mul_.Scalar": 1,
        "aten.view.default": 1,
        "aten.slice.Tensor": 1,
    }
    assert counter.total == 4


def _step(x: torch.Tensor, n: int) -> torch.Tensor:
    for _ in range(n):
        x = x + 1
    return x


def test_counting_dispatch_in_counts_each_call_alone_and_restores_the_name() -> None:
    owner = types.SimpleNamespace(step=_step)
    x = torch.zeros(2)
    with counting_dispatch_in(owner, "step") as calls:
        _ = x * 2  # outside the wrapped function: not counted
        assert torch.equal(owner.step(x, 3), torch.full((2,), 3.0))
        owner.step(x, 1)
    assert [c["aten.add.Tensor"] for c in calls] == [3, 1]
    assert [sum(c.values()) for c in calls] == [3, 1]
    assert owner.step is _step


def test_a_call_that_raises_is_counted_and_the_name_restored() -> None:
    def fails(x: torch.Tensor) -> None:
        _ = x + 1
        raise RuntimeError("boom")

    owner = types.SimpleNamespace(fn=fails)
    with pytest.raises(RuntimeError, match="boom"), counting_dispatch_in(owner, "fn") as calls:
        owner.fn(torch.zeros(1))
    assert [sum(c.values()) for c in calls] == [1]
    assert owner.fn is fails


def test_timing_calls_of_records_one_time_per_call() -> None:
    owner = types.SimpleNamespace(step=_step)
    with timing_calls_of(owner, "step") as seconds:
        owner.step(torch.zeros(1), 2)
        owner.step(torch.zeros(1), 2)
    assert len(seconds) == 2 and all(s >= 0.0 for s in seconds)
    assert owner.step is _step
