"""The rest of Muon's math on plain tensors: momentum, Nesterov, update scale, the step.

Never imports `torch.distributed` (see `ops.newton_schulz`).
"""

from __future__ import annotations

import math

import torch

from muon_megatron.config import ScaleMode

__all__ = [
    "update_scale",
    "momentum_update_",
    "nesterov_input",
    "apply_update_",
    "momentum_update_foreach_",
    "nesterov_inputs_foreach",
    "apply_updates_foreach_",
]


def update_scale(
    mode: ScaleMode,
    rows: int,
    cols: int,
    matched_adamw_rms: float = 0.2,
    extra_scale_factor: float = 1.0,
) -> float:
    """Multiplier of the orthogonalized update of a rows x cols (A x B, out x in) matrix.

    'moonlight': matched_adamw_rms * sqrt(max(A, B)). An orthogonal A x B matrix has RMS
    1/sqrt(max(A, B)), so this gives the update an RMS of `matched_adamw_rms`, the RMS of
    a typical AdamW update (Moonlight, arXiv 2502.16982, Sec. 2.2).
    'shape_scaling': sqrt(max(1, A / B)) (Keller Jordan's original Muon), and
    'unit_rms_norm': sqrt(A / B), both with megatron-core's names and meaning.
    'none': 1.
    Every mode is multiplied by `extra_scale_factor` (megatron-core's
    `muon_extra_scale_factor`).
    """
    if mode == "moonlight":
        scale = matched_adamw_rms * math.sqrt(max(rows, cols))
    elif mode == "shape_scaling":
        scale = math.sqrt(max(1.0, rows / cols))
    elif mode == "unit_rms_norm":
        scale = math.sqrt(rows / cols)
    elif mode == "none":
        scale = 1.0
    else:
        raise ValueError(
            f"scale_mode={mode!r} is unknown; use 'moonlight', 'shape_scaling', "
            "'unit_rms_norm' or 'none'."
        )
    return scale * extra_scale_factor


def momentum_update_(buf: torch.Tensor, grad: torch.Tensor, momentum: float) -> torch.Tensor:
    """EMA momentum in place: buf <- momentum * buf + (1 - momentum) * grad.

    The EMA form (torch.optim.Muon, AdamW's exp_avg) differs from Moonlight's
    buf <- mu*buf + g only by the factor (1 - mu), which Newton-Schulz normalizes away.
    """
    return buf.lerp_(grad, 1.0 - momentum)


def nesterov_input(
    grad: torch.Tensor, buf: torch.Tensor, momentum: float, nesterov: bool
) -> torch.Tensor:
    """What Newton-Schulz orthogonalizes: (1 - mu) g + mu buf with Nesterov, else buf."""
    return grad.lerp(buf, momentum) if nesterov else buf


def apply_update_(
    param: torch.Tensor,
    update: torch.Tensor,
    lr: float,
    weight_decay: float,
    scale: float,
) -> torch.Tensor:
    """Decoupled weight decay then the step: p <- p (1 - lr wd) - lr scale update."""
    param.mul_(1.0 - lr * weight_decay)
    return param.add_(update.to(param.dtype), alpha=-lr * scale)


# The same three steps over many tensors in one kernel launch each (torch._foreach_*): the
# arithmetic per element is that of the single-tensor functions above, bit for bit.


def momentum_update_foreach_(
    bufs: list[torch.Tensor], grads: list[torch.Tensor], momentum: float
) -> list[torch.Tensor]:
    """`momentum_update_` on every (buf, grad) pair."""
    if bufs:
        torch._foreach_lerp_(bufs, grads, 1.0 - momentum)
    return bufs


def nesterov_inputs_foreach(
    grads: list[torch.Tensor], bufs: list[torch.Tensor], momentum: float, nesterov: bool
) -> list[torch.Tensor]:
    """`nesterov_input` of every pair (new tensors with Nesterov, else the buffers)."""
    if not nesterov or not bufs:
        return list(bufs)
    return list(torch._foreach_lerp(grads, bufs, momentum))


def apply_updates_foreach_(
    params: list[torch.Tensor], updates: list[torch.Tensor], lr: float, weight_decay: float
) -> None:
    """`apply_update_` (scale 1) on every (param, update) pair of one param group."""
    if not params:
        return
    if weight_decay:  # multiplying by exactly 1.0 changes no float: skip the kernel
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_add_(params, updates, alpha=-lr)
