"""`muon-megatron verify`: the distributed optimizer against the single-device reference.

Phase A (the layout under test, N processes): build the tiny model, save its initial
weights, train K steps with `get_muon_optimizer` on deterministic global batches (each
DP rank its own slice), save the final weights. Phase B (one process, TP=PP=EP=1): load
the initial weights, train the same K global batches with `muon_megatron.reference.Muon`
(same clipping, same lr/wd per group), load phase A's final weights, and compare.

The figure of merit compares total updates dW = W_K - W_0 (not the weights, which init
dominates): for each optimizer family (all Muon matrices; all AdamW params) the relative
difference ||dW_dist - dW_ref|| / ||dW_ref|| of the family's concatenated update, and
`max_rel_diff` is the larger of the two. In fp32, per-tensor figures are reported for
diagnosis but do not decide: AdamW divides every element by its own gradient RMS, so
elements with near-zero gradients turn fp32 reduction-order noise into large per-element
changes (seen: one sequence-parallel layernorm weight at 3e-5 while its family is at 2e-6).
A real bug in any whole tensor (skipped, mis-scaled, mis-split) moves its family by well
over 1e-3. In bf16 the family tolerance is 0.1, under which one wholly wrong small tensor
could hide: every tensor is also held to BF16_TENSOR_TOLERANCE.

Newton-Schulz accounting: each rank returns what it orthogonalized (observed from outside
the optimizer, `tools.observe.counting_newton_schulz`) and its plan's logical matrices,
both keyed by (grid ranks, param name, logical index), for the caller to check that every
planned matrix ran exactly once per step.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from muon_megatron.config import MuonConfig
from muon_megatron.tools.observe import NsKey, counting_newton_schulz, grid_ranks

if TYPE_CHECKING:
    from muon_megatron.testing.tiny import Layout, ModelSpec

__all__ = [
    "BF16_TENSOR_TOLERANCE",
    "BF16_TOLERANCE",
    "FP32_TOLERANCE",
    "NOISE_CEILING",
    "NOISE_GAIN",
    "VerifySpec",
    "run_verify",
    "tensor_tolerance_for",
    "tolerance_for",
]

# fp32 Newton-Schulz and fp32 communication: with the same micro-batching a world-1 run is
# bitwise equal to the reference. Other layouts differ only in fp32 reduction order (DP
# reduce-scatter vs sequential accumulation, TP partial sums, pipeline stages), ~1e-7 in the
# gradient, which Newton-Schulz amplifies along small singular directions (slope a=3.4445 per
# step at 0) and training compounds. How much depends on the CPU's kernels (AVX2 and AVX-512
# block their sums differently): 6e-6..7.5e-6 after 5 steps on one Intel machine, 1.5e-5 for
# TP2xPP2 on an AMD EPYC. So the tolerance is not one number fitted on one machine. Each run
# measures its own noise: the reference is trained a second time with another
# micro-batching, the same mean loss summed in another order, a perturbation of the same
# kind and size as the distributed run's (fp32 reduction order alone) that passes through
# the same Newton-Schulz and the same training. The tolerance is NOISE_GAIN times that
# measured noise (the larger of the two families': the same perturbed gradient feeds both,
# and the AdamW family alone under-reads it, 9.6e-7 against 3.4e-6 for TP2xPP2 on the EPYC,
# where the distributed AdamW family measured 7.0e-6), never below FP32_TOLERANCE (runs
# whose reordering happens to cancel out) and never above NOISE_CEILING. NOISE_GAIN = 10:
# the distributed run reorders more sums than one micro-batch change (TP, DP and PP at
# once), each O(eps), so its noise is the same process with a few times the variance; 10
# leaves room for that on any CPU. The ceiling keeps the check a bug detector: any real bug
# (a wrong scale, split or shard, a skipped matrix, zeroed momentum) moves a family's total
# update by 1e-2 or more (measured: 0.38..0.78 with the QKV / gate-up split switched, 0.8
# with the momentum zeroed), a hundred times the ceiling.
FP32_TOLERANCE = 1e-5
NOISE_GAIN = 10.0
NOISE_CEILING = 1e-4
# bf16 Newton-Schulz (or bf16 communication): a world-1 run is still bitwise equal to the
# reference, so the bf16 code path is the same arithmetic. Across ranks, fp32 gradients that
# differ by ~1e-7 (reduction order) round to different bf16 values, and NS decorrelates the
# rounding: measured 1.3e-2 after one step at TP2xDP2 (reordering one bf16 NS alone gives
# 1.9e-2), compounding through training to 5e-2..7e-2 after 3-5 steps. 0.1 bounds five
# steps; real bugs (wrong split, scale, shard) move the update by 0.4..1.0.
BF16_TOLERANCE = 1e-1
# bf16, per tensor: a tensor whose update is wholly wrong differs by 1 or more (skipped or
# zeroed: exactly 1; doubled: 1; the wrong sign: 2), whatever its size. The noisiest bf16
# tensors measured (2-core AMD EPYC): 0.063 at TP2xDP2 bf16 NS after 5 steps and 0.039 at
# DP2 bf16 communication after 5 (both linear_proj, whose nearly rank-deficient input NS
# amplifies); 0.060 at EP2 GroupedMLP bf16 params after 3 steps; 0.24 at TP2xEP2 GroupedMLP
# bf16 params after its one step (final_layernorm.bias: AdamW's first step is ~lr*sign(g),
# and the bf16 TP forward flips the sign of near-zero gradient elements; its Muon tensors
# stay <= 0.10). 0.5 is twice the noisiest and half a wholly wrong tensor. Partial errors in
# one matrix (a mis-split, a sqrt(2) scale) stay the family check's job.
BF16_TENSOR_TOLERANCE = 0.5


def _is_bf16(muon_config: MuonConfig, bf16_params: bool) -> bool:
    bf16 = muon_config.muon_ns_dtype == "bf16" or muon_config.muon_comm_dtype == "bf16"
    return bf16 or bf16_params


def tolerance_for(
    muon_config: MuonConfig, bf16_params: bool = False, measured_noise: float = 0.0
) -> float:
    """The tolerance of one family's relative update difference (see above)."""
    if _is_bf16(muon_config, bf16_params):
        return BF16_TOLERANCE
    return min(NOISE_CEILING, max(FP32_TOLERANCE, NOISE_GAIN * measured_noise))


