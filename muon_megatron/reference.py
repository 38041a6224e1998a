"""Single-device Muon (Moonlight recipe) with AdamW for the rest: the oracle.

Every distributed layout is tested against this class, so it is written to be obviously
right rather than fast: one parameter at a time, one logical matrix at a time, calling the
same math (`muon_megatron.ops.newton_schulz`) and the same splitting (`muon_megatron.routing.rules`)
as the distributed optimizer, with TP size 1.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim.adamw import adamw as _torch_adamw

from muon_megatron.config import MuonConfig
from muon_megatron.ops.newton_schulz import newton_schulz
from muon_megatron.ops.update import apply_update_, momentum_update_, nesterov_input, update_scale
from muon_megatron.routing.rules import muon_param_rule, param_kind, require_matrix
from muon_megatron.routing.weight_decay import megatron_no_weight_decay, no_weight_decay_rule
from muon_megatron.routing.splits import (
    MatrixSplit,
    ModelShape,
    extract_pieces,
    insert_pieces,
    matrix_split,
)

# ModelShape lives in routing (it is what matrix_split needs); re-exported for callers.
__all__ = ["ModelShape", "Muon", "megatron_no_weight_decay"]


class Muon(torch.optim.Optimizer):
    """Muon for hidden matrices, AdamW for everything else, on one device.

    Muon step of a parameter p with gradient g (momentum mu, lr, weight decay wd):
      buf <- mu buf + (1 - mu) g  (fp32); x <- (1 - mu) g + mu buf (Nesterov) or buf;
      for each logical matrix M of x (Q/K/V, gate/up, one expert; see `routing`):
        U_M = NS(M).float() * update_scale(mode, rows(M), cols(M));
      p <- p (1 - lr wd) - lr U.

    The momentum is fp32; parameters are updated in their own dtype (no master copy), so
    the caller passes fp32 parameters to compare with Megatron's fp32 main params.

    Param groups: one per non-empty (use_muon, no weight decay) pair, Muon before AdamW and
    weight decay before none, each holding `use_muon`, `lr`, `weight_decay`, `wd_mult` (0 or
    1, read by Megatron's scheduler), `betas`, `eps` and torch's `param_names`. `lr` and
    `weight_decay` are read at every step, so a scheduler may change them between steps.

    Numerical contract:
      - AdamW parameters: bitwise equal to `torch.optim.AdamW` with the same lr, betas,
        eps and weight decay (the same functional `torch.optim.adamw.adamw` does the math).
      - Muon parameters, quintic bf16, no splits: Newton-Schulz is bitwise equal to torch's
        `_zeropower_via_newtonschulz`; the parameter differs from `torch.optim.Muon(
        adjust_lr_fn="match_rms_adamw")` only because we round (scale * NS) in fp32 where
        torch rounds (lr * scale): at most one fp32 ulp of the parameter per step.
    """

    def __init__(
        self,
        named_params: Iterable[tuple[str, torch.nn.Parameter]],
        *,
        lr: float,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        muon_config: MuonConfig | None = None,
        model_shape: ModelShape | None = None,
        is_muon: Callable[[str, Tensor], bool] | None = None,
        no_weight_decay: Callable[[str, Tensor], bool] | None = None,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"lr={lr} is negative; pass a learning rate >= 0.")
        if weight_decay < 0.0:
            raise ValueError(f"weight_decay={weight_decay} is negative; pass a value >= 0.")
        self.muon_config = muon_config if muon_config is not None else MuonConfig()
        # The distributed optimizer's defaults: the router flag and norm-gamma decay.
        is_muon = is_muon or muon_param_rule(self.muon_config)
        no_weight_decay = no_weight_decay or no_weight_decay_rule(self.muon_config)
        self.model_shape = model_shape
        self._splits: dict[str, MatrixSplit] = {}
        groups: dict[tuple[bool, bool], dict[str, Any]] = {
            key: {"params": [], "use_muon": key[0], "wd_mult": 0.0 if key[1] else 1.0}
            for key in ((True, False), (True, True), (False, False), (False, True))
        }
        seen: set[str] = set()
        for name, param in named_params:
            if not param.requires_grad:
                continue
            if name in seen:
                raise ValueError(f"parameter name {name!r} appears twice; names must be unique.")
            seen.add(name)
            use_muon = bool(is_muon(name, param))
            if use_muon:
                self._splits[name] = self._matrix_split(name, param)
            groups[use_muon, bool(no_weight_decay(name, param))]["params"].append((name, param))
        param_groups = [g for g in groups.values() if g["params"]]
        if not param_groups:
            raise ValueError("Muon got no trainable parameters; pass model.named_parameters().")
        for group in param_groups:
            group["weight_decay"] = weight_decay * group["wd_mult"]
        defaults = {"lr": lr, "weight_decay": weight_decay, "betas": betas, "eps": eps}
        super().__init__(param_groups, defaults)
        # Name -> RMS of the scaled Muon update (the step divided by lr) of the last step.
        self.last_metrics: dict[str, float] = {}

    def _matrix_split(self, name: str, param: Tensor) -> MatrixSplit:
        require_matrix(name, param.shape)
        if self.model_shape is not None:
            return matrix_split(
                name,
                param.shape,
                tp_size=1,
                tp_partition_dim=None,
                muon_config=self.muon_config,
                **dataclasses.asdict(self.model_shape),
            )
        if param_kind(name) in ("grouped_fc1", "grouped_fc2"):
            raise ValueError(
                f"{name}: a GroupedMLP weight holds every local expert, which Muon must "
                "orthogonalize one by one; pass model_shape=ModelShape(...)."
            )
        # Without a model shape nothing is known about fused layouts: one plain matrix.
        rows, cols = param.shape
        return MatrixSplit((rows, cols), False, (((0, rows),),), "replicated", 0, 1)

    @property
    def logical_matrix_count(self) -> int:
        """Logical matrices (after splits) orthogonalized per step."""
        return sum(len(split.logical_shapes()) for split in self._splits.values())

    def orthogonalized_update(self, name: str, x_2d: Tensor) -> Tensor:
        """The scaled fp32 update of Muon parameter `name` for NS input `x_2d` (p's shape)."""
        cfg = self.muon_config
        split = self._splits[name]
        pieces = []
        for piece in extract_pieces(x_2d, split):
            rows, cols = piece.shape
            ortho = newton_schulz(
                piece, cfg.muon_ns_steps, cfg.muon_coefficients, cfg.muon_ns_dtype, cfg.muon_eps
            )
            scale = update_scale(
                cfg.muon_scale_mode,
                rows,
                cols,
                cfg.muon_matched_adamw_rms,
                cfg.muon_extra_scale_factor,
            )
            pieces.append(ortho.float() * scale)
        return insert_pieces(torch.zeros_like(x_2d, dtype=torch.float32), split, pieces)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch casts every floating state tensor to its parameter's dtype on load; the
        # momentum must stay fp32 (and keep its bits) for low-precision parameters too.
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        momenta = {
            param: state_dict["state"][i]["momentum_buffer"]
            for i, param in zip(saved_ids, params)
            if "momentum_buffer" in state_dict["state"].get(i, {})
        }
        super().load_state_dict(state_dict)
        for param, buf in momenta.items():
            self.state[param]["momentum_buffer"] = buf.to(param.device, torch.float32, copy=True)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.last_metrics = {}
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _muon_step(self, group: dict[str, Any]) -> None:
        mu, nesterov = self.muon_config.muon_momentum, self.muon_config.muon_nesterov
        for name, param in zip(group["param_names"], group["params"]):
            if param.grad is None:
                continue
            # The momentum is fp32 whatever the parameter dtype; `.float()` copies a
            # low-precision grad and never writes to p.grad.
            grad = param.grad.float()
            state = self.state[param]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(param, dtype=torch.float32)
            buf = momentum_update_(state["momentum_buffer"], grad, mu)
            update = self.orthogonalized_update(name, nesterov_input(grad, buf, mu, nesterov))
            self.last_metrics[name] = update.square().mean().sqrt().item()
            apply_update_(param, update, group["lr"], group["weight_decay"], scale=1.0)

    def _adamw_step(self, group: dict[str, Any]) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for param in group["params"]:
            if param.grad is None:
                continue
            state = self.state[param]
            if not state:
                # Same state keys and dtypes as torch.optim.AdamW (step on the CPU when
                # neither fused nor capturable), so the functional below takes the same path.
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            params.append(param)
            grads.append(param.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        # foreach/fused None: the functional picks the implementation exactly as
        # torch.optim.AdamW's default does, which is what makes the two bitwise equal.
        _torch_adamw(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            foreach=None,
            fused=None,
            has_complex=any(torch.is_complex(p) for p in params),
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )
