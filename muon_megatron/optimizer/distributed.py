"""`MuonDistributedOptimizer`: Muon inside megatron-core's ZeRO-1 DistributedOptimizer.

Communication schedule of one step (after Megatron's reduce-scatter, unscale, grad-norm
and clipping, i.e. at the start of `step_with_ready_grads`):

  phase 1, local momentum:   every rank updates the fp32 momentum of its own ZeRO-1
                             shard of each Muon matrix and forms the Newton-Schulz input
                             shard (Nesterov or plain momentum). No communication.
  phase 2, gather to owner:  one all-to-all over the DP x TP grid per bucket of matrices
                             sends every shard of a matrix to its single owner.
  phase 3, orthogonalize:    the owner reassembles the TP-local tensors from their DP
                             shards, the logical matrices from the TP pieces (experts,
                             Q/K/V, gate/up split apart), runs Newton-Schulz once per
                             logical matrix (batched by shape) and scales it.
  phase 4, scatter back:     one all-to-all returns each rank its slice of the update;
                             each rank applies p <- p (1 - lr wd) - lr u to its main shard.
  then Megatron as usual:    the inner AdamW steps the non-Muon shards (Muon shards have
                             their grad cleared, so AdamW skips them), main params are
                             copied to the model and all-gathered over DP.

Each matrix is orthogonalized exactly once in the whole grid; owners are balanced by
Newton-Schulz cost (`ownership.assign_owners`) and, within 5% of the mean load, chosen where
most of the matrix already lies, so that part is neither gathered nor scattered. Momentum is stored per shard in the inner
optimizer's state as `exp_avg`: it is the same EMA as Adam's first moment.

Numerical contract: with `muon_ns_dtype='fp32'` and `muon_comm_dtype='fp32'` the update
equals the single-device reference (`muon_megatron.reference.Muon`) up to fp32 round-off
(different reduction orders of the DP/TP gradient reduction and batched vs single matmuls),
tested at relative 1e-5. bf16 Newton-Schulz or bf16 communication round to bf16 (~3
significant digits) and are tested at a bf16 tolerance.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Callable

import torch
from megatron.core import parallel_state
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from muon_megatron.config import MuonConfig
from muon_megatron.ops.newton_schulz import DTYPES, newton_schulz
from muon_megatron.ops.update import apply_update_, momentum_update_, nesterov_input, update_scale
from muon_megatron.optimizer.checkpoint_state import MuonCheckpointMixin
from muon_megatron.optimizer.grid import Grid, all_to_all, build_grid
from muon_megatron.optimizer.hang_watch import watched
from muon_megatron.optimizer.nonfinite import NonFiniteGradSkipMixin
from muon_megatron.optimizer.plan import MuonMatrix, make_buckets, plan_matrices
from muon_megatron.routing.rules import is_muon_param
from muon_megatron.routing.splits import (
    combine_tp_pieces,
    extract_pieces,
    insert_pieces,
    split_tp_matrix,
)

__all__ = ["MuonDistributedOptimizer"]

class MuonDistributedOptimizer(MuonCheckpointMixin, NonFiniteGradSkipMixin, DistributedOptimizer):
    """ZeRO-1 Muon for 2-D hidden weights, Megatron's AdamW for everything else.

    Checkpoints (`checkpoint_state.MuonCheckpointMixin`): Megatron's `sharded_state_dict` /
    `load_state_dict` save and load the momentum, bitwise, under the state key
    `muon_momentum` ('fully_reshardable' and 'dp_reshardable'). Non-finite gradients
    (`nonfinite.NonFiniteGradSkipMixin`): `prepare_grads` reports found_inf on every rank
    together, the step is skipped and counted in `skipped_steps`.

    Takes DistributedOptimizer's arguments plus `muon_config` and `is_muon` (name, param)
    -> bool. Construct through `muon_megatron.get_muon_optimizer`.
    """

    def __init__(
        self,
        *args,
        muon_config: MuonConfig,
        is_muon: Callable[[str, torch.Tensor], bool] = is_muon_param,
        **kwargs,
    ) -> None:
        optimizer = args[0] if args else kwargs["optimizer"]
        # Before super() replaces them by shards, the groups still hold model params.
        group_of = {}
        if optimizer is not None:
            for gi, group in enumerate(optimizer.param_groups):
                for p in group["params"]:
                    group_of[p] = gi
        is_expert = optimizer is not None and any(
            g.get("is_expert_parallel", False) for g in optimizer.param_groups
        )
        super().__init__(*args, **kwargs)
        self.muon_config = muon_config
        self.ns_calls = 0
        # (param name, logical matrix index within it) -> Newton-Schulz runs on this rank.
        self.ns_counts: Counter[tuple[str, int]] = Counter()
        self.muon_metrics: dict[str, float] = {}
        self.muon_param_update_rms: dict[str, float] = {}
        if is_expert:
            tp_group = parallel_state.get_expert_tensor_parallel_group()
        else:
            tp_group = parallel_state.get_tensor_model_parallel_group()
        # Collective: every rank takes part, also a stub optimizer with no params.
        dp_group = getattr(self, "data_parallel_group", None) or kwargs["data_parallel_group"]
        self.grid: Grid = build_grid(tp_group, dp_group)
        self._matrices: list[MuonMatrix] = []
        self._buckets: list[list[MuonMatrix]] = []
        if self.is_stub_optimizer:
            return
        self._matrices = plan_matrices(self, group_of, is_muon)
        self._buckets = make_buckets(self._matrices, self.muon_config.muon_bucket_mb)

    def _main_shard(self, m: MuonMatrix) -> torch.Tensor | None:
        if m.param not in self.model_param_group_index_map:
            return None
        gi, order = self.model_param_group_index_map[m.param]
        return self.optimizer.param_groups[gi]["params"][order]

    # ---------------------------------------------------------------- step
    @torch.no_grad()
    def step_with_ready_grads(self) -> bool:
        if not self.is_stub_optimizer and self._matrices:
            self._muon_step()
        return super().step_with_ready_grads()

    def _muon_step(self) -> None:
        self.muon_param_update_rms = {}
        self._ns_seconds = 0.0
        ns_inputs = self._phase1_local_momentum()
        sumsq = defaultdict(float)
        for bucket in self._buckets:
            owned = self._phase2_gather(bucket, ns_inputs)
            updates = self._phase3_orthogonalize(owned, sumsq)
            shards = self._phase4_scatter(bucket, updates)
            self._apply(bucket, shards)
        self._record_metrics(sumsq)

    def _phase1_local_momentum(self) -> dict[int, torch.Tensor]:
        cfg = self.muon_config
        inputs = {}
        for m in self._matrices:
            shard = self._main_shard(m)
            if shard is None:
                continue
            grad = shard.grad if shard.grad is not None else torch.zeros_like(shard)
            state = self.optimizer.state[shard]
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(shard, dtype=torch.float32)
            buf = momentum_update_(state["exp_avg"], grad.float(), cfg.muon_momentum)
            inputs[m.index] = nesterov_input(grad.float(), buf, cfg.muon_momentum, cfg.muon_nesterov)
            shard.grad = None  # the inner AdamW skips parameters without a gradient
        return inputs

    def _phase2_gather(
        self, bucket: list[MuonMatrix], ns_inputs: dict[int, torch.Tensor]
    ) -> dict[int, list[torch.Tensor]]:
        """Every shard to its owner. Returns, for matrices this rank owns, the TP-local
        flat tensors (one per TP rank that sends)."""
        grid = self.grid
        my_tp, _ = grid.coords[grid.rank]
        out = [[] for _ in range(grid.size)]
        for m in bucket:
            if m.index in ns_inputs and m.sends_from(my_tp):
                out[m.owner].append(ns_inputs[m.index])
        mine = [m for m in bucket if m.owner == grid.rank]
        sizes = [
            sum(m.shard_numel(d) for m in mine if m.sends_from(t)) for t, d in grid.coords
        ]
        device = self._device()
        chunks = [torch.cat(c) if c else torch.empty(0, device=device) for c in out]
        received = all_to_all(chunks, sizes, grid, DTYPES[self.muon_config.muon_comm_dtype])
        flats = {
            m.index: [
                torch.zeros(m.param.numel(), dtype=torch.float32, device=device)
                for _ in range(m.split.tp_size)
            ]
            for m in mine
        }
        for member, (t, d) in enumerate(grid.coords):
            offset = 0
            for m in mine:
                if not m.sends_from(t):
                    continue
                start, end = m.dp_ranges[d]
                flats[m.index][t][start:end] = received[member][offset : offset + end - start]
                offset += end - start
        return {m.index: flats[m.index] for m in mine}

    def _phase3_orthogonalize(
        self, owned: dict[int, list[torch.Tensor]], sumsq: dict[int, float]
    ) -> dict[int, list[torch.Tensor]]:
        """Newton-Schulz once per logical matrix; returns each owned matrix's update as
        one flat TP-local tensor per TP rank."""
        cfg = self.muon_config
        jobs: list[tuple[int, torch.Tensor]] = []  # (matrix index, logical matrix)
        for index, flats in owned.items():
            m = self._matrices[index]
            pieces = [extract_pieces(f.view(m.local_shape), m.split) for f in flats]
            logical = combine_tp_pieces(pieces, m.split)
            self.ns_counts.update((m.name, j) for j in range(len(logical)))
            jobs.extend((index, x) for x in logical)
        results = self._newton_schulz_batched([x for _, x in jobs])
        per_matrix: dict[int, list[torch.Tensor]] = defaultdict(list)
        for (index, _), u in zip(jobs, results):
            r, c = u.shape
            scaled = u.float() * update_scale(
                cfg.muon_scale_mode, r, c, cfg.muon_matched_adamw_rms, cfg.muon_extra_scale_factor
            )
            per_matrix[index].append(scaled)
        updates = {}
        for index, matrices in per_matrix.items():
            m = self._matrices[index]
            sq = sum(float(x.square().sum()) for x in matrices)
            n = sum(x.numel() for x in matrices)
            self.muon_param_update_rms[m.name] = (sq / n) ** 0.5
            sumsq[2 * m.group_index] += sq
            sumsq[2 * m.group_index + 1] += n
            rank_pieces = split_tp_matrix(matrices, m.split)
            updates[index] = [
                insert_pieces(torch.empty(m.local_shape, device=x[0].device), m.split, x).view(-1)
                for x in rank_pieces
            ]
        return updates

    def _newton_schulz_batched(self, matrices: list[torch.Tensor]) -> list[torch.Tensor]:
        cfg = self.muon_config
        start = time.perf_counter()
        by_shape: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, x in enumerate(matrices):
            by_shape[tuple(x.shape)].append(i)
        out: list[torch.Tensor | None] = [None] * len(matrices)
        for indices in by_shape.values():
            stacked = torch.stack([matrices[i] for i in indices])
            ortho = newton_schulz(
                stacked if len(indices) > 1 else stacked[0],
                steps=cfg.muon_ns_steps,
                coefficients=cfg.muon_coefficients,
                dtype=cfg.muon_ns_dtype,
                eps=cfg.muon_eps,
            )
            ortho = ortho if len(indices) > 1 else ortho.unsqueeze(0)
            for i, u in zip(indices, ortho.unbind(0)):
                out[i] = u
        if matrices and matrices[0].is_cuda:
            torch.cuda.synchronize()
        self._ns_seconds += time.perf_counter() - start
        self.ns_calls += len(matrices)
        return out  # type: ignore[return-value]

    def _phase4_scatter(
        self, bucket: list[MuonMatrix], updates: dict[int, list[torch.Tensor]]
    ) -> dict[int, torch.Tensor]:
        """Each rank's slice of the update back from the owner."""
        grid = self.grid
        my_tp, my_dp = grid.coords[grid.rank]
        out = []
        for t, d in grid.coords:
            parts = []
            for m in bucket:
                if m.owner == grid.rank and m.shard_numel(d) > 0:
                    flat = updates[m.index][t if m.split.tp_mode != "replicated" else 0]
                    start, end = m.dp_ranges[d]
                    parts.append(flat[start:end])
            out.append(torch.cat(parts) if parts else torch.empty(0, device=self._device()))
        sizes = [0] * grid.size
        for m in bucket:
            sizes[m.owner] += m.shard_numel(my_dp)
        received = all_to_all(out, sizes, grid, DTYPES[self.muon_config.muon_comm_dtype])
        shards, offsets = {}, [0] * grid.size
        for m in bucket:
            n = m.shard_numel(my_dp)
            if n:
                shards[m.index] = received[m.owner][offsets[m.owner] : offsets[m.owner] + n]
                offsets[m.owner] += n
        return shards

    def _apply(self, bucket: list[MuonMatrix], shards: dict[int, torch.Tensor]) -> None:
        for m in bucket:
            if m.index not in shards:
                continue
            shard = self._main_shard(m)
            group = self.optimizer.param_groups[self.model_param_group_index_map[m.param][0]]
            apply_update_(shard, shards[m.index].float(), group["lr"], group["weight_decay"], 1.0)

    def _record_metrics(self, sumsq: dict[int, float]) -> None:
        groups = len(self.optimizer.param_groups)
        stats = torch.zeros(2 * groups + 1, dtype=torch.float64)
        for k, v in sumsq.items():
            stats[k] = v
        stats[-1] = self._ns_seconds
        if self.grid.group is not None:
            stats = stats.to(self._device())
            with watched("Muon metrics all_reduce", self.grid.group):
                torch.distributed.all_reduce(stats, group=self.grid.group)
            stats = stats.cpu()
        metrics = {"muon/ns_seconds_local": self._ns_seconds, "muon/ns_seconds_grid": float(stats[-1])}
        for g in range(groups):
            if stats[2 * g + 1] > 0:
                metrics[f"muon/update_rms/group{g}"] = float((stats[2 * g] / stats[2 * g + 1]).sqrt())
        self.muon_metrics = metrics

    def _device(self) -> torch.device:
        return self._matrices[0].param.device if self._matrices else torch.device("cpu")

    # ---------------------------------------------------------------- introspection
    @property
    def muon_matrix_names(self) -> list[str]:
        return [m.name for m in self._matrices]

    @property
    def owners(self) -> dict[str, int]:
        """Grid member owning each Muon parameter."""
        return {m.name: m.owner for m in self._matrices}

    @property
    def logical_matrix_count(self) -> int:
        """Logical matrices (after splits) of all Muon params of this optimizer."""
        return sum(len(m.split.logical_shapes()) for m in self._matrices)

    def owner_loads(self) -> list[float]:
        """Newton-Schulz FLOPs per grid member."""
        loads = [0.0] * self.grid.size
        for m in self._matrices:
            loads[m.owner] += m.cost
        return loads
