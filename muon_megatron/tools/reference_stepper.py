"""The single-device reference, stepped the way Megatron steps the distributed optimizer.

`muon-megatron verify` trains a world-1 Megatron DDP model with `reference.Muon` through this
stepper and compares the result with the distributed run (`tools.verify`).
"""

from __future__ import annotations

import torch

__all__ = ["ReferenceStepper"]


class ReferenceStepper:
    """Drives `reference.Muon` from a world-1 Megatron DDP model like Megatron's mixed
    precision does: grads come from `param.main_grad` (fp32); with bf16 params the
    reference updates fp32 master copies, which are then copied into the model. Clipping
    uses megatron-core's own norm and clip functions: torch's `clip_grad_norm_` rounds the
    global norm differently, which Newton-Schulz amplifies."""

    def __init__(self, named_params, make_reference, clip_grad: float) -> None:
        self.model_params = [p for _, p in named_params]
        # fp32 params are their own masters, so the fp32 path stays bitwise comparable.
        self.masters = [
            p if p.dtype == torch.float32 else torch.nn.Parameter(p.detach().float().clone())
            for p in self.model_params
        ]
        self.reference = make_reference([(n, m) for (n, _), m in zip(named_params, self.masters)])
        self.clip_grad = clip_grad

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.model_params + self.masters:
            p.grad = None

    @torch.no_grad()
    def step(self):
        for p, master in zip(self.model_params, self.masters):
            master.grad = p.main_grad.float().clone()
        if self.clip_grad > 0:
            from megatron.core.optimizer.clip_grads import (
                clip_grad_by_total_norm_fp32,
                get_grad_norm_fp32,
            )

            norm = get_grad_norm_fp32([m.grad for m in self.masters])
            clip_grad_by_total_norm_fp32(self.masters, self.clip_grad, norm)
        self.reference.step()
        for p, master in zip(self.model_params, self.masters):
            if p is not master:
                p.copy_(master)
        return True, None, None
