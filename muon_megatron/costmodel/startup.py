"""The plan's summary lines for a real run's log, from the optimizer it has just built.

A run prints, at rank 0 when its optimizer is built, what `muon-megatron plan` says of its
stage: the grids (matrices, owners busy, Newton-Schulz balance, buckets) and the step's
Newton-Schulz critical path, Muon time and bytes on the default hardware (H100 SXM). The
ranks' places come from megatron-core's rank layout (`layout.RankLayout`) for the sizes of
the groups in use; a run whose grids are not laid out that way (custom process groups)
gets one line saying so instead.
"""

from __future__ import annotations

import torch.distributed as dist

from muon_megatron.costmodel.estimate import estimate_stage
from muon_megatron.costmodel.figures import grid_figures
from muon_megatron.costmodel.hardware import PRESETS, Hardware
from muon_megatron.costmodel.layout import RankLayout
from muon_megatron.costmodel.report import summary_lines
from muon_megatron.optimizer.builder import muon_optimizers

__all__ = ["plan_summary"]


def plan_summary(optimizer, hw: Hardware = PRESETS["h100-sxm"]) -> list[str]:
    """Summary lines of this rank's stage ([] without Muon matrices). Local: no collective."""
    from megatron.core import parallel_state as ps

    members = [m for m in muon_optimizers(optimizer) if m._matrices]
    if not members:
        return []
    layout = RankLayout.of(
        dist.get_world_size(),
        ps.get_tensor_model_parallel_world_size(),
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_expert_model_parallel_world_size(),
        ps.get_expert_tensor_parallel_world_size(),
        ps.get_context_parallel_world_size(),
    )
    stage = ps.get_pipeline_model_parallel_rank()
    me = dist.get_rank()
    experts = [m.expert for m in members]
    for m, expert in zip(members, experts):
        grids = layout.expert_grids if expert else layout.dense_grids
        if list(m.grid.ranks or (me,)) not in grids:
            return ["[muon plan] no plan summary: this run's grids are not megatron-core's "
                    "default rank layout (tp-cp-ep-dp-pp)"]
    grids = [grid_figures(m, "expert" if m.expert else "dense") for m in members]
    est = estimate_stage(
        stage, grids, layout.placement(stage, experts),
        lambda m, instance: layout.grid_ranks(experts[m], instance),
        hw, members[0].muon_config.muon_ns_steps,
    )
    return summary_lines(est, hw)
