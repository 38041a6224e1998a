"""TE's fused MoE router kernels (imported by megatron-core for TE >= 2.7): out of reach;
megatron-core calls them only with `--moe-router-fusion`."""

__all__ = [
    "fused_compute_score_for_moe_aux_loss",
    "fused_moe_aux_loss",
    "fused_topk_with_score_function",
]


def _refuse(*args, **kwargs):
    raise NotImplementedError("TE's fused router is out of reach in the TE stand-in (CPU)")


fused_compute_score_for_moe_aux_loss = _refuse
fused_moe_aux_loss = _refuse
fused_topk_with_score_function = _refuse
