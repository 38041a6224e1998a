"""Megatron-Bridge's own checkpointing saves and loads a muon-megatron optimizer, bit for bit.

A tiny GPT at DP2 gets its optimizer from Bridge's `setup_optimizer` (through
`MuonOptimizerConfig.provide()`) and its scheduler from Bridge (warm-up then cosine, stepped
by samples as Bridge's training loop steps it), trains, and is saved at step SAVE_AT by
`megatron.bridge.training.checkpointing.save_checkpoint` (torch_dist, fully parallel save, as
Bridge's recipes set it) while the run goes on to STEPS. A new spawn builds a model from
another seed and a fresh optimizer the same way, loads with Bridge's `load_checkpoint`, and
trains the same steps: the optimizer state right after the load (main params, Muon momentum,
AdamW moments and step), the lr and weight decay, and every weight and state after the
remaining steps equal the uninterrupted run's, bitwise. Both of megatron-core's
distributed-optimizer formats are saved: dp_reshardable (Bridge's default) and
fully_reshardable.

The ranks run under the Transformer Engine stand-in (Bridge imports TE at import time);
`muon_megatron.testing.bridge` says which two shims Bridge needs on CPU and Python 3.11.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from muon_megatron.bridge.recipes import MOONLIGHT_MUON
from muon_megatron.runtime.launch import spawn
from muon_megatron.testing.checkpoint_tensors import optimizer_snapshot
from muon_megatron.testing.tiny import Layout, ModelSpec

SAVE_AT, STEPS = 2, 4
GLOBAL_BATCH, MICRO_BATCH = 8, 2
SEED, OTHER_SEED, DATA_SEED = 0, 1, 7
LR, MIN_LR, WD = 2e-2, 2e-3, 0.1
# fp32 Newton-Schulz: the resumed steps run the same arithmetic as the uninterrupted ones.
MUON = dataclasses.replace(MOONLIGHT_MUON, muon_ns_dtype="fp32")
FORMATS = ("dp_reshardable", "fully_reshardable")
SPEC = ModelSpec(num_layers=2)


def _config(ckpt_dir: str, sharding: str, load: bool):
    """Bridge's `ConfigContainer` for the tiny GPT: what its checkpoint functions read."""
    from megatron.bridge.models.gpt_provider import GPTModelProvider
    from megatron.bridge.training.config import (
        CheckpointConfig, ConfigContainer, LoggerConfig, MockGPTDatasetConfig, RNGConfig,
        SchedulerConfig, TokenizerConfig, TrainingConfig)

    from muon_megatron.bridge import MuonOptimizerConfig
    from muon_megatron.testing import tiny

    base = tiny.optimizer_config(lr=LR, weight_decay=WD, min_lr=MIN_LR)
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.init}
    optimizer = MuonOptimizerConfig(**fields, muon=MUON)
    optimizer.finalize()
    # Steps in samples, as Bridge's loop steps the scheduler (global batch per step).
    scheduler = SchedulerConfig(lr_decay_style="cosine", lr_warmup_init=0.0,
                                start_weight_decay=WD, end_weight_decay=WD,
                                weight_decay_incr_style="constant")
    scheduler.lr_warmup_steps = 2 * GLOBAL_BATCH
    scheduler.lr_decay_steps = scheduler.wd_incr_steps = STEPS * GLOBAL_BATCH
    model = GPTModelProvider(
        num_layers=SPEC.num_layers, hidden_size=SPEC.hidden_size,
        num_attention_heads=SPEC.num_attention_heads, num_query_groups=SPEC.num_query_groups,
        ffn_hidden_size=SPEC.ffn_hidden_size, vocab_size=SPEC.vocab_size,
        seq_length=SPEC.seq_length)
    return ConfigContainer(
        model=model,
        train=TrainingConfig(train_iters=STEPS, global_batch_size=GLOBAL_BATCH,
                             micro_batch_size=MICRO_BATCH),
        optimizer=optimizer,
        scheduler=scheduler,
        dataset=MockGPTDatasetConfig(random_seed=DATA_SEED, seq_length=SPEC.seq_length,
                                     reset_attention_mask=False, reset_position_ids=False,
                                     eod_mask_loss=False),
        logger=LoggerConfig(),
        tokenizer=TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=SPEC.vocab_size),
        checkpoint=CheckpointConfig(
            save=ckpt_dir, load=ckpt_dir if load else None, ckpt_format="torch_dist",
            fully_parallel_save=True, async_save=False,
            dist_ckpt_optim_fully_reshardable=sharding == "fully_reshardable"),
        rng=RNGConfig(seed=SEED),
    )


def _state(model, optimizer, scheduler) -> dict:
    group = optimizer.param_groups[0]
    return {**optimizer_snapshot(model, optimizer),
            "schedule": {"lr": torch.tensor(group["lr"]),
                         "weight_decay": torch.tensor(group["weight_decay"]),
                         "num_steps": torch.tensor(scheduler.num_steps)}}


