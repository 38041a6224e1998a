"""QK-Clip's two sources of max logits agree: Transformer Engine's (what megatron-core's
TEDotProductAttention keeps in `current_max_attn_logits` with config.qk_clip, TE >= 2.9) and
our hook on the local attention (`qk_clip.clip.record_max_logits`).

Needs a CUDA GPU and Transformer Engine >= 2.9; skipped, with the reason, without them (CI
and the project's CPU machines have neither: this runs on a lent GPU node only).
"""

from __future__ import annotations

import socket

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (TE's fused attention)", allow_module_level=True)
pytest.importorskip("transformer_engine", reason="needs Transformer Engine >= 2.9")

from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import is_te_min_version

from muon_megatron.qk_clip.clip import record_max_logits

if not is_te_min_version("2.9.0"):
    pytest.skip("TE < 2.9 returns no max logits", allow_module_level=True)

# Both compute max(q.k * softmax_scale) from the same bf16 q and k with fp32 accumulation;
# they may differ by the order of the sums (~1e-6) and, if TE rounds its scores to bf16
# before the max, by one bf16 unit (2**-8 relative): 1e-2 covers both, and a quantity of
# another definition (unscaled, or the mask ignored) is off by a factor, not by 1%.
MAX_LOGIT_RTOL = 1e-2


@pytest.fixture(scope="module")
def one_gpu_process_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.distributed.init_process_group(
        "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1
    )
    torch.cuda.set_device(0)
    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(1234)
    yield
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("groups", [8, 2])
def test_te_max_logits_equal_the_local_hooks(one_gpu_process_group, groups: int) -> None:
    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    heads, hn, sq, b = 8, 64, 128, 2
    config = TransformerConfig(
        num_layers=1, hidden_size=heads * hn, num_attention_heads=heads,
        num_query_groups=groups, bf16=True, params_dtype=torch.bfloat16,
        attention_dropout=0.0, qk_clip=True,
    )  # fmt: skip
    kwargs = {"layer_number": 1, "attn_mask_type": AttnMaskType.causal, "attention_type": "self"}
    te_core = TEDotProductAttention(config, **kwargs).cuda()
    local_core = DotProductAttention(config, **kwargs).cuda()
    torch.manual_seed(0)
    q = 3 * torch.randn(sq, b, heads, hn, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(sq, b, groups, hn, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(sq, b, groups, hn, device="cuda", dtype=torch.bfloat16)
    te_core(q, k, v, None, attn_mask_type=AttnMaskType.causal)
    record_max_logits(local_core, (q, k, v, None), {"attn_mask_type": AttnMaskType.causal})
    theirs = te_core.current_max_attn_logits.float()
    ours = local_core.qk_clip_max_logits
    assert theirs.shape == ours.shape == (heads,)
    torch.testing.assert_close(theirs, ours, rtol=MAX_LOGIT_RTOL, atol=0)
