"""How Muon's optimizer state travels through megatron-core's distributed checkpointing.

`MuonCheckpointMixin` is mixed into `MuonDistributedOptimizer` ahead of Megatron's
`DistributedOptimizer`. It overrides only the hooks where a Muon shard differs from an AdamW
shard, so Megatron's own `sharded_state_dict` / `load_state_dict` (the calls a Megatron
training loop makes) save and load Muon momentum next to the AdamW state.

In memory a Muon shard's state is `{'exp_avg': momentum}` (fp32; the same EMA as Adam's first
moment), with no `exp_avg_sq` and no `step`. In a checkpoint its momentum is stored under its
own state key, `muon_momentum`, so that a checkpoint says which parameters were Muon
parameters and a momentum can never be mistaken for an Adam moment (see docs/checkpoints.md):

  fully_reshardable  model space, one tensor per parameter and state key:
                     `optimizer.state.param.<param key>` for every parameter, then
                     `optimizer.state.exp_avg.<key>` + `optimizer.state.exp_avg_sq.<key>` for an
                     AdamW parameter or `optimizer.state.muon_momentum.<key>` for a Muon one.
  dp_reshardable     bucket space, one flat tensor per bucket and state key:
                     `<bucket>.param` exactly as Megatron writes it; in a bucket holding Muon
                     parameters `<bucket>.exp_avg` / `<bucket>.exp_avg_sq` run over the AdamW
                     parameters only and `<bucket>.muon_momentum` over the Muon ones, each
                     packed in bucket order (a bucket without Muon parameters is written
                     exactly as Megatron writes it). A per-DP-group ShardedObject
                     `...dp_group_idx_<i>.muon_params` lists the Muon parameters; loading
                     checks it before any state is applied. `checkpoint_packing` packs.

Other sharding types (Megatron's deprecated `dp_zero_gather_scatter`,
`fully_sharded_model_space`, FSDP's `fsdp_dtensor`) raise NotImplementedError.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence

import torch
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.optimizer import distrib_optimizer as _megatron_distrib_optimizer

from muon_megatron.optimizer.checkpoint_packing import bucket_spans, pack_bucket_state

__all__ = ["MuonCheckpointMixin", "reading_adamw_checkpoint", "MUON_MOMENTUM", "MUON_MANIFEST", "SHARDING_TYPES"]

MUON_MOMENTUM = "muon_momentum"
"""State key of a Muon parameter's momentum in a checkpoint."""
MUON_MANIFEST = "muon_params"
"""Optimizer state-dict key of the list of Muon parameters (dp_reshardable)."""
SHARDING_TYPES = ("fully_reshardable", "dp_reshardable")
_ADAM_KEYS = ("exp_avg", "exp_avg_sq")


