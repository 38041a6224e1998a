"""Checkpoints and faults: bit-exact resume, resharding, optimizer switch, NaN steps, errors.

Every run is real multi-process training of the tiny GPT over gloo, saved and loaded with
`muon_megatron.training.checkpointing` (megatron `dist_checkpointing`, torch_dist). A resumed run is a
*new* spawn: nothing survives from the saving processes but the checkpoint directory. The lr
schedule warms up and decays (cosine), so a scheduler that were not restored would show.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import re
import shutil
import zlib
from typing import Any

import pytest
import torch

from muon_megatron.runtime.launch import spawn
from muon_megatron.testing.checkpoint_tensors import named_chunk_params as _named_params
from muon_megatron.testing.checkpoint_tensors import optimizer_snapshot as _snapshot
from muon_megatron.tools.verify import FP32_TOLERANCE

SEED, DATA_SEED = 1234, 7
GLOBAL_BATCH, MICRO_BATCH = 8, 2
STEPS, SAVE_AT = 6, 3
LR, MIN_LR, WD = 2e-2, 2e-3, 0.1

# Resuming under another layout (DP4 -> DP2, TP2 -> TP1, EP2 -> EP1) restores the same state,
# bit for bit, and then differs from the uninterrupted run only in the fp32 reduction order of
# the 3 steps after the resume (DP reduce-scatter over 2 instead of 4 ranks, TP partial sums,
# expert-DP reduction), which Newton-Schulz amplifies: measured 4.9e-6 (DP4 -> DP2), 6.2e-6
# (TP2 -> TP1), 4.1e-6 (EP2 -> EP1), worst on linear_proj, the size verify.py measures against
# the single-device reference (6e-6..7.5e-6, hence its FP32_TOLERANCE = 1e-5). Resuming DP4 ->
# DP2 with the momentum zeroed instead moves the update since the resume by 0.8.
RESHARD_TOLERANCE = FP32_TOLERANCE

MOE = {"num_experts": 4}
# A word embedding (1024 x 64 = 65,536 elements, tied with the output layer) larger than one
# DP slice of the single gradient bucket (~140k elements: 35k per rank at DP4, 17.5k at DP8),
# so some rank's slice holds only AdamW params while the bucket holds Muon ones: the layout of
# every real run at DP >= 4, where the bucket-space checkpoint used to disagree across ranks
# on the global shape of exp_avg.
WIDE = {"vocab_size": 1024}
WIDE_MICRO_BATCH = 1  # DP8 x 1 = the global batch of 8


@dataclasses.dataclass
class Job:
    """One training run; every field is plain data so that it pickles into the ranks."""

    layout: dict[str, Any] = dataclasses.field(default_factory=dict)
    moe: bool = False
    optimizer: str = "muon"  # 'muon' or 'adam' (megatron's own distributed AdamW)
    steps: int = STEPS
    load: str | None = None
    saves: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # at SAVE_AT
    save_final_weights: str | None = None
    compare_weights: str | None = None  # weights (tiny.save_model) to compare against
    nan_at: dict[int, tuple[int, str, float]] = dataclasses.field(default_factory=dict)
    not_muon: str | None = None  # params whose name contains this go to AdamW
    spec: dict[str, Any] = dataclasses.field(default_factory=dict)  # ModelSpec overrides
    megatron_lm_load: str | None = None  # sharding type: load as Megatron-LM's loop does
    micro_batch: int = MICRO_BATCH


# ---------------------------------------------------------------------------- the ranks
def _setup(job: Job):
    from muon_megatron.config import MuonConfig
    from muon_megatron.routing.rules import is_muon_param
    from muon_megatron.testing import tiny
    from muon_megatron.training import step

    spec = tiny.ModelSpec(**(MOE if job.moe else {}), **job.spec)
    layout = tiny.Layout(**job.layout)
    tiny.initialize_parallel(layout, SEED)
    model = tiny.build_model(spec, layout)
    config = tiny.optimizer_config(lr=LR, weight_decay=WD)
    if job.optimizer == "adam":
        optimizer = step.build_optimizer(config, model)
    else:
        def is_muon(name: str, param: torch.Tensor) -> bool:
            return is_muon_param(name, param) and not (job.not_muon and job.not_muon in name)

        optimizer = step.build_optimizer(
            config, model, MuonConfig(muon_ns_dtype="fp32"), is_muon=is_muon
        )
    scheduler = step.param_scheduler(
        optimizer,
        init_lr=0.0,
        max_lr=LR,
        min_lr=MIN_LR,
        weight_decay=WD,
        warmup_steps=2,
        decay_steps=STEPS,
        decay_style="cosine",
    )
    return spec, layout, model, optimizer, scheduler


def _full_states(per_rank: list[dict], what: str) -> dict[str, dict[str, torch.Tensor]]:
    """Per parameter, its flat main param and optimizer-state tensors over the whole param,
    assembled from every rank's ZeRO-1 shard: layout-independent across DP sizes."""
    full: dict[str, dict[str, torch.Tensor]] = {}
    for result in per_rank:
        snapshot = result[what]
        for name, (start, end) in snapshot.get("ranges", {}).items():
            numel = snapshot["model"][name].numel()
            for key, tensor in snapshot[name].items():
                if tensor.dim() == 0:  # AdamW's step: one value, the same on every shard
                    full.setdefault(name, {})[key] = tensor
                    continue
                flat = full.setdefault(name, {}).setdefault(key, torch.full((numel,), float("nan")))
                flat[start:end] = tensor
    return full


