"""The checkpoint mixin's per-parameter lookups do not rebuild anything per parameter.

Megatron calls `_get_main_param_and_optimizer_states` / `_set_main_param_and_optimizer_states`
once per parameter while saving and loading. Each of them asks whether the parameter is a Muon
one; if that lookup is built from the optimizer's list of Muon matrices on every call, save and
load are quadratic in the number of matrices (tens of thousands in a Kimi-K2-sized MoE). The
tests count, through wrappers installed here, how often the whole `_matrices` list is iterated.
"""

from __future__ import annotations

import os
import tempfile
from types import SimpleNamespace

import torch

from muon_megatron.optimizer.checkpoint_state import MuonCheckpointMixin
from muon_megatron.runtime.launch import spawn

SHARDINGS = ("fully_reshardable", "dp_reshardable")
# Passes over all of a member's Muon matrices that one save or one load may make, whatever
# the number of matrices: building the parameter -> name map (once per `_matrices` list), and
# the list of names (`_muon_manifest`) that a dp_reshardable load both requests and checks.
MAX_PASSES = 2


def _count_passes(rank: int, world_size: int, num_experts: int) -> dict:
    from muon_megatron.config import MuonConfig
    from muon_megatron.optimizer.builder import muon_optimizers
    from muon_megatron.testing import tiny
    from muon_megatron.training import checkpointing

    counts = {"hooks": 0, "passes": 0}

    class CountingList(list):
        def __iter__(self):
            counts["passes"] += 1
            return super().__iter__()

    def counting(method):
        def wrapper(self, *args, **kwargs):
            counts["hooks"] += 1
            return method(self, *args, **kwargs)

        return wrapper

    for name in ("_get_main_param_and_optimizer_states", "_set_main_param_and_optimizer_states"):
        setattr(MuonCheckpointMixin, name, counting(getattr(MuonCheckpointMixin, name)))

    # SequentialMLP: every expert's fc1 and fc2 is a Muon parameter of its own.
    spec = tiny.ModelSpec(
        hidden_size=32, ffn_hidden_size=64, moe_ffn_hidden_size=32, num_experts=num_experts
    )
    layout = tiny.Layout()
    tiny.initialize_parallel(layout, seed=0)
    model = tiny.build_model(spec, layout)
    optimizer = tiny.build_optimizer(model, tiny.optimizer_config(), MuonConfig(muon_ns_dtype="fp32"))
    tiny.train_step(model, optimizer, tiny.global_batch(0, spec, 2, seed=0), spec, layout, 2)
    members = muon_optimizers(optimizer)
    for member in members:
        member._matrices = CountingList(member._matrices)

    out: dict = {"matrices": sum(len(m._matrices) for m in members)}
    with tempfile.TemporaryDirectory() as root:
        for sharding in SHARDINGS:
            ckpt = os.path.join(root, sharding)
            counts.update(hooks=0, passes=0)
            checkpointing.save_checkpoint(ckpt, model, optimizer, None, 1, sharding)
            out[sharding, "save"] = dict(counts)
            counts.update(hooks=0, passes=0)
            with torch.no_grad():
                checkpointing.load_checkpoint(ckpt, model, optimizer, None)
            out[sharding, "load"] = dict(counts)
    return out


def test_save_and_load_pass_over_the_muon_matrices_a_bounded_number_of_times() -> None:
    """One save and one load, in either sharding type, iterate the list of Muon matrices at
    most MAX_PASSES times each, at 36 and at 132 Muon matrices, while Megatron's per-parameter
    hooks run at least once per Muon matrix (so the hooks' lookups are in what is counted)."""
    small, large = (spawn(_count_passes, 1, experts)[0] for experts in (8, 32))
    assert small["matrices"] == 36 and large["matrices"] == 132
    for counted in (small, large):
        for sharding in SHARDINGS:
            for phase in ("save", "load"):
                seen = counted[sharding, phase]
                where = f"{counted['matrices']} matrices, {sharding} {phase}: {seen}"
                assert seen["hooks"] >= counted["matrices"], where
                assert seen["passes"] <= MAX_PASSES, where
                assert seen["passes"] == small[sharding, phase]["passes"], where


def _matrix(name: str) -> SimpleNamespace:
    return SimpleNamespace(name=name, param=torch.nn.Parameter(torch.zeros(2, 2)))


class _Host(MuonCheckpointMixin):
    """The part of `MuonDistributedOptimizer` that `_muon_names` reads: `_matrices`."""


def test_muon_names_is_built_once_per_matrices_list_and_follows_a_new_list() -> None:
    host = _Host()
    assert host._muon_names() == {}  # before the host has planned: no Muon parameters
    first = [_matrix("a"), _matrix("b")]
    host._matrices = first
    names = host._muon_names()
    assert names == {m.param: m.name for m in first}
    assert host._muon_names() is names
    second = [_matrix("c")]
    host._matrices = second
    assert host._muon_names() == {second[0].param: "c"}
