"""The Megatron-LM hooks' own logic, on stand-in modules (no Megatron-LM needed).

These pin what the hooks do with what Megatron-LM hands them; the real integration is
tests/functional/test_megatron_lm_integration.py, which needs Megatron-LM itself.
"""

from __future__ import annotations

import argparse
import types

import pytest

from muon_megatron.config import MuonConfig
from muon_megatron.megatron_lm import checkpoints, hooks, metrics
from muon_megatron.megatron_lm.arguments import muon_extra_args_provider
from muon_megatron.optimizer import builder

PRINTED: list[str] = []


def _print_args(title: str, args: argparse.Namespace) -> None:
    """Stands in for megatron.training.arguments._print_args (the argument dump)."""
    PRINTED.append(args.optimizer)


def _megatron_args(**overrides: object) -> argparse.Namespace:
    args = muon_extra_args_provider(argparse.ArgumentParser()).parse_args([])
    # The Megatron-LM arguments the validation reads, at Megatron-LM's defaults.
    args.optimizer = "muon"
    args.use_distributed_optimizer = True
    args.fp16 = False
    args.optimizer_cpu_offload = False
    args.use_precision_aware_optimizer = False
    args.ckpt_format = "torch_dist"
    args.save = args.load = None
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def _stand_ins(args: argparse.Namespace) -> tuple[types.SimpleNamespace, list, list]:
    calls: list = []
    seen_optimizer_names: list = []

    def get_megatron_optimizer(config, model_chunks, **kwargs):
        calls.append(("megatron", config.optimizer, kwargs))
        return "megatron-optimizer"

    def validate_args(a, defaults={}):  # noqa: B006 (Megatron-LM's signature)
        seen_optimizer_names.append(a.optimizer)
        if "muon" in a.optimizer and a.use_distributed_optimizer:
            raise AssertionError("Muon optimizer does not support distributed optimizer for now.")
        _print_args("arguments", a)  # as Megatron-LM's validate_args ends
        return a

    training = types.SimpleNamespace(get_megatron_optimizer=get_megatron_optimizer)
    initialize = types.SimpleNamespace(validate_args=validate_args)
    hooks._install_into(training=training, validators=(initialize,), get_args=lambda: args)
    mods = types.SimpleNamespace(training=training, initialize=initialize)
    return mods, calls, seen_optimizer_names


def test_muon_routes_to_get_muon_optimizer_with_flags_as_muon_config(monkeypatch) -> None:
    args = _megatron_args(muon_momentum=0.9, muon_coefficients="polar_express")
    mods, calls, _ = _stand_ins(args)
    received = {}
    built = type("BuiltOptimizer", (), {})()

    def fake_get_muon_optimizer(config, model_chunks, muon_config, **kwargs):
        received.update(config=config, muon_config=muon_config, kwargs=kwargs)
        return built

    monkeypatch.setattr(builder, "get_muon_optimizer", fake_get_muon_optimizer)
    config = types.SimpleNamespace(optimizer="muon")
    out = mods.training.get_megatron_optimizer(
        config, ["chunk"], config_overrides={"k": 1}, use_gloo_process_groups=False,
        dump_param_to_param_group_map=None,
    )
    assert out is built and calls == []
    assert metrics.built_optimizer() is built  # what training_log reports on
    assert received["muon_config"] == MuonConfig(muon_momentum=0.9,
                                                 muon_coefficients="polar_express")
    # Everything Megatron-LM passes goes on; get_muon_optimizer itself checks it against the
    # installed megatron-core (test_builder_passes_on_or_refuses_megatron_keywords).
    assert received["kwargs"] == {
        "config_overrides": {"k": 1},
        "use_gloo_process_groups": False,
        "dump_param_to_param_group_map": None,
    }


def test_builder_passes_on_or_refuses_megatron_keywords(monkeypatch) -> None:
    """A keyword the installed get_megatron_optimizer takes goes on to it; a set one it
    does not take is refused, naming it, before anything is built; an unset one is dropped."""
    import megatron.core.optimizer as mcore_optimizer

    seen = {}

    def fake_get_megatron_optimizer(config, model_chunks, config_overrides=None,
                                    use_gloo_process_groups=True, pg_collection=None,
                                    dump_param_to_param_group_map=None):
        seen.update(dump=dump_param_to_param_group_map)
        raise RuntimeError("built")

    ddp = types.SimpleNamespace(
        ddp_config=types.SimpleNamespace(), config=types.SimpleNamespace(context_parallel_size=1),
        named_parameters=lambda: iter(()),
    )
    config = _ok_optimizer_config()
    monkeypatch.setattr(mcore_optimizer, "get_megatron_optimizer", fake_get_megatron_optimizer)
    with pytest.raises(RuntimeError, match="built"):
        builder.get_muon_optimizer(config, [ddp], dump_param_to_param_group_map="/tmp/map")
    assert seen == {"dump": "/tmp/map"}
    with pytest.raises(TypeError, match=r"takes no \['no_such_knob'\]"):
        builder.get_muon_optimizer(config, [ddp], no_such_knob=1)
    with pytest.raises(RuntimeError, match="built"):
        builder.get_muon_optimizer(config, [ddp], no_such_knob=None)