def _megatron_lm_style_load(ckpt_dir: str, model, optimizer, sharding: str, read_adamw: bool) -> None:
    """What Megatron-LM's load_checkpoint does with a torch_dist checkpoint (request the
    sharded state dict, load, load_state_dict), with the AdamW-checkpoint mode that
    muon_megatron.megatron_lm's hook turns on for an AdamW -> Muon switch."""
    from megatron.core import dist_checkpointing

    from muon_megatron.optimizer.builder import muon_optimizers
    from muon_megatron.optimizer.checkpoint_state import reading_adamw_checkpoint
    from muon_megatron.training import checkpointing

    members = muon_optimizers(optimizer) if read_adamw else []
    with reading_adamw_checkpoint(members), torch.no_grad():
        model_sd = checkpointing.model_sharded_state_dict(model)
        opt_sd = optimizer.sharded_state_dict(
            model_sd, is_loading=True, metadata=checkpointing._metadata(sharding)
        )
        loaded = dist_checkpointing.load({**model_sd, "optimizer": opt_sd}, ckpt_dir)
        checkpointing.load_weights(model, loaded)
        optimizer.load_state_dict(loaded["optimizer"])


def _muon_names(optimizer) -> list[str]:
    from muon_megatron.optimizer.builder import muon_optimizers

    return [name for o in muon_optimizers(optimizer) for name in o.muon_matrix_names]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _run(rank: int, world: int, job: Job) -> dict[str, Any]:
    from muon_megatron.optimizer.nonfinite import skipped_steps
    from muon_megatron.testing import tiny
    from muon_megatron.training import checkpointing

    records = _Records()
    logging.getLogger("muon_megatron").addHandler(records)
    logging.getLogger("muon_megatron").setLevel(logging.INFO)
    spec, layout, model, optimizer, scheduler = _setup(job)
    config = tiny.unwrap(model[0]).config
    finalize, inject = config.finalize_model_grads_func, {}

    def finalize_with_fault(*args, **kwargs):
        # A fault in this rank's local gradient, before the DP reduction spreads it.
        if inject:
            with torch.no_grad():
                dict(_named_params(model))[inject["name"]].main_grad.view(-1)[0] = inject["value"]
        return finalize(*args, **kwargs)

    config.finalize_model_grads_func = finalize_with_fault
    out: dict[str, Any] = {"muon_names": _muon_names(optimizer), "steps": {}}
    start = 0
    if job.load and job.megatron_lm_load:
        _megatron_lm_style_load(
            job.load, model, optimizer, job.megatron_lm_load, read_adamw=job.optimizer == "muon"
        )
        start = SAVE_AT
        for _ in range(SAVE_AT):  # the schedule's own state is not what this load tests
            scheduler.step(1)
        out["after_load"] = _snapshot(model, optimizer)
    elif job.load:
        start = checkpointing.load_checkpoint(job.load, model, optimizer, scheduler)
        out["after_load"] = _snapshot(model, optimizer)
    for step in range(start, job.steps + 1):
        if step == SAVE_AT and job.saves:
            out["at_save"] = _snapshot(model, optimizer)
            for ckpt_dir, sharding in job.saves:
                checkpointing.save_checkpoint(ckpt_dir, model, optimizer, scheduler, step, sharding)
        if step == job.steps:
            break
        inject.clear()
        if step in job.nan_at and job.nan_at[step][0] == rank:
            inject.update(name=job.nan_at[step][1], value=job.nan_at[step][2])
        before = _snapshot(model, optimizer) if step in job.nan_at else None
        batch = tiny.global_batch(step, spec, GLOBAL_BATCH, DATA_SEED)
        optimizer.zero_grad()
        loss = tiny.forward_backward(model, batch, spec, job.micro_batch)
        success, _, _ = optimizer.step()
        if success:  # as megatron's training loop: the schedule advances on real updates
            scheduler.step(1)
        out["steps"][step] = {"loss": loss, "success": success, "skipped": skipped_steps(optimizer)}
        if before is not None:
            out["steps"][step].update(before=before, after=_snapshot(model, optimizer))
    out["final"] = _snapshot(model, optimizer)
    out["skipped_per_member"] = [
        getattr(m, "skipped_steps", None) for m in getattr(optimizer, "chained_optimizers", [optimizer])
    ]
    if job.save_final_weights:
        tiny.save_model(model, job.save_final_weights)
    if job.compare_weights:
        out["relative_update_error"] = _compare(job, spec, layout, model, out["after_load"]["model"])
    out["logs"] = records.messages
    return out


