"""dist_checkpointing and the distributed optimizer with torch's own Adam, on CPU."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from muon_megatron.runtime.cpu_shims._patching import (
    _is_cuda_device,
    _wrap_method,
)

# --------------------------------------------------------------------------------------------
# dist_checkpointing
# --------------------------------------------------------------------------------------------


def _install_checkpoint_shims() -> None:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    # exchange_utils.py 98/106: `sh_ten.init_data("cuda")` for the fully-parallel load
    # exchange buffers.
    def init_data(orig: Callable[..., None]) -> Callable[..., None]:
        def wrapper(self: ShardedTensor, device: Any, init_fn: Callable = torch.empty) -> None:
            return orig(self, "cpu" if _is_cuda_device(device) else device, init_fn)

        return wrapper

    _wrap_method(ShardedTensor, "init_data", init_data)

    # distrib_optimizer.py 936-940 copies every key of the *destination* state
    # ({"param", **optim_state}) from the loaded `tensors`. torch's Adam (the fallback without
    # apex/TE) keeps a per-param "step", which megatron restores from the param groups
    # (817-836; "the optimizer state of STEP is handled specifically", 1496): the
    # fully_reshardable loader leaves it out of `tensors` (KeyError 'step'), and the
    # dp_reshardable one hands back a placeholder that would reset it to 0. Copy the keys both
    # sides have, except "step"; the precision-aware path is left to megatron. The copy runs
    # under no_grad: for fp32 models the main param is a view of the model param, and the
    # dp_reshardable loader (1772) is not itself decorated with no_grad.
    def set_states(orig: Callable[..., None]) -> Callable[..., None]:
        def wrapper(
            self: DistributedOptimizer,
            model_param: torch.nn.Parameter,
            tensors: dict[str, torch.Tensor],
        ) -> None:
            if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
                return orig(self, model_param, tensors)
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            dst_tensors = {"param": main_param, **self.optimizer.state[main_param]}
            with torch.no_grad():
                for key, dst in dst_tensors.items():
                    if key != "step" and key in tensors:
                        dst.copy_(tensors[key])

        return wrapper

    _wrap_method(DistributedOptimizer, "_set_main_param_and_optimizer_states", set_states)

    # distrib_optimizer.py 639-642: without apex/TE, `state_dict()` reads the per-param "step"
    # of torch's Adam and asserts there is exactly one value; a fresh optimizer has none, so
    # `sharded_state_dict(is_loading=True)` (which calls `state_dict()`, 1264-1267) fails
    # before a checkpoint can be loaded into it. Give every param the state torch's Adam
    # would create lazily at its first step (step 0, zero moments): the next step is
    # bit-for-bit what it would have been.
    from megatron.core.optimizer import distrib_optimizer

    def state_dict(orig: Callable[..., dict]) -> Callable[..., dict]:
        def wrapper(self: DistributedOptimizer) -> dict:
            inner = self.optimizer
            if not distrib_optimizer.HAVE_APEX_OR_TE and isinstance(
                inner, (torch.optim.Adam, torch.optim.AdamW)
            ):
                _init_torch_adam_state(inner)
            return orig(self)

        return wrapper

    _wrap_method(DistributedOptimizer, "state_dict", state_dict)

    # distrib_optimizer.py 821-825 restores torch Adam's step by assigning *one* tensor to
    # every param's state. torch's foreach Adam increments the step tensors in place, once
    # per param, so after a load the shared step races ahead and the bias correction is
    # wrong from the first step on. Give each param its own copy.
    def load_state_dict(orig: Callable[..., None]) -> Callable[..., None]:
        def wrapper(self: DistributedOptimizer, state_dict: dict) -> None:
            orig(self, state_dict)
            inner = self.optimizer
            if not distrib_optimizer.HAVE_APEX_OR_TE and isinstance(
                inner, (torch.optim.Adam, torch.optim.AdamW)
            ):
                for state in inner.state.values():
                    if torch.is_tensor(state.get("step")):
                        state["step"] = state["step"].clone()

        return wrapper

    _wrap_method(DistributedOptimizer, "load_state_dict", load_state_dict)


def _init_torch_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Create, where missing, the per-param state torch's Adam(W) creates lazily (adam.py
    `_init_group`, non-fused, non-capturable)."""
    step_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state[param]
            if len(state) != 0:
                continue
            state["step"] = torch.tensor(0.0, dtype=step_dtype)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            if group.get("amsgrad", False):
                state["max_exp_avg_sq"] = torch.zeros_like(
                    param, memory_format=torch.preserve_format
                )
