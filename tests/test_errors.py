"""Bad input ends in one line `hybrids: error: ...` and a non-zero exit, never a traceback (issue 8).

Config values, YAML files, study files and keys, report options and storage URLs; each case asserts the
exit code and the exact line. Checkpoints, read-only folders and interrupts are in test_errors_runs.py.
"""

import sys

import pytest
import torch

from hybrids.cli import main


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(("override", "message"), [
    ("optim.lr=-1", "optim.lr must be a number > 0, got -1.0"),
    ("optim.lr=abc", "optim.lr: Value 'abc' of type 'str' could not be converted to Float"),
    ("optim.betas=[2,3]", "optim.betas must be two numbers in [0, 1), got [2.0, 3.0]"),
    ("optim.betas=[0.9]", "optim.betas must be two numbers in [0, 1), got [0.9]"),
    ("optim.weight_decay=-0.1", "optim.weight_decay must be a number >= 0 (0 turns it off), got -0.1"),
    ("optim.grad_clip=-1", "optim.grad_clip must be a number >= 0 (0 turns it off), got -1.0"),
    ("trainer.accelerator=tpu", "trainer.accelerator must be one of auto, cpu, gpu, cuda, mps, got 'tpu'"),
    ("trainer.val_batches=0", "trainer.val_batches must be positive, got 0"),
    ("trainer.strategy=deepspeed", "trainer.strategy must be one of auto, ddp, fsdp, got 'deepspeed'"),
    ("trainer.devices=0", "trainer.devices must be positive, got 0"),
    ("trainer.num_nodes=0", "trainer.num_nodes must be positive, got 0"),
    ("trainer.devices=3", "trainer.batch_size = 32 (the global batch) must be a multiple of trainer.devices x "
                          "trainer.num_nodes = 3"),
    ("trainer.max_steps=abc", "trainer.max_steps: Value 'abc' of type 'str' could not be converted to Integer"),
    ("schedule.warmup_steps=-1", "schedule.warmup_steps must be an integer >= 0, got -1"),
    ("schedule.min_lr_ratio=2", "schedule.min_lr_ratio must be a number in [0, 1], got 2.0"),
    ("schedule.name=cosinus", "unknown schedule.name 'cosinus'; valid: cosine, wsd, constant, linear, step, exp, "
                              "two_phase"),
])
def test_bad_train_values_name_the_full_key(override, message, capsys):
    assert main(["train", "trainer.max_steps=5", override, "--cfg", "job"]) == 2
    assert one_line(capsys) == f"hybrids: error: {message}"


def test_fsdp_needs_the_last_validation_inside_training(capsys):
    assert main(["train", "trainer.strategy=fsdp", "trainer.max_steps=30", "trainer.val_every=20", "--cfg", "job"]) == 2
    assert one_line(capsys) == ("hybrids: error: trainer.strategy=fsdp needs trainer.val_every (20) to divide "
                                "trainer.max_steps (30): the final validation runs inside training")


def test_schedule_errors_found_at_run_time_name_the_full_key(tmp_path, capsys):
    code = main(["train", f"run.dir={tmp_path}", "tracking.enabled=false", "trainer.max_steps=5",
                 "schedule.warmup_steps=9"])
    assert code == 2
    assert one_line(capsys) == "hybrids: error: schedule.warmup_steps must be in [0, 4] (total_steps = 5), got 9"
    assert not (tmp_path / "train").exists()


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text('layout: "6M:A*\nd_model: [1,\n')
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "folder.yaml").mkdir()
    (tmp_path / "folder").mkdir()
    return tmp_path


@pytest.mark.parametrize(("source", "message"), [
    ("bad.yaml", "model config file bad.yaml is not valid YAML at line 3, column 1: found unexpected end of stream"),
    ("list.yaml", "model config file list.yaml must hold a mapping of keys, got a list"),
    ("empty.yaml", "the model config needs a layout"),
    ("folder.yaml", "folder.yaml is a directory; expected a model config YAML file"),
    ("folder", "folder is a directory; expected a model config YAML file"),
    ("nope.yaml", "no such model config file: nope.yaml"),
])
def test_info_on_a_bad_file(files, source, message, capsys):
    assert main(["info", source]) == 2
    assert one_line(capsys) == f"hybrids: error: {message}"


def _sweep_error(capsys, *argv) -> str:
    assert main(["sweep", *argv]) == 2
    err = capsys.readouterr()
    assert "Traceback" not in err.err and len(err.err.strip().splitlines()) == 1, err.err
    return err.err.strip()