def _compare(job: Job, spec, layout, model, resumed_from) -> dict[str, float]:
    """||W_resumed - W_ref|| / ||W_ref - W_resume_point|| per parameter (the update since the
    resume, as verify.py compares the total update)."""
    from muon_megatron.testing import tiny

    reference = tiny.build_model(spec, layout)
    tiny.load_model(reference, job.compare_weights)
    ref = dict(_named_params(reference))
    errors = {}
    for name, param in _named_params(model):
        update = (ref[name] - resumed_from[name]).norm().item()
        errors[name] = (param - ref[name]).norm().item() / update
    return errors


# ---------------------------------------------------------------------------- helpers
def _assert_bitwise(a: dict, b: dict, where: str = "") -> None:
    assert a.keys() == b.keys(), (where, sorted(a.keys() ^ b.keys()))
    for key in a:
        if isinstance(a[key], dict):
            _assert_bitwise(a[key], b[key], f"{where}/{key}")
        else:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{where}/{key}")


def _assert_runs_equal(first: list[dict], second: list[dict], what: str = "final") -> None:
    assert len(first) == len(second)
    for rank, (x, y) in enumerate(zip(first, second)):
        _assert_bitwise(x[what], y[what], f"rank{rank}")


def _momentum(snapshot: dict, names: list[str]) -> dict[str, torch.Tensor]:
    return {n: s["exp_avg"] for n, s in snapshot.items() if n in names}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def dp2(root) -> dict[str, Any]:
    """DP2: an uninterrupted run, and one that saves both formats at step 3 and goes on."""
    full, bucket = os.path.join(root, "dp2_full"), os.path.join(root, "dp2_dp")
    saving = spawn(_run, 2, Job(saves=[(full, "fully_reshardable"), (bucket, "dp_reshardable")]))
    return {
        "straight": spawn(_run, 2, Job()),
        "saving": saving,
        "fully_reshardable": full,
        "dp_reshardable": bucket,
    }


# ---------------------------------------------------------------------------- resume
def test_saving_does_not_perturb_the_run(dp2) -> None:
    _assert_runs_equal(dp2["straight"], dp2["saving"])


@pytest.mark.parametrize("sharding", ["fully_reshardable", "dp_reshardable"])
def test_dp2_resume_is_bitwise(dp2, sharding) -> None:
    resumed = spawn(_run, 2, Job(load=dp2[sharding]))
    for rank, (saving, result) in enumerate(zip(dp2["saving"], resumed)):
        _assert_bitwise(saving["at_save"], result["after_load"], f"rank{rank} after load")
    _assert_runs_equal(dp2["straight"], resumed)  # params, main params, momentum, AdamW state
    names = dp2["straight"][0]["muon_names"]
    assert _momentum(resumed[0]["final"], names), "no Muon momentum compared"


def test_checkpoint_holds_momentum_under_its_own_key(dp2) -> None:
    from megatron.core.dist_checkpointing.serialization import load_tensors_metadata

    tensors = load_tensors_metadata(dp2["fully_reshardable"])
    # Checkpoint keys stack the layers of the block: decoder.layers.<i>.x -> decoder.layers.x
    muon = {re.sub(r"layers\.\d+\.", "layers.", n) for n in dp2["saving"][0]["muon_names"]}
    assert muon, "the run has no Muon parameters"
    for key, meta in tensors.items():
        if key.startswith("optimizer.state.muon_momentum."):
            assert meta.dtype == torch.float32, key
    params = {k.removeprefix("optimizer.state.param.") for k in tensors if k.startswith("optimizer.state.param.")}
    for name in params:
        has = {s for s in ("exp_avg", "exp_avg_sq", "muon_momentum") if f"optimizer.state.{s}.{name}" in tensors}
        assert has == ({"muon_momentum"} if name in muon else {"exp_avg", "exp_avg_sq"}), (name, has)
    bucket = load_tensors_metadata(dp2["dp_reshardable"])
    assert any(k.endswith(".muon_momentum") for k in bucket), sorted(bucket)


