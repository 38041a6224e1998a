"""Where every rank sits: megatron-core's rank layout, and each stage rank's grid slots.

`RankLayout` rebuilds the groups `initialize_model_parallel` builds, with megatron-core's own
`RankGenerator` (order 'tp-cp-ep-dp-pp', its default), for a world of any size: the TP group
of every rank (dense and expert), the ranks of every pipeline stage, and the Muon grids (the
dense grid is a stage's TP x CP x DP ranks; an expert grid is its expert-TP x expert-DP ranks
of one EP rank). `placement` says, for every rank of a stage, which grid instance and which
member of it the rank is in each optimizer of the chain: what the event model needs.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RankLayout"]

ORDER = "tp-cp-ep-dp-pp"


@dataclass
class RankLayout:
    """megatron-core's rank layout of a world."""

    world_size: int
    dense_tp: dict[int, list[int]]
    expert_tp: dict[int, list[int]]
    stages: list[list[int]]
    """Ranks of each pipeline stage, ascending."""
    dense_grids: list[list[int]]
    expert_grids: list[list[int]]

    @classmethod
    def of(cls, world_size: int, tp: int, pp: int, ep: int = 1, etp: int | None = None,
           cp: int = 1) -> RankLayout:
        from megatron.core.parallel_state import RankGenerator

        etp = etp or tp
        for name, size in (("TP x PP x CP", tp * pp * cp), ("expert TP x EP x PP", etp * ep * pp)):
            if world_size % size:
                raise ValueError(f"world size {world_size} is not a multiple of {name} = {size}.")
        dense = RankGenerator(tp=tp, ep=1, dp=world_size // (tp * pp * cp), pp=pp, cp=cp,
                              order=ORDER)
        expert = RankGenerator(tp=etp, ep=ep, dp=world_size // (etp * ep * pp), pp=pp, cp=1,
                               order=ORDER)
        by_stage: dict[int, list[int]] = {}
        for group in dense.get_ranks("pp"):
            for s, rank in enumerate(group):
                by_stage.setdefault(s, []).append(rank)
        return cls(
            world_size,
            {r: g for g in dense.get_ranks("tp") for r in g},
            {r: g for g in expert.get_ranks("tp") for r in g},
            [sorted(by_stage[s]) for s in range(pp)],
            [sorted(g) for g in dense.get_ranks("tp-cp-dp")],
            [sorted(g) for g in expert.get_ranks("tp-dp")],
        )

    @classmethod
    def of_args(cls, args, world_size: int) -> RankLayout:
        """From Megatron-LM's parallel flags (an argparse namespace)."""
        return cls.of(world_size, args.tensor_model_parallel_size,
                      args.pipeline_model_parallel_size, args.expert_model_parallel_size,
                      args.expert_tensor_parallel_size, getattr(args, "context_parallel_size", 1))

    def tp_group_of(self, rank: int, expert: bool) -> list[int]:
        return (self.expert_tp if expert else self.dense_tp)[rank]

    def placement(self, stage: int, experts: list[bool]) -> list[list[tuple[int, int]]]:
        """Per rank of `stage` (ascending), per optimizer of the chain (`experts[m]`: whether
        member m is the expert one): (grid instance, member index in that grid)."""
        slots: list[dict[int, tuple[int, int]]] = [{}, {}]
        for kind, grids in enumerate((self.dense_grids, self.expert_grids)):
            for instance, grid in enumerate(grids):
                for g, rank in enumerate(grid):
                    slots[kind][rank] = (instance, g)
        return [[slots[int(e)][r] for e in experts] for r in self.stages[stage]]

    def grid_ranks(self, expert: bool, instance: int) -> list[int]:
        return (self.expert_grids if expert else self.dense_grids)[instance]
