"""Multi-latent attention with megatron-core's local layers (CPU, or GPUs without TE).

megatron-core's local MLA spec (`get_gpt_layer_local_spec(multi_latent_attention=True)`)
builds its core attention with `k_channels` (q/k head dim, nope + rope) and `v_channels`
(v head dim), which 0.16.1's local `DotProductAttention` does not take: only TE's attention
does. `MLADotProductAttention` is the local attention with those two arguments. Its
arithmetic is the base class's: q . k over `k_channels` at MLA's own softmax scale (which
MLA always passes), the probabilities times v; only the output width differs, heads x
`v_channels` instead of heads x kv_channels.

`use_local_mla_attention(block_spec)` puts it into a decoder block spec where the installed
megatron-core needs it (a release whose `DotProductAttention` takes the two arguments keeps
its own).

`fix_local_mla_gradients(model)` corrects two gradients megatron-core's local MLA gets
wrong under TP (0.16.1, the same code in 0.19.2); `training.model.build_model` calls it for
every local-spec MLA model. Each fix is applied only where the installed megatron-core has
the flaw (read from its source) and only to layers that need it:

- The k-rope rows of `linear_kv_down_proj`. Its output (column-parallel, gather_output=False)
  is all-gathered with `gather_from_tensor_model_parallel_region`, whose backward only
  keeps this rank's columns of this rank's gradient, then split into the kv latent and the
  shared k-rope. The latent's gradient is the same on every TP rank (linear_kv_up_proj
  all-reduces its input gradient), so the split is right there; the k-rope feeds this
  rank's heads only, with no TP reduction, so each rank's gradient of it is its heads'
  share and the other ranks' shares were dropped: 0.45..0.82 relative error per k-rope row
  at TP2 against TP1 from the same weights, and through the hidden states 4e-4..1.6e-3 on
  the latent rows of the layers below. Fix: a forward hook marks `linear_kv_down_proj`'s
  output, and megatron's MLA module's `gather_from_tensor_model_parallel_region` becomes
  a dispatcher that passes every unmarked tensor to megatron's function unchanged and
  gathers a marked one with `_GatherKvCombined`, whose backward all-reduces the k-rope
  columns over the layer's TP group before keeping this rank's columns (the dispatcher,
  once installed, stays for the process: it is megatron's own function for every other
  tensor, e.g. the q latent, whose gather is right). Sequence parallel
  takes the same branch (only the latent is scattered back to s/TP) and is fixed alike.
- `q_layernorm` (with `--q-lora-rank` and `--qk-layernorm`). `finalize_model_grads` sums
  over TP the gradient of every param named `*q_layernorm*` (meant for standard
  attention's per-head q norm). MLA's q norm is on the whole q latent, the same on every
  TP rank without SP, so its gradient came out x TP. Fix: without SP its params are marked
  `average_gradients_across_tp_domain`, which megatron checks first (the mean of identical
  gradients). Under SP each rank normalizes its own sequence chunk and the sum is right.
  (`kv_layernorm` matches neither name rule and was right.)

After both, every gradient at TP2 (with and without SP) matches TP1 to 7e-7
(tests/functional/test_mla_parity.py). Not covered: megatron-core 0.19's
`FusedMLASelfAttention` (fused q/kv down projection, no `linear_kv_down_proj`) is left
alone, and the TE path (duplicated down projections) is not tested here.

`te_stand_ins_off()`: without Transformer Engine, megatron-core's TE extension module still
imports, with `MagicMock` stand-ins for TE's classes, so `multi_latent_attention.HAVE_TE` is
True and `MLASelfAttention.__init__`'s `isinstance(self.linear_proj, TELinear)` raises
TypeError. While an MLA model is built without TE, the context sets that module's HAVE_TE
to the truth (False) and restores it afterwards; that flag is read nowhere else.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention

__all__ = [
    "MLADotProductAttention",
    "fix_local_mla_gradients",
    "megatron_splits_kv_rope_gradient",
    "megatron_sums_q_norm_gradient",
    "te_stand_ins_off",
    "use_local_mla_attention",
]


class MLADotProductAttention(DotProductAttention):
    """`DotProductAttention` for MLA: q/k heads of `k_channels`, v heads of `v_channels`.

    MLA expands its shared k-rope to every head, so keys and values have as many heads as
    queries (no GQA repeat)."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        k_channels: int | None = None,
        v_channels: int | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ) -> None:
        if softmax_scale is None and k_channels is not None:
            raise ValueError(
                "MLADotProductAttention needs MLA's softmax_scale (megatron's "
                "MLASelfAttention passes it); the base class would derive it from kv_channels."
            )
        super().__init__(
            config=config,
            layer_number=layer_number,
            attn_mask_type=attn_mask_type,
            attention_type=attention_type,
            attention_dropout=attention_dropout,
            softmax_scale=softmax_scale,
            cp_comm_type=cp_comm_type,
            pg_collection=pg_collection,
        )
        if self.num_query_groups_per_partition != self.num_attention_heads_per_partition:
            raise ValueError(
                f"MLA has one key head per query head; num_query_groups="
                f"{config.num_query_groups} != num_attention_heads={config.num_attention_heads}: "
                "drop --group-query-attention / --num-query-groups with MLA."
            )
        if v_channels is not None:
            # The only shape the base class takes from kv_channels after the scale: the
            # context's [sq, b, heads x v] view.
            self.hidden_size_per_partition = self.num_attention_heads_per_partition * v_channels