@pytest.fixture(scope="module")
def tp2xdp2(root) -> dict[str, Any]:
    ckpt, final = os.path.join(root, "tp2_full"), os.path.join(root, "tp2_final")
    job = Job(layout={"tp": 2}, saves=[(ckpt, "fully_reshardable")], save_final_weights=final)
    return {"saving": spawn(_run, 4, job), "ckpt": ckpt, "final": final}


def test_tp2xdp2_resume_is_bitwise(tp2xdp2) -> None:
    resumed = spawn(_run, 4, Job(layout={"tp": 2}, load=tp2xdp2["ckpt"]))
    _assert_runs_equal(tp2xdp2["saving"], resumed)


def test_tp2_to_tp1_resume(tp2xdp2) -> None:
    resumed = spawn(_run, 2, Job(load=tp2xdp2["ckpt"], compare_weights=tp2xdp2["final"]))
    errors = resumed[0]["relative_update_error"]
    assert max(errors.values()) <= RESHARD_TOLERANCE, max(errors.items(), key=lambda kv: kv[1])


@pytest.fixture(scope="module")
def ep2(root) -> dict[str, Any]:
    full, bucket = os.path.join(root, "ep2_full"), os.path.join(root, "ep2_dp")
    final = os.path.join(root, "ep2_final")
    job = Job(
        layout={"ep": 2},
        moe=True,
        saves=[(full, "fully_reshardable"), (bucket, "dp_reshardable")],
        save_final_weights=final,
    )
    return {"saving": spawn(_run, 2, job), "fully_reshardable": full, "dp_reshardable": bucket, "final": final}


def test_moe_ep2_resume_is_bitwise(ep2) -> None:
    resumed = spawn(_run, 2, Job(layout={"ep": 2}, moe=True, load=ep2["dp_reshardable"]))
    _assert_runs_equal(ep2["saving"], resumed)
    assert any("experts" in n for n in ep2["saving"][0]["muon_names"])


def test_moe_ep2_to_ep1_resume(ep2) -> None:
    job = Job(moe=True, load=ep2["fully_reshardable"], compare_weights=ep2["final"])
    errors = spawn(_run, 2, job)[0]["relative_update_error"]
    assert max(errors.values()) <= RESHARD_TOLERANCE, max(errors.items(), key=lambda kv: kv[1])


@pytest.fixture(scope="module")
def ep1(root) -> dict[str, Any]:
    """The MoE at EP1 x DP2 (one optimizer: the experts are in the dense one), saving both
    formats at step 3, and its final weights."""
    full, bucket = os.path.join(root, "ep1_full"), os.path.join(root, "ep1_dp")
    final = os.path.join(root, "ep1_final")
    job = Job(moe=True, saves=[(full, "fully_reshardable"), (bucket, "dp_reshardable")], save_final_weights=final)
    return {"saving": spawn(_run, 2, job), "fully_reshardable": full, "dp_reshardable": bucket, "final": final}


def test_moe_ep1_to_ep2_resume(ep1) -> None:
    """One optimizer -> two (dense + expert): the expert optimizer's param groups (lr, wd,
    step) come from the dense groups its weights were in; the 3 steps after the resume match
    the uninterrupted EP1 run within the reduction-order tolerance. It stopped in megatron's
    `KeyError: (1.0, 1.0, True, False)` before."""
    job = Job(layout={"ep": 2}, moe=True, load=ep1["fully_reshardable"], compare_weights=ep1["final"])
    out = spawn(_run, 2, job)
    errors = out[0]["relative_update_error"]
    assert max(errors.values()) <= RESHARD_TOLERANCE, max(errors.items(), key=lambda kv: kv[1])
    assert all(all(s["success"] for s in r["steps"].values()) for r in out)


