"""Patching helpers of the CPU shims: marks, torch views, rebinding, wrapping."""

from __future__ import annotations

import functools
import sys
import types
from collections.abc import Callable
from typing import Any

import torch

# Marks a function this package produced, so a second install never wraps a wrapper.
_SHIM_MARK = "__muon_cpu_shim__"


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _mark(fn: Callable[..., Any]) -> Callable[..., Any]:
    setattr(fn, _SHIM_MARK, True)
    return fn


def _is_shim(obj: Any) -> bool:
    return getattr(obj, _SHIM_MARK, False)


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


def _cpu_for_cuda_device(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` with a `device='cuda'` keyword turned into `device='cpu'`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
            # Pinned host memory needs a CUDA driver; it only ever served the H2D copy.
            kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    return _mark(wrapper)


class _TorchView:
    """Stands in for the `torch` module inside one megatron module.

    Attribute lookups fall through to the real module except for the names in `overrides`.
    Replacing a module's `torch` global changes what every function *defined* in that module
    sees (functions look globals up in their defining module), including the functions other
    modules imported by name, and nothing else in the process.
    """

    def __init__(self, real: types.ModuleType, overrides: dict[str, Any]) -> None:
        self._real = real
        self._overrides = overrides

    def __getattr__(self, name: str) -> Any:
        try:
            return self._overrides[name]
        except KeyError:
            return getattr(self._real, name)

    def __repr__(self) -> str:
        return f"<CPU view of {self._real.__name__}: {sorted(self._overrides)}>"


def _view_torch_in(module: types.ModuleType, overrides: dict[str, Any]) -> None:
    """Replace `module.torch` by a `_TorchView` with `overrides` (merged if already a view)."""
    current = module.__dict__.get("torch")
    if isinstance(current, _TorchView):
        current._overrides.update(overrides)
    elif current is torch:
        module.torch = _TorchView(torch, dict(overrides))
    else:
        raise RuntimeError(f"{module.__name__}.torch is {current!r}, expected the torch module")


def _rebind_everywhere(owner: types.ModuleType, name: str, new: Callable[..., Any]) -> None:
    """Set `owner.name = new` and rebind every loaded megatron module that imported it by name."""
    old = getattr(owner, name)
    for mod_name, mod in list(sys.modules.items()):
        if mod is not None and mod_name.startswith("megatron.") and mod.__dict__.get(name) is old:
            setattr(mod, name, new)
    setattr(owner, name, new)


def _wrap_function(owner: types.ModuleType, name: str, make: Callable[..., Callable]) -> None:
    old = getattr(owner, name)
    if not _is_shim(old):
        _rebind_everywhere(owner, name, _mark(functools.wraps(old)(make(old))))


def _wrap_method(cls: type, name: str, make: Callable[..., Callable]) -> None:
    """Wrap `cls.name` (plain function, classmethod or staticmethod) once."""
    raw = cls.__dict__[name]
    for kind in (classmethod, staticmethod):
        if isinstance(raw, kind):
            if not _is_shim(raw.__func__):
                new = _mark(functools.wraps(raw.__func__)(make(raw.__func__)))
                setattr(cls, name, kind(new))
            return
    if not _is_shim(raw):
        setattr(cls, name, _mark(functools.wraps(raw)(make(raw))))
