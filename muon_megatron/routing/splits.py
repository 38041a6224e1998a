"""How a fused Megatron weight splits into the logical matrices Muon orthogonalizes.

Muon must orthogonalize each *logical* matrix on its own: one MoE expert, Q / K / V, the
SwiGLU gate and up projections (and, with `--muon-split-mla`, MLA's K-nope / V and
q-nope / q-rope; by default each MLA projection is one whole matrix). Megatron stores these fused, and under tensor parallelism
each TP rank holds a slice of each. This module describes, for one TP-local parameter
tensor, the 2-D *pieces* it contributes and how the pieces of all TP ranks combine into
the logical matrices (`MatrixSplit`). It is plain tensor code: no communication.

Orientation: a piece may be taken transposed (GroupedMLP's fc1 is stored [hidden, ffn]);
Newton-Schulz commutes with transposition (NS(X^T) = NS(X)^T) and with row/column
permutations, so orthogonalizing a piece in any orientation or row order gives the same
update.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from muon_megatron.config import MuonConfig
from muon_megatron.routing.rules import param_kind, require_matrix

if TYPE_CHECKING:
    from megatron.core.transformer import TransformerConfig

__all__ = [
    "MatrixSplit",
    "ModelShape",
    "matrix_split",
    "extract_pieces",
    "insert_pieces",
    "combine_tp_pieces",
    "split_tp_matrix",
]

TPMode = Literal["concat", "per_rank", "replicated"]


@dataclass(frozen=True)
class MatrixSplit:
    """How one TP-local parameter tensor splits into pieces of logical matrices.

    The local tensor is viewed as `view_shape` ([rows, cols] or [batch, rows, cols]); for
    each batch item (transposed if `transpose`), each entry of `row_groups` selects the rows
    of one piece (a tuple of [start, end) ranges, concatenated). `tp_mode` says how the
    pieces of the TP ranks form logical matrices:
      - 'concat': logical matrix j = cat over TP ranks of piece j, along `tp_dim`;
      - 'per_rank': every TP rank's piece j is its own logical matrix (per-head QKV);
      - 'replicated': the tensor is not TP-partitioned; TP rank 0's pieces are the matrices.
    """

    view_shape: tuple[int, ...]
    transpose: bool
    row_groups: tuple[tuple[tuple[int, int], ...], ...]
    tp_mode: TPMode
    tp_dim: int
    tp_size: int

    @property
    def batch(self) -> int:
        return self.view_shape[0] if len(self.view_shape) == 3 else 1

    @property
    def pieces_per_rank(self) -> int:
        return self.batch * len(self.row_groups)

    def piece_shape(self, j: int) -> tuple[int, int]:
        rows = sum(end - start for start, end in self.row_groups[j % len(self.row_groups)])
        cols = self.view_shape[-2] if self.transpose else self.view_shape[-1]
        return rows, cols

    def logical_shapes(self) -> list[tuple[int, int]]:
        """Shapes of the logical matrices, in the order the owner orthogonalizes them."""
        shapes = [self.piece_shape(j) for j in range(self.pieces_per_rank)]
        if self.tp_mode == "concat":
            return [
                (r * self.tp_size, c) if self.tp_dim == 0 else (r, c * self.tp_size)
                for r, c in shapes
            ]
        if self.tp_mode == "per_rank":
            return shapes * self.tp_size
        return shapes


def _ranges(*pairs: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    return tuple(pairs)


def _qkv_row_groups(
    groups: int, heads_per_group: int, head_dim: int, per_head: bool
) -> tuple[tuple[tuple[int, int], ...], ...]:
    """Rows of Q, K, V (or of every head) in Megatron's [q..., k, v]-per-query-group layout."""
    block = (heads_per_group + 2) * head_dim
    if per_head:
        out = []
        for g in range(groups):
            for h in range(heads_per_group + 2):
                start = g * block + h * head_dim
                out.append(_ranges((start, start + head_dim)))
        return tuple(out)
    q, k, v = [], [], []
    for g in range(groups):
        base = g * block
        q.append((base, base + heads_per_group * head_dim))
        k.append((base + heads_per_group * head_dim, base + (heads_per_group + 1) * head_dim))
        v.append((base + (heads_per_group + 1) * head_dim, base + block))
    return (tuple(q), tuple(k), tuple(v))