@pytest.mark.parametrize(("source", "message"), [
    ("bad.yaml", "study file bad.yaml is not valid YAML at line 3, column 1: found unexpected end of stream"),
    ("list.yaml", "study file list.yaml must hold a mapping of keys, got a list"),
    ("empty.yaml", "study 'empty' has an empty search space: give 'space' at least one key, "
                   "e.g. space: {model.layout: {choices: [M, '2M:A*']}}"),
    ("folder.yaml", "folder.yaml is a directory; expected a study YAML file"),
    ("folder", "folder is a directory; expected a study YAML file"),
])
def test_sweep_on_a_bad_study_file(files, source, message, capsys):
    assert _sweep_error(capsys, f"study={source}") == f"hybrids: error: {message}"
    assert not (files / "runs").exists()


@pytest.mark.parametrize(("override", "message"), [
    ("workers=two", "workers must be an integer, got 'two'"),
    ("n_trials=0", "n_trials must be an integer >= 1 (or left out: the grid's size), got 0"),
    ("n_trials=-3", "n_trials must be an integer >= 1 (or left out: the grid's size), got -3"),
    ("n_trials=2.5", "n_trials must be an integer, got 2.5"),
    ("grace_period=-1", "grace_period must be a number of seconds > heartbeat_interval = 5.0 "
                        "(else a live trial looks stale), got -1"),
    ("heartbeat_interval=-2", "heartbeat_interval must be a number of seconds > 0, got -2"),
    ("max_retry=-1", "max_retry must be an integer >= 0, got -1"),
    ("stop_after=0", "stop_after must be a number of seconds > 0, got 0"),
    ("stop_after=soon", "stop_after must be a number, got 'soon'"),
    ("seeds=[]", "seeds must list at least one seed, e.g. seeds=[0]"),
    ("seeds=[a]", "seeds must be a list of integers, got ['a']"),
    ("storage=5", "storage must be a string, got 5"),
    ("n_trials=[", "value of 'n_trials' is not valid YAML: '['"),
    ("sampler=bayes", "sampler must be one of grid, tpe, random, got 'bayes'"),
    ("storage=sqlite:///runs/one.db tracking_uri=sqlite:///runs/one.db",
     "storage and tracking_uri name the same database (sqlite:///runs/one.db): Optuna and MLflow each need their own "
     "(both keep an alembic_version table)"),
    ("devices=1", "devices must be a non-empty list of GPU indices, e.g. [0, 1], got 1"),
    ("devices=[-1]", "devices must be a non-empty list of GPU indices, e.g. [0, 1], got [-1]"),
])
def test_bad_study_values(files, override, message, capsys):
    assert _sweep_error(capsys, "study=attention-spacing", *override.split()) == f"hybrids: error: {message}"
    assert not (files / "runs").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a GPU")
def test_a_sweep_on_gpus_this_machine_lacks_is_one_line(files, capsys):
    line = _sweep_error(capsys, "study=attention-spacing", "devices=[0,1]", "workers=2")
    assert line == "hybrids: error: devices=[0, 1] names GPUs, but this machine has no CUDA GPU; leave devices out"
    assert not (files / "runs").exists()


def test_unknown_study_key_lists_the_valid_ones(files, capsys):
    line = _sweep_error(capsys, "study=attention-spacing", "n_trial=2")
    assert line.startswith("hybrids: error: unknown study key 'n_trial'; valid: artifacts, devices, direction, "
                           "eval, grace_period")


def study_text(metric="val/accuracy", layout="2M", train="model=mamba-tiny, trainer.max_steps=40"):
    return f"metric: {metric}\nn_trials: 2\ntrain: [{train}]\nspace: {{model.layout: {{choices: [M, '{layout}']}}}}\n"