def _try_load_job(rank: int, world: int, job: Job) -> str:
    from muon_megatron.training import checkpointing

    _, _, model, optimizer, scheduler = _setup(job)
    try:
        checkpointing.load_checkpoint(job.load, model, optimizer, scheduler)
    except (checkpointing.CheckpointMismatchError, checkpointing.CheckpointReadError) as error:
        return f"{type(error).__name__}: {error}"
    return "loaded"


def test_a_dp_reshardable_checkpoint_under_another_ep_is_refused_naming_both_layouts(ep1, ep2) -> None:
    to_ep2 = spawn(_try_load_job, 2, Job(layout={"ep": 2}, moe=True, load=ep1["dp_reshardable"]))
    to_ep1 = spawn(_try_load_job, 2, Job(moe=True, load=ep2["dp_reshardable"]))
    for messages, saved, run in ((to_ep2, "EP1", "EP2"), (to_ep1, "EP2", "EP1")):
        assert messages[0] == messages[1], messages
        message = messages[0]
        assert message.startswith("CheckpointMismatchError"), message
        assert f"saved under TP1 PP1 {saved} (DP" in message and f"this run is TP1 PP1 {run} (DP" in message
        assert f"resume under TP1 PP1 {saved}" in message and "'fully_reshardable'" in message


# An interleaved pipeline: PP2 with two virtual stages (model chunks) of one layer per rank,
# x DP2. Each rank's chunks repeat the chunk-local names (both have a decoder.layers.0).
VPP = {"layout": {"pp": 2, "vpp": 2}, "spec": {"num_layers": 4}}


@pytest.fixture(scope="module")
def pp2xvpp2(root) -> dict[str, Any]:
    full, bucket = os.path.join(root, "vpp_full"), os.path.join(root, "vpp_dp")
    final = os.path.join(root, "vpp_final")
    job = Job(**VPP, saves=[(full, "fully_reshardable"), (bucket, "dp_reshardable")],
              save_final_weights=final)
    return {"saving": spawn(_run, 4, job), "fully_reshardable": full, "dp_reshardable": bucket,
            "final": final}


@pytest.mark.parametrize("sharding", ["fully_reshardable", "dp_reshardable"])
def test_pp2xvpp2_resume_is_bitwise(pp2xvpp2, sharding) -> None:
    """Every model param and every optimizer-state tensor (Muon momentum, AdamW moments) of
    both chunks of every rank equals the uninterrupted run's after the 3 resumed steps; the
    plan names each rank's matrices by global layer, two chunks' worth per rank."""
    resumed = spawn(_run, 4, Job(**VPP, load=pp2xvpp2[sharding]))
    _assert_runs_equal(pp2xvpp2["saving"], resumed)
    first = pp2xvpp2["saving"][0]["muon_names"]
    assert len(first) == len(set(first)) == 8, first
    assert {n.split(".")[2] for n in first} == {"0", "2"}, first  # PP rank 0: layers 0 and 2


@pytest.mark.parametrize("world, layout", [(4, {"pp": 2}), (2, {})], ids=["pp2", "pp1"])
def test_pp2xvpp2_to_another_pipeline_resume(pp2xvpp2, world, layout) -> None:
    """fully_reshardable: saved at PP2 x VPP2, resumed at plain PP2 and at PP1 (DP2 each);
    the 3 steps after the resume match the uninterrupted run within the reduction-order
    tolerance."""
    job = Job(layout=layout, spec=VPP["spec"], load=pp2xvpp2["fully_reshardable"],
              compare_weights=pp2xvpp2["final"])
    errors = spawn(_run, world, job)[0]["relative_update_error"]
    assert max(errors.values()) <= RESHARD_TOLERANCE, max(errors.items(), key=lambda kv: kv[1])


def test_a_dp_reshardable_pp2xvpp2_checkpoint_at_plain_pp2_is_refused(pp2xvpp2) -> None:
    job = Job(layout={"pp": 2}, spec=VPP["spec"], load=pp2xvpp2["dp_reshardable"])
    messages = spawn(_try_load_job, 4, job)
    assert len(set(messages)) == 1, messages
    message = messages[0]
    assert message.startswith("CheckpointMismatchError"), message
    assert "saved under TP1 PP2xVPP2 EP1 (DP2); this run is TP1 PP2 EP1 (DP2)" in message, message
    assert "resume under TP1 PP2xVPP2 EP1" in message and "'fully_reshardable'" in message


