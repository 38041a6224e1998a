"""Every tensor of a torch_dist checkpoint, and every optimizer-state tensor of a rank, for
comparing two checkpoints or two runs bit for bit."""

from __future__ import annotations

import pathlib

import torch

__all__ = ["checkpoint_tensors", "named_chunk_params", "optimizer_snapshot"]


def checkpoint_tensors(ckpt_dir: pathlib.Path, scratch: pathlib.Path) -> dict:
    """Every tensor of the torch_dist checkpoint at `ckpt_dir`, flattened to '/a/b/c' keys
    (torch's own converter into the file `scratch`, no process group)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(ckpt_dir), str(scratch))
    out: dict = {}

    def walk(node, path: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{path}/{k}")
        elif torch.is_tensor(node):
            out[path] = node

    walk(torch.load(scratch, weights_only=False), "")
    return out


def named_chunk_params(model) -> list[tuple[str, torch.nn.Parameter]]:
    """This rank's parameters, by name; with several model chunks (an interleaved pipeline),
    each name prefixed by its chunk's key in the checkpoint ('model0/...')."""
    from muon_megatron.testing import tiny

    if len(model) == 1:
        return list(tiny.unwrap(model[0]).named_parameters())
    return [
        (f"model{i}/{name}", param)
        for i, chunk in enumerate(model)
        for name, param in tiny.unwrap(chunk).named_parameters()
    ]


def optimizer_snapshot(model, optimizer) -> dict:
    """This rank's model params ("model", named by `named_chunk_params`) and, per param with
    a local main shard, that shard's main param ("main") and every optimizer-state tensor
    (AdamW's moments and step, Muon's momentum), with the shard's range in the flat param
    ("ranges")."""
    named = named_chunk_params(model)
    out = {"model": {n: p.detach().clone() for n, p in named}}
    for member in getattr(optimizer, "chained_optimizers", [optimizer]):
        for name, param in named:
            if param not in member.model_param_group_index_map:
                continue
            gi, order = member.model_param_group_index_map[param]
            main = member.optimizer.param_groups[gi]["params"][order]
            state = member.optimizer.state[main]
            out[name] = {"main": main.detach().clone()}
            out[name].update({k: v.detach().clone() for k, v in state.items()})
            shard = member._get_model_param_range_map(param)["param"]
            out.setdefault("ranges", {})[name] = (shard.start, shard.end)
    return out
