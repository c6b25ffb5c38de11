"""Progress a log file can hold: periodic plain lines off a terminal, the trial lines of a sweep, no banners."""

import io
import re
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
from optuna.trial import TrialState

from hybrids.training.progress import ProgressLines, format_duration, format_rate, use_bar
from search.worker import Progress
from tests.test_train import config, metric_rows


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (59.4, "59s"), (65, "1m05s"), (3599, "59m59s"),
                                           (3725, "1h02m"), (float("nan"), "?")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize("rate, text", [(999.4, "999"), (41234.5, "41.2k"), (2.5e6, "2.5M"), (3e9, "3.0G")])
def test_format_rate(rate, text):
    assert format_rate(rate) == text


class Stream(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def test_bar_only_in_a_terminal_and_only_when_asked():
    assert use_bar(True, Stream(True)) is True
    assert use_bar(True, Stream(False)) is False
    assert use_bar(False, Stream(True)) is False


def test_lines_every_interval_with_loss_val_metrics_rate_and_eta(capsys):
    now = [100.0]
    cb = ProgressLines(max_steps=100, tokens_per_step=1000, every_s=10, label="trial-0003", clock=lambda: now[0])
    trainer = SimpleNamespace(global_step=0, callback_metrics={})
    cb.on_train_start(trainer, None)
    for t, step, metrics in [(102, 1, {"train/loss": 2.75}), (110, 5, {"train/loss": 2.5}),
                             (115, 10, {"train/loss": 2.4}),
                             (121, 12, {"train/loss": 2.25, "val/loss": 3.0, "val/accuracy": 0.125})]:
        now[0], trainer.global_step = t, step
        trainer.callback_metrics = {k: torch.tensor(v) for k, v in metrics.items()}
        cb.on_train_batch_end(trainer, None, None, None, step)
    # 5 steps x 1000 tokens in 10 s; 2 s a step for 95 more. Then 7 steps in 11 s; 21 s / 12 steps for 88 more.
    assert capsys.readouterr().out.splitlines() == [
        "trial-0003 step 5/100  loss 2.5000  500 tok/s  eta 3m10s",
        "trial-0003 step 12/100  loss 2.2500  val/accuracy 0.1250  val/loss 3.0000  636 tok/s  eta 2m34s",
    ]


def test_a_resumed_run_counts_rate_and_eta_from_its_own_start(capsys):
    now = [0.0]
    cb = ProgressLines(max_steps=60, tokens_per_step=10, every_s=0, clock=lambda: now[0])
    trainer = SimpleNamespace(global_step=50, callback_metrics={})
    cb.on_train_start(trainer, None)
    now[0], trainer.global_step = 4.0, 52
    cb.on_train_batch_end(trainer, None, None, None, 0)
    assert capsys.readouterr().out == "step 52/60  5 tok/s  eta 16s\n"


def test_training_off_a_terminal_prints_one_line_per_interval_and_no_bar(tmp_path, capsys):
    overrides = ["trainer.max_steps=4", "trainer.val_every=2", "trainer.progress_bar=true",
                 "trainer.progress_every_s=0"]
    result = __import__("hybrids.training.run").training.run.train(config(tmp_path, *overrides))
    out = capsys.readouterr().out  # pytest's capture is not a terminal: lines, not a bar
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["1/4", "2/4", "3/4", "4/4"]
    losses = metric_rows(result.run_dir, "train/loss")
    assert [float(line.split()[3]) for line in lines] == [pytest.approx(losses[s], abs=5e-5) for s in range(4)]
    assert "val/accuracy" not in lines[0] and "val/accuracy" in lines[2]
    assert all(re.search(r"  [\d.]+[kM]? tok/s  eta \d+s$", line) for line in lines), lines
    assert "Epoch" not in out and "\r" not in out


class Finished:
    """A study's finished trials, as far as the ETA reads them."""

    def __init__(self, *seconds):
        self.trials = [SimpleNamespace(duration=timedelta(seconds=s)) for s in seconds]

    def get_trials(self, deepcopy, states):
        assert states == (TrialState.COMPLETE, TrialState.PRUNED)
        return self.trials


def test_trial_eta_is_rounds_of_remaining_trials_times_mean_time():
    study = Finished(60, 120)
    counts = {"done": 2, "waiting": 3, "running": 1}
    assert Progress(5, workers=2).eta(study, counts) == "3 left, eta 3m00s"  # 3 x 90 s / 2 -> 2 rounds
    assert Progress(8, workers=1).eta(study, counts) == "4 left, eta 6m00s"  # only 4 more are queued or running
    assert Progress(3, workers=2).eta(study, counts) == "1 left, eta 1m30s"  # one round left
    assert Progress(2).eta(study, counts) == "0 left"
    assert Progress(4).eta(Finished(), {"done": 0, "waiting": 4}) == "4 left"
