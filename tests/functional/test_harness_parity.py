"""The CPU harness computes what one process computes.

megatron's own ZeRO-1 Adam (`get_megatron_optimizer`) is trained for a few steps under a
parallel layout, starting from a one-process model's weights (moved there with
`save_model` / `load_model`) on the same global batches, and must end with the one-process
weights. A second test shows the data-parallel gradient reduction is real: the ranks'
local gradients differ, their mean is the one-process gradient, and the same run with the
reduction switched off misses the reference by far more than the tolerance. PP2 and MoE EP2
(both token dispatchers) get smoke tests.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from typing import Any

import pytest
import torch

from muon_megatron.runtime.cpu_shims import install_cpu_shims
from muon_megatron.runtime.launch import spawn
from muon_megatron.testing.tiny import (
    Layout,
    ModelSpec,
    build_optimizer,
    build_model,
    forward_backward,
    full_state,
    global_batch,
    initialize_parallel,
    load_model,
    optimizer_config,
    save_model,
    train_step,
    unwrap,
)

SPEC = ModelSpec()
GLOBAL_BATCH = 8
MICRO_BATCH = 2
STEPS = 3
SEED = 1234
DATA_SEED = 7

# Tolerance on ||p_layout - p_ref|| / ||p_ref - p_init|| per parameter, i.e. relative to the
# update the parameter received over STEPS Adam steps. Everything is fp32 and the layouts
# differ from one process only in summation order (TP partial sums, the DP reduce-scatter of
# 1/dp-scaled grads, the distributed grad norm): the gradients agree to 6e-8 (DP2) and
# 5e-7 (TP2xDP2) relative in norm (GRAD_RTOL below checks that). Adam then divides every
# entry by its own RMS, g / (|g| + eps): for the few entries with |g| near eps = 1e-8 (the
# query/key rows of layer 0, whose gradient at a near-uniform-attention init is a
# cancellation of much larger terms, min |g| ~ 6e-9) a rounding-level absolute error becomes a
# percent-level error of that entry's update. Measured worst case, the layer-0 linear_qkv
# weight: 1.3e-5 (DP2), 5.7e-5 (TP2xDP2), 7.5e-5 (TP2). 3e-4 leaves 4x headroom and is still
# >1000x below what a missing gradient reduction produces (the negative control below).
UPDATE_RTOL = 3e-4

# The one-process gradient against a layout's gradient, relative in norm per parameter: fp32
# summation order only, nothing amplifies it. Measured 6.2e-8 (DP2), 5.3e-7 (TP2xDP2).
GRAD_RTOL = 2e-6


def _batches() -> list[dict[str, torch.Tensor]]:
    return [global_batch(step, SPEC, GLOBAL_BATCH, DATA_SEED) for step in range(STEPS)]


def _main_grads(model_chunks: list[torch.nn.Module]) -> dict[str, torch.Tensor]:
    return {
        name: param.main_grad.detach().clone()
        for name, param in unwrap(model_chunks[0]).named_parameters()
    }


def _train(model_chunks: list[torch.nn.Module], layout: Layout) -> list[float]:
    optimizer = build_optimizer(model_chunks, optimizer_config())
    return [
        train_step(model_chunks, optimizer, batch, SPEC, layout, MICRO_BATCH)
        for batch in _batches()
    ]


def _reference_rank(rank: int, world_size: int, ckpt_dir: str) -> dict[str, Any]:
    layout = Layout()
    initialize_parallel(layout, SEED)
    model = build_model(SPEC, layout)
    save_model(model, ckpt_dir)
    init = full_state(model, layout)
    forward_backward(model, _batches()[0], SPEC, MICRO_BATCH)
    grad0 = _main_grads(model)
    losses = _train(model, layout)
    return {"init": init, "final": full_state(model, layout), "losses": losses, "grad0": grad0}


def _layout_rank(rank: int, world_size: int, layout: Layout, ckpt_dir: str) -> dict[str, Any]:
    # A different seed: the weights must come from the checkpoint, not from the init.
    initialize_parallel(layout, SEED + 1)

    # The step-0 gradient, whole: plain DDP all-reduces it (ZeRO-1 buffers would hold only
    # this rank's reduced shard) and, copied into the params, full_state un-shards it.
    probe = build_model(SPEC, layout, ddp_overrides={"use_distributed_optimizer": False})
    load_model(probe, ckpt_dir)
    forward_backward(probe, _batches()[0], SPEC, MICRO_BATCH)
    with torch.no_grad():
        for param in unwrap(probe[0]).parameters():
            param.copy_(param.main_grad)
    grad0 = full_state(probe, layout)

    model = build_model(SPEC, layout)
    load_model(model, ckpt_dir)
    losses = _train(model, layout)
    return {"final": full_state(model, layout), "losses": losses, "grad0": grad0}


def _dp_rank(rank: int, world_size: int, ckpt_dir: str) -> dict[str, Any]:
    layout = Layout()
    initialize_parallel(layout, SEED + 1)

    # Negative control: the same model with megatron's grad finalisation (the DP reduction)
    # switched off. Its first forward-backward also leaves this rank's local gradient.
    unreduced = build_model(SPEC, layout)
    unwrap(unreduced[0]).config.finalize_model_grads_func = None
    load_model(unreduced, ckpt_dir)
    forward_backward(unreduced, _batches()[0], SPEC, MICRO_BATCH)
    local_grad0 = _main_grads(unreduced)
    _train(unreduced, layout)

    model = build_model(SPEC, layout)
    load_model(model, ckpt_dir)
    losses = _train(model, layout)
    return {
        "local_grad0": local_grad0,
        "final": full_state(model, layout),
        "final_unreduced": full_state(unreduced, layout),
        "losses": losses,
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    ckpt_dir = str(tmp_path_factory.mktemp("world1_init"))
    result = spawn(_reference_rank, 1, ckpt_dir)[0]
    result["ckpt_dir"] = ckpt_dir
    return result


def _relative_errors(
    actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
) -> dict[str, float]:
    """Per parameter: ||actual - expected|| / ||expected||."""
    if actual.keys() != expected.keys():
        raise AssertionError(f"parameter names differ: {sorted(actual.keys() ^ expected.keys())}")
    return {
        name: ((actual[name] - want).norm() / want.norm()).item() for name, want in expected.items()
    }


def _update_errors(final: dict[str, torch.Tensor], reference: dict[str, Any]) -> dict[str, float]:
    """Per parameter: ||final - ref_final|| / ||ref_final - init||, relative to the update."""
    init = reference["init"]
    if final.keys() != init.keys():
        raise AssertionError(f"parameter names differ: {sorted(final.keys() ^ init.keys())}")
    return _relative_errors(
        {name: value - init[name] for name, value in final.items()},
        {name: value - init[name] for name, value in reference["final"].items()},
    )


def test_reference_loss_is_sane(reference: dict[str, Any]) -> None:
    # A near-uniform init on a 256-token vocabulary starts at ln(256).
    assert reference["losses"][0] == pytest.approx(math.log(SPEC.vocab_size), abs=0.05)


def test_tp2_dp2_distributed_adam_matches_one_process(reference: dict[str, Any]) -> None:
    results = spawn(_layout_rank, 4, Layout(tp=2), reference["ckpt_dir"])
    for result in results:
        assert result["losses"] == results[0]["losses"], "ranks disagree on the loss"
    assert results[0]["losses"] == pytest.approx(reference["losses"], rel=1e-6)

    grad_errors = _relative_errors(results[0]["grad0"], reference["grad0"])
    worst = max(grad_errors, key=grad_errors.get)
    print(f"TP2xDP2: max relative gradient error {grad_errors[worst]:.2e} ({worst})")
    assert grad_errors[worst] <= GRAD_RTOL, f"{worst}: {grad_errors[worst]:.2e} > {GRAD_RTOL}"

    errors = _update_errors(results[0]["final"], reference)
    worst = max(errors, key=errors.get)
    print(f"TP2xDP2: max relative update error {errors[worst]:.2e} ({worst})")
    assert errors[worst] <= UPDATE_RTOL, f"{worst}: {errors[worst]:.2e} > {UPDATE_RTOL}"


def test_dp2_reduction_is_real(reference: dict[str, Any]) -> None:
    results = spawn(_dp_rank, 2, reference["ckpt_dir"])
    local = [result["local_grad0"] for result in results]

    # The two ranks' slices of the global batch really differ...
    for name in local[0]:
        spread = (local[0][name] - local[1][name]).norm()
        assert spread > 0.05 * (local[0][name] + local[1][name]).norm(), name
    # ...and the one-process gradient of the whole batch is their mean.
    mean = {name: (local[0][name] + local[1][name]) / 2 for name in local[0]}
    grad_errors = _relative_errors(mean, reference["grad0"])
    worst = max(grad_errors, key=grad_errors.get)
    print(f"DP2: max relative gradient error {grad_errors[worst]:.2e} ({worst})")
    assert grad_errors[worst] <= GRAD_RTOL, f"{worst}: {grad_errors[worst]:.2e} > {GRAD_RTOL}"

    assert results[0]["losses"] == pytest.approx(reference["losses"], rel=1e-6)
    errors = _update_errors(results[0]["final"], reference)
    worst = max(errors, key=errors.get)
    print(f"DP2: max relative update error {errors[worst]:.2e} ({worst})")
    assert errors[worst] <= UPDATE_RTOL, f"{worst}: {errors[worst]:.2e} > {UPDATE_RTOL}"

    # Without the reduction the same comparison fails, by a wide margin.
    unreduced = _update_errors(results[0]["final_unreduced"], reference)
    print(f"DP2 without reduction: max relative update error {max(unreduced.values()):.2e}")
    assert max(unreduced.values()) > 100 * UPDATE_RTOL


def _smoke_rank(
    rank: int, world_size: int, spec: ModelSpec, layout: Layout, steps: int
) -> list[float]:
    initialize_parallel(layout, SEED)
    model = build_model(spec, layout)
    optimizer = build_optimizer(model, optimizer_config(lr=1e-2))
    return [
        train_step(
            model,
            optimizer,
            global_batch(step, spec, GLOBAL_BATCH, DATA_SEED),
            spec,
            layout,
            MICRO_BATCH,
        )
        for step in range(steps)
    ]


def _assert_trains(results: list[list[float]]) -> None:
    losses = results[0]
    assert all(result == losses for result in results), "ranks disagree on the loss"
    assert all(math.isfinite(loss) for loss in losses), losses
    assert losses[-1] < losses[0] - 0.1, losses


def test_pp2_trains() -> None:
    _assert_trains(spawn(_smoke_rank, 2, SPEC, Layout(pp=2), 5, timeout_s=300))


@pytest.mark.parametrize("dispatcher", ["allgather", "alltoall"])
def test_moe_ep2_trains(dispatcher: str) -> None:
    spec = ModelSpec(num_experts=4, moe_router_topk=2, moe_token_dispatcher_type=dispatcher)
    _assert_trains(spawn(_smoke_rank, 2, spec, Layout(ep=2), 5, timeout_s=300))


# --------------------------------------------------------------------------------------------
# The harness itself
# --------------------------------------------------------------------------------------------


def test_cpu_shims_idempotent_and_inert_under_cuda() -> None:
    # Whoever launches on CPU installs them (importing the harness does not): the first call
    # patches, a second changes nothing.
    install_cpu_shims()
    patched = (torch.cuda.current_device, torch.Tensor.cuda, torch.cuda.Stream)
    assert install_cpu_shims() is True
    assert (torch.cuda.current_device, torch.Tensor.cuda, torch.cuda.Stream) == patched

    # On a CUDA machine nothing may change, not even a megatron import.
    probe = (
        "import sys, torch\n"
        "torch.cuda.is_available = lambda: True\n"
        "before = (torch.cuda.current_device, torch.Tensor.cuda, torch.cuda.Stream)\n"
        "from muon_megatron.runtime.cpu_shims import install_cpu_shims\n"
        "assert install_cpu_shims() is False\n"
        "assert (torch.cuda.current_device, torch.Tensor.cuda, torch.cuda.Stream) == before\n"
        "assert not [m for m in sys.modules if m.startswith('megatron')]\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run([sys.executable, "-c", probe], cwd=root, check=True, timeout=60)


def _fail_on_rank_1(rank: int, world_size: int) -> int:
    torch.distributed.barrier()
    if rank == 1:
        raise ValueError("boom on purpose")
    # Rank 0 would wait here forever for rank 1; the parent must not.
    torch.distributed.barrier()
    return rank


def _sleep_forever(rank: int, world_size: int) -> None:
    time.sleep(3600)


def test_spawn_reports_the_failing_rank() -> None:
    with pytest.raises(RuntimeError, match=r"(?s)rank 1 of 2 raised.*ValueError: boom on purpose"):
        spawn(_fail_on_rank_1, 2, timeout_s=60)


def test_spawn_times_out() -> None:
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="did not finish within"):
        spawn(_sleep_forever, 1, timeout_s=5)
    assert time.monotonic() - start < 30
