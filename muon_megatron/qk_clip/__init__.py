"""QK-Clip (MuonClip, Kimi K2): a model concern applied after the optimizer step.

`factors.py`: the math on plain tensors (per-head factors from the max logits, the rows of
each query / key projection they scale, GQA and MLA layouts). `clip.py`: the attention hook
that records each head's max logit, their reduction over the ranks, and the rescaling of the
query / key weights (model params and the optimizer's fp32 main shards alike).
"""