def _run(rank: int, world: int, root: str, load: str | None) -> dict:
    """Train to STEPS; without `load`, save every format at SAVE_AT on the way, else start
    from the `load` format's checkpoint."""
    from megatron.core.num_microbatches_calculator import init_num_microbatches_calculator

    from muon_megatron.optimizer.builder import muon_optimizers
    from muon_megatron.testing import tiny
    from muon_megatron.testing.bridge import import_bridge_training

    optim, checkpointing = import_bridge_training()  # first: the Python 3.11 shim
    from megatron.bridge.training.state import GlobalState

    layout = Layout()
    tiny.initialize_parallel(layout, OTHER_SEED if load else SEED)
    model = tiny.build_model(SPEC, layout)
    config = _config(os.path.join(root, load or FORMATS[0]), load or FORMATS[0], bool(load))
    optimizer, scheduler = optim.setup_optimizer(config.optimizer, config.scheduler, model)
    for chunk in model:
        tiny.unwrap(chunk).config.grad_scale_func = optimizer.scale_loss
    init_num_microbatches_calculator(rank, None, GLOBAL_BATCH, MICRO_BATCH, world)
    state = GlobalState()
    state.cfg = config
    out: dict = {"members": [type(m).__name__ for m in optimizer.chained_optimizers],
                 "muon_names": [n for o in muon_optimizers(optimizer) for n in o.muon_matrix_names]}
    if load:
        out["before_load"] = optimizer_snapshot(model, optimizer)["model"]
        checkpointing.load_checkpoint(state, model, optimizer, scheduler)
        out["after_load"] = _state(model, optimizer, scheduler)
        out["loaded_step"] = state.train_state.step
    for step in range(state.train_state.step, STEPS):
        if step == SAVE_AT and not load:
            out["at_save"] = _state(model, optimizer, scheduler)
            for sharding in FORMATS:
                state.cfg = _config(os.path.join(root, sharding), sharding, False)
                checkpointing.save_checkpoint(state, model, optimizer, scheduler, 0)
        batch = tiny.global_batch(step, SPEC, GLOBAL_BATCH, DATA_SEED)
        tiny.train_step(model, optimizer, batch, SPEC, layout, MICRO_BATCH)
        scheduler.step(increment=GLOBAL_BATCH)
        state.train_state.step += 1
        state.train_state.consumed_train_samples += GLOBAL_BATCH
    out["final"] = _state(model, optimizer, scheduler)
    return out


def _runs(root: str) -> dict:
    """The saving run, and one resumed run per format (in the TE stand-in's process)."""
    runs = {"saving": spawn(_run, 2, root, None)}
    for sharding in FORMATS:
        runs[sharding] = spawn(_run, 2, root, sharding)
    return runs


@pytest.fixture(scope="module")
def runs(megatron_bridge, te_stand_in, tmp_path_factory) -> dict:
    return te_stand_in.in_te_process(_runs, str(tmp_path_factory.mktemp("bridge_ckpt")))


def _assert_bitwise(a: dict, b: dict, where: str) -> None:
    assert a.keys() == b.keys(), (where, sorted(a.keys() ^ b.keys()))
    for key in a:
        if isinstance(a[key], dict):
            _assert_bitwise(a[key], b[key], f"{where}/{key}")
        elif isinstance(a[key], tuple):
            assert a[key] == b[key], (where, key)
        else:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=f"{where}/{key}")


def test_the_saved_state_holds_muon_momentum_and_adamw_moments(runs) -> None:
    """Bridge's `setup_optimizer` built ours (a `ChainedOptimizer` of one
    `MuonDistributedOptimizer`), and the saved state holds what the bitwise comparisons
    cover, on every rank: Muon momentum (the "exp_avg" of a Muon matrix's shard) and AdamW's
    two moments, non-zero after SAVE_AT steps."""
    for rank, saving in enumerate(runs["saving"]):
        assert saving["members"] == ["MuonDistributedOptimizer"], saving["members"]
        state, muon = saving["at_save"], set(saving["muon_names"])
        assert muon, "setup_optimizer built no Muon matrices"
        shards = state["ranges"]
        momentum = [state[n]["exp_avg"] for n in shards if n in muon]
        moments = [state[n]["exp_avg_sq"] for n in shards if n not in muon]
        assert momentum and moments, (rank, sorted(shards))
        assert all(m.abs().sum() > 0 for m in momentum + moments), rank


@pytest.mark.parametrize("sharding", FORMATS)
def test_bridge_save_load_resumes_bitwise(runs, sharding) -> None:
    """After Bridge's load: the state at the save, bitwise; after the remaining steps: the
    uninterrupted run's weights, main params, momentum, moments and schedule, bitwise."""
    resumed = runs[sharding]
    for rank, (saving, result) in enumerate(zip(runs["saving"], resumed)):
        assert result["loaded_step"] == SAVE_AT
        fresh, saved = result["before_load"], saving["at_save"]["model"]
        assert all(not torch.equal(fresh[n], saved[n]) for n in fresh if n.endswith("weight")
                   and "norm" not in n), "the fresh model equals the saved one before the load"
        _assert_bitwise(saving["at_save"], result["after_load"], f"rank{rank} after load")
        _assert_bitwise(saving["final"], result["final"], f"rank{rank} final")
