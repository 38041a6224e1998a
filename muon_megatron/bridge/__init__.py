"""muon-megatron in Megatron-Bridge: an optimizer config whose `provide()` builds our optimizer.

Megatron-Bridge's `training/optim.py::setup_optimizer` asks the run's optimizer config for
the optimizer first, when the config has a `provide` method:

    optimizer_config.provide(model_chunks=..., config_overrides=...,
                             use_gloo_process_groups=..., pg_collection=...)

`MuonOptimizerConfig` is megatron-core's `OptimizerConfig` (every field Bridge and
megatron-core read: lr, min_lr, weight_decay, bf16, clip_grad, use_distributed_optimizer, ...)
plus `muon`, the `MuonConfig` of every `--muon-*` knob; `provide()` is
`get_muon_optimizer(self, model_chunks, self.muon, ...)`: the same optimizer, built the same
way, as muon-megatron's own entry and Megatron-LM hook build it. Bridge's scheduler then
drives lr and weight decay for Muon and AdamW alike, as megatron-core's does.
`moonlight_16b_muon_pretrain_config()` (in `recipes`) is Bridge's Moonlight-16B recipe with
this config. Nothing here imports Megatron-Bridge at import time.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from megatron.core.optimizer import OptimizerConfig

from muon_megatron.config import MuonConfig
from muon_megatron.optimizer.builder import get_muon_optimizer

__all__ = ["MuonOptimizerConfig"]


@dataclasses.dataclass
class MuonOptimizerConfig(OptimizerConfig):
    """megatron-core's `OptimizerConfig` that Megatron-Bridge asks for muon-megatron's ZeRO-1
    Muon. `optimizer` stays "adam": the config's Adam fields are the AdamW half's (embeddings,
    norms, biases, the router by default), as in `get_muon_optimizer`."""

    muon: MuonConfig = dataclasses.field(default_factory=MuonConfig)
    """Muon's knobs (`muon_momentum`, `muon_scale_mode`, ...), as `MuonConfig` documents."""

    def __post_init__(self) -> None:
        if self.optimizer != "adam":
            raise ValueError(
                f"MuonOptimizerConfig(optimizer={self.optimizer!r}): leave optimizer='adam' "
                "(the AdamW half's settings); Muon's are in `muon`")
        if not self.use_distributed_optimizer:
            raise ValueError("MuonOptimizerConfig(use_distributed_optimizer=False): "
                             "muon-megatron is a ZeRO-1 optimizer; set it True")
        super().__post_init__()

    def finalize(self) -> None:
        """What Bridge calls once its config is complete: megatron-core's checks again, on
        the final field values."""
        self.__post_init__()

    def provide(
        self,
        model_chunks: list,
        config_overrides: dict | None = None,
        use_gloo_process_groups: bool = False,
        pg_collection: Any = None,
    ) -> Any:
        """Build the optimizer (`get_muon_optimizer`) for Bridge's `setup_optimizer`.

        With `muon.muon_norm_weight_decay`, the weight-decay skips among `config_overrides`
        (entries that only set `wd_mult` to 0: Bridge's default provider sends megatron-core's
        standard "no decay for biases and 1-D params") are dropped, since that flag sets
        the weight-decay rule itself; any other override is passed on, and
        `get_muon_optimizer` then asks for it to be folded in."""
        chunks = model_chunks if isinstance(model_chunks, list) else [model_chunks]
        if self.muon.muon_norm_weight_decay and config_overrides:
            config_overrides = {key: value for key, value in config_overrides.items()
                                if dict(value) != {"wd_mult": 0.0}}
        return get_muon_optimizer(
            self, chunks, self.muon, config_overrides=config_overrides or None,
            use_gloo_process_groups=use_gloo_process_groups, pg_collection=pg_collection)