class MuonCheckpointMixin:
    """Muon shards in Megatron's `DistributedOptimizer` checkpoint paths.

    Needs the host class to provide `_matrices` (each with `.param` and `.name`), as
    `MuonDistributedOptimizer` does, assigned as a whole (a new list for a new plan), never
    edited in place. Momentum is copied, never recomputed: save and load are bitwise for both
    sharding types.
    """

    _muon_gather_as_adam: bool = False
    _reading_adamw_checkpoint: bool = False
    """Set by `reading_adamw_checkpoint`: the checkpoint being loaded was written by AdamW,
    so Muon parameters request AdamW's layout and take their momentum from `exp_avg`."""
    _muon_names_cache: tuple[Sequence, dict[torch.nn.Parameter, str]] | None = None
    """`_muon_names`' map and the `_matrices` list it was built from."""
    _steps_taken: int = 0
    """Optimizer steps of this member; what a checkpoint records as its AdamW 'step' when
    the member has no AdamW shard (an MoE expert optimizer is all Muon)."""

    # ------------------------------------------------------------------ bookkeeping
    def _muon_names(self) -> dict[torch.nn.Parameter, str]:
        """Each Muon parameter of this optimizer mapped to its name, in `_matrices` order.

        Built on the first call after `_matrices` is assigned; later calls return the same
        dict (callers only read it) until `_matrices` holds another list. Megatron calls the
        per-parameter hooks below once per parameter: a map rebuilt in each call made save and
        load quadratic in the number of Muon matrices (tens of thousands in a Kimi-K2-sized MoE).
        """
        matrices = getattr(self, "_matrices", ())
        cached = self._muon_names_cache
        # Keyed on the identity of the list `_matrices` holds now (the cache keeps that list
        # alive, so `is` cannot match a new list at a recycled address). The host assigns a
        # new list whenever it plans (`[]`, then the plan) and never edits one in place, so a
        # map built from the list the attribute holds now is the map of the current plan,
        # whatever the order in which the host's attributes were created.
        if cached is None or cached[0] is not matrices:
            cached = (matrices, {m.param: m.name for m in matrices})
            self._muon_names_cache = cached
        return cached[1]

    def _main_param_and_state(self, model_param: torch.nn.Parameter) -> tuple[torch.Tensor, dict]:
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        return main_param, self.optimizer.state[main_param]

    def _muon_states(self) -> list[dict]:
        """This rank's Muon shard states, each reduced to `{'exp_avg'}`.

        Megatron's load path allocates AdamW slots (`exp_avg_sq`, `step`) for every shard;
        they are dropped here. A missing momentum is created as zeros: that is the momentum
        of a parameter that has not stepped yet, not a fallback for lost state.
        """
        states = []
        for param in self._muon_names():
            if param not in self.model_param_group_index_map:
                continue
            main_param, state = self._main_param_and_state(param)
            for key in [k for k in state if k != "exp_avg"]:
                del state[key]
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(main_param, dtype=torch.float32)
            states.append(state)
        return states

    def _muon_manifest(self) -> list[str]:
        return [m.name for m in getattr(self, "_matrices", ())]

    # ------------------------------------------------------------------ per-param state
    def _get_main_param_and_optimizer_states(self, model_param):
        if model_param not in self._muon_names():
            return super()._get_main_param_and_optimizer_states(model_param)
        main_param, state = self._main_param_and_state(model_param)
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(main_param, dtype=torch.float32)
        if self._reading_adamw_checkpoint:
            # AdamW's layout, to receive an AdamW checkpoint: exp_avg lands in the momentum,
            # exp_avg_sq in scratch that _set_main_param_and_optimizer_states drops.
            return {
                "param": main_param,
                "exp_avg": state["exp_avg"],
                "exp_avg_sq": torch.empty_like(main_param, dtype=torch.float32),
            }
        if self._muon_gather_as_adam:
            # Megatron's DP gather (get_parameter_state_dp_zero) packs exactly the keys
            # param/exp_avg/exp_avg_sq into per-buffer world tensors. The momentum rides in
            # the exp_avg slot; the zero exp_avg_sq slot is dropped before anything is
            # written (sharded_param_state_fully_reshardable below).
            return {"param": main_param, "exp_avg": state["exp_avg"], "exp_avg_sq": main_param.new_zeros(())}
        return {"param": main_param, MUON_MOMENTUM: state["exp_avg"]}

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        names = self._muon_names()
        if model_param not in names:
            if MUON_MOMENTUM in tensors:
                raise RuntimeError(
                    f"{self._param_label(model_param)} is an AdamW parameter in this run but the "
                    "checkpoint holds Muon momentum for it: it was saved with a different Muon "
                    "parameter set. Build the optimizer with the routing (is_muon) of the run "
                    "that saved it, or load through muon_megatron.training.checkpointing.load_checkpoint, "
                    "which converts a whole-run optimizer switch."
                )
            return super()._set_main_param_and_optimizer_states(model_param, tensors)
        if MUON_MOMENTUM not in tensors and self._reading_adamw_checkpoint:
            # AdamW -> Muon: Muon's momentum is the same EMA of gradients as AdamW's exp_avg
            # (m <- mu*m + (1-mu)*g with mu = beta1), so it carries over as it is.
            tensors = {"param": tensors["param"], MUON_MOMENTUM: tensors["exp_avg"]}
        if MUON_MOMENTUM not in tensors:
            raise RuntimeError(
                f"{names[model_param]}: the checkpoint has no Muon momentum for this Muon "
                f"parameter (it holds {sorted(k for k in tensors if k != 'padding')}). Build the "
                "optimizer with the routing (is_muon) of the run that saved it; to start Muon "
                "from an AdamW checkpoint load it with muon_megatron.training.checkpointing.load_checkpoint."
            )
        main_param, _ = self._main_param_and_state(model_param)
        with torch.no_grad():
            main_param.copy_(tensors["param"])
        state = self.optimizer.state[main_param]
        momentum = state.get("exp_avg")
        if momentum is None or momentum.dtype != torch.float32:
            momentum = state["exp_avg"] = torch.empty_like(main_param, dtype=torch.float32)
        with torch.no_grad():
            momentum.copy_(tensors[MUON_MOMENTUM])
        for key in [k for k in state if k != "exp_avg"]:
            del state[key]

    def _param_label(self, model_param) -> str:
        with contextlib.suppress(Exception):
            return self._param_name(model_param)
        return f"parameter of shape {tuple(model_param.shape)}"

    # ------------------------------------------------------------------ non-tensor state
    def step_with_ready_grads(self) -> bool:
        success = super().step_with_ready_grads()
        self._steps_taken += int(success)
        return success

    def state_dict(self):
        muon_states = self._muon_states()
        if _megatron_distrib_optimizer.HAVE_APEX_OR_TE or not muon_states:
            return super().state_dict()
        # Without apex/TE, Megatron reads torch AdamW's per-param 'step' from *every* state
        # and asserts a single value (distrib_optimizer.py 639-642). Muon shards have no step:
        # lend them AdamW's for the duration of the call (or this member's own step count
        # when it has no AdamW shard: ChainedOptimizer asserts its members agree).
        steps = [s["step"] for s in self.optimizer.state.values() if "step" in s]
        lent = steps[0].clone() if steps else torch.tensor(float(self._steps_taken))
        for state in muon_states:
            state["step"] = lent
        try:
            return super().state_dict()
        finally:
            for state in muon_states:
                state.pop("step", None)

    def load_state_dict(self, state_dict):
        if MUON_MANIFEST in state_dict:
            state_dict = dict(state_dict)
            self._check_muon_manifest(state_dict.pop(MUON_MANIFEST))
        super().load_state_dict(state_dict)
        steps = {float(g["step"]) for g in state_dict["optimizer"]["param_groups"] if "step" in g}
        if len(steps) == 1:
            self._steps_taken = int(steps.pop())
        self._muon_states()

    def _check_muon_manifest(self, saved: list[str]) -> None:
        mine = self._muon_manifest()
        if list(saved) == mine:
            return
        only_saved = sorted(set(saved) - set(mine))
        only_mine = sorted(set(mine) - set(saved))
        raise ValueError(
            "the checkpoint was saved with a different Muon parameter set: "
            f"Muon there but not here: {only_saved or 'none'}; Muon here but not there: "
            f"{only_mine or 'none'}"
            + ("" if only_saved or only_mine else "; same parameters in a different order")
            + ". Build the optimizer with the routing (is_muon) of the run that saved it."
        )

    # ------------------------------------------------------------------ sharded state dicts
    def sharded_state_dict(
        self, model_sharded_state_dict=None, is_loading=False, sharding_type=None, metadata=None
    ):
        kind = sharding_type or (metadata or {}).get(
            "distrib_optim_sharding_type", "fully_sharded_model_space"
        )
        if kind not in SHARDING_TYPES:
            raise NotImplementedError(
                f"distrib_optim_sharding_type={kind!r} is not supported with Muon; use one of "
                f"{SHARDING_TYPES} (metadata={{'distrib_optim_sharding_type': ...}})."
            )
        state_dict = super().sharded_state_dict(
            model_sharded_state_dict if model_sharded_state_dict is not None else {},
            is_loading,
            sharding_type,
            metadata,
        )
        if kind == "dp_reshardable" and not self._reading_adamw_checkpoint:
            state_dict[MUON_MANIFEST] = ShardedObject(
                f"optimizer.distributed.dp_group_idx_{self.data_parallel_group_idx}.{MUON_MANIFEST}",
                self._muon_manifest(),
                (1,),
                (0,),
                replica_id=(self.distributed_optimizer_instance_id, 0, self.data_parallel_group.rank()),
            )
        return state_dict

    def sharded_param_state_fully_reshardable(self, model_sharded_state_dict, is_loading=False, metadata=None):
        with self._gathering_momentum_as_adam():
            state = super().sharded_param_state_fully_reshardable(
                model_sharded_state_dict, is_loading, metadata
            )
        if state is None:  # memory-efficient save: DP ranks > 0 hold nothing
            return None
        if self._reading_adamw_checkpoint:
            return state
        muon = self._muon_names()
        kinds: dict[str, set[bool]] = {}
        for param_idx, model_param in enumerate(self._params_in_checkpoint_order()):
            key = state[param_idx]["param"].key
            kinds.setdefault(key, set()).add(model_param in muon)
            if len(kinds[key]) > 1:
                raise ValueError(
                    f"{key}: Muon for some layers and AdamW for others. Megatron stacks the "
                    "layers of a block into one checkpoint tensor, so the routing (is_muon) "
                    "must not depend on the layer number."
                )
            if model_param not in muon:
                continue
            tensors = state[param_idx]
            del tensors["exp_avg_sq"]
            exp_avg = tensors.pop("exp_avg")
            tensors[MUON_MOMENTUM] = dataclasses.replace(
                exp_avg, key=_rename_state(exp_avg.key, "exp_avg", MUON_MOMENTUM)
            )
        return state

    def sharded_param_state_dp_reshardable(self, model_sharded_state_dict, is_loading=False, metadata=None):
        state = super().sharded_param_state_dp_reshardable(model_sharded_state_dict, is_loading, metadata)
        if self._reading_adamw_checkpoint:
            return state
        muon = self._muon_names()
        for gbuf_idx, gbuf_range_maps in enumerate(self.gbuf_ranges):
            spans_of_bucket = bucket_spans(self.buffers[gbuf_idx])
            for dtype, range_maps in gbuf_range_maps.items():
                for bucket_idx, range_map in enumerate(range_maps):
                    spans = spans_of_bucket.get(bucket_idx, [])
                    # Whether a bucket is packed is a property of the whole bucket, never of
                    # this rank's slice: every DP rank must give a state key the same global
                    # shape, and a rank whose slice holds only AdamW params (a large embedding
                    # at DP >= 4) must still pack its exp_avg over the bucket's AdamW params.
                    if any(param in muon for _, _, param in spans):
                        pack_bucket_state(
                            spans,
                            list(range_map["param_map"]),
                            state[gbuf_idx][dtype][bucket_idx],
                            muon,
                        )
        return state

    def _params_in_checkpoint_order(self) -> Iterator[torch.nn.Parameter]:
        # The order of sharded_param_state_fully_reshardable and its loader.
        for buffer in self.buffers:
            yield from buffer.param_index_map

    @contextlib.contextmanager
    def _gathering_momentum_as_adam(self) -> Iterator[None]:
        self._muon_gather_as_adam = True
        try:
            yield
        finally:
            self._muon_gather_as_adam = False

    # ------------------------------------------------------------------ legacy formats
    def save_parameter_state(self, filename: str):
        raise NotImplementedError(
            "the legacy torch.save parameter-state format cannot hold Muon momentum: with "
            "Megatron-LM use --ckpt-format torch_dist (its default); from Python, save with "
            "muon_megatron.training.checkpointing.save_checkpoint."
        )

    def load_parameter_state(self, filename: str, *, update_legacy_format=False):
        raise NotImplementedError(
            "the legacy torch.save parameter-state format cannot hold Muon momentum: with "
            "Megatron-LM use --ckpt-format torch_dist (its default); from Python, load with "
            "muon_megatron.training.checkpointing.load_checkpoint."
        )


def _rename_state(key: str, old: str, new: str) -> str:
    marker = f"optimizer.state.{old}."
    if marker not in key:
        raise RuntimeError(f"unexpected optimizer state key {key!r}: expected {marker}<param>")
    return key.replace(marker, f"optimizer.state.{new}.", 1)


@contextlib.contextmanager
def reading_adamw_checkpoint(members: list[MuonCheckpointMixin]) -> Iterator[None]:
    """Within the block, `members` (the Muon optimizers of a run) build and load their
    sharded state as AdamW's: a checkpoint written by megatron-core's distributed AdamW, in
    either sharding type, loads into Muon with each Muon parameter's momentum taken from its
    `exp_avg` (bitwise) and its `exp_avg_sq` dropped; AdamW parameters load as saved. Wrap
    both the `sharded_state_dict(..., is_loading=True)` call and `load_state_dict`."""
    for member in members:
        member._reading_adamw_checkpoint = True
    try:
        yield
    finally:
        for member in members:
            member._reading_adamw_checkpoint = False