def tensor_tolerance_for(muon_config: MuonConfig, bf16_params: bool = False) -> float | None:
    """The tolerance of every tensor's relative update difference: BF16_TENSOR_TOLERANCE in
    bf16, None in fp32 (where per-tensor figures do not decide, see above)."""
    return BF16_TENSOR_TOLERANCE if _is_bf16(muon_config, bf16_params) else None


@dataclass
class VerifySpec:
    """One parity check: a model under a layout on `layout.tp * dp * layout.pp * layout.cp`
    ranks, and the run both phases train."""

    layout: Layout = field(default_factory=lambda: _tiny().Layout())
    """The distributed run's layout; with TP > 1 and MoE, sequence parallelism is switched on
    (megatron needs it there)."""
    dp: int = 1
    """Data-parallel size of the dense params."""
    model: ModelSpec | None = None
    """None: the tiny default `ModelSpec`, dense, with `num_layers = 2 * layout.pp` (with
    virtual stages, at least one layer per model chunk)."""
    steps: int = 5
    global_batch_size: int = 8
    micro_batch_size: int = 2
    lr: float = 2e-2
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    seed: int = 1234
    qk_clip: tuple[float, float] | None = None
    """(threshold, alpha): QK-Clip after every step of both runs (`qk_clip.clip`)."""

    @property
    def world_size(self) -> int:
        return self.layout.tp * self.dp * self.layout.pp * self.layout.cp

    def model_spec(self) -> ModelSpec:
        if self.model is not None:
            return self.model
        chunks = self.layout.pp * (self.layout.vpp or 1)
        return _tiny().ModelSpec(num_layers=max(2 * self.layout.pp, chunks))

    def distributed_layout(self) -> Layout:
        """`layout`, with sequence parallelism on where TP > 1 meets MoE."""
        moe_under_tp = self.layout.tp > 1 and bool(self.model_spec().num_experts)
        if moe_under_tp and not self.layout.sequence_parallel:
            return dataclasses.replace(self.layout, sequence_parallel=True)
        return self.layout

    def layout_name(self) -> str:
        lay, model = self.layout, self.model_spec()
        parts = [f"TP{lay.tp}", f"DP{self.dp}", f"PP{lay.pp}", f"EP{lay.ep}"]
        if lay.vpp is not None:
            parts.insert(3, f"VPP{lay.vpp}")
        if lay.cp > 1:
            parts.append(f"CP{lay.cp}")
        if lay.etp is not None:
            parts.append(f"ETP{lay.etp}")
        if model.num_experts:
            parts.append(f"experts{model.num_experts}-{model.moe_token_dispatcher_type}")
        if model.transformer_impl != "local":
            parts.append(model.transformer_impl)
        return "x".join(parts)


