"""TE's `LayerNorm` and `RMSNorm` (TE v2.11 transformer_engine/pytorch/module/layernorm.py
and rmsnorm.py, both thin wrappers over `te.pytorch.ops`), and the normalization that
`LayerNormLinear` applies before its GEMM. Computed in fp32, returned in the input's dtype."""

from __future__ import annotations

import torch

__all__ = ["LayerNorm", "RMSNorm", "normalize"]


def normalize(x: torch.Tensor, kind: str, weight: torch.Tensor, bias: torch.Tensor | None,
              eps: float, zero_centered_gamma: bool) -> torch.Tensor:
    """LayerNorm ((x - mean) / sqrt(var + eps) * gamma + beta) or RMSNorm
    (x / sqrt(mean(x^2) + eps) * gamma) over the last dim; gamma is 1 + weight when
    `zero_centered_gamma`."""
    x32 = x.float()
    gamma = weight.float() + 1.0 if zero_centered_gamma else weight.float()
    if kind == "LayerNorm":
        mean = x32.mean(dim=-1, keepdim=True)
        var = (x32 - mean).square().mean(dim=-1, keepdim=True)
        y = (x32 - mean) * torch.rsqrt(var + eps) * gamma + bias.float()
    else:
        y = x32 * torch.rsqrt(x32.square().mean(dim=-1, keepdim=True) + eps) * gamma
    return y.to(x.dtype)


def _shape(normalized_shape, hidden_size) -> int:
    # TE v2.11 layernorm.py L70-86: `hidden_size` is the deprecated name (megatron's TENorm
    # still passes it); exactly one of the two is given.
    if (normalized_shape is None) == (hidden_size is None):
        raise RuntimeError("give exactly one of normalized_shape / hidden_size (deprecated)")
    return int(normalized_shape if normalized_shape is not None else hidden_size)


class LayerNorm(torch.nn.Module):
    """TE 2.11's `LayerNorm`: `weight` (ones, zeros with zero-centered gamma) and `bias`."""

    def __init__(self, normalized_shape=None, eps: float = 1e-5,
                 sequence_parallel: bool | None = None, params_dtype: torch.dtype | None = None,
                 zero_centered_gamma: bool = False, hidden_size: int | None = None,
                 **kwargs) -> None:
        super().__init__()
        size = _shape(normalized_shape, hidden_size)
        dtype = kwargs.get("dtype", params_dtype) or torch.get_default_dtype()
        device = kwargs.get("device", "cuda")
        # TE v2.11 layernorm.py L94-95: set before the op builds its parameters.
        self.sequence_parallel = sequence_parallel
        self.eps, self.zero_centered_gamma = eps, zero_centered_gamma
        self.weight = torch.nn.Parameter(torch.empty(size, device=device, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.empty(size, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self, defer_init: bool | None = None) -> None:
        """TE v2.11 ops/basic/layer_norm.py L157-161 (the values) and layernorm.py L129-135
        (the attribute: `sequence_parallel` as given, on weight and bias, unless None)."""
        if defer_init:
            return
        with torch.no_grad():
            self.weight.fill_(0.0 if self.zero_centered_gamma else 1.0)
            self.bias.zero_()
        if self.sequence_parallel is not None:
            self.weight.sequence_parallel = self.sequence_parallel
            self.bias.sequence_parallel = self.sequence_parallel

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        return normalize(inp, "LayerNorm", self.weight, self.bias, self.eps,
                         self.zero_centered_gamma)


class RMSNorm(torch.nn.Module):
    """TE 2.11's `RMSNorm`: `weight` only."""

    def __init__(self, normalized_shape=None, eps: float = 1e-5,
                 sequence_parallel: bool | None = None, params_dtype: torch.dtype | None = None,
                 zero_centered_gamma: bool = False, hidden_size: int | None = None,
                 **kwargs) -> None:
        super().__init__()
        size = _shape(normalized_shape, hidden_size)
        dtype = kwargs.get("dtype", params_dtype) or torch.get_default_dtype()
        device = kwargs.get("device", "cuda")
        self.sequence_parallel = sequence_parallel  # TE v2.11 rmsnorm.py L98-99
        self.eps, self.zero_centered_gamma = eps, zero_centered_gamma
        self.weight = torch.nn.Parameter(torch.empty(size, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self, defer_init: bool | None = None) -> None:
        """TE v2.11 rmsnorm.py L133-138: `sequence_parallel` on the weight, unless None."""
        if defer_init:
            return
        with torch.no_grad():
            self.weight.fill_(0.0 if self.zero_centered_gamma else 1.0)
        if self.sequence_parallel is not None:
            self.weight.sequence_parallel = self.sequence_parallel

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        return normalize(inp, "RMSNorm", self.weight, None, self.eps, self.zero_centered_gamma)
