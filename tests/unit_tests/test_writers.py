"""TensorBoard / wandb output of the training entry (`training.writers`)."""

from __future__ import annotations

import importlib.util
import math
import sys

import pytest

from muon_megatron.training.args import build_parser, validate_args
from muon_megatron.training.writers import Writers, writer_errors

RECORDS = [{"iteration": i, "loss": 6.0 - 0.1 * i, "lr": 1e-3, "grad_norm": 1.5,
            "seconds": 0.25, "tokens_per_s": 2048.0, "update_rms": 0.2} for i in (1, 2, 3, 4)]
TRAINING_NAMES = {"lm loss", "learning-rate", "batch-size", "grad-norm", "iteration-time",
                  "throughput", "muon/update_rms"}


class FakeSummaryWriter:
    def __init__(self, log_dir: str, max_queue: int) -> None:
        self.log_dir, self.max_queue, self.scalars, self.closed = log_dir, max_queue, [], False

    def add_scalar(self, name: str, value: float, step: int) -> None:
        self.scalars.append((name, value, step))

    def close(self) -> None:
        self.closed = True


class FakeWandb:
    def __init__(self) -> None:
        self.init_kwargs, self.logged, self.finished = None, [], False

    def init(self, **kwargs) -> None:
        self.init_kwargs = kwargs

    def log(self, values: dict, step: int) -> None:
        self.logged.append((values, step))

    def finish(self) -> None:
        self.finished = True


def _args(*flags: str):
    return build_parser().parse_args(list(flags))


def test_megatron_lm_defaults() -> None:
    args = _args()
    assert (args.tensorboard_dir, args.tensorboard_log_interval, args.tensorboard_queue_size,
            args.wandb_project, args.wandb_exp_name, args.wandb_save_dir,
            args.wandb_entity) == (None, 1, 1000, "", "", "", "")


def test_scalars_reach_tensorboard_and_wandb_under_megatron_names(tmp_path) -> None:
    """--tensorboard-log-interval 2: iterations 2 and 4 only, every training name, the values
    of the record; wandb gets the same dict at the same step, wandb.init Megatron-LM's kwargs
    (dir <--save>/wandb); validation adds 'lm loss validation' and its ppl."""
    args = _args("--tensorboard-dir", str(tmp_path / "tb"), "--tensorboard-log-interval", "2",
                 "--wandb-project", "p", "--wandb-exp-name", "e", "--save", str(tmp_path))
    wandb = FakeWandb()
    writers = Writers(args, tensorboard=FakeSummaryWriter, wandb=wandb)
    for record in RECORDS:
        writers.training(record, batch_size=8)
    writers.validation(5.0, 4)
    writers.close()
    tb = writers.tensorboard
    assert (tb.log_dir, tb.max_queue, tb.closed) == (str(tmp_path / "tb"), 1000, True)
    assert {step for _, _, step in tb.scalars} == {2, 4}
    assert {name for name, _, step in tb.scalars if step == 2} == TRAINING_NAMES
    assert ("lm loss", RECORDS[3]["loss"], 4) in tb.scalars
    assert ("lm loss validation", 5.0, 4) in tb.scalars
    assert ("lm loss validation ppl", math.exp(5.0), 4) in tb.scalars
    assert wandb.init_kwargs["dir"] == str(tmp_path / "wandb")
    assert (wandb.init_kwargs["project"], wandb.init_kwargs["name"]) == ("p", "e")
    assert [step for _, step in wandb.logged] == [2, 4, 4] and wandb.finished
    assert wandb.logged[0][0]["lm loss"] == RECORDS[1]["loss"]


def test_adamw_records_leave_out_update_rms() -> None:
    args = _args("--tensorboard-dir", "unused")
    writers = Writers(args, tensorboard=FakeSummaryWriter)
    writers.training({**RECORDS[0], "update_rms": None}, batch_size=8)
    assert "muon/update_rms" not in {name for name, _, _ in writers.tensorboard.scalars}


def test_without_tensorboard_the_run_goes_on_with_a_warning(monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    writers = Writers(_args("--tensorboard-dir", "unused"))
    writers.training(RECORDS[0], batch_size=8)
    assert writers.tensorboard is None
    assert "pip install tensorboard" in capsys.readouterr().out


def test_wandb_flags_are_checked_with_the_fix(monkeypatch) -> None:
    no_name = writer_errors(_args("--wandb-project", "p", "--save", "s"))
    assert "needs --wandb-exp-name" in no_name[0]
    assert "--wandb-save-dir or --save" in " ".join(
        writer_errors(_args("--wandb-project", "p", "--wandb-exp-name", "e")))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    errors = writer_errors(_args("--wandb-project", "p", "--wandb-exp-name", "e", "--save", "s"))
    assert errors == ["--wandb-project p: wandb is not installed; pip install wandb, or drop "
                      "--wandb-project"]
    with pytest.raises(ValueError, match="wandb is not installed"):
        validate_args(_args("--wandb-project", "p", "--wandb-exp-name", "e", "--save", "s"), 1)
    interval = writer_errors(_args("--tensorboard-log-interval", "0"))
    assert "--tensorboard-log-interval 0" in interval[0]


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                    reason="tensorboard is not installed; the stand-in tests above cover Writers")
def test_real_tensorboard_event_file_reads_back(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writers = Writers(_args("--tensorboard-dir", str(tmp_path)))
    for record in RECORDS:
        writers.training(record, batch_size=8)
    writers.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert TRAINING_NAMES <= set(events.Tags()["scalars"])
    losses = [(e.step, e.value) for e in events.Scalars("lm loss")]
    # float32 in the event file: equal to the record to float32 precision.
    assert [s for s, _ in losses] == [1, 2, 3, 4]
    assert [v for _, v in losses] == pytest.approx([r["loss"] for r in RECORDS], rel=1e-6)