def test_other_optimizers_reach_megatron_unchanged() -> None:
    mods, calls, _ = _stand_ins(_megatron_args())
    for name in ("adam", "sgd", "dist_muon"):
        assert mods.training.get_megatron_optimizer(
            types.SimpleNamespace(optimizer=name), [], use_gloo_process_groups=True
        ) == "megatron-optimizer"
    assert [c[1] for c in calls] == ["adam", "sgd", "dist_muon"]


def test_validate_args_accepts_muon_with_the_distributed_optimizer() -> None:
    args = _megatron_args()
    mods, _, seen = _stand_ins(args)
    assert mods.initialize.validate_args(args, {}) is args
    assert seen == ["adam"] and args.optimizer == "muon"


def test_argument_dump_prints_the_optimizer_as_muon() -> None:
    """Megatron validates the run as the AdamW run underneath, but its argument dump (and
    everything after validation) sees 'muon'."""
    args = _megatron_args()
    mods, _, seen = _stand_ins(args)
    PRINTED.clear()
    mods.initialize.validate_args(args, {})
    assert seen == ["adam"] and PRINTED == ["muon"] and args.optimizer == "muon"
    assert _print_args.__name__ == "_print_args"  # restored after validation


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"ckpt_format": "torch", "save": "/ckpt"}, "--ckpt-format torch_dist"),
        ({"fp16": True}, "--bf16"),
        ({"use_torch_fsdp2": True}, "without FSDP"),
        ({"muon_scale_mode": "spectral"}, "shape_scaling"),
        ({"muon_tp_mode": "blockwise"}, "Drop --muon-tp-mode"),
        ({"muon_fp32_matmul_prec": "medium"}, "--muon-ns-dtype"),
        ({"qk_clip": True, "qk_clip_alpha": 1.0, "qk_clip_threshold": 100.0},
         "--qk-clip-alpha 1.0"),
        ({"qk_clip": True, "qk_clip_alpha": 0.5, "qk_clip_threshold": 0.0},
         "--qk-clip-threshold 0.0"),
    ],
)
def test_validate_args_refuses_unsupported_runs_before_training(overrides, message) -> None:
    args = _megatron_args(**overrides)
    mods, _, seen = _stand_ins(args)
    with pytest.raises(ValueError, match=message):
        mods.initialize.validate_args(args, {})
    assert seen == [], "Megatron's own validation ran before ours refused"


@pytest.mark.parametrize("impl", ["local", "transformer_engine"])
def test_qk_clip_on_the_local_attention_skips_megatrons_te_assertion_only(
    impl, monkeypatch
) -> None:
    """Megatron-LM asserts TE >= 2.9 for --qk-clip / --log-max-attention-logit; with the
    local attention its validation sees both off (our QK-Clip computes the logits), while
    its argument dump and everything after see the user's values. With TE, Megatron checks
    its own version as it always does."""
    args = _megatron_args(qk_clip=True, log_max_attention_logit=True, qk_clip_alpha=0.5,
                          qk_clip_threshold=100.0, transformer_impl=impl)
    mods, _, seen = _stand_ins(args)
    during, dumped = [], []
    validate = mods.initialize.validate_args.__wrapped__

    def recording_validate(a, defaults={}):  # noqa: B006 (Megatron-LM's signature)
        during.append((a.qk_clip, a.log_max_attention_logit))
        return validate(a, defaults)

    mods.initialize.validate_args = hooks._marked(hooks._validating(recording_validate))
    # The argument dump: what the stand-in validate_args prints, as Megatron-LM's does.
    monkeypatch.setitem(globals(), "_print_args", lambda t, a: dumped.append(
        (a.optimizer, a.qk_clip, a.log_max_attention_logit)))
    mods.initialize.validate_args(args, {})
    megatron_sees = impl == "transformer_engine"
    assert during == [(megatron_sees, megatron_sees)] and seen == ["adam"]
    assert dumped == [("muon", True, True)]
    assert (args.optimizer, args.qk_clip, args.log_max_attention_logit) == ("muon", True, True)