def test_dp4_to_dp2_resume(root) -> None:
    ckpt, final = os.path.join(root, "dp4_full"), os.path.join(root, "dp4_final")
    spawn(_run, 4, Job(saves=[(ckpt, "fully_reshardable")], save_final_weights=final))
    errors = spawn(_run, 2, Job(load=ckpt, compare_weights=final))[0]["relative_update_error"]
    assert max(errors.values()) <= RESHARD_TOLERANCE, max(errors.items(), key=lambda kv: kv[1])


# ---------------------------------------------------------------------------- DP4 / DP8
def _wide_saving_run(root: str, world: int) -> dict[str, Any]:
    ckpts = {k: os.path.join(root, f"wide_dp{world}_{k}") for k in ("fully_reshardable", "dp_reshardable")}
    job = Job(spec=WIDE, micro_batch=WIDE_MICRO_BATCH, saves=[(d, k) for k, d in ckpts.items()])
    return {"saving": spawn(_run, world, job), **ckpts}


@pytest.fixture(scope="module")
def wide_dp4(root) -> dict[str, Any]:
    return _wide_saving_run(root, 4)


@pytest.fixture(scope="module")
def wide_dp8(root) -> dict[str, Any]:
    return _wide_saving_run(root, 8)


def test_wide_embedding_puts_an_adamw_only_slice_next_to_muon_params(wide_dp4, wide_dp8) -> None:
    """The layout these tests exist for: in the one bucket that holds Muon matrices, some
    rank's ZeRO-1 slice holds AdamW params only."""
    for run in (wide_dp4, wide_dp8):
        muon = set(run["saving"][0]["muon_names"])
        slices = [set(r["at_save"]["ranges"]) for r in run["saving"]]
        assert muon and any(names and not names & muon for names in slices), slices


@pytest.mark.parametrize("world", [4, 8])
@pytest.mark.parametrize("sharding", ["fully_reshardable", "dp_reshardable"])
def test_wide_resume_is_bitwise(wide_dp4, wide_dp8, world, sharding) -> None:
    run = {4: wide_dp4, 8: wide_dp8}[world]
    resumed = spawn(_run, world, Job(spec=WIDE, micro_batch=WIDE_MICRO_BATCH, load=run[sharding]))
    for rank, (saving, result) in enumerate(zip(run["saving"], resumed)):
        _assert_bitwise(saving["at_save"], result["after_load"], f"rank{rank} after load")
    _assert_runs_equal(run["saving"], resumed)  # params, main params, momentum, AdamW state


@pytest.mark.parametrize(("source", "target"), [(4, 8), (8, 4)])
@pytest.mark.parametrize("sharding", ["fully_reshardable", "dp_reshardable"])
def test_wide_reshard_restores_every_state_tensor_bitwise(wide_dp4, wide_dp8, source, target, sharding) -> None:
    """DP4 -> DP8 and DP8 -> DP4: the loaded ZeRO-1 shards, reassembled per parameter, are
    the saved ones bit for bit (main params, Muon momentum, AdamW exp_avg / exp_avg_sq)."""
    run = {4: wide_dp4, 8: wide_dp8}[source]
    job = Job(spec=WIDE, micro_batch=WIDE_MICRO_BATCH, load=run[sharding], steps=SAVE_AT + 1)
    resumed = spawn(_run, target, job)
    saved, loaded = _full_states(run["saving"], "at_save"), _full_states(resumed, "after_load")
    assert saved.keys() == loaded.keys() and saved
    for name in saved:
        assert saved[name].keys() == loaded[name].keys(), name
        for key in saved[name]:
            assert not torch.isnan(loaded[name][key]).any(), (name, key, "not covered by the shards")
            torch.testing.assert_close(loaded[name][key], saved[name][key], rtol=0, atol=0, msg=f"{name}/{key}")
    assert all(s["success"] for r in resumed for s in r["steps"].values())


@pytest.fixture(scope="module")
def wide_adam_dp4(root) -> dict[str, Any]:
    ckpts = {k: os.path.join(root, f"wide_adam_{k}") for k in ("fully_reshardable", "dp_reshardable")}
    job = Job(spec=WIDE, micro_batch=WIDE_MICRO_BATCH, optimizer="adam", steps=SAVE_AT, saves=[(d, k) for k, d in ckpts.items()])
    return {"saving": spawn(_run, 4, job), **ckpts}


