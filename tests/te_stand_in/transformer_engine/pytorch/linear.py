"""TE's GEMM layers: `Linear`, `LayerNormLinear`, `GroupedLinear` (TE v2.11
transformer_engine/pytorch/module/{linear,layernorm_linear,grouped_linear}.py).

Constructor signatures are TE 2.11's. Sizes, TP group and `sequence_parallel` are set as TE
sets them; parameters are registered in TE's order and initialized by `_base`; and the
parameter attributes are set by `reset_parameters` exactly as TE's do (lines cited): every
weight `tensor_model_parallel=True`, `partition_dim = 1 if parallel_mode == "row" else 0`,
whatever the layer really does. The forward is plain torch (`_comm` for TP / SP).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._base import StandInModule, init_method_constant, refuse
from ._comm import column_input, row_output
from .distributed import get_distributed_world_size, set_tensor_model_parallel_attributes
from .norms import normalize

__all__ = ["GroupedLinear", "LayerNormLinear", "Linear"]

_MODES = (None, "column", "row")


def _divide(numerator: int, denominator: int) -> int:
    if numerator % denominator:
        raise ValueError(f"{numerator} is not divisible by {denominator}")
    return numerator // denominator


def _setup_parallel(layer: StandInModule, tp_group, tp_size: int, parallel_mode,
                    sequence_parallel: bool) -> None:
    """TE v2.11 linear.py L1119-1138 (the same in layernorm_linear.py L1187-1209 and
    grouped_linear.py L641-666): TP size from the group or `tp_size`, in / out features
    divided by it for column / row, sequence parallel only when TP > 1."""
    if tp_group is None:
        layer.tp_size = tp_size
        if tp_size == 1:
            layer.set_tensor_parallel_group(tp_group)
    else:
        layer.tp_size = get_distributed_world_size(tp_group)
        layer.set_tensor_parallel_group(tp_group)
    if parallel_mode not in _MODES:
        raise AssertionError(f"parallel_mode {parallel_mode} not supported")
    layer.parallel_mode = parallel_mode
    if parallel_mode == "column":
        layer.out_features = _divide(layer.out_features, layer.tp_size)
    elif parallel_mode == "row":
        layer.in_features = _divide(layer.in_features, layer.tp_size)
    layer.sequence_parallel = (layer.tp_size > 1) and sequence_parallel


def _refuse_unsupported(kwargs: dict) -> None:
    for flag in ("ub_overlap_ag", "ub_overlap_rs", "ub_overlap_rs_dgrad", "ub_bulk_dgrad",
                 "ub_bulk_wgrad", "delay_wgrad_compute", "return_layernorm_output",
                 "return_layernorm_output_gathered"):
        if kwargs.get(flag):
            refuse(flag)
    if kwargs.get("parameters_split") is not None:
        refuse("parameters_split")
    if kwargs.get("symmetric_ar_type") is not None:
        refuse("symmetric_ar_type")


def _mark_gemm_params(layer: StandInModule, weight_names: list[str],
                      bias_names: list[str]) -> None:
    """TE v2.11 linear.py L1329-1344 = layernorm_linear.py L1446-1461 = grouped_linear.py
    L730-749: every weight is marked TP-split, along dim 1 for "row" and dim 0 otherwise
    (so also for parallel_mode None, a layer TE does not split at all); a row-parallel bias
    gets `sequence_parallel`, a column-parallel bias TP attributes along dim 0."""
    for weight in weight_names:
        set_tensor_model_parallel_attributes(
            tensor=getattr(layer, weight),
            is_parallel=True,
            dim=1 if layer.parallel_mode == "row" else 0,
            stride=1,
        )
    if layer.use_bias:
        for bias in bias_names:
            if layer.parallel_mode == "row":
                setattr(getattr(layer, bias), "sequence_parallel", layer.sequence_parallel)
            elif layer.parallel_mode == "column":
                set_tensor_model_parallel_attributes(getattr(layer, bias), True, 0, 1)


class _GemmLayer(StandInModule):
    """The weight / bias registration and the forward of Linear and LayerNormLinear."""

    def _register_gemm(self, init_method, get_rng_state_tracker, device, params_dtype) -> None:
        # TE v2.11 linear.py L1269-1296: weight (then bias) as views of contiguous buffers.
        weight = torch.empty(self.out_features, self.in_features, device=device,
                             dtype=params_dtype)
        self.weight_names, self.bias_names = ["weight"], ["bias"]
        self.register_parameter("weight", torch.nn.Parameter(weight), init_fn=init_method,
                                get_rng_state_tracker=get_rng_state_tracker)
        if self.use_bias:
            bias = torch.empty(self.out_features, device=device, dtype=params_dtype)
            self.register_parameter("bias", torch.nn.Parameter(bias),
                                    init_fn=init_method_constant(0.0))
        else:
            self.bias = torch.Tensor().to(dtype=params_dtype, device=device)

    def _gemm(self, inp: torch.Tensor):
        if self.parallel_mode == "column":
            inp = column_input(inp, self.tp_group, self.sequence_parallel)
        bias = self.bias if self.use_bias else None
        # A row-parallel bias is added after the TP reduction (TE's gemm_bias_unfused_add).
        fused = self.apply_bias and self.parallel_mode != "row"
        out = F.linear(inp, self.weight, bias if fused else None)
        if self.parallel_mode == "row":
            out = row_output(out, self.tp_group, self.sequence_parallel)
            if self.apply_bias:
                out = out + bias
        if self.return_bias:
            return out, bias
        return out


class Linear(_GemmLayer):
    """TE 2.11's `Linear` (linear.py L985)."""

    def __init__(self, in_features: int, out_features: int, sequence_parallel: bool = False,
                 fuse_wgrad_accumulation: bool = False, tp_group=None, tp_size: int = 1,
                 get_rng_state_tracker=None, rng_tracker_name: str | None = None,
                 init_method=None, bias: bool = True, return_bias: bool = False,
                 params_dtype: torch.dtype | None = None, parallel_mode: str | None = None,
                 parameters_split=None, device="cuda", ub_overlap_ag: bool = False,
                 ub_overlap_rs: bool = False, ub_overlap_rs_dgrad: bool = False,
                 ub_bulk_dgrad: bool = False, ub_bulk_wgrad: bool = False,
                 ub_name: str | None = None, delay_wgrad_compute: bool = False,
                 symmetric_ar_type: str | None = None, save_original_input: bool = False,
                 name: str | None = None) -> None:
        super().__init__()
        _refuse_unsupported(locals())
        params_dtype = torch.get_default_dtype() if params_dtype is None else params_dtype
        self.in_features, self.out_features = in_features, out_features
        self.fuse_wgrad_accumulation = fuse_wgrad_accumulation
        self.use_bias, self.return_bias = bias, return_bias
        self.apply_bias = bias and not return_bias
        self.get_rng_state_tracker = get_rng_state_tracker
        self.rng_tracker_name = rng_tracker_name  # TE v2.11 linear.py L1110
        self.save_original_input = save_original_input
        self.name = name
        _setup_parallel(self, tp_group, tp_size, parallel_mode, sequence_parallel)
        self._register_gemm(init_method, get_rng_state_tracker, device, params_dtype)
        self.reset_parameters(defer_init=device == "meta")

    def reset_parameters(self, defer_init: bool | None = False) -> None:
        """TE v2.11 linear.py L1325-1344."""
        super().reset_parameters(defer_init=defer_init)
        if not defer_init:
            _mark_gemm_params(self, self.weight_names, self.bias_names)

    def forward(self, inp: torch.Tensor, is_first_microbatch: bool | None = None,
                fp8_output: bool | None = False, fp8_grad: bool | None = False):
        return self._gemm(inp)