def test_clip_qk_is_ours_for_a_muon_run_and_megatron_cores_otherwise(monkeypatch) -> None:
    """Megatron-LM's train_step calls clip_qk(model, log_max_only=...) after the step: with
    a QK-Clip built for our optimizer, QKClip.apply(that optimizer) runs and its max logit
    is returned; without one, megatron-core's clip_qk. train_step forgets the records first."""
    from muon_megatron.megatron_lm import qk_clip

    theirs, applied, resets = [], [], []

    def their_clip_qk(model, log_max_only=False):
        theirs.append(log_max_only)
        return 7.0

    class Clip:
        clip = True

        def apply(self, optimizer):
            applied.append(optimizer)
            return types.SimpleNamespace(max_attention_logit=3.5)

        def reset(self):
            resets.append(True)

        def remove(self):
            pass

    ours = qk_clip.clipping_with_muon(their_clip_qk)
    step = qk_clip.resetting_before_step(lambda *a, **k: ("stepped", a, k))
    monkeypatch.setattr(qk_clip, "_clip", [])
    assert ours(["model"], log_max_only=True) == 7.0 and theirs == [True]
    assert step(1, x=2) == ("stepped", (1,), {"x": 2}) and resets == []
    optimizer = type("Built", (), {})()
    metrics.remember_optimizer(optimizer)
    monkeypatch.setattr(qk_clip, "_clip", [Clip()])
    assert step() and resets == [True]
    assert ours(["model"], log_max_only=False) == 3.5 and applied == [optimizer]
    with pytest.raises(RuntimeError, match="log_max_only=True"):
        ours(["model"], log_max_only=True)
    assert theirs == [True]


def test_ckpt_format_torch_without_save_or_load_is_accepted() -> None:
    args = _megatron_args(ckpt_format="torch")
    mods, _, _ = _stand_ins(args)
    assert mods.initialize.validate_args(args, {}) is args


def test_megatron_cores_own_muon_is_refused_when_our_flags_replaced_its_flags() -> None:
    args = _megatron_args(optimizer="dist_muon")
    mods, _, seen = _stand_ins(args)
    with pytest.raises(ValueError, match="--optimizer muon --use-distributed-optimizer"):
        mods.initialize.validate_args(args, {})
    assert seen == []
    plain = argparse.Namespace(optimizer="adam")
    assert mods.initialize.validate_args(plain, {}) is plain


def test_require_installed_names_the_fix_when_install_was_forgotten(monkeypatch) -> None:
    monkeypatch.setattr(hooks, "is_installed", lambda: False)
    with pytest.raises(ValueError, match=r"install\(\) has not run"):
        hooks.require_installed()
    monkeypatch.setattr(hooks, "is_installed", lambda: True)
    hooks.require_installed()


def test_checkpoint_optimizer_tells_muon_adam_and_weights_only_apart() -> None:
    bucket = "optimizer.distributed.dp_group_idx_0.gbuf_idx_0.dtype_(f32, f32).bucket_idx_0"
    weights = {"decoder.layers.mlp.linear_fc1.weight", "embedding.word_embeddings.weight"}
    assert checkpoints.checkpoint_optimizer(weights) == "none"
    assert checkpoints.checkpoint_optimizer(weights | {f"{bucket}.param", f"{bucket}.exp_avg",
                                                       f"{bucket}.exp_avg_sq"}) == "adam"
    assert checkpoints.checkpoint_optimizer(weights | {f"{bucket}.exp_avg",
                                                       f"{bucket}.muon_momentum"}) == "muon"
    model_space = {"optimizer.state.exp_avg.embedding.word_embeddings.weight",
                   "optimizer.state.exp_avg_sq.embedding.word_embeddings.weight"}
    assert checkpoints.checkpoint_optimizer(weights | model_space) == "adam"
    muon = {"optimizer.state.muon_momentum.decoder.layers.mlp.linear_fc1.weight"}
    assert checkpoints.checkpoint_optimizer(weights | model_space | muon) == "muon"


def test_muon_log_line_carries_update_rms_ns_time_and_skipped_steps() -> None:
    line = metrics.format_muon_log_line(
        10, {"muon/update_rms": 0.19871, "muon/ns_seconds": 0.01234, "muon/skipped_steps": 2.0}
    )
    assert line == (" [muon] iteration       10 | update rms: 0.1987 | ns time (s): 0.0123 | "
                    "skipped steps: 2")


def test_validate_args_names_the_fix_without_the_distributed_optimizer() -> None:
    args = _megatron_args(use_distributed_optimizer=False)
    mods, _, _ = _stand_ins(args)
    with pytest.raises(ValueError, match="--use-distributed-optimizer"):
        mods.initialize.validate_args(args, {})


def test_missing_muon_flags_name_the_provider() -> None:
    args = argparse.Namespace(optimizer="muon", use_distributed_optimizer=True)
    mods, _, _ = _stand_ins(args)
    with pytest.raises(ValueError, match="muon_extra_args_provider"):
        mods.training.get_megatron_optimizer(types.SimpleNamespace(optimizer="muon"), [])


def test_install_into_is_idempotent() -> None:
    args = _megatron_args()
    mods, _, _ = _stand_ins(args)
    hooked = mods.training.get_megatron_optimizer
    hooks._install_into(training=mods.training, validators=(mods.initialize,),
                              get_args=lambda: args)
    assert mods.training.get_megatron_optimizer is hooked


def _ok_optimizer_config():
    from megatron.core.optimizer import OptimizerConfig

    return OptimizerConfig(optimizer="muon", lr=1e-3, use_distributed_optimizer=True, bf16=True)
