"""Run a function in a fresh Python process that imports the TE stand-in as
`transformer_engine` (see `transformer_engine/__init__.py`).

The stand-in must be importable before megatron-core is first imported: megatron-core reads
`import transformer_engine` once, at import, in a dozen modules. So the tests never install
it in their own process (every later test would then see "TE"); `in_te_process(fn, *args)`
starts `python run.py` with this folder first on PYTHONPATH, which calls `fn(*args)` there
(and any ranks `fn` spawns, whose forkserver inherits the path) and sends back its pickled
result. `fn` must be a module-level function (of an importable module, or of a file whose
folder the child then puts on its `sys.path`, as pytest does for test files) and its
arguments and result picklable.

Never put this folder on the tests' own `sys.path`: `import transformer_engine` would then
find the stand-in in every later test. The tests load this file by its path
(`tests/conftest.py`).
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["STAND_IN_ROOT", "in_te_process", "load_stand_in_as"]

STAND_IN_ROOT = Path(__file__).resolve().parent
REPO_ROOT = STAND_IN_ROOT.parents[1]


def in_te_process(fn: Callable[..., Any], *args: Any, timeout_s: float = 1800) -> Any:
    """`fn(*args)` in a child interpreter whose `import transformer_engine` is the stand-in;
    raises RuntimeError with the child's output if it fails."""
    with tempfile.TemporaryDirectory(prefix="te-stand-in-") as tmp:
        call, result = Path(tmp, "call.pkl"), Path(tmp, "result.pkl")
        where = getattr(sys.modules.get(fn.__module__), "__file__", None)
        call.write_bytes(pickle.dumps((fn.__module__, where, fn.__qualname__, args)))
        path = [str(STAND_IN_ROOT), str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
        done = subprocess.run(
            [sys.executable, __file__, str(call), str(result)],
            env=env, capture_output=True, text=True, timeout=timeout_s,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{fn.__name__} under the TE stand-in failed ({done.returncode}):\n"
                f"{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
            )
        return pickle.loads(result.read_bytes())


def load_stand_in_as(alias: str):
    """The stand-in imported under another top-level name (its modules import each other
    relatively), so that a test may inspect its classes without any megatron-core module of
    its process ever seeing a `transformer_engine`."""
    import importlib.util

    if alias in sys.modules:
        return sys.modules[alias]
    init = STAND_IN_ROOT / "transformer_engine" / "__init__.py"
    spec = importlib.util.spec_from_file_location(
        alias, init, submodule_search_locations=[str(init.parent)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[alias] = module
    spec.loader.exec_module(module)
    return module


def _main(call_path: str, result_path: str) -> None:
    import transformer_engine

    where = Path(transformer_engine.__file__).resolve().parent
    if where != STAND_IN_ROOT / "transformer_engine":
        raise RuntimeError(f"transformer_engine imported from {where}, not the stand-in")
    import importlib

    module_name, module_file, qualname, args = pickle.loads(Path(call_path).read_bytes())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError:
        # A test file pytest imported by putting its folder on sys.path: do the same (the
        # ranks fn spawns inherit this sys.path and import it alike).
        sys.path.insert(0, str(Path(module_file).parent))
        module = importlib.import_module(module_name)
    fn = module
    for part in qualname.split("."):
        fn = getattr(fn, part)
    Path(result_path).write_bytes(pickle.dumps(fn(*args)))


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])
