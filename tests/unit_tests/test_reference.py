"""The single-device reference `muon_megatron.reference.Muon` against torch's own Muon and
AdamW, the Moonlight update RMS, fused-weight splits and input checking."""

from __future__ import annotations

import types

import pytest
import torch

from muon_megatron.config import MuonConfig
from muon_megatron.reference import ModelShape, Muon, megatron_no_weight_decay

LAYER = "decoder.layers.0"
PROJ = f"{LAYER}.self_attention.linear_proj.weight"
QKV = f"{LAYER}.self_attention.linear_qkv.weight"
FC1 = f"{LAYER}.mlp.linear_fc1.weight"
STEPS = 5
LRS = [0.02, 0.01, 0.03, 0.005, 0.02]
WDS = [0.1, 0.1, 0.0, 0.2, 0.1]
FP32_EPS = torch.finfo(torch.float32).eps

# The reference rounds (scale * NS(x)) in fp32 and then multiplies by lr; torch.optim.Muon
# multiplies NS(x) by the rounded (lr * scale). Newton-Schulz itself is bitwise equal (see
# test_newton_schulz), and the gradients here do not depend on the parameters, so the only
# difference is that final rounding: at most one ulp of the parameter per step, not
# compounding. Measured: 0.75 ulp of max |p| after 5 steps.
TORCH_MUON_ULPS_PER_STEP = 1.0

# 'moonlight' targets an update RMS of matched_adamw_rms = 0.2 assuming NS returns an exact
# orthogonal factor. Polar Express (5 steps) gets within 3% (measured 0.1977..0.2054 on
# Gaussian inputs), so 5% holds with margin. The quintic leaves singular values in
# [0.68, 1.2] and on Gaussian inputs gives 0.16..0.18 (80-89% of target): only the
# singular-value band bounds it.
MOONLIGHT_RMS_RTOL = 0.05
QUINTIC_SV_BAND = (0.65, 1.25)  # as SV_BANDS["quintic", 5] in test_newton_schulz

# Cancellation when recovering lr * update from p_new - p_old in fp32 (|p| / |lr u| ~ 10,
# so ~1e-6 per element at worst; the RMS averages it): measured 1.1e-7.
DELTA_RMS_RTOL = 1e-5


def _param(*shape: int, seed: int, scale: float = 0.02) -> torch.nn.Parameter:
    return torch.nn.Parameter(
        torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale
    )


def _grads(params: list[torch.Tensor], seed: int) -> list[list[torch.Tensor]]:
    """Fixed gradients per step (independent of the parameters)."""
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(STEPS)]


def _rms(x: torch.Tensor) -> float:
    return x.double().square().mean().sqrt().item()


def test_muon_matches_torch_muon() -> None:
    names = [f"decoder.layers.{i}.self_attention.linear_proj.weight" for i in range(3)]
    ours = [_param(*s, seed=i) for i, s in enumerate([(64, 64), (96, 32), (32, 96)])]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    ref = Muon(zip(names, ours), lr=LRS[0], weight_decay=WDS[0])
    cfg = ref.muon_config
    assert (cfg.muon_coefficients, cfg.muon_ns_dtype, cfg.muon_ns_steps) == ("quintic", "bf16", 5)
    torch_muon = torch.optim.Muon(
        theirs,
        lr=LRS[0],
        weight_decay=WDS[0],
        momentum=cfg.muon_momentum,
        nesterov=cfg.muon_nesterov,
        eps=cfg.muon_eps,
        ns_steps=cfg.muon_ns_steps,
        adjust_lr_fn="match_rms_adamw",
    )
    for step, grads in enumerate(_grads(ours, seed=100)):
        for group in ref.param_groups + torch_muon.param_groups:
            group["lr"], group["weight_decay"] = LRS[step], WDS[step]
        before = [p.detach().clone() for p in ours]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ref.step()
        torch_muon.step()
        for p, q, p0 in zip(ours, theirs, before):
            atol = (step + 1) * TORCH_MUON_ULPS_PER_STEP * FP32_EPS * q.abs().max().item()
            torch.testing.assert_close(p, q, rtol=0, atol=atol)
            assert not torch.equal(p, p0)