@pytest.mark.parametrize("sharding", ["dp_reshardable", "fully_reshardable"])
def test_adamw_checkpoint_loads_into_muon_through_megatron_lms_load_path(wide_adam_dp4, sharding) -> None:
    """AdamW -> Muon through the calls Megatron-LM's load_checkpoint makes, at DP4: Muon
    momentum <- exp_avg and weights bitwise, AdamW params' state as saved, training goes on."""
    job = Job(spec=WIDE, micro_batch=WIDE_MICRO_BATCH, load=wide_adam_dp4[sharding], megatron_lm_load=sharding, steps=SAVE_AT + 2)
    muon = spawn(_run, 4, job)
    names = set(muon[0]["muon_names"])
    saved, loaded = _full_states(wide_adam_dp4["saving"], "at_save"), _full_states(muon, "after_load")
    assert names and saved.keys() == loaded.keys()
    for name, state in loaded.items():
        if name in names:
            assert state.keys() == {"main", "exp_avg"}, (name, state.keys())
            _assert_bitwise({"m": saved[name]["exp_avg"], "p": saved[name]["main"]}, {"m": state["exp_avg"], "p": state["main"]}, name)
        else:
            _assert_bitwise(saved[name], state, name)
    for rank in range(4):
        _assert_bitwise(wide_adam_dp4["saving"][rank]["at_save"]["model"], muon[rank]["after_load"]["model"])
        assert all(s["success"] and torch.isfinite(torch.tensor(s["loss"])) for s in muon[rank]["steps"].values())


# ---------------------------------------------------------------------------- determinism
def test_same_seed_and_layout_give_the_same_bits(dp2) -> None:
    _assert_runs_equal(dp2["straight"], spawn(_run, 2, Job()))


# ---------------------------------------------------------------------------- switching
def test_adamw_to_muon_switch(root) -> None:
    ckpt = os.path.join(root, "adam_full")
    adam = spawn(_run, 2, Job(optimizer="adam", steps=SAVE_AT, saves=[(ckpt, "fully_reshardable")]))
    muon = spawn(_run, 2, Job(load=ckpt, steps=SAVE_AT + 2))
    names = muon[0]["muon_names"]
    for rank in range(2):
        saved, loaded = adam[rank]["at_save"], muon[rank]["after_load"]
        _assert_bitwise(saved["model"], loaded["model"])
        for name, state in loaded.items():
            if name == "model":
                continue
            if name in names:  # momentum <- exp_avg, bitwise; no AdamW slots left
                assert state.keys() == {"main", "exp_avg"}, state.keys()
                _assert_bitwise({"m": saved[name]["exp_avg"], "p": saved[name]["main"]}, {"m": state["exp_avg"], "p": state["main"]})
            else:  # AdamW state kept as saved
                _assert_bitwise(saved[name], state, name)
        assert all(s["success"] and torch.isfinite(torch.tensor(s["loss"])) for s in muon[rank]["steps"].values())
    assert sum("optimizer switch AdamW -> Muon" in m for m in muon[0]["logs"]) == 1, muon[0]["logs"]


def test_muon_to_adamw_switch(dp2) -> None:
    adam = spawn(_run, 2, Job(optimizer="adam", load=dp2["fully_reshardable"], steps=SAVE_AT + 2))
    names = dp2["saving"][0]["muon_names"]
    for rank in range(2):
        saved, loaded = dp2["saving"][rank]["at_save"], adam[rank]["after_load"]
        for name, state in loaded.items():
            if name == "model":
                continue
            if name in names:  # exp_avg <- momentum, exp_avg_sq <- momentum**2
                momentum = saved[name]["exp_avg"]
                _assert_bitwise(
                    {"m": momentum, "v": momentum.square(), "p": saved[name]["main"]},
                    {"m": state["exp_avg"], "v": state["exp_avg_sq"], "p": state["main"]},
                    name,
                )
            else:
                _assert_bitwise(saved[name], state, name)
        assert all(s["success"] and torch.isfinite(torch.tensor(s["loss"])) for s in adam[rank]["steps"].values())
    assert sum("optimizer switch Muon -> AdamW" in m for m in adam[0]["logs"]) == 1, adam[0]["logs"]