def _tiny():
    # The harness imports megatron-core (seconds): only when a spec is built or run.
    from muon_megatron.testing import tiny

    return tiny


"""(global ranks of the grid, param name, logical matrix index): parameter names are local
(every PP stage has a `decoder.layers.0`, every EP rank a `local_experts.0`), the grid that
holds the parameter tells them apart."""


def _distributed_worker(rank: int, world: int, spec: VerifySpec, cfg: MuonConfig, root: str):
    from muon_megatron.optimizer.builder import muon_optimizers
    from muon_megatron.testing import tiny

    layout, model_spec = spec.distributed_layout(), spec.model_spec()
    tiny.initialize_parallel(layout, spec.seed)
    model = tiny.build_model(model_spec, layout)
    tiny.save_model(model, os.path.join(root, "init"))
    opt_config = tiny.optimizer_config(
        lr=spec.lr, weight_decay=spec.weight_decay, bf16=model_spec.bf16, clip_grad=spec.clip_grad
    )
    # A constant lr / wd scheduler applies wd_mult (no decay on biases and 1-D params)
    # exactly as a training run does.
    optimizer = tiny.build_optimizer(model, opt_config, cfg)
    losses, clip, clip_stats = [], _qk_clip(model, spec), []
    with counting_newton_schulz() as ns_counts:
        for step in range(spec.steps):
            batch = tiny.global_batch(step, model_spec, spec.global_batch_size, spec.seed)
            losses.append(
                tiny.train_step(model, optimizer, batch, model_spec, layout, spec.micro_batch_size)
            )
            if clip is not None:
                clip_stats.append(clip.apply(optimizer))
    tiny.save_model(model, os.path.join(root, "final"))
    muons = muon_optimizers(optimizer)
    planned: set[NsKey] = set()
    for o in muons:
        grid = grid_ranks(o.grid)
        planned.update(
            (grid, m.name, j) for m in o._matrices for j in range(len(m.split.logical_shapes()))
        )
    return {
        "losses": losses,
        "qk_clip": clip_stats,
        "ns_counts": dict(ns_counts),
        "planned_matrices": planned,
        "owner_loads": [o.owner_loads() for o in muons],
        "update_rms": {k: v for o in muons for k, v in o.muon_param_update_rms.items()},
    }


