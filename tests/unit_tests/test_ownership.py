"""Owner assignment: deterministic, every job owned once, balanced by Newton-Schulz cost."""

from __future__ import annotations

import random

import pytest

from muon_megatron.ops.newton_schulz import ns_flops
from muon_megatron.optimizer.ownership import LOCALITY_SLACK, assign_owners, load_per_rank

# Issue target: the busiest rank does at most 15% more Newton-Schulz work than the mean.
MAX_OVER_MEAN = 1.15


def _moonlight_like_shapes() -> list[tuple[int, int]]:
    """Matrices of one DeepSeek-style MoE block stack (hidden 2048, 64 experts of 1408,
    attention and shared experts): many similar matrices plus a few big ones."""
    shapes = []
    for _ in range(4):  # layers
        shapes += [(2048, 2048)] * 4  # q, k, v, proj-like
        shapes += [(1408, 2048)] * 2 * 64 + [(2048, 1408)] * 64  # experts gate/up, down
        shapes += [(2816, 2048)] * 2 + [(2048, 2816)]  # shared experts
    return shapes


def _moonlight_like_costs() -> list[float]:
    return [float(ns_flops(r, c, 5)) for r, c in _moonlight_like_shapes()]


def _contiguous_holders(sizes: list[int], ranks: int) -> list[dict[int, int]]:
    """Elements of each matrix per rank when one flat buffer of them is cut into `ranks`
    equal contiguous ranges, as Megatron's ZeRO-1 shards a gradient bucket."""
    per_rank = -(-sum(sizes) // ranks)
    held, offset = [], 0
    for size in sizes:
        spans = {r: min(offset + size, (r + 1) * per_rank) - max(offset, r * per_rank)
                 for r in range(ranks)}
        held.append({r: n for r, n in spans.items() if n > 0})
        offset += size
    return held


@pytest.mark.parametrize("ranks", [2, 4, 8, 16])
def test_assignment_balanced_on_moe_shapes(ranks: int) -> None:
    costs = _moonlight_like_costs()
    owners = assign_owners(costs, ranks)
    load = load_per_rank(costs, owners, ranks)
    mean = sum(load) / ranks
    assert max(load) / mean <= MAX_OVER_MEAN, load


@pytest.mark.parametrize("ranks", [2, 3])
def test_plain_lpt_stays_within_grahams_bound_of_the_optimal_assignment(ranks: int) -> None:
    """Every owner is a rank in range, and the busiest rank's load is at most
    (4/3 - 1/(3m)) of the best assignment's, found here by trying all m^8 of them."""
    import itertools

    rng = random.Random(ranks)
    for _ in range(5):
        costs = [float(rng.randint(1, 100)) for _ in range(8)]
        owners = assign_owners(costs, ranks)
        assert all(0 <= o < ranks for o in owners), owners
        best = min(
            max(load_per_rank(costs, choice, ranks))
            for choice in itertools.product(range(ranks), repeat=len(costs))
        )
        bound = (4 / 3 - 1 / (3 * ranks)) * best
        assert max(load_per_rank(costs, owners, ranks)) <= bound, (costs, owners, best)


def test_a_locality_owner_never_pushes_its_load_past_the_slack() -> None:
    """With `held`, a job goes to a rank holding it only while that rank stays within
    LOCALITY_SLACK of the mean: here every job is held by rank 0 alone, so rank 0 takes
    jobs up to the cap and plain LPT places the rest."""
    costs = [float(c) for c in range(1, 21)]
    held = [{0: 10}] * len(costs)
    owners = assign_owners(costs, 4, held)
    load = load_per_rank(costs, owners, 4)
    assert load[0] <= (1 + LOCALITY_SLACK) * sum(costs) / 4, load
    assert owners.count(0) < len(costs) and max(load) / (sum(costs) / 4) <= MAX_OVER_MEAN, load


def test_owners_follow_a_permutation_of_the_jobs() -> None:
    """Every rank computes the plan from its own list of matrices. Jobs are taken by
    decreasing cost, equal costs in list order, so a permutation can only reorder jobs of
    equal cost: the invariance is that, per cost, the owners of that cost's jobs in list
    order are the same sequence. So a job of unique cost keeps its owner, wherever it is, and
    every rank's load is the same."""
    import itertools

    costs = [7.5, 3.0, 3.0, 2.0, 2.0, 2.0, 1.0]
    owners = assign_owners(costs, 3)
    assert len(set(owners)) == 3  # every rank owns something: the check can see a swap

    def owners_by_cost(costs: list[float], owners: list[int]) -> dict[float, list[int]]:
        out: dict[float, list[int]] = {}
        for cost, owner in zip(costs, owners):
            out.setdefault(cost, []).append(owner)
        return out

    expected = owners_by_cost(costs, owners)
    for perm in itertools.permutations(range(len(costs))):
        permuted = [costs[i] for i in perm]
        permuted_owners = assign_owners(permuted, 3)
        assert owners_by_cost(permuted, permuted_owners) == expected, perm
        for i, job in enumerate(perm):
            if costs.count(costs[job]) == 1:
                assert permuted_owners[i] == owners[job], (perm, job)
        assert load_per_rank(permuted, permuted_owners, 3) == load_per_rank(costs, owners, 3)
    # LPT on this instance is optimal: loads 7.5, 7, 6 -> makespan 7.5 (the largest job).
    assert max(load_per_rank(costs, owners, 3)) == 7.5


def test_assignment_is_the_same_in_every_process() -> None:
    """Ranks are separate processes (other hash seeds, other allocation orders): the owners
    of the same list must be identical, or two ranks would disagree on who owns a matrix."""
    import subprocess
    import sys

    costs = [3.0, 3.0, 2.0, 2.0, 2.0, 1.0, 7.5, 0.25]
    holders = [{0: 1}, {}, {1: 2, 2: 2}, {}, {2: 1}, {}, {0: 3, 1: 3}, {}]
    code = (
        "from muon_megatron.optimizer.ownership import assign_owners; "
        f"print(assign_owners({costs!r}, 3, {holders!r}))"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True,
            env={"PYTHONHASHSEED": seed, "PYTHONPATH": ":".join(sys.path)},
        ).stdout.strip()
        for seed in ("0", "1", "12345")
    }  # fmt: skip
    assert outputs == {str(assign_owners(costs, 3, holders))}