class LayerNormLinear(_GemmLayer):
    """TE 2.11's `LayerNormLinear` (layernorm_linear.py L1036): a norm, then a GEMM."""

    def __init__(self, in_features: int, out_features: int, eps: float = 1e-5,
                 sequence_parallel: bool = False, fuse_wgrad_accumulation: bool = False,
                 tp_group=None, tp_size: int = 1, get_rng_state_tracker=None,
                 init_method=None, bias: bool = True, normalization: str = "LayerNorm",
                 return_bias: bool = False, params_dtype: torch.dtype | None = None,
                 parallel_mode: str | None = None, return_layernorm_output: bool = False,
                 return_layernorm_output_gathered: bool = False, parameters_split=None,
                 zero_centered_gamma: bool = False, device="cuda", ub_overlap_ag: bool = False,
                 ub_overlap_rs: bool = False, ub_overlap_rs_dgrad: bool = False,
                 ub_bulk_wgrad: bool = False, ub_bulk_dgrad: bool = False,
                 ub_name: str | None = None, delay_wgrad_compute: bool = False,
                 symmetric_ar_type: str | None = None, name: str | None = None) -> None:
        super().__init__()
        _refuse_unsupported(locals())
        if normalization not in ("LayerNorm", "RMSNorm"):
            raise AssertionError("Unsupported normalization type!")
        params_dtype = torch.get_default_dtype() if params_dtype is None else params_dtype
        self.in_features, self.out_features = in_features, out_features
        self.fuse_wgrad_accumulation = fuse_wgrad_accumulation
        self.normalization, self.eps = normalization, eps
        self.use_bias, self.return_bias = bias, return_bias
        self.apply_bias = bias and not return_bias
        self.zero_centered_gamma = zero_centered_gamma
        self.name = name
        _setup_parallel(self, tp_group, tp_size, parallel_mode, sequence_parallel)
        # TE v2.11 layernorm_linear.py L1258-1276: the norm's params come first.
        self.register_parameter(
            "layer_norm_weight",
            torch.nn.Parameter(torch.empty(self.in_features, device=device, dtype=params_dtype)),
            init_fn=init_method_constant(float(not zero_centered_gamma)),
        )
        if normalization != "RMSNorm":
            self.register_parameter(
                "layer_norm_bias",
                torch.nn.Parameter(
                    torch.empty(self.in_features, device=device, dtype=params_dtype)
                ),
                init_fn=init_method_constant(0.0),
            )
        else:
            self.layer_norm_bias = None
        self._register_gemm(init_method, get_rng_state_tracker, device, params_dtype)
        self.reset_parameters(defer_init=device == "meta")

    def reset_parameters(self, defer_init: bool | None = False) -> None:
        """TE v2.11 layernorm_linear.py L1437-1461: the norm's params get
        `sequence_parallel` (this layer's: TP > 1 and SP), the GEMM's as in Linear."""
        super().reset_parameters(defer_init=defer_init)
        if defer_init:
            return
        setattr(self.layer_norm_weight, "sequence_parallel", self.sequence_parallel)
        if self.normalization != "RMSNorm":
            setattr(self.layer_norm_bias, "sequence_parallel", self.sequence_parallel)
        _mark_gemm_params(self, self.weight_names, self.bias_names)

    def forward(self, inp: torch.Tensor, is_first_microbatch: bool | None = None,
                fp8_output: bool | None = False, fp8_grad: bool | None = False):
        normed = normalize(inp, self.normalization, self.layer_norm_weight,
                           self.layer_norm_bias, self.eps, self.zero_centered_gamma)
        return self._gemm(normed)