def _reference_worker(rank: int, world: int, spec: VerifySpec, cfg: MuonConfig, root: str):
    from muon_megatron.routing.rules import muon_param_rule
    from muon_megatron.testing import tiny

    is_muon = muon_param_rule(cfg)
    layout, model_spec = _tiny().Layout(), spec.model_spec()
    tiny.initialize_parallel(layout, spec.seed)
    model = tiny.build_model(model_spec, layout)
    init_path = os.path.join(root, "init")
    tiny.load_model(model, init_path)
    init = {n: p.detach().float().clone() for n, p in model[0].named_parameters()}
    losses, reference = _train_reference(
        model, model_spec, layout, spec, cfg, spec.micro_batch_size
    )
    ref_final = {n: p.detach().float().clone() for n, p in model[0].named_parameters()}
    # The harness's own fp32 noise on this CPU: the same reference training with the
    # gradient summed in another order (other micro-batches: the same mean loss, another
    # fp32 reduction order and matmul blocking), compared with the first exactly as the
    # distributed run is. See NOISE_GAIN.
    tiny.load_model(model, init_path)
    _train_reference(model, model_spec, layout, spec, cfg, _reordered_micro_batch(spec))
    noise_final = {n: p.detach().float().clone() for n, p in model[0].named_parameters()}
    tiny.load_model(model, os.path.join(root, "final"))
    dist_final = {n: p.detach().float().clone() for n, p in model[0].named_parameters()}
    errors, noise = {}, {}
    for name, w0 in init.items():
        family = "muon" if is_muon(name, w0) else "adamw"
        d_ref = ref_final[name] - w0
        errors[name] = (family, (dist_final[name] - w0 - d_ref).norm().item(), d_ref.norm().item())
        noise[name] = (family, (noise_final[name] - w0 - d_ref).norm().item(), d_ref.norm().item())
    return {
        "losses": losses,
        "errors": errors,
        "noise": noise,
        "logical_matrices": reference.logical_matrix_count,
    }


def _reordered_micro_batch(spec: VerifySpec) -> int:
    return 1 if spec.micro_batch_size > 1 else 2


def _train_reference(
    model, model_spec, layout, spec: VerifySpec, cfg: MuonConfig, micro_batch: int
):
    from megatron.core.utils import get_model_config

    from muon_megatron.reference import ModelShape, Muon
    from muon_megatron.testing import tiny
    from muon_megatron.tools.reference_stepper import ReferenceStepper

    named = [(n, p) for n, p in model[0].named_parameters() if p.requires_grad]
    shape = ModelShape.from_transformer_config(get_model_config(model[0]))

    def make_reference(named_masters):
        return Muon(
            named_masters,
            lr=spec.lr,
            weight_decay=spec.weight_decay,
            muon_config=cfg,
            model_shape=shape,
        )

    stepper = ReferenceStepper(named, make_reference, spec.clip_grad)
    losses, clip = [], _qk_clip(model, spec)
    for step in range(spec.steps):
        batch = tiny.global_batch(step, model_spec, spec.global_batch_size, spec.seed)
        losses.append(tiny.train_step(model, stepper, batch, model_spec, layout, micro_batch))
        if clip is not None:
            clip.apply(stepper)
    if clip is not None:
        clip.remove()
    return losses, stepper.reference


def _qk_clip(model, spec: VerifySpec):
    if spec.qk_clip is None:
        return None
    from muon_megatron.qk_clip.clip import QKClip

    threshold, alpha = spec.qk_clip
    return QKClip.for_model(model, threshold=threshold, alpha=alpha)


def _relative(err: float, ref: float) -> float:
    return err / ref if ref > 0 else (0.0 if err == 0 else float("inf"))


def family_diffs(errors: dict[str, tuple[str, float, float]]) -> dict[str, float]:
    """||dW_dist - dW_ref|| / ||dW_ref|| over the concatenated update of each optimizer
    family ('muon' matrices, 'adamw' params)."""
    sums: dict[str, list[float]] = {}
    for family, err, ref in errors.values():
        acc = sums.setdefault(family, [0.0, 0.0])
        acc[0] += err**2
        acc[1] += ref**2
    return {family: _relative(e**0.5, r**0.5) for family, (e, r) in sums.items()}


