"""QK-Clip (MuonClip, Kimi K2, arXiv 2507.20534 section 2.1): the rescale math.

Plain tensors, no `torch.distributed` and no training imports: from the per-head maximum
pre-softmax logits S_h of one attention layer (this TP rank's heads, already reduced over
DP and CP by the caller) build one factor per output row of the TP-local projection
weights, then apply them to a whole TP-local tensor or to a flat ZeRO-1 shard of it.

For a head with S_h > tau, gamma_h = tau / S_h (else 1); the logit q_h . k_h is bilinear
in the rows of W_q and W_k that make head h, so scaling the q rows by gamma^alpha and the k
rows by gamma^(1-alpha) scales every logit of the head by gamma (exactly, without biases:
RoPE is a rotation, the MLA latent norms act before the up-projections).

- MHA / GQA (`linear_qkv`, megatron-core's layout: per query group g the rows
  [q heads of g | k of g | v of g], each head_dim rows): query head h's rows by
  gamma_h^alpha; the group's K rows by gamma_g^(1-alpha), gamma_g = min over the group's
  heads of gamma_h (the group's max logit). Then head h's logits scale by
  gamma_h^alpha gamma_g^(1-alpha) <= gamma_h, so every head ends at or below tau. Kimi K2
  uses MLA (per-head keys) and says nothing of GQA; megatron-core's `Attention.clip_qk`
  scales every query head of a group by gamma_g^alpha too, which shrinks heads that never
  exceeded tau. We keep each query head's own gamma (a head below tau only loses what its
  shared K gives up). With one head per group (MHA) both are Kimi's per-head rule.
- MLA (`linear_q_proj` or `linear_q_up_proj`, per head [q-nope | q-rope] rows; and
  `linear_kv_up_proj`, per head [k-nope | v] rows): q-nope by gamma^alpha, q-rope by gamma,
  k-nope by gamma^(1-alpha), v and the shared k-rope (in `linear_kv_down_proj`) untouched,
  as Kimi K2 prescribes (the k-rope is shared by all heads).

Only weights are rescaled, as in Kimi K2 (Algorithm 1 rescales W_q, W_k after the Muon
update); the momentum and AdamW's moments are left as they are.
"""

from __future__ import annotations

import torch

__all__ = [
    "clip_gammas",
    "gqa_qkv_row_factors",
    "mla_kv_up_row_factors",
    "mla_q_row_factors",
    "scale_rows_",
    "scale_shard_",
    "shard_factors",
]


def clip_gammas(max_logits_H: torch.Tensor, threshold: float) -> torch.Tensor:
    """gamma_h = threshold / S_h where S_h > threshold, else 1 (fp32, one per head)."""
    if threshold <= 0:
        raise ValueError(f"QK-Clip threshold must be > 0, got {threshold}")
    s = max_logits_H.float()
    return torch.where(s > threshold, threshold / s, torch.ones_like(s))


def gqa_qkv_row_factors(
    gammas_H: torch.Tensor, num_query_groups: int, head_dim: int, alpha: float
) -> torch.Tensor:
    """One factor per row of the TP-local `linear_qkv` weight
    [groups * (heads_per_group + 2) * head_dim, hidden]; `gammas_H` are this TP rank's
    query heads, in order, `num_query_groups` this rank's groups."""
    heads = gammas_H.numel()
    if heads % num_query_groups != 0:
        raise ValueError(f"{heads} query heads are not divisible into {num_query_groups} groups")
    per_group = heads // num_query_groups
    g_GH = gammas_H.view(num_query_groups, per_group)
    q_GHD = g_GH.pow(alpha)[:, :, None].expand(-1, -1, head_dim)
    k_GD = g_GH.min(dim=1).values.pow(1 - alpha)[:, None].expand(-1, head_dim)
    v_GD = torch.ones_like(k_GD)
    rows_G = torch.cat([q_GHD.reshape(num_query_groups, -1), k_GD, v_GD], dim=1)
    return rows_G.reshape(-1)


def mla_q_row_factors(
    gammas_H: torch.Tensor, qk_head_dim: int, qk_pos_emb_head_dim: int, alpha: float
) -> torch.Tensor:
    """Rows of the TP-local `linear_q_proj` / `linear_q_up_proj` [heads * (nope + rope), in]:
    q-nope by gamma^alpha, q-rope by gamma."""
    nope = gammas_H.pow(alpha)[:, None].expand(-1, qk_head_dim)
    rope = gammas_H[:, None].expand(-1, qk_pos_emb_head_dim)
    return torch.cat([nope, rope], dim=1).reshape(-1)


def mla_kv_up_row_factors(
    gammas_H: torch.Tensor, qk_head_dim: int, v_head_dim: int, alpha: float
) -> torch.Tensor:
    """Rows of the TP-local `linear_kv_up_proj` [heads * (nope + v), kv_lora_rank]: k-nope by
    gamma^(1-alpha), v untouched."""
    k = gammas_H.pow(1 - alpha)[:, None].expand(-1, qk_head_dim)
    v = torch.ones_like(gammas_H)[:, None].expand(-1, v_head_dim)
    return torch.cat([k, v], dim=1).reshape(-1)


def _check_rows(rows_R: torch.Tensor, shape: tuple[int, ...]) -> None:
    if len(shape) != 2 or shape[0] != rows_R.numel():
        raise ValueError(f"{rows_R.numel()} row factors do not fit a weight of shape {shape}")


def shard_factors(
    rows_R: torch.Tensor, shape: tuple[int, ...], start: int, end: int
) -> torch.Tensor:
    """The per-element factors of the flat range [start, end) of a row-major tensor of
    `shape` (the TP-local weight) whose row r is scaled by rows_R[r]: built on the whole
    shape, then sliced, as a ZeRO-1 shard is a flat slice of the TP-local tensor."""
    _check_rows(rows_R, shape)
    full_RC = rows_R[:, None].expand(shape[0], shape[1])
    return full_RC.reshape(-1)[start:end]


@torch.no_grad()
def scale_rows_(weight_RC: torch.Tensor, rows_R: torch.Tensor) -> None:
    """weight[r, :] *= rows_R[r], in place: the product in fp32, rounded once to the
    weight's dtype (bf16 model params)."""
    _check_rows(rows_R, tuple(weight_RC.shape))
    weight_RC.copy_(weight_RC.float() * rows_R[:, None])


@torch.no_grad()
def scale_shard_(
    shard_1d: torch.Tensor, rows_R: torch.Tensor, shape: tuple[int, ...], start: int, end: int
) -> None:
    """A flat shard [start, end) of a `shape` tensor, scaled in place like `scale_rows_`
    would scale the whole tensor."""
    if shard_1d.numel() != end - start:
        raise ValueError(f"shard of {shard_1d.numel()} elements for range [{start}, {end})")
    shard_1d.copy_(shard_1d.float() * shard_factors(rows_R, shape, start, end))
