"""Megatron-LM integration: `--optimizer muon` in Megatron-LM's own `pretrain_gpt.py`.

* `hooks`: `install()` rebinds the optimizer builders, validation, logging and checkpoint
  loading that `megatron.training` uses (see its docstring).
* `metrics`: Muon's metrics in Megatron-LM's log line, TensorBoard and wandb.
* `checkpoints`: AdamW <-> Muon switches through Megatron-LM's own `load_checkpoint`.
* `__main__`: `python -m muon_megatron.megatron_lm pretrain_gpt.py ...`.
"""

from muon_megatron.megatron_lm.hooks import (
    MUON_OPTIMIZER_NAME,
    install,
    is_installed,
    main,
    require_installed,
)

__all__ = ["install", "is_installed", "require_installed", "main", "MUON_OPTIMIZER_NAME"]
