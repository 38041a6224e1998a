"""Fit a checkpoint's chain of optimizers to this run's when the expert-parallel size changed.

Megatron builds a separate expert optimizer only when a run has expert-parallel weights:
EP2 (any EP > 1) has a `ChainedOptimizer` of two members (dense, expert), EP1 one. A
`fully_reshardable` checkpoint's tensors are in model space and load under any layout, but
its common state (each member's `param_groups`: lr, weight decay, AdamW's `step`) keeps the
saving chain's shape, and megatron-core's `ChainedOptimizer.load_state_dict` and
`DistributedOptimizer.load_state_dict` expect this run's: EP1 -> EP2 stopped in
`KeyError: (1.0, 1.0, True, False)`, megatron's lookup of a param group by
`param_group_identifier_keys` (wd_mult, lr_mult, is_expert_parallel, is_decoupled_lr).

`match_chain` pools the saved members' param groups and hands every member of this run the
whole pool, so each finds its own by those keys. Going from one member to two (EP1 -> EP2),
the expert groups are not in the checkpoint: in an EP1 run the expert weights are in the
dense optimizer's groups with the same lr and wd multipliers, stepped by the same steps, so
each missing expert group is that dense group with `is_expert_parallel` set (lr, weight
decay and step are the dense group's, as they were for those weights when saved).

Used by both entries: `training.checkpointing.load_checkpoint` and, under Megatron-LM, the
load hook of `megatron_lm.checkpoints`, which calls it on what Megatron-LM's own
`load_checkpoint` passes to `optimizer.load_state_dict`.
"""

from __future__ import annotations

from typing import Any

from megatron.core.optimizer.optimizer import param_group_identifier_keys

__all__ = ["match_chain", "chain_members"]

_EXPERT_KEY = "is_expert_parallel"


def chain_members(state_dict: dict) -> list:
    """Member keys of a ChainedOptimizer state dict ({0: ..., 1: ...}); [] for one member."""
    return sorted(k for k in state_dict if isinstance(k, int))


def _identity(group: dict) -> tuple:
    return tuple(group.get(k, group.get(f"pre_{k}")) for k in param_group_identifier_keys)


def _with_expert_counterparts(groups: list[dict]) -> list[dict]:
    """`groups` plus, for each group without an expert-parallel twin, the twin: the same
    group with `is_expert_parallel` True (what an EP1 run's dense group was for its experts)."""
    have = {_identity(g) for g in groups}
    twins = []
    for group in groups:
        if _EXPERT_KEY not in group or group[_EXPERT_KEY]:
            continue
        twin = {**group, _EXPERT_KEY: True}
        if _identity(twin) not in have:
            have.add(_identity(twin))
            twins.append(twin)
    return groups + twins


def match_chain(loaded: dict, run_members: list, saved_common: dict) -> dict:
    """Fit the checkpoint's per-member common state to this run's chain of optimizers.

    `loaded` is the optimizer part of what dist_checkpointing returned for this run's request
    (tensors in this run's member structure, merged with the saved common state);
    `run_members` this run's member keys (`chain_members` of its sharded state dict: [] for
    one member); `saved_common` the optimizer part of the checkpoint's common state. The
    param groups of all saved members are pooled (expert twins added, see the module
    docstring) and given to every member. Returns `loaded` itself when the chains match."""
    saved = chain_members(saved_common)
    if run_members == saved:
        return loaded
    saved_members = [saved_common[k] for k in saved] or [saved_common]
    groups = [g for member in saved_members for g in member["optimizer"]["param_groups"]]
    if len(run_members) > max(len(saved), 1):
        groups = _with_expert_counterparts(groups)
    common: dict[str, Any] = {k: v for k, v in saved_members[0].items() if not isinstance(k, int)}
    common["optimizer"] = {**common["optimizer"], "param_groups": groups}
    if not run_members:
        own = {k: v for k, v in loaded.items() if not isinstance(k, int) and k not in common}
        return {**own, **common}
    return {k: {**loaded[k], **common} for k in run_members}