@dataclass(frozen=True)
class ModelShape:
    """What `routing.matrix_split` needs to know about the model to split fused weights."""

    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    gated_linear_unit: bool
    hidden_size: int
    moe_ffn_hidden_size: int | None = None
    qk_head_dim: int | None = None
    """MLA only (None otherwise): per-head dims of q/k without RoPE, with RoPE, and of v."""
    qk_pos_emb_head_dim: int | None = None
    v_head_dim: int | None = None

    @classmethod
    def from_transformer_config(cls, cfg: TransformerConfig) -> ModelShape:
        """Read megatron's `TransformerConfig`, filling its None defaults the way it does."""
        heads = cfg.num_attention_heads
        mla = bool(getattr(cfg, "multi_latent_attention", False))
        return cls(
            num_attention_heads=heads,
            num_query_groups=cfg.num_query_groups or heads,
            kv_channels=cfg.kv_channels or cfg.hidden_size // heads,
            gated_linear_unit=bool(cfg.gated_linear_unit),
            hidden_size=cfg.hidden_size,
            moe_ffn_hidden_size=cfg.moe_ffn_hidden_size,
            qk_head_dim=cfg.qk_head_dim if mla else None,
            qk_pos_emb_head_dim=cfg.qk_pos_emb_head_dim if mla else None,
            v_head_dim=cfg.v_head_dim if mla else None,
        )


