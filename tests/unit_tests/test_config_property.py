"""Property test of `MuonConfig`'s checks (Hypothesis): whatever values its fields get, the
config is refused when it is built (ValueError / TypeError naming a drawn field), or a few
steps of the single-device reference optimizer leave every weight finite.

Draws: every field, each from the values of its type inside its range, the ends of the range
and the floats right beside them, any float (NaN, +-inf, -0.0, subnormal, huge), ints, and
wrong types (bool for a number, a number for a bool, None, str, list). The model is a tiny
GPT layer whose fused weights split per `ModelShape` (Q/K/V, SwiGLU gate/up), a router, a
norm, a bias and an embedding; one Muon matrix gets an all-zero gradient (the 0/0 that
`muon_eps` guards) and one a gradient of 1e-30 (below every allowed eps).

Single-process, CPU, a bounded number of examples with the deadline off (Newton-Schulz at up
to 100 iterations on a shared CPU has no stable time per example); derandomized and without
the example database, so the suite gives the same verdict on every run (Hypothesis still
caches constants under .hypothesis/, which .gitignore lists).
"""

from __future__ import annotations

import dataclasses
import math
import typing

import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from muon_megatron.config import REFUSED_SCALE_MODES, MuonConfig, NamePatterns
from muon_megatron.reference import ModelShape, Muon

FIELDS = {f.name: f for f in dataclasses.fields(MuonConfig)}
HINTS = typing.get_type_hints(MuonConfig)

LAYER = "decoder.layers.0"
SHAPE = ModelShape(
    num_attention_heads=4, num_query_groups=2, kv_channels=4, gated_linear_unit=True,
    hidden_size=16,
)
# name -> (shape, gradient scale): Q 16x16 + K, V 8x16 each; gate, up 16x16 each.
MODEL = {
    f"{LAYER}.self_attention.linear_qkv.weight": ((32, 16), 1.0),
    f"{LAYER}.self_attention.linear_proj.weight": ((16, 16), 1e-30),
    f"{LAYER}.self_attention.linear_proj.bias": ((16,), 1.0),
    f"{LAYER}.mlp.linear_fc1.weight": ((32, 16), 1.0),
    f"{LAYER}.mlp.linear_fc2.weight": ((16, 16), 0.0),
    f"{LAYER}.mlp.router.weight": ((4, 16), 1.0),
    f"{LAYER}.input_layernorm.weight": ((16,), 1.0),
    "embedding.word_embeddings.weight": ((32, 16), 1.0),
}
STEPS = 3
LR, WEIGHT_DECAY = 0.02, 0.1
PROPERTY = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

WRONG_TYPES = st.sampled_from([None, "1", "", [1], (0.5,)])
# Name patterns that match only 2-D weights of MODEL (or nothing), include and exclude from
# disjoint pools: a pattern matching a 1-D param, or both flags matching one param, is
# refused when the optimizer is built (routing.rules.route_reason), not by MuonConfig.
PATTERNS = {
    "muon_include": ["*.mlp.router.weight", "embedding.*", "*.nothing"],
    "muon_exclude": ["*.linear_proj.weight", "*.mlp.linear_fc*", "nothing.else"],
}
BAD_PATTERNS = st.sampled_from([("",), (" *.x",), ("*.x", "*.x"), ["*.x"], ("*.x", 1), "*.x"])
ANY_FLOAT = st.floats(allow_nan=True, allow_infinity=True)


def _beside(value: float) -> list[float]:
    return [value, math.nextafter(value, -math.inf), math.nextafter(value, math.inf)]


def _values(name: str) -> st.SearchStrategy:
    """Any value for field `name`: in range, at or beside the range's ends, anything of a
    neighbouring type (every float, NaN and inf included), and wrong types."""
    hint = HINTS[name]
    if hint is bool:
        return st.one_of(st.booleans(), st.sampled_from([0, 1, 1.0]), WRONG_TYPES)
    if hint == NamePatterns:
        return st.one_of(_inside(name), BAD_PATTERNS, WRONG_TYPES)
    if typing.get_origin(hint) is typing.Literal:
        choices = typing.get_args(hint)
        odd = [*REFUSED_SCALE_MODES, choices[0].upper(), 0, True]
        return st.one_of(st.sampled_from(choices), st.sampled_from(odd), WRONG_TYPES)
    bounds = FIELDS[name].metadata["bounds"]
    ends = [v for end in (bounds.low, bounds.high) if math.isfinite(end) for v in _beside(end)]
    if hint is int:
        inside = st.integers(int(bounds.low), int(bounds.high))
        edges = st.sampled_from(sorted({int(v) for v in ends} | {int(bounds.high) + 1, 0, -1}))
        other = st.one_of(ANY_FLOAT, st.sampled_from([True, False, 5.0]))
    else:
        inside = st.floats(bounds.low, bounds.high, exclude_min=bounds.low_open,
                           exclude_max=bounds.high_open, allow_nan=False, allow_infinity=False)
        edges = st.sampled_from(ends + [0.0, -0.0, -1.0, 1e-300, 1e300])
        other = st.one_of(ANY_FLOAT, st.integers(-(10**6), 10**6), st.booleans())
    return st.one_of(inside, edges, other, WRONG_TYPES)