def _local_attention_takes_mla_dims() -> bool:
    return "v_channels" in inspect.signature(DotProductAttention.__init__).parameters


def use_local_mla_attention(block_spec) -> None:
    """Swap megatron's local `DotProductAttention` for `MLADotProductAttention` in every MLA
    layer of `block_spec` (a `TransformerBlockSubmodules`), in place, where it is needed."""
    if _local_attention_takes_mla_dims():
        return
    for layer_spec in block_spec.layer_specs:
        attention = layer_spec.submodules.self_attention.submodules
        if getattr(attention, "core_attention", None) is DotProductAttention and hasattr(
            attention, "linear_kv_up_proj"
        ):
            attention.core_attention = MLADotProductAttention


@contextlib.contextmanager
def te_stand_ins_off() -> Iterator[None]:
    """HAVE_TE False in megatron's MLA module while TE's classes there are stand-ins."""
    from megatron.core.transformer import multi_latent_attention as mla

    stand_in = mla.HAVE_TE and not isinstance(mla.TELinear, type)
    if not stand_in:
        yield
        return
    mla.HAVE_TE = False
    try:
        yield
    finally:
        mla.HAVE_TE = True


# --------------------------------------------------------------------------------------------
# MLA's gradients under TP: the k-rope share, the q latent norm
# --------------------------------------------------------------------------------------------

_MARK = "_muon_megatron_kv_rope"
"""Attribute on linear_kv_down_proj's output: (k-rope width, the layer's TP group)."""
_HOOKED = "_muon_megatron_kv_rope_hook"
_AVERAGE = "average_gradients_across_tp_domain"
_REDUCES_K_ROPE = re.compile(
    r"(copy_to_tensor_model_parallel_region|reduce_from_tensor_model_parallel_region|"
    r"all_reduce)\(\s*k_pos_emb"
)


class _GatherKvCombined(torch.autograd.Function):
    """Forward: all-gather this rank's columns of [latent | k-rope] along the last dim.
    Backward: all-reduce (sum) the k-rope columns of the gradient over the group (each rank
    holds only its own heads' share of the shared k-rope's gradient), then keep this rank's
    columns. The latent columns' gradient is already the same on every rank (the up
    projection all-reduces its input gradient) and is only sliced."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group, rope_dim: int) -> torch.Tensor:
        ctx.group, ctx.rope_dim = group, rope_dim
        world = group.size()
        local = local.contiguous()
        stacked = local.new_empty((world * local.size(0), *local.shape[1:]))
        torch.distributed.all_gather_into_tensor(stacked, local, group=group)
        return torch.cat(stacked.chunk(world, dim=0), dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        group, rope_dim = ctx.group, ctx.rope_dim
        total = grad.size(-1)
        start = total - rope_dim  # first k-rope column
        rope = grad[..., start:].clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(rope, group=group)  # every rank, whatever its slice
        width = total // group.size()
        lo = group.rank() * width
        hi = lo + width
        pieces = []
        if lo < start:
            pieces.append(grad[..., lo : min(hi, start)])
        if hi > start:
            pieces.append(rope[..., max(lo, start) - start : hi - start])
        return torch.cat(pieces, dim=-1).contiguous(), None, None


def _dispatching_gather(megatron_gather: Callable[..., Any]) -> Callable[..., Any]:
    """megatron's `gather_from_tensor_model_parallel_region`, except for a marked tensor."""

    def gather(input_, group=None):
        mark = getattr(input_, _MARK, None)
        if mark is None:
            return megatron_gather(input_, group)
        rope_dim, own_group = mark
        group = own_group if group is None else group
        if group.size() == 1:
            return megatron_gather(input_, group)
        return _GatherKvCombined.apply(input_, group, rope_dim)

    gather.__wrapped__ = megatron_gather
    return gather


