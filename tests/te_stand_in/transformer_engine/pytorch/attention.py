"""TE's `DotProductAttention` (TE v2.11 transformer_engine/pytorch/attention/
dot_product_attention/dot_product_attention.py L154), as plain softmax attention in torch:
`sbhd` / `bshd` layouts, causal or no mask, grouped-query heads, different q/k and v head
sizes (MLA), dropout under the RNG tracker, and the per-head max logit TE 2.9+ returns for
QK-Clip. Out of reach, refused: THD / packed sequences, padding and arbitrary masks, attention
bias, sliding windows, non-vanilla softmax, and context parallelism other than over one
process group with `cp_comm_type` "p2p" or "all_gather".

Context parallelism computes what TE's `cp_comm_type="all_gather"` computes (TE v2.11
context_parallel.py `AttnFuncWithCPAndKVAllGather`, L2759): the rank holds the query, key and
value of two of the sequence's 2 x CP equal chunks, chunks r and 2 x CP - 1 - r (L2882, the
split megatron-core's `get_batch_on_this_cp_rank` makes); K and V are all-gathered along the
sequence over the CP group (L2865-2866, their gradients reduce-scattered back), and every
local query attends to the gathered keys at global positions up to its own (causal; the keys'
positions follow from the gather order, which L2869-2876 reorders into the sequence). With
`return_max_logit` the per-head max is all-reduced (MAX) over the CP group (L2997-3000).
TE's "p2p" ring (the default megatron-core asks for) computes the same exact attention with
other communication; the stand-in computes it the all-gather way for both."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._base import StandInModule, refuse
from ._comm import gather_sequence
from .distributed import get_distributed_world_size

__all__ = ["DotProductAttention"]


class DotProductAttention(StandInModule):
    """TE 2.11's `DotProductAttention`, constructor signature L318-340."""

    def __init__(self, num_attention_heads: int, kv_channels, num_gqa_groups: int | None = None,
                 attention_dropout: float = 0.0, qkv_format: str = "sbhd",
                 attn_mask_type: str = "causal", window_size=None, sequence_parallel: bool = False,
                 tp_size: int = 1, get_rng_state_tracker=None, tp_group=None,
                 layer_number: int | None = None, attention_type: str = "self", cp_group=None,
                 cp_global_ranks=None, cp_stream=None, cp_comm_type: str = "p2p",
                 softmax_scale: float | None = None, softmax_type: str = "vanilla",
                 return_max_logit: bool | None = False) -> None:
        super().__init__()
        # TE v2.11 L363-366.
        self.set_context_parallel_group(cp_group, cp_global_ranks, cp_stream, cp_comm_type)
        if window_size is not None and tuple(window_size) != (-1, 0):
            refuse("sliding-window attention")
        if softmax_type != "vanilla":
            refuse(f"softmax_type={softmax_type!r}")
        self.qkv_format = qkv_format
        self.attn_mask_type = attn_mask_type.replace(",", "_")
        # TE v2.11 L353-359: the TP size from the group, else `tp_size`.
        if tp_group is None:
            self.tp_size = tp_size
            if tp_size == 1:
                self.set_tensor_parallel_group(tp_group)
        else:
            self.tp_size = get_distributed_world_size(tp_group)
            self.set_tensor_parallel_group(tp_group)
        self.get_rng_state_tracker = get_rng_state_tracker
        self.num_attention_heads = num_attention_heads
        self.hidden_size_per_attention_head_k = (
            kv_channels if isinstance(kv_channels, int) else kv_channels[0]
        )
        self.hidden_size_per_attention_head_v = (
            kv_channels if isinstance(kv_channels, int) else kv_channels[1]
        )
        self.num_gqa_groups = num_attention_heads if num_gqa_groups is None else num_gqa_groups
        self.num_gqa_groups_per_partition = int(self.num_gqa_groups // self.tp_size)
        if num_attention_heads % self.num_gqa_groups:
            raise AssertionError("The number of attention heads must be divisible by groups")
        # TE v2.11 L390-393: 1/sqrt(q/k head size) unless given.
        self.softmax_scale = (
            1.0 / math.sqrt(self.hidden_size_per_attention_head_k)
            if softmax_scale is None else softmax_scale
        )
        self.attention_dropout = attention_dropout
        self.softmax_offset = None
        self.return_max_logit = bool(return_max_logit)

    def set_context_parallel_group(self, cp_group, cp_global_ranks, cp_stream,
                                   cp_comm_type="p2p") -> None:
        """TE v2.11 L529-567: keep the CP attributes for the forward."""
        if isinstance(cp_group, list) or cp_comm_type not in ("p2p", "all_gather"):
            refuse(f"context parallelism with cp_comm_type={cp_comm_type!r}")
        self.cp_group = cp_group
        self.cp_global_ranks = cp_global_ranks
        self.cp_stream = cp_stream
        self.cp_comm_type = cp_comm_type

    def _cp_size(self) -> int:
        return 1 if self.cp_group is None else get_distributed_world_size(self.cp_group)

    def forward(self, query_layer: torch.Tensor, key_layer: torch.Tensor,
                value_layer: torch.Tensor, attention_mask=None, qkv_format: str | None = None,
                cu_seqlens_q=None, cu_seqlens_kv=None, cu_seqlens_q_padded=None,
                cu_seqlens_kv_padded=None, max_seqlen_q=None, max_seqlen_kv=None,
                attn_mask_type: str | None = None, window_size=None,
                checkpoint_core_attention: bool = False, core_attention_bias_type: str = "no_bias",
                core_attention_bias=None, alibi_slopes=None, fast_zero_fill: bool = True,
                inference_params=None, pad_between_seqs=None, fp8_output: bool = False,
                num_splits: int | None = 1):
        fmt = qkv_format or self.qkv_format
        mask = (attn_mask_type or self.attn_mask_type).replace(",", "_")
        if fmt not in ("sbhd", "bshd") or cu_seqlens_q is not None:
            refuse(f"qkv_format={fmt!r} / packed sequences")
        if mask not in ("causal", "no_mask"):
            refuse(f"attn_mask_type={mask!r}")
        if core_attention_bias_type != "no_bias" or alibi_slopes is not None:
            refuse("attention bias")
        if inference_params is not None:
            refuse("inference_params")
        cp = self._cp_size()
        if cp > 1:
            # [b, s, h, d] -> [s, b, h, d] for the gather along the sequence (TE v2.11 L2862).
            seq_first = (lambda t: t) if fmt == "sbhd" else (lambda t: t.transpose(0, 1))
            key_layer, value_layer = (
                _gathered_in_sequence_order(seq_first(t), self.cp_group, cp)
                for t in (key_layer, value_layer)
            )
            if fmt == "bshd":
                key_layer, value_layer = key_layer.transpose(0, 1), value_layer.transpose(0, 1)
        # To [batch, heads, seq, dim].
        order = (1, 2, 0, 3) if fmt == "sbhd" else (0, 2, 1, 3)
        q, k, v = (t.permute(*order) for t in (query_layer, key_layer, value_layer))
        repeat = q.shape[1] // k.shape[1]
        if repeat > 1:
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * self.softmax_scale
        if mask == "causal":
            sq, sk = scores.shape[-2:]
            q_pos = torch.arange(sq, device=scores.device)
            if cp > 1:
                q_pos = _local_positions(sq, _rank(self.cp_group), cp, scores.device)
            future = torch.arange(sk, device=scores.device)[None, :] > q_pos[:, None]
            scores = scores.masked_fill(future, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        if self.training and self.attention_dropout > 0:
            if self.get_rng_state_tracker is None:
                probs = F.dropout(probs, p=self.attention_dropout)
            else:
                with self.get_rng_state_tracker().fork():
                    probs = F.dropout(probs, p=self.attention_dropout)
        context = torch.matmul(probs, v)  # [b, h, sq, dv]
        back = (2, 0, 1, 3) if fmt == "sbhd" else (0, 2, 1, 3)
        out = context.permute(*back).contiguous()
        out = out.view(*out.shape[:2], -1)
        if self.return_max_logit:
            # TE v2.11 L276-281: max over batch and positions of the masked, scaled scores,
            # one per head, shape [h].
            max_logit = scores.detach().amax(dim=(0, 2, 3))
            if cp > 1:
                torch.distributed.all_reduce(
                    max_logit, op=torch.distributed.ReduceOp.MAX, group=self.cp_group
                )
            return out, max_logit
        return out


def _rank(group) -> int:
    return torch.distributed.get_rank(group)


def _chunk_order(cp: int) -> list[int]:
    """Sequence chunk of each of the 2 x CP pieces of a gather in rank order: rank r holds
    chunks r and 2 x CP - 1 - r (TE v2.11 context_parallel.py L2882)."""
    return [c for r in range(cp) for c in (r, 2 * cp - 1 - r)]


def _gathered_in_sequence_order(x: torch.Tensor, group, cp: int) -> torch.Tensor:
    """[s_local, ...] on each CP rank -> [s_local x CP, ...], the whole sequence in order
    (TE v2.11 L2865-2876: all-gather, then reorder the 2 x CP chunks)."""
    gathered = gather_sequence(x, group)
    pieces = gathered.chunk(2 * cp, dim=0)
    where = {chunk: i for i, chunk in enumerate(_chunk_order(cp))}
    return torch.cat([pieces[where[c]] for c in range(2 * cp)], dim=0)


def _local_positions(sq: int, rank: int, cp: int, device) -> torch.Tensor:
    """Global sequence positions of this CP rank's `sq` queries: its two chunks, in order."""
    half = sq // 2
    first, second = rank, 2 * cp - 1 - rank
    return torch.cat([torch.arange(first * half, (first + 1) * half, device=device),
                      torch.arange(second * half, (second + 1) * half, device=device)])
