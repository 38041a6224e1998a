"""optimizer.chain_fit: a checkpoint's chain of optimizers fitted to this run's (EP changes)."""

from __future__ import annotations

from muon_megatron.optimizer.chain_fit import chain_members, match_chain


def _group(expert: bool, lr: float, step: int, wd_mult: float = 1.0) -> dict:
    return {"wd_mult": wd_mult, "lr_mult": 1.0, "is_expert_parallel": expert,
            "is_decoupled_lr": False, "lr": lr, "step": step, "params": []}  # fmt: skip


def _identity(group: dict) -> tuple:
    return (group["wd_mult"], group["lr_mult"], group["is_expert_parallel"], group["is_decoupled_lr"])


def test_one_saved_optimizer_gives_the_new_expert_optimizer_the_dense_groups_of_its_weights() -> None:
    """EP1 -> EP2: every member finds each of its groups by megatron's identifier keys, the
    expert ones carrying the lr and step of the dense group with the same multipliers."""
    saved = {"optimizer": {"param_groups": [_group(False, 0.01, 7), _group(False, 0.02, 7, wd_mult=0.0)]},
             "param_state_sharding_type": "fully_reshardable"}  # fmt: skip
    loaded = {**saved, 0: {"param_state": "dense tensors"}, 1: {"param_state": "expert tensors"}}
    fitted = match_chain(loaded, [0, 1], saved)
    assert sorted(fitted) == [0, 1]
    assert fitted[1]["param_state"] == "expert tensors"
    for member in (0, 1):
        groups = {_identity(g): g for g in fitted[member]["optimizer"]["param_groups"]}
        assert groups[(1.0, 1.0, True, False)]["lr"] == 0.01 and groups[(1.0, 1.0, True, False)]["step"] == 7
        assert groups[(0.0, 1.0, True, False)]["lr"] == 0.02
        assert groups[(1.0, 1.0, False, False)] is saved["optimizer"]["param_groups"][0]
        assert fitted[member]["param_state_sharding_type"] == "fully_reshardable"


def test_two_saved_optimizers_pool_their_groups_for_one() -> None:
    """EP2 -> EP1: the one member gets the groups of both, its own tensors kept."""
    saved = {0: {"optimizer": {"param_groups": [_group(False, 0.01, 7)]}},
             1: {"optimizer": {"param_groups": [_group(True, 0.01, 7)]}}}  # fmt: skip
    loaded = {**saved, "param_state": "tensors"}
    fitted = match_chain(loaded, [], saved)
    assert fitted["param_state"] == "tensors" and not chain_members(fitted)
    assert sorted(_identity(g)[2] for g in fitted["optimizer"]["param_groups"]) == [False, True]


def test_matching_chains_are_left_as_loaded() -> None:
    saved = {0: {"optimizer": {"param_groups": []}}, 1: {"optimizer": {"param_groups": []}}}
    loaded = {0: {"x": 1}, 1: {"x": 2}}
    assert match_chain(loaded, [0, 1], saved) is loaded
