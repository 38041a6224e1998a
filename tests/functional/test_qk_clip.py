"""QK-Clip (MuonClip, Kimi K2) with the ZeRO-1 optimizer, over real multi-process layouts.

Parity: `tools.verify.run_verify` with `VerifySpec.qk_clip`: the distributed run (DP2, TP2,
TP2 x DP2; and PP2 x DP2 / TP2 x PP2) and the single-device reference (full weights, full batch, the same hook and
the same rescale on its fp32 masters) both clip after every step, compared within the fp32
tolerance of every other parity test. The tiny models' max logits are 0.05..0.14 at init,
so a threshold of 0.1 (GQA) / 0.04 (MLA) makes the clip fire on several heads at every
step (asserted).

Effect: with lr = 0 and no weight decay only the clip changes weights; on the next forward
of the same batch every head's max logit is at most tau, and the heads that set a clip
(every MLA head above tau; under GQA the group's top head) land on tau itself.
"""

from __future__ import annotations

import pytest
import torch

from muon_megatron.config import MuonConfig
from muon_megatron.runtime.launch import spawn
from muon_megatron.testing import tiny
from muon_megatron.tools.verify import VerifySpec, run_verify

STEPS = 3
MLA = {
    "multi_latent_attention": True, "kv_lora_rank": 16, "qk_head_dim": 16,
    "qk_pos_emb_head_dim": 8, "v_head_dim": 16, "q_lora_rank": 24, "qk_layernorm": True,
}
GQA_TAU, MLA_TAU, ALPHA = 0.1, 0.04, 0.5
# name -> (TP, DP, model, tau[, PP])
LAYOUTS = {
    "gqa-dp2": (1, 2, tiny.ModelSpec(), GQA_TAU),
    "gqa-tp2": (2, 1, tiny.ModelSpec(), GQA_TAU),
    "gqa-tp2xdp2": (2, 2, tiny.ModelSpec(), GQA_TAU),
    "mla-dp2": (1, 2, tiny.ModelSpec(**MLA), MLA_TAU),
    "mla-tp2": (2, 1, tiny.ModelSpec(**MLA), MLA_TAU),
    "mla-tp2xdp2": (2, 2, tiny.ModelSpec(**MLA), MLA_TAU),
    # Pipeline stages clip their own layers; the logged max reduces over the world.
    "gqa-pp2xdp2": (1, 2, tiny.ModelSpec(), GQA_TAU, 2),
    "mla-tp2xpp2": (2, 1, tiny.ModelSpec(**MLA), MLA_TAU, 2),
}
FP32 = MuonConfig(muon_ns_dtype="fp32")


@pytest.fixture(scope="module", params=list(LAYOUTS))
def clip_run(request) -> dict:
    tp, dp, model, tau, *pp = LAYOUTS[request.param]
    spec = VerifySpec(
        layout=tiny.Layout(tp=tp, pp=pp[0] if pp else 1), dp=dp, model=model, steps=STEPS, qk_clip=(tau, ALPHA)
    )
    return run_verify(spec, FP32)


def test_qk_clip_parity_with_reference(clip_run: dict, assert_fp32_parity) -> None:
    """Both families within the fp32 tolerance of the reference, with the clip firing on
    at least one head at every step."""
    assert_fp32_parity(clip_run)
    assert len(clip_run["qk_clip"]) == STEPS
    assert all(stats.clipped_heads > 0 for stats in clip_run["qk_clip"]), clip_run["qk_clip"]


def test_qk_clip_off_is_bitwise_todays_run() -> None:
    """Hooks installed but a threshold never reached: the same bits as no QK-Clip at all
    (the hook only reads q and k); and without VerifySpec.qk_clip nothing is installed."""
    base = VerifySpec(dp=2, steps=2)
    off = run_verify(base, FP32)
    never = run_verify(VerifySpec(dp=2, steps=2, qk_clip=(1e30, ALPHA)), FP32)
    assert off["qk_clip"] == []
    assert all(s.clipped_heads == 0 for s in never["qk_clip"])
    assert never["dist_losses"] == off["dist_losses"]
    assert never["ref_losses"] == off["ref_losses"]
    assert never["diffs"] == off["diffs"]


