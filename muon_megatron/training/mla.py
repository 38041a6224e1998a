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

Known limit (megatron-core 0.16.1, the same code in 0.19.x): under TP the local MLA's
gradient of `linear_kv_down_proj`'s k-rope rows is wrong before any optimizer runs (measured
0.45..0.73 relative error per k-rope row at TP2 against TP1 from the same weights, 1e-5 on
the latent rows); see docs/moonlight.md. MLA's TP layouts are therefore not parity-tested.

`te_stand_ins_off()`: without Transformer Engine, megatron-core's TE extension module still
imports, with `MagicMock` stand-ins for TE's classes, so `multi_latent_attention.HAVE_TE` is
True and `MLASelfAttention.__init__`'s `isinstance(self.linear_proj, TELinear)` raises
TypeError. While an MLA model is built without TE, the context sets that module's HAVE_TE
to the truth (False) and restores it afterwards; that flag is read nowhere else.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

from megatron.core.transformer.dot_product_attention import DotProductAttention

__all__ = [
    "MLADotProductAttention",
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