def _inside(name: str) -> st.SearchStrategy:
    """Only values of the field's type inside its range (ends included when closed)."""
    hint = HINTS[name]
    if hint is bool:
        return st.booleans()
    if hint == NamePatterns:
        return st.lists(st.sampled_from(PATTERNS[name]), unique=True, max_size=2).map(tuple)
    if typing.get_origin(hint) is typing.Literal:
        return st.sampled_from(typing.get_args(hint))
    bounds = FIELDS[name].metadata["bounds"]
    if hint is int:
        return st.integers(int(bounds.low), int(bounds.high))
    return st.floats(bounds.low, bounds.high, exclude_min=bounds.low_open,
                     exclude_max=bounds.high_open, allow_nan=False, allow_infinity=False)


CONFIG_IN_RANGE = st.fixed_dictionaries({}, optional={name: _inside(name) for name in FIELDS})
# Any field set in range, then up to 3 fields set to anything: about a third of the draws stay
# in range and step (with every field at once, almost every draw would be refused).
ANY_CONFIG = st.tuples(
    CONFIG_IN_RANGE,
    st.lists(st.sampled_from(list(FIELDS)), max_size=3, unique=True).flatmap(
        lambda names: st.fixed_dictionaries({name: _values(name) for name in names})
    ),
).map(lambda pair: {**pair[0], **pair[1]})


def _weights_after_steps(cfg: MuonConfig) -> dict[str, torch.Tensor]:
    """The model's weights after STEPS reference steps with fixed random gradients."""
    gen = torch.Generator().manual_seed(0)
    params = {
        name: torch.nn.Parameter(0.02 * torch.randn(shape, generator=gen))
        for name, (shape, _) in MODEL.items()
    }
    optimizer = Muon(params.items(), lr=LR, weight_decay=WEIGHT_DECAY, muon_config=cfg,
                     model_shape=SHAPE)
    for _ in range(STEPS):
        for name, param in params.items():
            param.grad = MODEL[name][1] * torch.randn(param.shape, generator=gen)
        optimizer.step()
    return {name: param.detach() for name, param in params.items()}


def _assert_refused_or_finite(kwargs: dict[str, object]) -> None:
    try:
        cfg = MuonConfig(**kwargs)
    except (ValueError, TypeError) as error:
        event(f"refused: {type(error).__name__}")  # --hypothesis-show-statistics
        text = str(error)
        assert any(f"{name}=" in text for name in kwargs), text  # names a drawn field
        return
    event("accepted: stepped")
    weights = _weights_after_steps(cfg)
    not_finite = [name for name, w in weights.items() if not torch.isfinite(w).all()]
    assert not not_finite, (cfg, not_finite)


@PROPERTY
@given(ANY_CONFIG)
# The silent failures issue 23 found: each must now be refused.
@example({"muon_matched_adamw_rms": -1.0})
@example({"muon_matched_adamw_rms": 0.0})
@example({"muon_matched_adamw_rms": math.nan})
@example({"muon_extra_scale_factor": math.inf})
@example({"muon_eps": -1.0})
@example({"muon_eps": 1e-300})
def test_any_config_is_refused_when_built_or_trains_to_finite_weights(
    kwargs: dict[str, object],
) -> None:
    _assert_refused_or_finite(kwargs)


@PROPERTY
@given(CONFIG_IN_RANGE)
def test_every_config_inside_the_documented_ranges_is_accepted_and_stays_finite(
    kwargs: dict[str, object],
) -> None:
    """The ranges in docs/flags.md are exactly what is accepted (nothing inside is refused),
    and none of them makes a weight inf or NaN."""
    weights = _weights_after_steps(MuonConfig(**kwargs))
    not_finite = [name for name, w in weights.items() if not torch.isfinite(w).all()]
    assert not not_finite, (kwargs, not_finite)
