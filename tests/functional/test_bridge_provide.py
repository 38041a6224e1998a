"""`muon_megatron.bridge.MuonOptimizerConfig.provide()`: what Megatron-Bridge's
`setup_optimizer` calls builds the optimizer `get_muon_optimizer` builds, step for step.

The first test makes the call as Bridge's `training/optim.py::setup_optimizer` makes it,
keyword for keyword (model_chunks, config_overrides, use_gloo_process_groups, pg_collection),
without Bridge. The second runs Bridge's own `setup_optimizer`; it needs Megatron-Bridge
installed (tests/bridge.sh installs it in CI) and runs its ranks under the Transformer Engine
stand-in, which Bridge imports at import time (`muon_megatron.testing.bridge`).
"""

from __future__ import annotations

import dataclasses

import torch

from muon_megatron.bridge.recipes import MOONLIGHT_MUON
from muon_megatron.runtime.launch import spawn
from muon_megatron.testing.tiny import Layout, ModelSpec

STEPS = 3
# fp32 Newton-Schulz and communication: the two builds run the same arithmetic in the same
# order, so the weights agree bitwise.
MUON = dataclasses.replace(MOONLIGHT_MUON, muon_ns_dtype="fp32")


def _train(rank: int, world: int, how: str) -> dict[str, dict[str, torch.Tensor]] | None:
    from muon_megatron.bridge import MuonOptimizerConfig
    from muon_megatron.testing import tiny
    from muon_megatron.training import step

    spec, layout = ModelSpec(num_layers=2), Layout()
    tiny.initialize_parallel(layout, seed=0)
    model = tiny.build_model(spec, layout)
    before = {name: p.detach().clone() for name, p in model[0].named_parameters()}
    base = tiny.optimizer_config()
    if how == "direct":
        optimizer = tiny.build_optimizer(model, base, MUON)
    else:
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.init}
        config = MuonOptimizerConfig(**fields, muon=MUON)
        config.finalize()
        if how == "bridge":
            from muon_megatron.testing.bridge import import_bridge_training

            optim, _ = import_bridge_training()
            optimizer, _ = optim.setup_optimizer(config, _constant_schedule(base), model)
        else:  # Bridge's call (training/optim.py::setup_optimizer), keyword for keyword
            optimizer = config.provide(model_chunks=model, config_overrides=None,
                                       use_gloo_process_groups=False, pg_collection=None)
        for chunk in model:
            tiny.unwrap(chunk).config.grad_scale_func = optimizer.scale_loss
        step.param_scheduler(optimizer, max_lr=base.lr, min_lr=base.lr,
                             weight_decay=base.weight_decay)
    for i in range(STEPS):
        tiny.train_step(model, optimizer, tiny.global_batch(i, spec, 8, seed=0), spec, layout, 2)
    if rank != 0:
        return None
    after = {name: p.detach().clone() for name, p in model[0].named_parameters()}
    return {"before": before, "after": after}


def _constant_schedule(base):
    """Bridge's SchedulerConfig for the constant lr and weight decay the direct build uses
    (`step.param_scheduler` at `base`'s values); the step counts Bridge derives from its
    training config are set outright."""
    from megatron.bridge.training.config import SchedulerConfig

    schedule = SchedulerConfig(lr_decay_style="constant", weight_decay_incr_style="constant",
                               start_weight_decay=base.weight_decay,
                               end_weight_decay=base.weight_decay)
    schedule.lr_warmup_init, schedule.lr_warmup_steps = base.lr, 0
    schedule.lr_decay_steps = schedule.wd_incr_steps = 1000
    return schedule


def test_provide_steps_equal_to_get_muon_optimizer() -> None:
    """DP2, Moonlight's Muon settings (fp32 Newton-Schulz), 3 steps: every weight equal, bitwise,
    whether the optimizer came from `provide()` or from `get_muon_optimizer`."""
    direct = spawn(_train, 2, "direct")[0]
    provided = spawn(_train, 2, "provide")[0]
    assert not all(torch.equal(direct["before"][n], w) for n, w in direct["after"].items())
    direct, provided = direct["after"], provided["after"]
    assert direct.keys() == provided.keys()
    for name in direct:
        torch.testing.assert_close(provided[name], direct[name], rtol=0, atol=0, msg=name)


def _direct_and_bridged() -> tuple[dict, dict]:
    return spawn(_train, 2, "direct")[0]["after"], spawn(_train, 2, "bridge")[0]["after"]


def test_bridge_setup_optimizer_builds_it_and_steps_equal(megatron_bridge, te_stand_in) -> None:
    """Bridge's own `setup_optimizer` (its default weight-decay overrides, its scheduler at
    a constant lr and weight decay) builds a muon-megatron optimizer through `provide()`,
    and 3 DP2 steps give the weights `get_muon_optimizer`'s build gives, bitwise (both runs
    under the TE stand-in)."""
    direct, bridged = te_stand_in.in_te_process(_direct_and_bridged)
    assert direct.keys() == bridged.keys()
    for name in direct:
        torch.testing.assert_close(bridged[name], direct[name], rtol=0, atol=0, msg=name)
