"""The test harness: a tiny GPT on top of `training.model` (`tiny`) and a runner for
Megatron-LM's own `pretrain_gpt.py` (`megatron_lm_run`).

Only tests and `tools/` import this package.
"""
