"""Workers claim queued trials only: never one trial twice, never a trial beyond the study's target; one retry per
failed trial however many workers recover it; an RDB outage is waited out in one line."""

import time

import optuna
import pytest
from optuna.exceptions import StorageInternalError
from optuna.trial import TrialState
from sqlalchemy.exc import OperationalError

import search.storage
from blocks import ConfigError
from search.patience import PatientStorage
from search.runner import _queue
from search.storage import HEARTBEAT, RETRY_OF, open_storage, recover, requeue_orphans, retry
from search.study_config import load_study
from search.worker import claim, sampler_seed


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


def _stale_trial(tmp_path):
    storage, (a, b) = journal_study(tmp_path)
    a.enqueue_trial({"x": 1})
    trial = claim(a, storage, target=1)
    storage.set_trial_system_attr(trial._trial_id, HEARTBEAT, time.time() - 100)  # its worker died 100 s ago
    return storage, a, b


def test_two_workers_recovering_one_stale_trial_queue_one_retry(tmp_path, monkeypatch):
    _, a, b = _stale_trial(tmp_path)
    seen_by_b = b.get_trials()  # b read the trial as RUNNING before a failed it: both try to fail it
    assert recover(a, grace_period=30, max_retry=2) == {"stale": [0], "requeued": [0]}
    monkeypatch.setattr(b, "get_trials", lambda **kwargs: [t for t in seen_by_b if t.state in kwargs["states"]])
    assert recover(b, grace_period=30, max_retry=2) == {"stale": [], "requeued": []}
    trials = a.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert trials[1].user_attrs == {RETRY_OF: 0} and trials[1].system_attrs["fixed_params"] == {"x": 1}


def test_a_stale_stamp_counts_from_when_the_storage_came_back(tmp_path, monkeypatch):
    _, a, _ = _stale_trial(tmp_path)
    monkeypatch.setattr(search.storage, "reachable_since", lambda storage: time.time() - 10)  # an outage ended
    assert recover(a, grace_period=30, max_retry=2) == {"stale": [], "requeued": []}
    assert recover(a, grace_period=5, max_retry=2) == {"stale": [0], "requeued": [0]}


def test_retries_stop_at_max_retry_and_never_for_a_diverged_run(tmp_path):
    storage, (a, _) = journal_study(tmp_path)
    a.enqueue_trial({"x": 1})
    a.tell(claim(a, storage, target=1), state=TrialState.FAIL)
    assert retry(a, 0, max_retry=1)
    a.tell(claim(a, storage, target=1), state=TrialState.FAIL)
    assert not retry(a, 1, max_retry=1)  # trial 1 is the first retry of trial 0: the chain is at its limit
    a.enqueue_trial({"x": 2})
    diverged = claim(a, storage, target=1)
    diverged.set_user_attr("no_retry", True)
    a.tell(diverged, state=TrialState.FAIL)
    assert not retry(a, 2, max_retry=1)
    assert sampler_seed() != sampler_seed()


def test_a_failure_whose_retry_was_never_queued_is_retried_once_at_the_next_start(tmp_path):
    """A worker SIGKILLed between recording its trial as failed and queuing the retry leaves an orphan."""
    storage, (a, _) = journal_study(tmp_path)
    for x in (1, 2):
        a.enqueue_trial({"x": x})
        a.tell(claim(a, storage, target=2), state=TrialState.FAIL)
    assert retry(a, 1, max_retry=2)  # trial 1's worker queued its retry; trial 0's was killed first
    assert requeue_orphans(a, grace_period=60, max_retry=2) == []  # too recent: its worker may still queue it
    assert requeue_orphans(a, grace_period=0, max_retry=2) == [0]
    assert requeue_orphans(a, grace_period=0, max_retry=2) == []  # queued once
    waiting = a.get_trials(states=(TrialState.WAITING,))
    assert sorted(t.user_attrs[RETRY_OF] for t in waiting) == [0, 1]


class _Flaky:
    """An inner storage whose server is down for the first `down` calls."""

    def __init__(self, down: int):
        self.down = down

    def get_all_studies(self):
        if self.down:
            self.down -= 1
            raise StorageInternalError("commit failed") from OperationalError("select", {}, Exception(
                "connection failed: connection refused\nIs the server running?"))
        return ["study"]


def test_patient_storage_waits_out_an_outage_in_one_line(capsys):
    storage = PatientStorage(_Flaky(down=2), "postgresql://u:***@h/db", retry_every=0.01)
    assert storage.get_all_studies() == ["study"]
    assert storage.reachable_since > time.time() - 5
    assert capsys.readouterr().err.splitlines() == [
        "hybrids: storage unreachable (connection failed: connection refused), retrying in 0.01 s",
        "hybrids: storage reachable again after 0 s"]
    impatient = PatientStorage(_Flaky(down=1000), "postgresql://u:***@h/db", patience=0.05, retry_every=0.01)
    with pytest.raises(ConfigError, match=r"^study storage postgresql://u:\*\*\*@h/db unreachable for 0 s \(patience "
                                          r"0.05 s\): connection failed: connection refused$"):
        impatient.get_all_studies()
    broken = _Flaky(down=0)
    broken.get_all_studies = lambda: int("not about reaching the server")
    with pytest.raises(ValueError):  # any other error is raised at once
        PatientStorage(broken, "postgresql://u@h/db").get_all_studies()


def test_workers_take_the_study_s_gpus_round_robin():
    config, _ = load_study(["study=attention-spacing", "workers=3", "devices=[2,5]"])
    assert [config.device(i) for i in range(3)] == [2, 5, 2]
    assert load_study(["study=attention-spacing"])[0].device(0) is None


def test_a_sweep_whose_worker_stopped_early_exits_non_zero(monkeypatch, capsys):
    import search.runner
    from hybrids.cli import main
    from search.identity import StudyIdentity

    done = {"done": 3, "complete": 3, "pruned": 0, "fail": 1}
    monkeypatch.setattr(search.runner, "run_study", lambda config, extra: {
        "counts": done, "recovered": {}, "queued": 0, "storage": "journal:j", "status": "FAILED",
        "study": StudyIdentity("attention-spacing", 0, "u")})
    assert main(["sweep", "study=attention-spacing", "workers=2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["hybrids: error: the sweep ended FAILED: a worker stopped early (its error is above); finished "
                   "trials are kept, run the same command again to go on"]