def run_verify(spec: VerifySpec, cfg: MuonConfig, backend: str = "auto") -> dict:
    """Run both phases and return the comparison (on every rank under torchrun).

    Spawned gloo processes on this machine's CPUs; or, under torchrun, the torchrun job's
    own ranks (NCCL on GPUs, `runtime.torchrun`), rank 0 then running the single-device
    reference on its CPU from the distributed run's initial weights."""
    from muon_megatron.runtime import torchrun
    from muon_megatron.runtime.launch import spawn

    if torchrun.under_torchrun():
        with torchrun.torchrun_session(backend) as (rank, world, _):
            if world != spec.world_size:
                raise ValueError(
                    f"layout {spec.layout_name()} needs {spec.world_size} ranks and torchrun "
                    f"started {world}; use --nproc-per-node {spec.world_size} (or change "
                    "--dp)."
                )
            # One directory every rank sees (one node; set TMPDIR to a shared one across
            # nodes), made by rank 0.
            root = torchrun.broadcast_object(
                tempfile.mkdtemp(prefix="muon-verify-") if rank == 0 else None
            )
            dist_out = torchrun.all_gather_objects(
                _distributed_worker(rank, world, spec, cfg, root)
            )
            torch.distributed.barrier()
            ref_out = spawn(_reference_worker, 1, spec, cfg, root)[0] if rank == 0 else None
            ref_out = torchrun.broadcast_object(ref_out)
            if rank == 0:
                shutil.rmtree(root, ignore_errors=True)
    else:
        torchrun.resolve_backend(backend)  # nccl on a machine without GPUs: refused here
        if backend == "nccl":
            raise ValueError(
                "--backend nccl runs under torchrun (one process per GPU): "
                f"torchrun --nproc-per-node {spec.world_size} -m muon_megatron.tools.cli "
                "verify ... --backend nccl"
            )
        with tempfile.TemporaryDirectory(prefix="muon-verify-") as root:
            dist_out = spawn(_distributed_worker, spec.world_size, spec, cfg, root)
            ref_out = spawn(_reference_worker, 1, spec, cfg, root)[0]
    errors = ref_out["errors"]
    diffs = {name: _relative(err, ref) for name, (_, err, ref) in errors.items()}
    families = family_diffs(errors)
    noise = family_diffs(ref_out["noise"])
    # One gradient feeds both families: the larger family's measured noise is the harness's.
    bf16_params = spec.model_spec().bf16
    tolerances = {f: tolerance_for(cfg, bf16_params, max(noise.values())) for f in families}
    tensor_tolerance = tensor_tolerance_for(cfg, bf16_params)
    families_ok = all(families[f] <= tolerances[f] for f in families)
    tensors_ok = tensor_tolerance is None or max(diffs.values()) <= tensor_tolerance
    return {
        "layout": spec.layout_name(),
        "max_rel_diff": max(families.values()),
        "family_diffs": families,
        "noise_diffs": noise,
        "tolerances": tolerances,
        "tensor_tolerance": tensor_tolerance,
        "within_tolerance": families_ok and tensors_ok,
        "worst_param": max(diffs, key=diffs.get),
        "diffs": diffs,
        "dist_losses": dist_out[0]["losses"],
        "qk_clip": dist_out[0]["qk_clip"],
        "ref_losses": ref_out["losses"],
        "ns_counts_per_rank": [o["ns_counts"] for o in dist_out],
        "planned_matrices_per_rank": [o["planned_matrices"] for o in dist_out],
        "ref_logical_matrices": ref_out["logical_matrices"],
        "owner_loads": [o["owner_loads"] for o in dist_out],
        "update_rms": {k: v for o in dist_out for k, v in o["update_rms"].items()},
        "steps": spec.steps,
        "config": dataclasses.asdict(cfg),
    }
