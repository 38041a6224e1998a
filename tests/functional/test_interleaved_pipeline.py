"""An interleaved pipeline (virtual pipeline stages) against the single-device reference.

PP2 with two virtual stages per rank, x DP2 (world 4): every rank holds two model chunks of
one layer each (PP rank 0 layers 0 and 2, PP rank 1 layers 1 and 3), run by megatron-core's
interleaved schedule, and one Muon optimizer per rank over both chunks' buffers. Both chunks
of a rank have a `decoder.layers.0`: the plan names them by global layer, and the
Newton-Schulz accounting below (keyed by grid and name) would count a shared name twice.
`verify.run_verify` trains it and the reference from the same weights on the same batches.
Bitwise resume and resharding at this layout: tests/functional/test_checkpoint.py; the
planner at this layout: tests/functional/test_planner.py.
"""

from __future__ import annotations

from collections import Counter

import pytest

from muon_megatron.config import MuonConfig
from muon_megatron.runtime.launch import spawn
from muon_megatron.testing import tiny
from muon_megatron.tools.verify import VerifySpec, run_verify

STEPS = 4
LAYOUT = tiny.Layout(pp=2, vpp=2)


@pytest.fixture(scope="module")
def vpp_run() -> dict:
    spec = VerifySpec(layout=LAYOUT, dp=2, steps=STEPS)
    assert spec.model_spec().num_layers == 4 and spec.world_size == 4
    return run_verify(spec, MuonConfig(muon_ns_dtype="fp32"))


def test_pp2xvpp2_fp32_parity_with_reference(vpp_run: dict, assert_fp32_parity) -> None:
    """Each family within NOISE_GAIN x the run's own measured fp32 noise (verify.py)."""
    assert_fp32_parity(vpp_run)
    assert vpp_run["layout"] == "TP1xDP2xPP2xVPP2xEP1"
    assert len(vpp_run["dist_losses"]) == STEPS


def test_pp2xvpp2_newton_schulz_runs_once_per_logical_matrix(vpp_run: dict) -> None:
    """Summed over all ranks, every logical matrix of the plans went through Newton-Schulz
    exactly once per step, and the plans hold as many logical matrices as the reference
    counts on one device: 4 layers x (Q,K,V + proj + gate,up + fc2) = 28."""
    counted: Counter = Counter()
    for per_rank in vpp_run["ns_counts_per_rank"]:
        counted.update(per_rank)
    planned = set().union(*vpp_run["planned_matrices_per_rank"])
    assert len(planned) == vpp_run["ref_logical_matrices"] == 28
    assert counted == Counter({key: STEPS for key in planned})


def _chunks_rank(rank: int, world: int) -> dict:
    from muon_megatron.optimizer.builder import muon_optimizers

    tiny.initialize_parallel(LAYOUT, seed=0)
    spec = tiny.ModelSpec(num_layers=4)
    model = tiny.build_model(spec, LAYOUT)
    optimizer = tiny.build_optimizer(model, tiny.optimizer_config(), MuonConfig())
    [member] = muon_optimizers(optimizer)
    return {
        "chunks": len(model),
        "local": sorted(m.local_name for m in member._matrices),
        "names": sorted(member.owners),
    }


def test_a_ranks_chunks_repeat_local_names_and_the_plan_keys_them_by_global_layer() -> None:
    """What the plan must tell apart: the two chunks of a rank share every chunk-local
    name; the plan's names (owners' keys) are the global layers of the rank's chunks."""
    out = spawn(_chunks_rank, 2)
    for pp_rank, got in enumerate(out):
        assert got["chunks"] == 2
        assert len(set(got["local"])) == 4 and len(got["local"]) == 8, got["local"]
        layers = {name.split(".")[2] for name in got["names"]}
        assert layers == {str(pp_rank), str(pp_rank + 2)} and len(got["names"]) == 8, got
