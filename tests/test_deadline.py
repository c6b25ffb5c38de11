"""stop_after: a worker starts only trials expected to end before the deadline (the longest wall time of finished
trials at the same point apart from lr, weight decay and seed; for a point like none finished, the study's longest
trial); a sweep past its deadline ends without killing."""

import datetime
import time

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from hybrids.cli import main
from search.deadline import expected_seconds, fits_before
from search.storage import open_storage
from search.worker import claim
from tests.test_sweep import FAST, args, load

LAYOUTS = CategoricalDistribution(["A", "M", "G"])
LRS = CategoricalDistribution([1e-3, 1e-2])


def finished(study, layout, lr, seconds):
    start = datetime.datetime(2026, 11, 30, 12, 0, 0)
    trial = optuna.trial.create_trial(params={"model.layout": layout, "optim.lr": lr},
                                      distributions={"model.layout": LAYOUTS, "optim.lr": LRS}, value=0.5)
    trial.datetime_start, trial.datetime_complete = start, start + datetime.timedelta(seconds=seconds)
    study.add_trial(trial)


def test_only_trials_expected_to_end_in_time_are_claimed(tmp_path):
    storage = open_storage(f"journal:{tmp_path}/optuna.journal")
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    for layout, lr, seconds in (("A", 1e-3, 8), ("A", 1e-2, 12), ("A", 1e-2, 10), ("M", 1e-3, 40)):
        finished(study, layout, lr, seconds)
    assert expected_seconds(study) == {(("model.layout", "A"),): 12, (("model.layout", "M"),): 40}
    for layout in ("M", "A", "G"):  # M is queued first
        study.enqueue_trial({"model.layout": layout, "optim.lr": 1e-2})
    queued = study.get_trials(states=(TrialState.WAITING,))
    waiting = {t.system_attrs["fixed_params"]["model.layout"]: t for t in queued}

    fits = fits_before(study, time.time() + 30)
    assert [fits(waiting[k]) for k in ("A", "M", "G")] == [True, False, False]  # G: like none finished, M's 40 s
    assert [fits_before(study, time.time() + 50)(waiting[k]) for k in ("A", "M", "G")] == [True, True, True]
    assert claim(study, storage, target=10, fits=fits).params == {}  # params come when the trial suggests them
    claimed = [t for t in study.get_trials() if t.state == TrialState.RUNNING]
    assert [t.system_attrs["fixed_params"]["model.layout"] for t in claimed] == ["A"]  # M skipped

    past = fits_before(study, time.time() - 1)
    assert not any(past(t) for t in waiting.values())
    assert claim(study, storage, target=10, fits=past) is None
    assert fits_before(study, None)(waiting["M"])  # no deadline: everything fits


def test_a_sweep_past_its_deadline_ends_cleanly_and_a_rerun_goes_on(tmp_path, capsys):
    one = ["n_trials=3", "seeds=[0]", "lr_grid=[0.003]", *FAST]
    assert main(["sweep", *args(tmp_path, *one, "stop_after=0.5")]) == 0  # the first trial starts: time was left
    out = capsys.readouterr().out
    assert "stops: no queued trial is expected to end within stop_after = 0.5 s" in out
    states = [t.state for t in load(tmp_path).get_trials()]
    assert states == [TrialState.COMPLETE, TrialState.WAITING, TrialState.WAITING]
    assert main(["sweep", *args(tmp_path, *one)]) == 0  # stop_after is no part of the study: the same one goes on
    assert [t.state for t in load(tmp_path).get_trials()] == [TrialState.COMPLETE] * 3
    assert "started version" not in capsys.readouterr().out
