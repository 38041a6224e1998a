"""One pipeline stage's Muon step on the cluster: time, bytes and memory of every rank.

`estimate_stage` takes the stage's optimizers (their `figures.GridFigures`, in chain order),
where its ranks sit (`layout.RankLayout.placement`) and the hardware, and returns for the
busiest rank: steady memory against ZeRO-1 AdamW, the peak transient bytes of the pipelined
step, bytes on NVLink and InfiniBand per step, the Newton-Schulz critical path against the
ideal and the estimated time of the Muon phases (`events.simulate` on the pipeline's own
issue order), and the same for megatron-core's Muon and Moonlight's scheme.

Costs per operation (stated in the plan's output too): Newton-Schulz at the hardware's
`ns_efficiency` of the matmul peak of its dtype; elementwise work HBM-bound (momentum and
Nesterov 16 bytes per shard element, apply 12, the owner's reassembly and scatter copies
24 per element orthogonalized); an exchange costs its latency (`Hardware`) plus the
busiest member's bytes over NVLink and over InfiniBand at `link_efficiency`; an exchange is
point-to-point between the pairs with something to send, so a rank pays a latency per peer
it really has (`events.simulate` runs each connected set of ranks on its own).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from muon_megatron.costmodel import alternatives
from muon_megatron.costmodel.events import issue_order, simulate
from muon_megatron.costmodel.figures import BucketFigures, GridFigures, member_bytes
from muon_megatron.costmodel.hardware import Hardware

__all__ = ["StageEstimate", "estimate_stage", "MOMENTUM_BYTES", "APPLY_BYTES", "OWNER_BYTES"]

MOMENTUM_BYTES = 16
"""Per shard element: read the grad, read and write the momentum, write the NS input."""
APPLY_BYTES = 12
"""Per shard element: read and write the fp32 main param, read the update."""
OWNER_BYTES = 24
"""Per element an owner orthogonalizes: receive -> flat -> logical matrix -> update -> wire."""


@dataclass
class StageEstimate:
    stage: int
    ranks: int
    grids: list[GridFigures]
    ideal: float
    ns_critical_path: float
    muon_seconds: float
    adam_seconds: float
    """AdamW's own elementwise step on the busiest rank's non-Muon shards (HBM-bound)."""
    zero1_adam_seconds: float
    nvlink_bytes: float
    ib_bytes: float
    transient_bytes: float
    memory: dict[str, int]
    memory_adamw: dict[str, int]
    owners_per_bucket: list[tuple[int, int]]
    alternatives: list[alternatives.SchemeFigures] = field(default_factory=list)
    per_rank: dict[int, dict[str, float]] = field(default_factory=dict)
    """Global rank -> {'ns_flops', 'sent', 'received' (wire bytes per step), 'transient'}."""

    @property
    def ratio(self) -> float:
        return self.ns_critical_path / self.ideal if self.ideal > 0 else 1.0


def _ns_rate(fig: GridFigures, hw: Hardware) -> float:
    peak = hw.bf16_tflops if fig.ns_dtype == "bf16" else hw.fp32_tflops
    return peak * 1e12 * hw.ns_efficiency


class _Costs:
    """Per-operation seconds of one stage, cached by position and grid instance."""

    def __init__(self, grids, buckets_at, ranks_of, hw: Hardware) -> None:
        self.grids, self.buckets_at, self.ranks_of, self.hw = grids, buckets_at, ranks_of, hw
        self.hbm = hw.hbm_gbps * 1e9
        self._coll: dict[tuple[str, int, int], tuple[float, list[list[float]]]] = {}

    def ns_only(self, kind: str, k: int, g: int) -> float:
        m, b = self.buckets_at[k]
        return self.grids[m].buckets[b].ns_flops[g] / _ns_rate(self.grids[m], self.hw) if (
            kind == "ns") else 0.0

    def compute(self, kind: str, k: int, g: int) -> float:
        m, b = self.buckets_at[k]
        bucket = self.grids[m].buckets[b]
        if kind == "momentum":
            return bucket.shard_numel[g] * MOMENTUM_BYTES / self.hbm
        if kind == "apply":
            return bucket.shard_numel[g] * APPLY_BYTES / self.hbm
        return self.ns_only(kind, k, g) + bucket.owned_numel[g] * OWNER_BYTES / self.hbm

    def exchange(self, kind: str, k: int, instance: int) -> list[tuple[list[int], float]]:
        """Connected components of the exchange's transfers, each with its seconds: the
        slowest member's latency (one per exchange, one per peer it really has) plus its
        bytes over NVLink and over InfiniBand."""
        return self._exchange(kind, k, instance)[0]

    def link_bytes(self, kind: str, k: int, instance: int) -> list[list[float]]:
        """Per member: [NVLink sent, NVLink received, IB sent, IB received] bytes."""
        return self._exchange(kind, k, instance)[1]

    def _exchange(self, kind: str, k: int, instance: int):
        key = (kind, k, instance)
        if key in self._coll:
            return self._coll[key]
        m, b = self.buckets_at[k]
        fig, hw = self.grids[m], self.hw
        node = [r // hw.gpus_per_node for r in self.ranks_of(m, instance)]
        bucket: BucketFigures = fig.buckets[b]
        pairs = bucket.gather if kind == "gather" else bucket.scatter
        links = [[0.0, 0.0, 0.0, 0.0] for _ in node]
        peers: dict[int, set[int]] = {}
        parent = list(range(len(node)))

        def root(g: int) -> int:
            while parent[g] != g:
                parent[g] = parent[parent[g]]
                g = parent[g]
            return g

        for (src, dst), n in pairs.items():
            ib = 2 if node[src] != node[dst] else 0
            links[src][ib] += n * fig.wire_bytes
            links[dst][ib + 1] += n * fig.wire_bytes
            peers.setdefault(src, set()).add(dst)
            peers.setdefault(dst, set()).add(src)
            parent[root(src)] = root(dst)
        nvl_bw = hw.nvlink_gbps * 1e9 * hw.link_efficiency
        ib_bw = hw.ib_gbps * 1e9 * hw.link_efficiency
        components: dict[int, tuple[list[int], float]] = {}
        for g in sorted(peers):
            s_nvl, r_nvl, s_ib, r_ib = links[g]
            inter = sum(1 for p in peers[g] if node[p] != node[g])
            seconds = (
                hw.collective_latency_us * 1e-6
                + ((len(peers[g]) - inter) * hw.peer_latency_us + inter * hw.ib_peer_latency_us)
                * 1e-6
                + max(s_nvl, r_nvl) / nvl_bw
                + max(s_ib, r_ib) / ib_bw
            )
            members, worst = components.get(root(g), ([], 0.0))
            components[root(g)] = (members + [g], max(worst, seconds))
        self._coll[key] = (list(components.values()), links)
        return self._coll[key]


def estimate_stage(
    stage: int,
    grids: list[GridFigures],
    placement: list[list[tuple[int, int]]],
    ranks_of,
    hw: Hardware,
    ns_steps: int,
) -> StageEstimate:
    """The Muon step of one stage. `ranks_of(m, instance)`: global ranks of a grid instance
    of optimizer m (member order)."""
    trace, member_of = issue_order([len(g.buckets) for g in grids])
    seen = [0] * len(grids)
    buckets_at = []
    for m in member_of:
        buckets_at.append((m, seen[m]))
        seen[m] += 1
    costs = _Costs(grids, buckets_at, ranks_of, hw)
    def free(kind: str, k: int, instance: int) -> list[tuple[list[int], float]]:
        return [(members, 0.0) for members, _ in costs.exchange(kind, k, instance)]

    ns_only = simulate(trace, member_of, placement, costs.ns_only, free)
    full = simulate(trace, member_of, placement, costs.compute, costs.exchange)

    # Per rank: bytes on each link, and the transient peak replayed on the trace (what
    # `run_pipeline` holds at each Newton-Schulz: the exchanges in flight and that bucket's
    # owner buffer, fp32, which takes the updates in place).
    nvl, ib, transient = [0.0] * len(placement), [0.0] * len(placement), [0.0] * len(placement)
    alive: set[tuple[str, int]] = set()
    for event, k in trace:
        kind = "gather" if event.startswith("gather") else "scatter"
        if event.endswith("_issue"):
            alive.add((kind, k))
        elif event.endswith("_wait"):
            alive.discard((kind, k))
        if event != "ns_begin":
            continue
        m, b = buckets_at[k]
        for r, slots in enumerate(placement):
            held = 4.0 * grids[m].buckets[b].owned_numel[slots[m][1]]
            for kind_, k_ in alive:
                m_ = buckets_at[k_][0]
                instance, g = slots[m_]
                links = costs.link_bytes(kind_, k_, instance)[g]
                held += links[1] + links[3] + links[0] + links[2]
            transient[r] = max(transient[r], held)
    sent, received = [0.0] * len(placement), [0.0] * len(placement)
    for r, slots in enumerate(placement):
        for k, (m, _) in enumerate(buckets_at):
            instance, g = slots[m]
            for kind in ("gather", "scatter"):
                links = costs.link_bytes(kind, k, instance)[g]
                nvl[r] += links[0] + links[1]
                ib[r] += links[2] + links[3]
                sent[r] += links[0] + links[2]
                received[r] += links[1] + links[3]
    per_rank = {}
    for r, slots in enumerate(placement):
        rank = ranks_of(0, slots[0][0])[slots[0][1]]
        per_rank[rank] = {
            "ns_flops": sum(grids[m].owned(g)[2] for m, (_, g) in enumerate(slots)),
            "sent": sent[r], "received": received[r], "transient": transient[r],
        }

    def rank_memory(r: int, muon: bool) -> dict[str, int]:
        total: dict[str, int] = {}
        for m, (_, g) in enumerate(placement[r]):
            for key, value in member_bytes(grids[m], g, muon).items():
                total[key] = total.get(key, 0) + value
        return total

    def steady(r: int) -> int:
        return sum(rank_memory(r, True).values())

    busiest = max(range(len(placement)), key=lambda r: (steady(r) + transient[r], -r))
    memory = rank_memory(busiest, True)
    memory["transient"] = int(transient[busiest])
    adamw = rank_memory(busiest, False)
    hbm = hw.hbm_gbps * 1e9
    # torch/apex Adam: read grad, param, exp_avg, exp_avg_sq; write the last three (fp32).
    adam = memory["adam_moments"] / 8 * 28 / hbm
    zero1 = adamw["adam_moments"] / 8 * 28 / hbm
    owners = [
        (sum(1 for f in bucket.ns_flops if f > 0), g.size) for g in grids for bucket in g.buckets
    ]
    schemes = []
    for scheme in (alternatives.megatron_core_muon, alternatives.moonlight_muon):
        parts = [scheme(g, hw, ns_steps) for g in grids]
        schemes.append(alternatives.SchemeFigures(
            parts[0].name,
            sum(p.ns_flops_max for p in parts),
            sum(p.ns_flops_mean for p in parts),
            sum(p.extra_bytes for p in parts),
            sum(p.state_bytes for p in parts),
            max(p.transient_bytes for p in parts),
            sum(p.seconds for p in parts),
        ))
    return StageEstimate(
        stage=stage,
        ranks=len(placement),
        grids=grids,
        ideal=ns_only.ideal,
        ns_critical_path=ns_only.ns_critical_path,
        muon_seconds=full.step,
        adam_seconds=adam,
        zero1_adam_seconds=zero1,
        nvlink_bytes=max(nvl),
        ib_bytes=max(ib),
        transient_bytes=max(transient),
        memory=memory,
        memory_adamw=adamw,
        owners_per_bucket=owners,
        alternatives=schemes,
        per_rank=per_rank,
    )
