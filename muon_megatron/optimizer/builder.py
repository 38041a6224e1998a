"""`get_muon_optimizer`: what users call instead of `get_megatron_optimizer`.

It returns Megatron's usual objects (a `ChainedOptimizer` of one optimizer for dense and
one for expert parameters), whose members are `MuonDistributedOptimizer`s. We reuse
megatron-core's own construction (param groups, wd/lr overrides, process groups, grad
scaler) by letting `get_megatron_optimizer` build an AdamW ZeRO-1 optimizer while its
`DistributedOptimizer` name points at our subclass; nothing else of Megatron changes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterator

import torch

from muon_megatron.config import MuonConfig
from muon_megatron.optimizer.core_versions import warn_if_untested_megatron_core
from muon_megatron.optimizer.distributed import MuonDistributedOptimizer
from muon_megatron.optimizer.nonfinite import check_once_per_step
from muon_megatron.optimizer.routing_table import routing_rows, routing_table_lines
from muon_megatron.routing.rules import muon_param_rule, stacked_expert_errors
from muon_megatron.routing.weight_decay import weight_decay_overrides

__all__ = [
    "get_muon_optimizer",
    "muon_optimizers",
    "muon_metrics",
    "check_supported",
    "pipeline_chain",
]


def check_supported(config) -> None:
    """Raise ValueError for OptimizerConfig settings Muon-megatron does not support."""
    if config.optimizer not in ("muon", "adam"):
        raise ValueError(
            f"optimizer={config.optimizer!r}: get_muon_optimizer builds Muon (with AdamW for "
            "non-matrix params); pass optimizer='muon'."
        )
    if not config.use_distributed_optimizer:
        raise ValueError(
            "use_distributed_optimizer=False: muon-megatron is a ZeRO-1 DistributedOptimizer; "
            "add --use-distributed-optimizer."
        )
    if config.fp16:
        raise ValueError(
            "fp16=True: Muon with fp16 dynamic loss scaling is not supported (untested); "
            "train with --bf16 instead."
        )
    if config.optimizer_cpu_offload:
        raise ValueError("optimizer_cpu_offload=True is not supported with Muon; turn it off.")
    if not getattr(config, "decoupled_weight_decay", True):
        raise ValueError(
            "decoupled_weight_decay=False asks for L2-regularized Adam, but Muon's weight "
            "decay is decoupled (p <- p (1 - lr wd) - lr U, as Moonlight trains) and the two "
            "would decay Muon and AdamW params differently; set decoupled_weight_decay=True "
            "(drop --no-decoupled-weight-decay)."
        )
    if config.use_precision_aware_optimizer:
        raise ValueError(
            "use_precision_aware_optimizer=True keeps main params inside TE's FusedAdam, where "
            "Muon cannot update them; turn it off."
        )


@contextlib.contextmanager
def _muon_as_distributed_optimizer(factory: Callable) -> Iterator[None]:
    import megatron.core.optimizer as mcore_optimizer

    original = mcore_optimizer.DistributedOptimizer
    mcore_optimizer.DistributedOptimizer = factory
    try:
        yield
    finally:
        mcore_optimizer.DistributedOptimizer = original


def get_muon_optimizer(
    config,
    model_chunks: list[torch.nn.Module],
    muon_config: MuonConfig | None = None,
    config_overrides=None,
    use_gloo_process_groups: bool = True,
    pg_collection=None,
    *,
    is_muon: Callable[[str, torch.Tensor], bool] | None = None,
    tp_groups_of: Callable[[int, bool], list[int]] | None = None,
    report_routing: bool = True,
    **megatron_kw,
):
    """Megatron optimizer with Muon for 2-D hidden weights (same arguments as
    `megatron.core.optimizer.get_megatron_optimizer`, plus `muon_config` and `is_muon`;
    `is_muon` defaults to `routing.rules.muon_param_rule(muon_config)`, and
    `muon_norm_weight_decay` sets the weight-decay `config_overrides`; `tp_groups_of` is
    the planner's, see `MuonDistributedOptimizer`).

    `megatron_kw`: the installed megatron-core's other keyword arguments (0.19's
    `dump_param_to_param_group_map`, say), passed on where its `get_megatron_optimizer` takes
    them; a set one it does not take is refused (TypeError) rather than dropped.

    lr, weight decay and their schedule come from `config` and Megatron's scheduler for
    both Muon and AdamW (Moonlight's recipe: keep AdamW's values).

    Logs one warning per process when the imported megatron-core is outside the tested
    releases (`core_versions.TESTED_MEGATRON_CORE`). With `report_routing` (off only for the
    planner's fake ranks), global rank 0 prints the routing table (`routing_table`: one line
    per kind of parameter, and with `muon_print_routing` one per parameter)."""
    from megatron.core.optimizer import get_megatron_optimizer

    warn_if_untested_megatron_core()

    accepted = inspect.signature(get_megatron_optimizer).parameters
    unknown = sorted(k for k, v in megatron_kw.items() if k not in accepted and v is not None)
    if unknown:
        raise TypeError(
            f"get_megatron_optimizer of this megatron-core takes no {unknown}; drop them or "
            "install the megatron-core release that has them."
        )
    megatron_kw = {k: v for k, v in megatron_kw.items() if k in accepted}

    check_supported(config)
    if getattr(model_chunks[0].ddp_config, "use_megatron_fsdp", False):
        raise ValueError("Megatron-FSDP is not supported with Muon; use the ZeRO-1 DDP.")
    if getattr(model_chunks[0].ddp_config, "num_distributed_optimizer_instances", 1) > 1:
        raise ValueError(
            "num_distributed_optimizer_instances > 1 is not supported with Muon; use 1."
        )
    muon_config = muon_config or MuonConfig()
    stacked = stacked_expert_errors(
        (item for chunk in model_chunks for item in chunk.named_parameters()), muon_config
    )
    if stacked and is_muon is None:
        raise ValueError(stacked[0])
    custom_rule = is_muon
    if is_muon is None:
        is_muon = muon_param_rule(muon_config)  # --muon-router-optimizer, --muon-include/exclude
    if muon_config.muon_norm_weight_decay:
        if config_overrides is not None:
            raise ValueError(
                "muon_norm_weight_decay=True (--muon-norm-weight-decay) with config_overrides "
                "of your own: the flag sets the weight-decay overrides itself; fold norm-gamma "
                "decay into your overrides (routing.weight_decay.weight_decay_overrides shows "
                "how) or drop the flag."
            )
        config_overrides = weight_decay_overrides(config, muon_config)
    adam_config = dataclasses.replace(config, optimizer="adam")
    factory = functools.partial(
        MuonDistributedOptimizer,
        muon_config=muon_config,
        is_muon=is_muon,
        pg_collection=pg_collection,
        tp_groups_of=tp_groups_of,
    )
    with _muon_as_distributed_optimizer(factory):
        optimizer = get_megatron_optimizer(
            adam_config,
            model_chunks,
            config_overrides=config_overrides,
            use_gloo_process_groups=use_gloo_process_groups,
            pg_collection=pg_collection,
            **megatron_kw,
        )
    check_once_per_step(optimizer)
    pipeline_chain(optimizer)
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    if report_routing and rank0:
        rows = routing_rows(optimizer, model_chunks, muon_config, custom_rule)
        for line in routing_table_lines(rows, per_param=muon_config.muon_print_routing):
            print(line, flush=True)
    return optimizer


def pipeline_chain(optimizer) -> None:
    """Let the chain's first Muon member run every member's Muon phases in one pipeline
    (dense and expert buckets interleaved, `optimizer.pipeline`); the others then skip
    theirs. Every rank builds the same chain, so every rank interleaves the same way."""
    members = [m for m in muon_optimizers(optimizer) if m._buckets]
    if len(members) < 2:
        return
    members[0]._pipeline_members = members
    for member in members[1:]:
        member._pipeline_members = None


def muon_optimizers(optimizer) -> list[MuonDistributedOptimizer]:
    """The MuonDistributedOptimizers inside a (possibly chained) Megatron optimizer."""
    members = getattr(optimizer, "chained_optimizers", [optimizer])
    return [o for o in members if isinstance(o, MuonDistributedOptimizer)]


def muon_metrics(optimizer) -> dict[str, float]:
    """Muon's metrics after the last step, for a training loop's log: `muon/update_rms` (mean
    over the Muon param groups of every member, the figure to watch against AdamW's ~0.2),
    `muon/update_rms/<member>/group<g>` per group, `muon/ns_seconds` (this rank's
    Newton-Schulz time, all members) and `muon/skipped_steps` (non-finite steps so far).
    Empty for an optimizer without Muon members. Host-side floats: no collective runs."""
    from muon_megatron.optimizer.nonfinite import skipped_steps

    members = muon_optimizers(optimizer)
    if not members:
        return {}
    out: dict[str, float] = {}
    rms: list[float] = []
    ns_seconds = 0.0
    for index, member in enumerate(members):
        for name, value in member.muon_metrics.items():
            if name.startswith("muon/update_rms/"):
                out[f"muon/update_rms/member{index}/{name.rsplit('/', 1)[1]}"] = value
                rms.append(value)
        ns_seconds += member.muon_metrics.get("muon/ns_seconds_local", 0.0)
    if rms:
        out["muon/update_rms"] = sum(rms) / len(rms)
    out["muon/ns_seconds"] = ns_seconds
    out["muon/skipped_steps"] = float(skipped_steps(optimizer))
    return out