def _adamw_model() -> list[tuple[str, torch.nn.Parameter]]:
    return [
        ("embedding.word_embeddings.weight", _param(50, 16, seed=1)),
        (PROJ, _param(16, 16, seed=2)),
        (f"{LAYER}.self_attention.linear_proj.bias", _param(16, seed=3)),
        (f"{LAYER}.input_layernorm.weight", _param(16, seed=4, scale=1.0)),
        ("output_layer.weight", _param(50, 16, seed=5)),
    ]


def test_param_groups() -> None:
    model = _adamw_model()
    ref = Muon(model, lr=1e-3, weight_decay=0.1)
    layout = [
        (g["use_muon"], g["weight_decay"], g["wd_mult"], g["param_names"]) for g in ref.param_groups
    ]
    assert layout == [
        (True, 0.1, 1.0, [PROJ]),
        (False, 0.1, 1.0, ["embedding.word_embeddings.weight", "output_layer.weight"]),
        (
            False,
            0.0,
            0.0,
            [f"{LAYER}.self_attention.linear_proj.bias", f"{LAYER}.input_layernorm.weight"],
        ),
    ]
    assert all(g["lr"] == 1e-3 for g in ref.param_groups)
    assert megatron_no_weight_decay("x.bias", torch.empty(2, 2))
    assert megatron_no_weight_decay("x.weight", torch.empty(2))
    assert not megatron_no_weight_decay("x.weight", torch.empty(2, 2))


def test_adamw_bitwise_equal_to_torch_adamw() -> None:
    model = _adamw_model()
    ref = Muon(model, lr=LRS[0], weight_decay=WDS[0], betas=(0.9, 0.95), eps=1e-8)
    adamw_names = [n for n, _ in model if n != PROJ]
    clones = {n: torch.nn.Parameter(p.detach().clone()) for n, p in model if n != PROJ}
    decay_names = ("embedding.word_embeddings.weight", "output_layer.weight")
    decay = [clones[n] for n in decay_names]
    no_decay = [clones[n] for n in adamw_names if n not in decay_names]
    torch_adamw = torch.optim.AdamW(
        [{"params": decay, "wd_mult": 1.0}, {"params": no_decay, "wd_mult": 0.0}],
        lr=LRS[0],
        betas=(0.9, 0.95),
        eps=1e-8,
        weight_decay=WDS[0],
    )
    params = dict(model)
    for step, grads in enumerate(_grads([p for _, p in model], seed=200)):
        # What Megatron's OptimizerParamScheduler does between steps.
        for group in ref.param_groups + torch_adamw.param_groups:
            group["lr"] = LRS[step]
            group["weight_decay"] = WDS[step] * group["wd_mult"]
        for (name, p), g in zip(model, grads):
            p.grad = g.clone()
            if name in clones:
                clones[name].grad = g.clone()
        ref.step()
        torch_adamw.step()
        for name in adamw_names:
            torch.testing.assert_close(params[name], clones[name], rtol=0, atol=0)
            ours, theirs = ref.state[params[name]], torch_adamw.state[clones[name]]
            for key in ("step", "exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)


def _rms_model() -> tuple[list[tuple[str, torch.nn.Parameter]], ModelShape]:
    # Q is 32x16, K and V 16x16, gate and up 24x16: their own update_scale differs from
    # that of the fused 64x16 / 48x16 tensor, so a scale taken from the fused shape would
    # miss 0.2.
    shape = ModelShape(
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=8,
        gated_linear_unit=True,
        hidden_size=16,
    )
    model = [(QKV, _param(64, 16, seed=1)), (FC1, _param(48, 16, seed=2))]
    model += [
        (PROJ, _param(16, 32, seed=3)),
        (f"{LAYER}.mlp.linear_fc2.weight", _param(96, 24, seed=4)),
    ]
    return model, shape


def _one_step_rms(coefficients: str) -> tuple[Muon, dict[str, float], dict[str, float]]:
    model, shape = _rms_model()
    lr = 0.01
    cfg = MuonConfig(muon_coefficients=coefficients)
    ref = Muon(model, lr=lr, weight_decay=0.0, muon_config=cfg, model_shape=shape)
    before = {n: p.detach().clone() for n, p in model}
    for (_, p), g in zip(model, _grads([p for _, p in model], seed=300)[0]):
        p.grad = g
    ref.step()
    delta_rms = {n: _rms(p.detach() - before[n]) / lr for n, p in model}
    return ref, ref.last_metrics, delta_rms


def test_moonlight_update_rms_is_matched_adamw_rms() -> None:
    ref, metrics, delta_rms = _one_step_rms("polar_express")
    target = ref.muon_config.muon_matched_adamw_rms
    assert target == 0.2
    assert set(metrics) == {QKV, FC1, PROJ, f"{LAYER}.mlp.linear_fc2.weight"}
    for name, rms in metrics.items():
        assert abs(rms / target - 1) <= MOONLIGHT_RMS_RTOL, (name, rms)
        assert abs(delta_rms[name] / rms - 1) <= DELTA_RMS_RTOL, (name, delta_rms[name], rms)


def test_moonlight_update_rms_quintic_within_singular_value_band() -> None:
    ref, metrics, delta_rms = _one_step_rms("quintic")
    lo, hi = QUINTIC_SV_BAND
    target = ref.muon_config.muon_matched_adamw_rms
    for name, rms in metrics.items():
        # RMS = target * sqrt(mean sigma^2) for each logical matrix.
        assert lo * target <= rms <= hi * target, (name, rms)
        assert abs(delta_rms[name] / rms - 1) <= DELTA_RMS_RTOL, (name, delta_rms[name], rms)


# Q, K, V of very different magnitudes: NS of the fused matrix sees K and V as tiny
# directions and leaves them far below 1, while NS of each block brings each to ~1.
QKV_SHAPE = ModelShape(
    num_attention_heads=4,
    num_query_groups=2,
    kv_channels=8,
    gated_linear_unit=False,
    hidden_size=64,
)
KV_SCALE = 1e-3


def _qkv_blocks_input() -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """A [2 groups x (2 q + k + v) heads x 8, 64] QKV gradient and each head's rows."""
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(400))
    heads = [(start, start + 8) for start in range(0, 64, 8)]
    for i, (s, e) in enumerate(heads):
        if i % 4 >= 2:  # the k and v heads of each query group
            x[s:e] *= KV_SCALE
    return x, heads


