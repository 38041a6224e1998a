"""Fused weights are orthogonalized per logical matrix, also under tensor parallelism.

One step of the distributed optimizer at TP2, with DP1 and with DP2 (world 4: each matrix's
TP shards are further cut into ZeRO-1 DP ranges, which the owner must gather and put back
in place), with momentum 0 and weight decay 0 makes the update exactly scale * NS(grad).
The worker also returns the full reduced gradient, so
the test recomputes that update on one device: with the split flag on, Newton-Schulz and the
'moonlight' scale apply to each logical block (Q, K, V; SwiGLU gate, up) on its own; with it
off, to the whole fused matrix. Each layout must match its own recomputation and not the
other one; with the flag on every block's singular values are ~1, with it off no block's are.
"""

from __future__ import annotations

import pytest
import torch

from muon_megatron.config import MuonConfig
from muon_megatron.ops.newton_schulz import newton_schulz
from muon_megatron.ops.update import update_scale
from muon_megatron.runtime.launch import spawn

LR = 1.0
QKV = "decoder.layers.0.self_attention.linear_qkv.weight"
FC1 = "decoder.layers.0.mlp.linear_fc1.weight"
# fp32 Newton-Schulz on the owner vs. on one device: the same arithmetic on the same matrix
# up to the order of the TP gather, measured ~1e-6 relative; 1e-5 as in the parity tests.
FP32_TOLERANCE = 1e-5
# Per-block and whole-matrix orthogonalization differ by far more than that (measured 0.38-0.78).
DIFFERENT = 0.1
# Singular values of a quintic-NS output of a full-rank input: 0.68-1.20 measured in
# tests/unit_tests/test_newton_schulz.py; the same band here.
QUINTIC_BAND = (0.65, 1.25)
# LayerNorm's output is zero-mean over the hidden dimension, so a gradient whose input side is
# the hidden size (Q, gate, up) is orthogonal to the all-ones vector: one exactly-zero
# singular value that Newton-Schulz keeps at zero (measured ~1e-6).
NULL_SINGULAR_VALUE = 1e-4


def _all_gather_reduced_grads(model_chunk) -> None:
    """After the reduce-scatter each DP rank holds the reduced gradient of its own range of
    every grad bucket (the rest is its local, unreduced gradient): gather the reduced ranges
    over the bucket's DP group, as Megatron gathers the params, so every rank's main_grad
    is the whole reduced gradient."""
    for bucket_group in model_chunk.bucket_groups:
        group = bucket_group.intra_distributed_optimizer_instance_group
        size = bucket_group.intra_distributed_optimizer_instance_size
        rank = bucket_group.intra_distributed_optimizer_instance_rank
        for bucket in bucket_group.buckets:
            mine = bucket.grad_data.view(size, -1)[rank].clone()
            torch.distributed.all_gather_into_tensor(bucket.grad_data, mine, group=group)


def _one_step_update(rank: int, world: int, split: bool) -> dict[str, torch.Tensor] | None:
    from muon_megatron.optimizer.builder import get_muon_optimizer
    from muon_megatron.testing import tiny

    spec, layout = tiny.ModelSpec(), tiny.Layout(tp=2)
    tiny.initialize_parallel(layout, seed=7)
    model = tiny.build_model(spec, layout)
    before = tiny.full_state(model, layout)
    cfg = MuonConfig(
        muon_momentum=0.0,
        muon_nesterov=False,
        muon_ns_dtype="fp32",
        muon_split_qkv=split,
        muon_split_fc1=split,
    )
    opt_config = tiny.optimizer_config(lr=LR, weight_decay=0.0, clip_grad=0.0)
    optimizer = get_muon_optimizer(opt_config, model, cfg)
    batch = tiny.global_batch(0, spec, 8, seed=7)
    tiny.train_step(model, optimizer, batch, spec, layout, micro_batch_size=2)
    after = tiny.full_state(model, layout)
    # Clipping is off and the step only reads main_grad: it still holds the reduced gradient
    # (of this rank's DP range; at DP1 that is all of it). This model is done with: write the
    # gradients into the weights to un-shard them the same way the weights were.
    if world > layout.tp:
        _all_gather_reduced_grads(model[0])
    with torch.no_grad():
        for param in model[0].parameters():
            param.copy_(param.main_grad)
    grads = tiny.full_state(model, layout)
    if before is None:
        return None
    return {
        name: ((before[name] - after[name]) / LR, grads[name]) for name in (QKV, FC1)
    }


def _blocks(tensor: torch.Tensor, name: str) -> list[tuple[slice, ...]]:
    """Row index sets of the logical blocks of a TP1 tensor.

    QKV: 2 query groups x [2 q heads, k, v] of 16 rows each; FC1: [gate; up].
    """
    if name == QKV:
        rows = torch.arange(tensor.shape[0]).view(2, 4, 16)
        return [rows[:, :2].reshape(-1), rows[:, 2].reshape(-1), rows[:, 3].reshape(-1)]
    half = tensor.shape[0] // 2
    rows = torch.arange(tensor.shape[0])
    return [rows[:half], rows[half:]]


def _orthogonalized(grad: torch.Tensor) -> torch.Tensor:
    return update_scale("moonlight", *grad.shape) * newton_schulz(grad, dtype="fp32")


def _expected(grad: torch.Tensor, name: str, split: bool) -> torch.Tensor:
    if not split:
        return _orthogonalized(grad)
    out = torch.empty_like(grad)
    for rows in _blocks(grad, name):
        out[rows] = _orthogonalized(grad[rows])
    return out


def _block_singular_values_in_band(update: torch.Tensor, name: str) -> list[bool]:
    """Per logical block: are its un-scaled singular values in the quintic band (at most one
    LayerNorm null direction aside)?"""
    verdicts = []
    for rows in _blocks(update, name):
        block = update[rows]
        sv = torch.linalg.svdvals(block / update_scale("moonlight", *block.shape))
        kept = sv[sv >= NULL_SINGULAR_VALUE]
        verdicts.append(
            len(sv) - len(kept) <= 1
            and QUINTIC_BAND[0] <= float(kept.min())
            and float(kept.max()) <= QUINTIC_BAND[1]
        )
    return verdicts


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _check(split: bool, dp: int) -> None:
    result = spawn(_one_step_update, 2 * dp, split)[0]
    for name, (update, grad) in result.items():
        own, other = _expected(grad, name, split), _expected(grad, name, not split)
        assert _rel(update, own) < FP32_TOLERANCE, (name, _rel(update, own))
        assert _rel(update, other) > DIFFERENT, (name, _rel(update, other))
        in_band = _block_singular_values_in_band(update, name)
        # Split: every block is orthogonal on its own. Fused: no block is (only the whole
        # matrix is), as the module docstring says.
        assert all(in_band) if split else not any(in_band), (name, in_band)


@pytest.mark.parametrize("dp", [1, 2])
def test_split_on_orthogonalizes_each_logical_block(dp: int) -> None:
    _check(split=True, dp=dp)


@pytest.mark.parametrize("dp", [1, 2])
def test_split_off_orthogonalizes_the_fused_matrix_instead(dp: int) -> None:
    _check(split=False, dp=dp)