def _effect(
    rank: int, world: int, model_spec: tiny.ModelSpec, layout: tiny.Layout, tau: float,
    second_step: bool = False,
):
    from megatron.core import parallel_state

    from muon_megatron.qk_clip.clip import QKClip
    from muon_megatron.training import step

    tiny.initialize_parallel(layout, 1234)
    model = tiny.build_model(model_spec, layout)
    optimizer = tiny.build_optimizer(
        model,
        tiny.optimizer_config(lr=0.0, weight_decay=0.0, clip_grad=0.0, bf16=model_spec.bf16),
        FP32,
    )
    clip = QKClip.for_model(model, threshold=tau, alpha=ALPHA)
    batch = tiny.global_batch(0, model_spec, 8, 1234)
    before = {n: p.detach().clone() for n, p in model[0].named_parameters()}
    tiny.train_step(model, optimizer, batch, model_spec, layout, 2)
    unchanged = all(torch.equal(before[n], p) for n, p in model[0].named_parameters())
    s_before = [s.clone() for s in clip.max_logits()]
    stats = clip.apply(optimizer)
    if second_step:  # Megatron copies the fp32 main shards into the (bf16) model params
        tiny.train_step(model, optimizer, batch, model_spec, layout, 2)
        clip.reset()
    dp = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    local = batch["tokens"].shape[0] // dp
    rows = {k: v[dp_rank * local : (dp_rank + 1) * local] for k, v in batch.items()}
    step.forward_backward(
        model, rows, seq_length=model_spec.seq_length, micro_batch_size=2, forward_only=True
    )
    s_after = clip.max_logits()
    return unchanged, stats, s_before, s_after


# A layer after the first sees an input that moved with the clip of the layers before it:
# measured on the next forward, the second layer's max at 0.9985..0.9993 tau (GQA) and
# 1.00012..1.00023 tau (MLA, per TP rank). 2e-3: ten times the MLA overshoot; a missed or
# wrong clip leaves a head at its pre-clip max, here 2 tau or more.
LATER_LAYER_SLACK = 2e-3


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("kind", ["gqa", "mla"])
def test_after_the_clip_every_head_is_at_most_tau(kind: str, num_layers: int) -> None:
    """TP2 x DP2, lr = 0: the optimizer step leaves the weights bitwise as they were, the
    clip fires, and the next forward of the same batch has every head of a one-layer model
    at most tau (fp32 round-off: 1e-5 relative). In the first layer, whose input the clip
    leaves as it was, the logits of a head scale by exactly its factor: the heads that set
    a clip land on tau and (MLA) the heads below tau keep their max. A later layer's input
    moved with the layers before it, so there the bound is LATER_LAYER_SLACK (Kimi K2's
    clip is per step too: it bounds the logits of the batch it saw, not exactly the next)."""
    extra = MLA if kind == "mla" else {}
    model_spec = tiny.ModelSpec(num_layers=num_layers, **extra)
    tau = (MLA_TAU if kind == "mla" else GQA_TAU) / 2
    out = spawn(_effect, 4, model_spec, tiny.Layout(tp=2), tau)
    heads_per_group = model_spec.num_attention_heads // model_spec.num_query_groups
    for unchanged, stats, s_before, s_after in out:
        assert unchanged
        assert stats.clipped_heads > 0
        for layer, (before_H, after_H) in enumerate(zip(s_before, s_after)):
            assert (before_H > tau).any()
            print(f"{kind} layer {layer}: max after / tau = {float(after_H.max()) / tau:.6f}")
            if layer > 0:  # its input moved with layer 0's clip: only a looser bound
                assert (after_H <= tau * (1 + LATER_LAYER_SLACK)).all(), (before_H, after_H)
                continue
            assert (after_H <= tau * (1 + 1e-5)).all(), (layer, before_H, after_H)
            if kind == "mla":
                setters = before_H > tau
            else:  # per KV group, the head with the group's max logit
                grouped = before_H.view(-1, heads_per_group)
                top = grouped == grouped.max(dim=1, keepdim=True).values
                setters = (top & (grouped > tau)).view(-1)
            torch.testing.assert_close(after_H[setters], torch.full_like(after_H[setters], tau),
                                       rtol=1e-5, atol=0)
            untouched = before_H <= tau
            if kind == "mla":  # a head below tau keeps its weights
                torch.testing.assert_close(after_H[untouched], before_H[untouched], rtol=1e-6,
                                           atol=0)