def megatron_splits_kv_rope_gradient() -> bool:
    """Whether the installed megatron-core's MLA has the flaw: it gathers the column-parallel
    `linear_kv_down_proj` output with `gather_from_tensor_model_parallel_region`, whose
    backward only splits, and reduces `k_pos_emb`'s gradient over TP nowhere."""
    from megatron.core.tensor_parallel import mappings
    from megatron.core.transformer import multi_latent_attention as mla

    gather = mla.gather_from_tensor_model_parallel_region
    gather = getattr(gather, "__wrapped__", gather)
    try:
        source = inspect.getsource(mla)
        backward = inspect.getsource(mappings._GatherFromModelParallelRegion.backward)
    except (OSError, TypeError, AttributeError):
        return False
    return (
        gather is mappings.gather_from_tensor_model_parallel_region
        and "gather_from_tensor_model_parallel_region(kv_combined)" in source
        and "_split_along_last_dim" in backward
        and "_reduce(" not in backward
        and _REDUCES_K_ROPE.search(source) is None
    )


def megatron_sums_q_norm_gradient() -> bool:
    """Whether the installed megatron-core's `finalize_model_grads` sums over TP the
    gradient of every param named `*q_layernorm*` under `qk_layernorm` (the rule for the
    per-head q/k norms of standard attention), and honours `average_gradients_across_tp_domain`
    ahead of that rule."""
    fmg = importlib.import_module("megatron.core.distributed.finalize_model_grads")
    try:
        source = inspect.getsource(fmg._allreduce_non_tensor_model_parallel_grads)
    except (OSError, TypeError, AttributeError):
        return False
    rule, average = source.find('"q_layernorm" in name'), source.find(_AVERAGE)
    return rule >= 0 and 0 <= average < rule


def _mla_layers(model: torch.nn.Module) -> list:
    from megatron.core.transformer import multi_latent_attention as mla

    return [m for m in model.modules() if isinstance(m, mla.MLASelfAttention)]


def _fix_kv_rope_gradient(layers: list) -> int:
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear
    from megatron.core.transformer import multi_latent_attention as mla

    linears = [
        m.linear_kv_down_proj
        for m in layers
        if isinstance(getattr(m, "linear_kv_down_proj", None), ColumnParallelLinear)
        and m.linear_kv_down_proj.tp_group.size() > 1
    ]
    if not linears or not megatron_splits_kv_rope_gradient():
        return 0
    if not hasattr(mla.gather_from_tensor_model_parallel_region, "__wrapped__"):
        mla.gather_from_tensor_model_parallel_region = _dispatching_gather(
            mla.gather_from_tensor_model_parallel_region
        )
    for linear in linears:
        if getattr(linear, _HOOKED, False):
            continue
        mark = (linear.config.qk_pos_emb_head_dim, linear.tp_group)

        def hook(module, args, output, mark=mark):
            setattr(output[0] if isinstance(output, tuple) else output, _MARK, mark)

        linear.register_forward_hook(hook)
        setattr(linear, _HOOKED, True)
    return len(linears)


def _fix_q_norm_gradient(layers: list) -> int:
    # Without SP the q latent norm sees the whole (TP-replicated) q latent, so its gradient
    # is already the same on every TP rank; the name rule would sum it (x TP). Averaging
    # identical gradients leaves them as they are. Under SP each rank normalizes its
    # sequence chunk and the rule's sum is right.
    norms = [
        m.q_layernorm
        for m in layers
        if isinstance(getattr(m, "q_layernorm", None), torch.nn.Module)
        and m.config.qk_layernorm
        and not m.config.sequence_parallel
        and m.config.tensor_model_parallel_size > 1
    ]
    params = [p for norm in norms for p in norm.parameters()]
    if not params or not megatron_sums_q_norm_gradient():
        return 0
    for param in params:
        setattr(param, _AVERAGE, True)
    return len(norms)


def fix_local_mla_gradients(model: torch.nn.Module) -> dict[str, int]:
    """Correct megatron-core's two TP gradient flaws in the local MLA layers of `model`
    (call after building it, before megatron's DDP wraps it; idempotent): the k-rope share
    of `linear_kv_down_proj` and the q latent norm's doubled gradient. Returns how many
    layers each fix touched (0 where megatron-core does not have the flaw)."""
    layers = _mla_layers(model)
    return {
        "kv_rope_gather": _fix_kv_rope_gradient(layers),
        "q_norm_average": _fix_q_norm_gradient(layers),
    }