def test_single_rank_owns_everything() -> None:
    assert assign_owners([5.0, 1.0, 2.0], 1) == [0, 0, 0]


def test_bad_rank_count_raises() -> None:
    with pytest.raises(ValueError, match="num_ranks=0"):
        assign_owners([1.0], 0)


@pytest.mark.parametrize("ranks", [2, 4, 8, 16])
def test_locality_keeps_matrices_where_their_shards_are(ranks: int) -> None:
    # Measured local fraction with locality: 1.0 (2-8 ranks), 0.999 (16); plain LPT leaves
    # only ~1/ranks of the elements where they are. Balance measured <= 1.036.
    shapes = _moonlight_like_shapes()
    costs = _moonlight_like_costs()
    held = _contiguous_holders([r * c for r, c in shapes], ranks)
    owners = assign_owners(costs, ranks, held)
    load = load_per_rank(costs, owners, ranks)
    assert max(load) / (sum(load) / ranks) <= MAX_OVER_MEAN, load
    local = sum(h.get(o, 0) for h, o in zip(held, owners)) / sum(r * c for r, c in shapes)
    plain = assign_owners(costs, ranks)
    plain_local = sum(h.get(o, 0) for h, o in zip(held, plain)) / sum(r * c for r, c in shapes)
    assert local >= 0.99, local
    assert plain_local <= 1.5 / ranks, plain_local


def test_locality_yields_to_balance() -> None:
    # Rank 0 holds every job; taking them all would put the whole load on it. Each job may
    # stay local only while rank 0's load is within LOCALITY_SLACK of the mean (8).
    owners = assign_owners([4.0] * 4, 2, [{0: 10}] * 4)
    assert load_per_rank([4.0] * 4, owners, 2) == [8.0, 8.0]
    assert owners == [0, 0, 1, 1]


def test_locality_prefers_the_rank_holding_most() -> None:
    held = [{0: 3, 1: 7}, {0: 9, 2: 1}, {2: 5}]
    assert assign_owners([1.0, 1.0, 1.0], 3, held, slack=0.0) == [1, 0, 2]


def _textbook_lpt(costs: list[float], ranks: int) -> list[int]:
    """Graham's LPT written out plainly: jobs by decreasing cost (ties: list order), each to
    the least-loaded rank (ties: the lowest rank)."""
    owners, loads = [0] * len(costs), [0.0] * ranks
    for job in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        rank = min(range(ranks), key=lambda r: (loads[r], r))
        owners[job] = rank
        loads[rank] += costs[job]
    return owners


@pytest.mark.parametrize("ranks", [3, 4, 8])
def test_without_holders_it_is_plain_lpt(ranks: int) -> None:
    rng = random.Random(ranks)
    # Random costs with repeats (ties), and the MoE-like shapes (many equal costs).
    for costs in ([float(rng.randint(1, 20)) for _ in range(41)], _moonlight_like_costs()):
        lpt = _textbook_lpt(costs, ranks)
        assert assign_owners(costs, ranks) == lpt
        assert assign_owners(costs, ranks, [{}] * len(costs)) == lpt


def test_locality_slack_stays_inside_the_balance_bound() -> None:
    """The constants' contract: preferring a holder may cost at most LOCALITY_SLACK of the
    mean load, which must leave the MAX_OVER_MEAN balance bound intact."""
    assert 0 < LOCALITY_SLACK <= MAX_OVER_MEAN - 1


def test_holders_must_match_jobs() -> None:
    with pytest.raises(ValueError, match="held has 1 entries for 2 jobs"):
        assign_owners([1.0, 2.0], 2, [{0: 1}])
