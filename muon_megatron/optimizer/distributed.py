"""`MuonDistributedOptimizer`: Muon inside megatron-core's ZeRO-1 DistributedOptimizer.

Communication schedule of one step (after Megatron's reduce-scatter, unscale, grad-norm
and clipping, i.e. at the start of `step_with_ready_grads`), per bucket, a round of the
whole DP x TP grid in which every owner does about the same share of its work
(`plan.make_buckets`):

  phase 1, local momentum:   every rank updates the fp32 momentum of its own ZeRO-1
                             shard of each Muon matrix of the bucket and forms the
                             Newton-Schulz input shard (Nesterov or plain momentum),
                             foreach over the bucket. No communication.
  phase 2, gather to owner:  one asynchronous exchange sends every shard to its matrix's
                             single owner: point-to-point, between the pairs of members
                             with something to send (`grid.start_exchange`); the owner's
                             own shard stays off the wire, in fp32. The owner assembles
                             its matrices' TP-local tensors in one buffer (one foreach
                             copy; `bucket.Bucket` lays everything out once).
  phase 3, orthogonalize:    per class of alike matrices and row group, one view/select
                             and one permute make a stack of logical matrices (experts,
                             Q/K/V, gate/up split apart, TP pieces joined); each logical
                             shape goes through Newton-Schulz once, batched, is scaled, and
                             is written back into the same buffer.
  phase 4, scatter back:     the mirror exchange returns each rank its slice of the
                             update; each rank applies p <- p (1 - lr wd) - lr u to its main
                             shards, foreach per param group.
  then Megatron as usual:    the inner AdamW steps the non-Muon shards (Muon shards have
                             their grad cleared, so AdamW skips them), main params are
                             copied to the model and all-gathered over DP.

`pipeline.run_pipeline` overlaps the buckets: bucket k+1's gather is in flight while bucket
k's Newton-Schulz runs, and bucket k's scatter while bucket k+1's runs; a chain's dense and
expert buckets are interleaved. Nothing in the step copies a value to the host or waits
for the device (`step_metrics`: the figures stay on the device until the log reads them),
and the step dispatches a number of operators set by its buckets and shapes, not by its
matrices.

Each matrix is orthogonalized exactly once in the whole grid; owners are balanced by
Newton-Schulz cost (`ownership.assign_owners`) and, within 5% of the mean load, chosen where
most of the matrix already lies, so that part is neither gathered nor scattered. Momentum
is stored per shard in the inner optimizer's state as `exp_avg`: it is the same EMA as
Adam's first moment.

Numerical contract: with `muon_ns_dtype='fp32'` and `muon_comm_dtype='fp32'` the update
equals the single-device reference (`muon_megatron.reference.Muon`) up to fp32 round-off
(different reduction orders of the DP/TP gradient reduction and batched vs single matmuls),
tested at relative 1e-5. bf16 Newton-Schulz or bf16 communication round to bf16 (~3
significant digits) and are tested at a bf16 tolerance. Pipelining changes no arithmetic;
the buckets change only which same-shape matrices share one batched Newton-Schulz.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from megatron.core import parallel_state
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from muon_megatron.config import MuonConfig
from muon_megatron.ops.newton_schulz import DTYPES, newton_schulz
from muon_megatron.ops.update import (
    apply_updates_foreach_,
    momentum_update_foreach_,
    nesterov_inputs_foreach,
)
from muon_megatron.optimizer.bucket import Bucket
from muon_megatron.optimizer.checkpoint_state import MuonCheckpointMixin
from muon_megatron.optimizer.grid import Grid, InFlight, build_grid, join_grid, start_exchange
from muon_megatron.optimizer.nonfinite import NonFiniteGradSkipMixin
from muon_megatron.optimizer.pipeline import run_pipeline
from muon_megatron.optimizer.plan import MuonMatrix, make_buckets, plan_matrices
from muon_megatron.optimizer.step_metrics import StepMetrics
from muon_megatron.optimizer.timing import PhaseTimer
from muon_megatron.routing.rules import is_muon_param

__all__ = ["MuonDistributedOptimizer"]


class _Bound:
    """A bucket's matrices resolved to this rank's main shards (the inner AdamW's params,
    the same objects for the optimizer's life: checkpoints load into them in place), and
    where each shard's update comes from in the scatter (received ones, then kept ones)."""

    def __init__(self, opt: MuonDistributedOptimizer, bucket: Bucket) -> None:
        self.shards = [opt._main_shard(m) for m in bucket.held]
        if any(s is None for s in self.shards):
            raise RuntimeError("a Muon matrix's ZeRO-1 range has no main shard on its rank")
        self.kept = [m.index for m in bucket.held if m.owner == bucket.me]
        position = {m.index: k for k, m in enumerate(bucket.updated)}
        position.update({i: len(bucket.updated) + k for k, i in enumerate(self.kept)})
        groups: dict[int, tuple[list, list]] = {}
        for m, shard in zip(bucket.held, self.shards):
            params, positions = groups.setdefault(opt.model_param_group_index_map[m.param][0],
                                                  ([], []))
            params.append(shard)
            positions.append(position[m.index])
        self.apply = [(gi, params, positions) for gi, (params, positions) in groups.items()]

class MuonDistributedOptimizer(MuonCheckpointMixin, NonFiniteGradSkipMixin, DistributedOptimizer):
    """ZeRO-1 Muon for 2-D hidden weights, Megatron's AdamW for everything else.

    Checkpoints (`checkpoint_state.MuonCheckpointMixin`): Megatron's `sharded_state_dict` /
    `load_state_dict` save and load the momentum, bitwise, under the state key
    `muon_momentum` ('fully_reshardable' and 'dp_reshardable'). Non-finite gradients
    (`nonfinite.NonFiniteGradSkipMixin`): `prepare_grads` reports found_inf on every rank
    together, the step is skipped and counted in `skipped_steps`.

    Takes DistributedOptimizer's arguments plus `muon_config`, `is_muon` (name, param)
    -> bool and `tp_groups_of` (global rank, expert=) -> that rank's TP group, which only
    the planner passes (`grid.build_grid`). Construct through
    `muon_megatron.get_muon_optimizer`.
    """

    def __init__(
        self,
        *args,
        muon_config: MuonConfig,
        is_muon: Callable[[str, torch.Tensor], bool] = is_muon_param,
        pg_collection=None,
        tp_groups_of: Callable[[int, bool], Sequence[int]] | None = None,
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
        self.expert = is_expert
        if pg_collection is not None and hasattr(pg_collection, "tp"):
            tp_group = pg_collection.expt_tp if is_expert else pg_collection.tp
        elif is_expert:
            tp_group = parallel_state.get_expert_tensor_parallel_group()
        else:
            tp_group = parallel_state.get_tensor_model_parallel_group()
        # Collective: every rank takes part, also a stub optimizer with no params.
        dp_group = getattr(self, "data_parallel_group", None) or kwargs["data_parallel_group"]
        tp_group_of = None
        if tp_groups_of is not None:
            tp_group_of = functools.partial(tp_groups_of, expert=is_expert)
        self.grid: Grid = build_grid(tp_group, dp_group, tp_group_of)
        join_grid(self.grid)
        self._matrices: list[MuonMatrix] = []
        self._buckets: list[Bucket] = []
        # The optimizers whose Muon phases this one runs, pipelined together, in its
        # step (itself; or the whole chain for its first member, None for the others:
        # `builder.pipeline_chain`).
        self._pipeline_members: list[MuonDistributedOptimizer] | None = [self]
        self.metrics = StepMetrics([], [], [], torch.device("cpu"), None)
        if self.is_stub_optimizer:
            return
        self._matrices = plan_matrices(self, group_of, is_muon)
        device = self._device()
        self._buckets = [
            Bucket(b, self.grid, muon_config, device, tag=2 * i)
            for i, b in enumerate(
                make_buckets(self._matrices, muon_config.muon_owner_bucket_mb, self.grid.size)
            )
        ]
        self._bound = {id(b): _Bound(self, b) for b in self._buckets}
        self.metrics = StepMetrics(
            names=[m.name for m in self._matrices],
            numels=[sum(r * c for r, c in m.split.logical_shapes()) for m in self._matrices],
            groups=[m.group_index for m in self._matrices],
            device=device,
            group=self.grid.group,
        )

    def _main_shard(self, m: MuonMatrix) -> torch.Tensor | None:
        if m.param not in self.model_param_group_index_map:
            return None
        gi, order = self.model_param_group_index_map[m.param]
        return self.optimizer.param_groups[gi]["params"][order]

    # ---------------------------------------------------------------- step
    @torch.no_grad()
    def step_with_ready_grads(self) -> bool:
        if self.skip_nonfinite_step():
            return False
        if not self.is_stub_optimizer and self._pipeline_members is not None:
            with PhaseTimer.of(self)("muon-step"):
                run_pipeline(self._pipeline_members)
        return super().step_with_ready_grads()

    # The four phases of one bucket; `optimizer.pipeline.run_pipeline` interleaves them.
    def _begin_step(self) -> None:
        self.metrics.begin_step()

    def _end_step(self) -> None:
        self.metrics.end_step()

    def _phase1_local_momentum(self, bucket: Bucket) -> list[torch.Tensor]:
        """Momentum and the Newton-Schulz input of this rank's shards of `bucket` (fp32,
        foreach over the bucket, in `bucket.held` order); clears their grads so the inner
        AdamW skips them."""
        shards = self._bound[id(bucket)].shards
        if not shards:
            return []
        cfg = self.muon_config
        grads = [s.grad.float() if s.grad is not None else torch.zeros_like(s) for s in shards]
        bufs = [self._momentum(s) for s in shards]
        for s in shards:
            s.grad = None  # the inner AdamW skips parameters without a gradient
        momentum_update_foreach_(bufs, grads, cfg.muon_momentum)
        return nesterov_inputs_foreach(grads, bufs, cfg.muon_momentum, cfg.muon_nesterov)

    def _momentum(self, shard: torch.Tensor) -> torch.Tensor:
        state = self.optimizer.state[shard]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(shard, dtype=torch.float32)
        return state["exp_avg"]

    def _phase2_start_gather(self, bucket: Bucket, ns_inputs: list[torch.Tensor]) -> InFlight:
        """Issue the exchange that sends every shard to its owner (asynchronous). This
        rank's own shards of the matrices it owns stay off the wire, in fp32."""
        return self._exchange(
            bucket.gather,
            [ns_inputs[i] for i in bucket.gather.send_order],
            [ns_inputs[i] for i in bucket.keep_held],
        )

    def _phase2_finish_gather(self, bucket: Bucket, flight: InFlight) -> torch.Tensor:
        """Wait for the gather; assemble the owned matrices' TP-local tensors, by class, in
        one fp32 buffer (one foreach copy from the received and kept pieces)."""
        recv = flight.wait("Muon gather exchange")
        buffer = torch.empty(bucket.owned_numel, dtype=torch.float32, device=self._device())
        if bucket.owned_numel:
            sources = list(recv.split(bucket.gather.recv_blocks)) + flight.keep
            torch._foreach_copy_(
                list(buffer.split(bucket.blocks)), [sources[i] for i in bucket.assemble_from]
            )
        return buffer

    def _phase3_orthogonalize(self, bucket: Bucket, buffer: torch.Tensor) -> torch.Tensor:
        """Newton-Schulz once per logical matrix, one batch per logical shape; the scaled
        updates are written back into `buffer` (same layout), which is returned."""
        if not bucket.batches:
            return buffer
        cfg = self.muon_config
        oriented = [c.oriented(buffer) for c in bucket.classes]
        self.metrics.timer.begin()
        for batch in bucket.batches:
            stacks = [bucket.classes[ci].logical(oriented[ci], j) for ci, j in batch.parts]
            x = torch.cat(stacks) if len(stacks) > 1 else stacks[0]
            update = newton_schulz(
                x if len(x) > 1 else x[0],
                steps=cfg.muon_ns_steps,
                coefficients=cfg.muon_coefficients,
                dtype=cfg.muon_ns_dtype,
                eps=cfg.muon_eps,
            ).float()
            update = update if len(x) > 1 else update.unsqueeze(0)
            update.mul_(batch.scale)
            self.metrics.add(
                batch.param_index, torch.linalg.vector_norm(update, dim=(-2, -1)).square()
            )
            for (ci, j), part in zip(batch.parts, update.split(batch.counts)):
                bucket.classes[ci].insert(oriented[ci], j, part)
        self.metrics.timer.end()
        return buffer

    def _phase4_start_scatter(self, bucket: Bucket, buffer: torch.Tensor) -> InFlight:
        """Issue the exchange returning each rank its slice of the update (asynchronous);
        the owner's own slices stay off the wire, in fp32."""
        views = list(buffer.split(bucket.blocks)) if bucket.owned_numel else []
        kept = self._bound[id(bucket)].kept
        return self._exchange(
            bucket.scatter,
            [views[k] for k in bucket.scatter.send_order],
            [views[bucket.scatter_keep[i]] for i in kept],
        )

    def _exchange(self, exchange, pieces: list[torch.Tensor], keep: list) -> InFlight:
        dtype = DTYPES[self.muon_config.muon_comm_dtype]
        return start_exchange(pieces, exchange, self.grid, dtype, self._device(), keep)

    def _phase4_finish_scatter(self, bucket: Bucket, flight: InFlight) -> None:
        """Wait for the scatter; p <- p (1 - lr wd) - lr u on every main shard, foreach per
        param group."""
        recv = flight.wait("Muon scatter exchange", dtype=torch.float32)
        sources = list(recv.split(bucket.scatter.recv_blocks)) + flight.keep
        for gi, params, positions in self._bound[id(bucket)].apply:
            group = self.optimizer.param_groups[gi]
            apply_updates_foreach_(
                params, [sources[i] for i in positions], group["lr"], group["weight_decay"]
            )

    # ---------------------------------------------------------------- metrics
    @property
    def muon_metrics(self) -> dict[str, float]:
        """The last step's figures (reads the device: call at log time)."""
        read = self.metrics.read() if self._matrices else {}
        if not read:
            return {}
        out = {"muon/ns_seconds_local": read["ns_seconds"]}
        for g, rms in sorted(read["group_rms"].items()):
            out[f"muon/update_rms/group{g}"] = rms
        return out

    @property
    def muon_param_update_rms(self) -> dict[str, float]:
        """Update RMS of every Muon matrix at the last step (reads the device)."""
        read = self.metrics.read() if self._matrices else {}
        return dict(read.get("update_rms", {}))

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