def _blocks(u: torch.Tensor, heads: list[tuple[int, int]]) -> list[torch.Tensor]:
    q = torch.cat([u[s:e] for i, (s, e) in enumerate(heads) if i % 4 < 2])
    k = torch.cat([u[s:e] for i, (s, e) in enumerate(heads) if i % 4 == 2])
    v = torch.cat([u[s:e] for i, (s, e) in enumerate(heads) if i % 4 == 3])
    return [q, k, v]


def _qkv_optimizer(split: bool) -> tuple[Muon, torch.nn.Parameter]:
    param = torch.nn.Parameter(torch.zeros(64, 64))
    cfg = MuonConfig(muon_split_qkv=split, muon_scale_mode="none", muon_momentum=0.0)
    return Muon([(QKV, param)], lr=1.0, muon_config=cfg, model_shape=QKV_SHAPE), param


def test_split_qkv_changes_update() -> None:
    x, _ = _qkv_blocks_input()
    steps = {}
    for split in (True, False):
        ref, param = _qkv_optimizer(split)
        param.grad = x.clone()
        ref.step()
        # momentum 0, lr 1, wd 0, scale 1, p0 = 0: p1 is exactly -NS(x) (cast to fp32).
        torch.testing.assert_close(
            -param.detach(), ref.orthogonalized_update(QKV, x), rtol=0, atol=0
        )
        steps[split] = param.detach().clone()
    assert ((steps[True] - steps[False]).norm() / steps[False].norm()).item() > 0.5