class GroupedLinear(StandInModule):
    """TE 2.11's `GroupedLinear` (grouped_linear.py L528): one weight per GEMM
    (`weight0`, `weight1`, ...), the input's rows split among them by `m_splits`. It does
    no TP communication of its own (megatron-core's token dispatcher does it)."""

    def __init__(self, num_gemms: int, in_features: int, out_features: int,
                 sequence_parallel: bool = False, fuse_wgrad_accumulation: bool = False,
                 tp_group=None, tp_size: int = 1, get_rng_state_tracker=None,
                 rng_tracker_name: str | None = None, init_method=None, bias: bool = True,
                 return_bias: bool = False, params_dtype: torch.dtype | None = None,
                 parallel_mode: str | None = None, device="cuda", ub_overlap_rs: bool = False,
                 ub_overlap_ag: bool = False, ub_name: str | None = None,
                 delay_wgrad_compute: bool = False, save_original_input: bool = False,
                 name: str | None = None) -> None:
        super().__init__()
        _refuse_unsupported(locals())
        params_dtype = torch.get_default_dtype() if params_dtype is None else params_dtype
        self.num_gemms = num_gemms
        self.in_features, self.out_features = in_features, out_features
        self.fuse_wgrad_accumulation = fuse_wgrad_accumulation
        self.use_bias, self.return_bias = bias, return_bias
        self.apply_bias = bias and not return_bias
        self.get_rng_state_tracker = get_rng_state_tracker
        self.rng_tracker_name = rng_tracker_name  # TE v2.11 grouped_linear.py L630
        self.save_original_input = save_original_input
        self.name = name
        _setup_parallel(self, tp_group, tp_size, parallel_mode, sequence_parallel)
        if self.tp_size > 1 and bias:  # TE v2.11 grouped_linear.py L650-654
            raise ValueError("GroupedLinear doesn't support bias when TP > 1.")
        for i in range(num_gemms):  # TE v2.11 grouped_linear.py L668-697
            weight = torch.empty(self.out_features, self.in_features, device=device,
                                 dtype=params_dtype)
            self.register_parameter(f"weight{i}", torch.nn.Parameter(weight),
                                    init_fn=init_method,
                                    get_rng_state_tracker=get_rng_state_tracker)
            if bias:
                b = torch.empty(self.out_features, device=device, dtype=params_dtype)
                self.register_parameter(f"bias{i}", torch.nn.Parameter(b),
                                        init_fn=init_method_constant(0.0))
            else:
                setattr(self, f"bias{i}", torch.Tensor().to(dtype=params_dtype, device=device))
        self.reset_parameters(defer_init=device == "meta")

    def reset_parameters(self, defer_init: bool | None = False) -> None:
        """TE v2.11 grouped_linear.py L726-749."""
        super().reset_parameters(defer_init=defer_init)
        if not defer_init:
            _mark_gemm_params(self, [f"weight{i}" for i in range(self.num_gemms)],
                              [f"bias{i}" for i in range(self.num_gemms)])

    def forward(self, inp: torch.Tensor, m_splits: list[int],
                is_first_microbatch: bool | None = None):
        splits = [int(m) for m in m_splits]
        outs = []
        for i, chunk in enumerate(torch.split(inp, splits, dim=0)):
            bias = getattr(self, f"bias{i}") if self.apply_bias else None
            outs.append(F.linear(chunk, getattr(self, f"weight{i}"), bias))
        out = torch.cat(outs, dim=0) if outs else inp.new_empty(0, self.out_features)
        if self.return_bias:
            biases = [getattr(self, f"bias{i}") for i in range(self.num_gemms)]
            return out, biases
        return out
