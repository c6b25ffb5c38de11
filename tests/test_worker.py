"""Workers claim queued trials only: never one trial twice, never a trial beyond the study's target."""

import optuna
from optuna.trial import TrialState

from search.runner import _queue
from search.storage import open_storage
from search.study_config import load_study
from search.worker import claim


def journal_study(tmp_path, name="s"):
    storage = open_storage(f"journal:{tmp_path}/optuna.journal")
    optuna.create_study(study_name=name, storage=storage, direction="maximize")
    return storage, [optuna.load_study(study_name=name, storage=storage) for _ in range(2)]


def test_two_workers_cannot_claim_one_queued_trial_and_create_none(tmp_path):
    storage, (a, b) = journal_study(tmp_path)
    a.enqueue_trial({"x": 1})
    first = claim(a, storage, target=1)
    assert first is not None and first.number == 0
    assert claim(b, storage, target=1) is None  # the other worker finds nothing queued: it stops
    assert [t.state for t in b.get_trials()] == [TrialState.RUNNING]
    b.tell(first, 1.0)
    assert claim(b, storage, target=1) is None


def test_claim_stops_at_the_target_even_with_trials_queued(tmp_path):
    storage, (a, _) = journal_study(tmp_path)
    for x in range(3):
        a.enqueue_trial({"x": x})
    a.tell(claim(a, storage, target=1), 1.0)
    assert claim(a, storage, target=1) is None
    assert [t.state for t in a.get_trials()] == [TrialState.COMPLETE, TrialState.WAITING, TrialState.WAITING]


def test_queue_fills_a_sampled_study_up_to_its_target_once(tmp_path):
    config, _ = load_study(["study=attention-spacing", "sampler=random", "n_trials=3"])
    storage, (a, b) = journal_study(tmp_path)
    assert _queue(config, a) == 3
    assert _queue(config, b) == 0  # a second start (a top-up, another machine) queues nothing more
    trial = claim(b, storage, target=3)
    assert trial.suggest_float("lr", 1e-4, 1e-2, log=True) > 0  # an empty queued trial is filled by the sampler
    b.tell(trial, 0.5)
    assert [t.state for t in a.get_trials()].count(TrialState.WAITING) == 2