# ---------------------------------------------------------------------------- NaN / Inf
def test_nonfinite_gradients_skip_the_step_on_every_rank() -> None:
    # MoE EP2: rank 1's expert optimizer alone sees the NaN in its expert's gradient (expert
    # DP size 1); the dense optimizers of both ranks and rank 0's expert optimizer must skip
    # too. Then an Inf in rank 0's dense gradient (spread by the DP reduce-scatter).
    nan_at = {
        1: (1, "decoder.layers.0.mlp.experts.local_experts.0.linear_fc2.weight", float("nan")),
        2: (0, "embedding.word_embeddings.weight", float("inf")),
    }
    out = spawn(_run, 2, Job(layout={"ep": 2}, moe=True, steps=4, nan_at=nan_at))
    for rank, result in enumerate(out):
        steps = result["steps"]
        assert [steps[s]["success"] for s in range(4)] == [True, False, False, True], rank
        assert [steps[s]["skipped"] for s in range(4)] == [0, 1, 2, 2], rank
        assert result["skipped_per_member"] == [2, 2], rank  # dense and expert optimizers
        for s in (1, 2):
            _assert_bitwise(steps[s]["before"], steps[s]["after"], f"rank{rank} step{s}")
        changed = [n for n, p in result["final"]["model"].items() if not torch.equal(p, steps[2]["after"]["model"][n])]
        assert changed, "the clean step after the skipped ones did not train"
    assert any("non-finite gradient in the expert parameters on 1 rank" in m for m in out[0]["logs"]), out[0]["logs"]
    assert any("non-finite gradient in the dense parameters on" in m for m in out[0]["logs"]), out[0]["logs"]


# ---------------------------------------------------------------------------- mismatches
def _try_loads(rank: int, world: int, attempts: list[tuple[str, str | None]]) -> list[str]:
    from muon_megatron.training import checkpointing

    messages = []
    for ckpt_dir, not_muon in attempts:
        _, _, model, optimizer, scheduler = _setup(Job(not_muon=not_muon))
        try:
            checkpointing.load_checkpoint(ckpt_dir, model, optimizer, scheduler)
        except (checkpointing.CheckpointMismatchError, checkpointing.CheckpointReadError) as error:
            messages.append(f"{type(error).__name__}: {error}")
        else:
            messages.append("loaded")
    return messages


def _rerecord_checksum(ckpt_dir: str, name: str) -> None:
    """Record `name`'s new CRC-32 in rank 0's checksum file, as if it had been saved so."""
    sidecar = os.path.join(ckpt_dir, "muon_checksums.0.json")
    with open(sidecar, encoding="utf-8") as f:
        record = json.load(f)
    with open(os.path.join(ckpt_dir, name), "rb") as f:
        data = f.read()
    record["files"][name] = {"bytes": len(data), "crc32": zlib.crc32(data)}
    with open(sidecar, "w", encoding="utf-8") as f:
        json.dump(record, f)


def test_mismatched_checkpoints_raise_naming_the_parameter_and_the_fix(dp2, root) -> None:
    removed = "decoder.layers.self_attention.linear_proj.weight"  # layers stacked in one key
    no_momentum = os.path.join(root, "no_momentum")
    shutil.copytree(dp2["fully_reshardable"], no_momentum)
    with open(os.path.join(no_momentum, ".metadata"), "rb") as f:
        metadata = pickle.load(f)
    del metadata.state_dict_metadata[f"optimizer.state.muon_momentum.{removed}"]
    with open(os.path.join(no_momentum, ".metadata"), "wb") as f:
        pickle.dump(metadata, f)
    _rerecord_checksum(no_momentum, ".metadata")  # a consistent checkpoint that lacks the key
    truncated = os.path.join(root, "truncated")
    shutil.copytree(dp2["fully_reshardable"], truncated)
    data_file = os.path.join(truncated, "__0_0.distcp")
    with open(data_file, "r+b") as f:
        f.truncate(os.path.getsize(data_file) // 2)

    fc2 = "decoder.layers.mlp.linear_fc2.weight"
    messages = spawn(
        _try_loads,
        2,
        [
            (dp2["fully_reshardable"], "linear_fc2"),  # fc2 AdamW here, Muon in the checkpoint
            (dp2["dp_reshardable"], "linear_fc2"),
            (no_momentum, None),
            (truncated, None),
        ],
    )
    assert messages[0] == messages[1]
    other_set, other_set_dp, missing, corrupt = messages[0]
    assert other_set.startswith("CheckpointMismatchError") and fc2 in other_set, other_set
    assert "different Muon parameter set" in other_set and "routing (is_muon)" in other_set
    assert other_set_dp.startswith("CheckpointMismatchError") and "linear_fc2" in other_set_dp, other_set_dp
    assert "routing (is_muon)" in other_set_dp
    assert missing.startswith("CheckpointMismatchError") and removed in missing, missing
    assert "no momentum" in missing and "complete checkpoint" in missing
    assert corrupt.startswith("CheckpointReadError") and "__0_0.distcp is truncated" in corrupt, corrupt
    assert truncated in corrupt and "Nothing was loaded" in corrupt
