"""The cost model's parts on hand-made cases whose answer is known without it."""

from __future__ import annotations

import argparse

import pytest

from muon_megatron.costmodel.alternatives import ring_seconds
from muon_megatron.costmodel.events import issue_order, simulate
from muon_megatron.costmodel.hardware import PRESETS, add_hardware_args, hardware_from_args
from muon_megatron.costmodel.layout import RankLayout


def _one_grid(ranks: int) -> list[list[tuple[int, int]]]:
    return [[(0, r)] for r in range(ranks)]


def _run(ns: list[list[float]], collective: float = 0.0):
    """One grid of len(ns[0]) ranks that all exchange with each other in every exchange (one
    connected set); bucket k costs ns[k][g] seconds of Newton-Schulz on g."""
    trace, member_of = issue_order([len(ns)])
    ranks = list(range(len(ns[0])))
    return simulate(
        trace,
        member_of,
        _one_grid(len(ns[0])),
        lambda kind, k, g: ns[k][g] if kind == "ns" else 0.0,
        lambda kind, k, instance: [(ranks, collective)],
    )


def test_in_order_collectives_let_two_buckets_work_at_once() -> None:
    # Bucket k has one owner, rank k. gather(k+2) is issued after scatter(k), which needs
    # every rank's Newton-Schulz of bucket k: so buckets run two at a time, 2 s for 4.
    timeline = _run([[1.0 if g == k else 0.0 for g in range(4)] for k in range(4)])
    assert timeline.ideal == 1.0
    assert timeline.ns_critical_path == 2.0


def test_buckets_that_keep_every_owner_busy_reach_the_ideal() -> None:
    timeline = _run([[1.0] * 4 for _ in range(4)])
    assert timeline.ideal == 4.0
    assert timeline.ns_critical_path == 4.0


def test_a_collective_starts_when_the_previous_one_on_its_communicator_ends() -> None:
    # One bucket: gather (c) -> Newton-Schulz (1) -> scatter (c): the step is 2c + 1.
    c = 0.25
    timeline = _run([[1.0, 1.0]], collective=c)
    assert timeline.step == pytest.approx(2 * c + 1.0)
    # Two buckets: gather(1) queues behind gather(0) and runs during Newton-Schulz(0);
    # scatter(0) and scatter(1) follow in order.
    timeline = _run([[1.0, 1.0], [1.0, 1.0]], collective=c)
    assert timeline.step == pytest.approx(c + 2.0 + c)


def test_owners_with_nothing_to_exchange_wait_for_nobody() -> None:
    # The two-at-a-time buckets, but every owner holds its whole matrix: no transfers, so
    # no rank waits for another and the four run at once.
    ns = [[1.0 if g == k else 0.0 for g in range(4)] for k in range(4)]
    trace, member_of = issue_order([4])
    timeline = simulate(
        trace, member_of, _one_grid(4),
        lambda kind, k, g: ns[k][g] if kind == "ns" else 0.0,
        lambda kind, k, instance: [],
    )
    assert timeline.ns_critical_path == 1.0


def test_a_rank_waits_for_a_peer_whose_stream_is_busy() -> None:
    # Bucket 2's gather links ranks 0 and 1. Rank 0 issues it after its 1 s of Newton-Schulz
    # on bucket 0 (gather(k+2) comes after NS(k) in the issue order), so its input is ready
    # at 1 s and rank 1's bucket 2 runs from 1 s to 2 s, though rank 1 is idle before.
    ns = [[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]
    trace, member_of = issue_order([3])
    links = {("gather", 2): [([0, 1], 0.0)]}
    timeline = simulate(
        trace, member_of, _one_grid(2),
        lambda kind, k, g: ns[k][g] if kind == "ns" else 0.0,
        lambda kind, k, instance: links.get((kind, k), []),
    )
    assert (timeline.ideal, timeline.ns_critical_path) == (1.0, 2.0)


def test_issue_order_interleaves_the_chain_bucket_by_bucket() -> None:
    trace, member_of = issue_order([3, 1])
    assert member_of == [0, 1, 0, 0]
    assert trace[:3] == [("gather_issue", 0), ("gather_wait", 0), ("gather_issue", 1)]
    assert sum(1 for event, _ in trace if event == "ns_begin") == 4


def test_ring_all_gather_pays_latency_per_step_and_bandwidth_per_byte() -> None:
    hw = PRESETS["h100-sxm"]
    one_node = tuple(range(8))
    two_nodes = tuple(range(16))
    nbytes = 1e9
    expected = (hw.collective_latency_us + 7 * hw.peer_latency_us) * 1e-6 + nbytes * 7 / 8 / (
        hw.nvlink_gbps * 1e9 * hw.link_efficiency
    )
    assert ring_seconds(nbytes, one_node, hw) == pytest.approx(expected)
    assert ring_seconds(nbytes, two_nodes, hw) > ring_seconds(nbytes, one_node, hw)
    assert ring_seconds(nbytes, (3,), hw) == 0.0


def test_hardware_flags_override_the_preset_and_refuse_nonsense() -> None:
    parser = argparse.ArgumentParser()
    add_hardware_args(parser)
    hw = hardware_from_args(parser.parse_args(["--gpu", "h200", "--gpu-ib-gbps", "100"]))
    assert (hw.name, hw.ib_gbps, hw.hbm_gib) == ("H200 SXM", 100.0, 141.0)
    assert hardware_from_args(parser.parse_args([])) == PRESETS["h100-sxm"]
    for bad in ("0", "-1", "nan", "inf"):
        with pytest.raises(ValueError, match="gpu-mfu"):
            hardware_from_args(parser.parse_args(["--gpu-mfu", bad]))


def test_rank_layout_follows_megatron_cores_order() -> None:
    # 16 ranks, TP2 PP2 EP2: DP 4 per stage, expert DP 2 (order tp-cp-ep-dp-pp).
    layout = RankLayout.of(16, tp=2, pp=2, ep=2)
    assert layout.stages == [list(range(8)), list(range(8, 16))]
    assert layout.dense_tp[5] == [4, 5]
    assert [0, 1, 2, 3, 4, 5, 6, 7] in layout.dense_grids
    # EP is inside DP: ranks 0,1 (EP 0) and 2,3 (EP 1), then the next DP block.
    assert [0, 1, 4, 5] in layout.expert_grids and [2, 3, 6, 7] in layout.expert_grids
    placement = layout.placement(0, [False, True])
    assert placement[2] == [(0, 2), (layout.expert_grids.index([2, 3, 6, 7]), 0)]
    with pytest.raises(ValueError, match="not a multiple"):
        RankLayout.of(12, tp=8, pp=1)