def test_split_qkv_orthogonalizes_each_block() -> None:
    x, heads = _qkv_blocks_input()
    lo, hi = QUINTIC_SV_BAND
    split_on, _ = _qkv_optimizer(True)
    for block in _blocks(split_on.orthogonalized_update(QKV, x), heads):
        s = torch.linalg.svdvals(block.double())
        assert lo <= s.min().item() and s.max().item() <= hi
    split_off, _ = _qkv_optimizer(False)
    q, k, v = _blocks(split_off.orthogonalized_update(QKV, x), heads)
    assert torch.linalg.svdvals(q.double()).min().item() >= lo
    for block in (k, v):
        # Measured max singular value ~0.1: far outside the band.
        assert torch.linalg.svdvals(block.double()).max().item() < lo / 2


def test_model_shape_from_transformer_config() -> None:
    from megatron.core.transformer import TransformerConfig

    cfg = TransformerConfig(
        num_layers=1,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=8,
        gated_linear_unit=True,
        num_moe_experts=4,
        moe_ffn_hidden_size=32,
    )
    assert ModelShape.from_transformer_config(cfg) == ModelShape(4, 2, 8, True, 64, 32)
    # Megatron leaves kv_channels / num_query_groups None until its __post_init__ fills them.
    raw = types.SimpleNamespace(
        num_attention_heads=4,
        num_query_groups=None,
        kv_channels=None,
        gated_linear_unit=False,
        hidden_size=64,
        moe_ffn_hidden_size=None,
    )
    assert ModelShape.from_transformer_config(raw) == ModelShape(4, 4, 16, False, 64, None)


def test_non_matrix_forced_into_muon_raises() -> None:
    vector = torch.nn.Parameter(torch.zeros(8))
    with pytest.raises(ValueError, match=r"layer\.scale: Muon needs a 2-D parameter.*AdamW"):
        Muon([("layer.scale", vector)], lr=1e-3, is_muon=lambda name, p: True)


def test_grouped_mlp_without_model_shape_raises() -> None:
    weight1 = torch.nn.Parameter(torch.zeros(16, 64))
    with pytest.raises(ValueError, match="model_shape"):
        Muon([(f"{LAYER}.mlp.experts.weight1", weight1)], lr=1e-3)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"muon_scale_mode": "x"}, "muon_scale_mode='x'"),
        ({"muon_coefficients": "x"}, "muon_coefficients='x'"),
        ({"muon_ns_dtype": "fp16"}, "muon_ns_dtype='fp16'"),
        ({"muon_momentum": 1.0}, "muon_momentum=1.0"),
    ],
)
def test_bad_muon_config_raises(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MuonConfig(**kwargs)


def test_bad_optimizer_arguments_raise() -> None:
    param = [(PROJ, torch.nn.Parameter(torch.zeros(4, 4)))]
    with pytest.raises(ValueError, match="lr=-1"):
        Muon(param, lr=-1.0)
    with pytest.raises(ValueError, match="no trainable parameters"):
        Muon([], lr=1e-3)
    with pytest.raises(ValueError, match="appears twice"):
        Muon(param + [(PROJ, torch.nn.Parameter(torch.zeros(4, 4)))], lr=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_state_dict_round_trip_then_more_steps_is_bitwise(dtype: torch.dtype) -> None:
    def build(params: list[tuple[str, torch.nn.Parameter]]) -> Muon:
        return Muon(params, lr=0.01, weight_decay=0.1, model_shape=_rms_model()[1])

    model, _ = _rms_model()
    model += [(n, p) for n, p in _adamw_model() if n != PROJ]
    model = [(n, torch.nn.Parameter(p.detach().to(dtype))) for n, p in model]
    grads = _grads([p for _, p in model], seed=500)
    grads = [[g.to(dtype) for g in step_grads] for step_grads in grads]
    resumed = [(n, torch.nn.Parameter(p.detach().clone())) for n, p in model]
    straight = build(model)
    first = build(resumed)
    for step, step_grads in enumerate(grads):
        if step == 2:
            # A fresh optimizer over the same parameters takes over from the checkpoint.
            checkpoint = first.state_dict()
            first = build(resumed)
            first.load_state_dict(checkpoint)
        for (_, p), (_, q), g in zip(model, resumed, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        straight.step()
        first.step()
    for (name, p), (_, q) in zip(model, resumed):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)
        if name in (QKV, FC1, PROJ):
            assert first.state[q]["momentum_buffer"].dtype == torch.float32