def _mla_head_row_groups(
    name: str, rows: int, first: int, second: int
) -> tuple[tuple[tuple[int, int], ...], ...]:
    """Rows of the first and second part of every head of an MLA up-projection, whose rows
    are [first, second] per head, heads one after another (q: [nope, rope]; kv: [k_nope, v])."""
    per_head = first + second
    if rows % per_head != 0:
        raise ValueError(
            f"{name}: {rows} rows are not whole heads of {first}+{second}; check "
            "--qk-head-dim / --qk-pos-emb-head-dim / --v-head-dim, or drop --muon-split-mla."
        )
    heads = range(rows // per_head)
    return (
        tuple((h * per_head, h * per_head + first) for h in heads),
        tuple((h * per_head + first, (h + 1) * per_head) for h in heads),
    )


def matrix_split(
    name: str,
    local_shape: Sequence[int],
    *,
    tp_size: int,
    tp_partition_dim: int | None,
    muon_config: MuonConfig,
    num_attention_heads: int,
    num_query_groups: int,
    kv_channels: int,
    gated_linear_unit: bool,
    hidden_size: int,
    moe_ffn_hidden_size: int | None = None,
    qk_head_dim: int | None = None,
    qk_pos_emb_head_dim: int | None = None,
    v_head_dim: int | None = None,
) -> MatrixSplit:
    """The `MatrixSplit` of a Muon parameter with TP-local shape `local_shape`.

    `tp_size` is the size of the TP group the parameter is sharded over (the expert TP
    group for experts); `tp_partition_dim` is Megatron's `partition_dim` attribute, or
    None when the tensor is replicated across TP.
    """
    require_matrix(name, tuple(local_shape))
    rows, cols = int(local_shape[0]), int(local_shape[1])
    kind = param_kind(name)
    replicated = tp_partition_dim is None or tp_size == 1

    def split(view, transpose, groups, tp_dim, mode: TPMode = "concat") -> MatrixSplit:
        return MatrixSplit(
            view_shape=tuple(view),
            transpose=transpose,
            row_groups=groups,
            tp_mode="replicated" if replicated else mode,
            tp_dim=tp_dim,
            tp_size=1 if replicated else tp_size,
        )

    whole_rows = (_ranges((0, rows)),)
    if kind == "qkv" and muon_config.muon_split_qkv:
        groups = num_query_groups // tp_size if not replicated else num_query_groups
        heads_per_group = num_attention_heads // num_query_groups
        expect = groups * (heads_per_group + 2) * kv_channels
        if rows != expect:
            raise ValueError(
                f"{name}: linear_qkv has {rows} rows, expected {expect} from {groups} query "
                f"groups x ({heads_per_group}+2) heads x {kv_channels}; disable "
                "--muon-split-qkv for a non-Megatron QKV layout."
            )
        per_head = muon_config.muon_split_qkv_per_head
        row_groups = _qkv_row_groups(groups, heads_per_group, kv_channels, per_head)
        return split((rows, cols), False, row_groups, 0, "per_rank" if per_head else "concat")
    if kind in ("mla_q", "mla_kv_up") and muon_config.muon_split_mla:
        if qk_head_dim is None or qk_pos_emb_head_dim is None or v_head_dim is None:
            raise ValueError(
                f"{name}: --muon-split-mla needs the MLA head dims (ModelShape.qk_head_dim, "
                "qk_pos_emb_head_dim, v_head_dim); build the ModelShape from the model's "
                "MLATransformerConfig."
            )
        second = qk_pos_emb_head_dim if kind == "mla_q" else v_head_dim
        # Column-parallel: each TP rank holds whole heads, so the first parts of all ranks
        # concatenated are the first parts of all heads ('concat' along rows).
        return split((rows, cols), False, _mla_head_row_groups(name, rows, qk_head_dim, second), 0)
    if kind == "fc1":
        glu = gated_linear_unit and muon_config.muon_split_fc1
        groups = (_ranges((0, rows // 2)), _ranges((rows // 2, rows))) if glu else whole_rows
        return split((rows, cols), False, groups, 0)
    if kind in ("grouped_fc1", "grouped_fc2"):
        if moe_ffn_hidden_size is None:
            raise ValueError(f"{name}: GroupedMLP weights need moe_ffn_hidden_size.")
        ffn_local = moe_ffn_hidden_size // (1 if replicated else tp_size)
        if kind == "grouped_fc1":
            width = ffn_local * (2 if gated_linear_unit else 1)
            experts = cols // width
            glu = gated_linear_unit and muon_config.muon_split_fc1
            groups = (
                (_ranges((0, width // 2)), _ranges((width // 2, width)))
                if glu
                else (_ranges((0, width)),)
            )
            # weight1 is [hidden, experts*width] but used as view(experts, hidden, width).
            return split((experts, hidden_size, width), True, groups, 0)
        # weight2 is [experts*ffn, hidden] used as view(experts, ffn, hidden), i.e. [in, out]
        # per expert: take it transposed so pieces are [out, in] like every Linear weight
        # (matters for the 'spectral' scale); TP splits ffn, now the columns.
        experts = rows // ffn_local
        return split((experts, ffn_local, hidden_size), True, (_ranges((0, hidden_size)),), 1)
    tp_dim = 0 if tp_partition_dim is None else int(tp_partition_dim)
    return split((rows, cols), False, whole_rows, tp_dim)


def _oriented_items(tensor: torch.Tensor, split: MatrixSplit) -> list[torch.Tensor]:
    view = tensor.view(split.view_shape)
    items = [view] if view.ndim == 2 else list(view.unbind(0))
    return [item.T if split.transpose else item for item in items]


def extract_pieces(local: torch.Tensor, split: MatrixSplit) -> list[torch.Tensor]:
    """The 2-D pieces of one TP-local tensor, in `MatrixSplit` order (copies)."""
    pieces = []
    for item in _oriented_items(local, split):
        for ranges in split.row_groups:
            pieces.append(torch.cat([item[s:e] for s, e in ranges], dim=0))
    return pieces


def insert_pieces(
    local: torch.Tensor, split: MatrixSplit, pieces: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Write `pieces` (same order and shapes as `extract_pieces`) back into `local`."""
    it = iter(pieces)
    for item in _oriented_items(local, split):
        for ranges in split.row_groups:
            piece = next(it)
            offset = 0
            for s, e in ranges:
                item[s:e].copy_(piece[offset : offset + e - s])
                offset += e - s
    return local


def combine_tp_pieces(
    pieces_per_rank: Sequence[Sequence[torch.Tensor]], split: MatrixSplit
) -> list[torch.Tensor]:
    """Logical matrices from the pieces of every TP rank (outer index: TP rank)."""
    if split.tp_mode == "concat":
        return [
            torch.cat([rank_pieces[j] for rank_pieces in pieces_per_rank], dim=split.tp_dim)
            for j in range(split.pieces_per_rank)
        ]
    if split.tp_mode == "per_rank":
        return [p for rank_pieces in pieces_per_rank for p in rank_pieces]
    return list(pieces_per_rank[0])


def split_tp_matrix(
    matrices: Sequence[torch.Tensor], split: MatrixSplit
) -> list[list[torch.Tensor]]:
    """Inverse of `combine_tp_pieces`: each TP rank's pieces of the logical matrices."""
    n = split.pieces_per_rank
    if split.tp_mode == "concat":
        chunks = [m.chunk(split.tp_size, dim=split.tp_dim) for m in matrices]
        return [[chunks[j][t] for j in range(n)] for t in range(split.tp_size)]
    if split.tp_mode == "per_rank":
        return [list(matrices[t * n : (t + 1) * n]) for t in range(split.tp_size)]
    return [list(matrices)]