# bf16 params: the logits are computed from bf16 q and k (3 significant digits).
BF16_LOGIT_RTOL = 2e-2


def test_bf16_main_shards_are_clipped_too() -> None:
    """bf16 params, TP2 x DP2, one layer, lr = 0: the fp32 main shards are separate from
    the model params, and the second optimizer step overwrites the model params with them.
    The clip survives that step (every head at most tau to bf16 round-off, the heads that
    set a clip at tau): the shards were rescaled, each by its flat slice of the factors. A
    shard left unclipped would bring its heads back to their pre-clip max, 2 tau or more."""
    model_spec = tiny.ModelSpec(num_layers=1, bf16=True)
    tau = GQA_TAU / 4
    out = spawn(_effect, 4, model_spec, tiny.Layout(tp=2), tau, True)
    for _, stats, s_before, s_after in out:
        assert stats.clipped_heads > 0
        before_H, after_H = s_before[0], s_after[0]
        assert (before_H > 2 * tau).any()
        assert (after_H <= tau * (1 + BF16_LOGIT_RTOL)).all(), (before_H, after_H)
        grouped = before_H.view(-1, model_spec.num_attention_heads // model_spec.num_query_groups)
        top = (grouped == grouped.max(dim=1, keepdim=True).values) & (grouped > tau)
        setters = after_H[top.view(-1)]
        torch.testing.assert_close(setters, torch.full_like(setters, tau),
                                   rtol=BF16_LOGIT_RTOL, atol=0)


def test_training_entry_clips_and_logs_the_max_logit(tmp_path) -> None:
    """`examples/pretrain_moe.py --qk-clip` at TP2 x DP2 (MoE EP2, the demo's layout): the
    max logit and the clipped heads are in every log line and JSON record, and the clip
    fires at a small threshold; the same run with --log-max-attention-logit only logs."""
    import json
    import os
    import pathlib
    import subprocess
    import sys

    from muon_megatron.training.demo import DEMO_FLAGS

    root = pathlib.Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for flag in ("--qk-clip", "--log-max-attention-logit"):
        out = tmp_path / flag.strip("-")
        cmd = [sys.executable, "examples/pretrain_moe.py", *DEMO_FLAGS, "--optimizer", "muon",
               "--train-iters", "3", "--log-interval", "1", "--eval-interval", "0",
               "--output-dir", str(out), flag, "--qk-clip-threshold", "0.1"]
        proc = subprocess.run(cmd, check=False, cwd=root, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        records = json.loads((out / "muon.json").read_text())["iterations"]
        assert all(r["max_attention_logit"] > 0.1 for r in records), records
        assert proc.stdout.count("max attention logit:") == 3
        if flag == "--qk-clip":
            assert all(r["qk_clipped_heads"] > 0 for r in records), records
            assert proc.stdout.count("qk-clipped heads:") == 3
        else:  # it only logs: nothing is clipped, so nothing is said to be
            assert not any("qk_clipped_heads" in r for r in records), records
            assert "qk-clipped heads:" not in proc.stdout
