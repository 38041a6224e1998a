"""The training entry: Megatron-LM-style flags, one GPT/MoE model builder, data, checkpoints.

`model` is the one place that builds megatron-core's GPTModel, DDP, optimizer, scheduler
and loss; the training entry (`entry`, `python examples/pretrain_moe.py`), the tools and
the test harness all build through it.
"""
