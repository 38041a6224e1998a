"""The dp_reshardable (bucket-space) layout of a grad-buffer bucket that holds Muon parameters.

Megatron writes every optimizer-state key of a bucket as one flat tensor over the whole
bucket. A Muon parameter has no exp_avg/exp_avg_sq and an AdamW one no momentum, so in a
bucket holding Muon parameters each key's global tensor runs over the parameters that have it
(docs/checkpoints.md, "dp_reshardable"). `MuonCheckpointMixin.sharded_param_state_dp_reshardable`
applies these functions to the entries Megatron built.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection

import torch
from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedTensor

__all__ = ["Span", "bucket_spans", "pack_bucket_state"]

Span = tuple[int, int, torch.nn.Parameter]
"""`(start, end, param)`: a parameter's flat range in its bucket, relative to the bucket."""


def bucket_spans(buffer) -> dict[int, list[Span]]:
    """Bucket index -> the `Span` of each parameter of that bucket of `buffer` (a Megatron
    `_ParamAndGradBuffer`), in bucket order.

    One pass over the buffer's parameters for all its buckets: a scan of every parameter per
    bucket is quadratic when buckets hold a few large matrices each (MoE experts at scale).
    """
    spans: dict[int, list[Span]] = {}
    for param, (start, end, bucket_idx) in buffer.param_index_map.items():
        offset = buffer.buckets[bucket_idx].offset
        spans.setdefault(bucket_idx, []).append((start - offset, end - offset, param))
    for in_bucket in spans.values():
        in_bucket.sort(key=lambda span: span[0])
    return spans


def pack_bucket_state(
    spans: list[Span], local_params: list, entries: list[dict], muon: Collection
) -> None:
    """Give each optimizer-state key of a bucket its own packed 1-D coordinate space.

    `spans` are the bucket's `bucket_spans`, `local_params` the parameters of this rank's slice
    and `entries` Megatron's sharded entries of the slice, in order (padding entries between
    them), rewritten in place; `muon` holds the Muon parameters. Each key's global tensor runs
    over the parameters that have it, in bucket order: offset = elements of earlier such
    parameters + position inside the parameter. DP-size independent, so DP resharding still
    works. Padding entries keep only `param` (Megatron covers gaps there).
    """
    packed_start: dict = {}
    totals = {"muon": 0, "adam": 0}
    for start, end, param in spans:
        kind = "muon" if param in muon else "adam"
        packed_start[param] = (kind, totals[kind], start)
        totals[kind] += end - start
    params = iter(local_params)
    for entry in entries:
        if _unwrap(entry["padding"]):
            for key in [k for k in entry if k not in ("param", "padding")]:
                del entry[key]
            continue
        param = next(params)
        kind, base, start = packed_start[param]
        for key, value in entry.items():
            if key == "param" or not isinstance(value, ShardedTensor):
                continue
            offset = base + value.global_offset[0] - start
            entry[key] = dataclasses.replace(
                value, global_shape=(totals[kind],), global_offset=(offset,)
            )


def _unwrap(value):
    return value.unwrap() if isinstance(value, LocalNonpersistentObject) else value