@pytest.mark.parametrize(("study", "message"), [
    (study_text(metric="val/acuracy"),
     "study s, trial model.layout=M: metric 'val/acuracy' is not logged by task 'mqar'; it logs train/accuracy, "
     "train/loss, val/accuracy, val/loss"),
    (study_text(layout="2M:X*"),
     "study s, trial model.layout=2M:X*: unknown block symbol 'X'; valid: M (mamba), M2 (mamba2), A (attention), "
     "F (mlp), E (moe), S (shared_attention), W (sliding_attention), P (parallel), G (gated_deltanet), H (hyena)"),
    (study_text(train="model=mamba-tiny, trainer.max_steps=4, schedule.warmup_steps=7"),
     "study s, trial model.layout=M: schedule.warmup_steps must be in [0, 3] (total_steps = 4), got 7"),
    (study_text(train="model=mamba-tiny, task.vocab_size=4096"),
     "study s, trial model.layout=M: model.vocab_size = 320 is smaller than the task's vocabulary (4096); "
     "set model.vocab_size=4096"),
    (study_text(train="model=mamba-tiny, schedule=two_phase, '+phase2_task={name: mqar, seq_len: 32}'"),
     "study s, trial model.layout=M: phase2_task must have the same seq_len as task (32 != 64)"),
])
def test_a_bad_study_is_rejected_before_any_trial_trains(files, study, message, capsys):
    (files / "s.yaml").write_text(study)
    assert main(["sweep", "study=s.yaml"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.splitlines()[0] == f"hybrids: error: {message}"
    assert not (files / "runs").exists()  # no storage, no MLflow store, no trial folder


@pytest.mark.parametrize(("options", "message"), [
    (["study=x", "stuff"], "unknown report option 'stuff'; usage: hybrids report study=<name> [with=<study>,...] "
                           "[storage=URL] [out=DIR] [mlflow=false]"),
    (["study=x", "output=r"], "unknown report option 'output=r'; usage: hybrids report study=<name> "
                              "[with=<study>,...] [storage=URL] [out=DIR] [mlflow=false]"),
    (["storage=x.db"], "name the study: hybrids report study=<name> [with=<study>,...] [storage=URL] [out=DIR] "
                       "[mlflow=false]"),
    (["study=x", "mlflow=no"], "mlflow must be true or false, got 'no'"),
])
def test_report_rejects_unknown_options(files, options, message, capsys):
    assert main(["report", *options]) == 2
    assert one_line(capsys) == f"hybrids: error: {message}"


def test_postgres_url_without_a_driver_names_the_extra(monkeypatch, capsys):
    for module in ("psycopg", "psycopg2"):
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    assert main(["report", "study=x", "storage=postgresql://u:p@127.0.0.1:1/db"]) == 2
    assert one_line(capsys) == ("hybrids: error: cannot open study storage 'postgresql://u:***@127.0.0.1:1/db': no "
                                "database driver for postgresql is installed; pip install 'hybrids[postgres]' "
                                "(psycopg 3, the default driver of postgresql:// URLs from SQLAlchemy 2.1)")


def test_more_devices_than_the_machine_has_writes_nothing(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert main(["train", f"run.dir={tmp_path}/train", "tracking.enabled=false", "trainer.devices=4"]) == 2
    assert one_line(capsys) == ("hybrids: error: trainer.devices = 4 but this machine has 2 CPU core(s) (one process "
                                "each); set trainer.devices=2 or fewer")
    assert main(["train", f"run.dir={tmp_path}/train", "tracking.enabled=false", "trainer.devices=2",
                 "trainer.accelerator=gpu"]) == 2
    assert one_line(capsys) == ("hybrids: error: trainer.devices = 2 but this machine has 0 CUDA GPU(s); set "
                                "trainer.devices=1 or fewer")
    assert main(["train", f"run.dir={tmp_path}/train", "tracking.enabled=false", "trainer.strategy=fsdp"]) == 2
    assert one_line(capsys) == ("hybrids: error: trainer.strategy=fsdp needs CUDA GPUs (Lightning's FSDP runs on GPUs "
                                "only); use trainer.strategy=ddp on CPU")
    assert list(tmp_path.iterdir()) == []


def _sweep_storage(tmp_path, storage):
    return ["sweep", "study=attention-spacing", f"storage={storage}", "workers=2", f"runs_dir={tmp_path}/sweeps",
            f"tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"artifacts={tmp_path}/artifacts"]


def test_unreachable_storage_url_is_one_line_and_writes_nothing(tmp_path, capsys):
    pytest.importorskip("psycopg")
    assert main(_sweep_storage(tmp_path, "postgresql+psycopg://u:secret@127.0.0.1:1/db")) == 2
    line = one_line(capsys)
    assert line.startswith("hybrids: error: cannot open study storage 'postgresql+psycopg://u:***@127.0.0.1:1/db': "
                           "(psycopg.OperationalError) connection failed: ") and "secret" not in line
    assert list(tmp_path.iterdir()) == []


def test_wrong_postgres_password_is_one_line_and_writes_nothing(tmp_path, capsys, postgres):
    from sqlalchemy.engine import make_url

    wrong = make_url(postgres).set(password="wrong").render_as_string(hide_password=False)
    assert main(_sweep_storage(tmp_path, wrong)) == 2
    line = one_line(capsys)
    assert line.startswith(f"hybrids: error: cannot open study storage "
                           f"'{make_url(wrong).render_as_string(hide_password=True)}': ")
    assert line.endswith('password authentication failed for user "hybrids"') and "wrong" not in line
    assert list(tmp_path.iterdir()) == []
