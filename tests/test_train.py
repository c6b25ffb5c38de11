"""End-to-end training on CPU: learning, exact resume, NaN stop, config errors, two-phase curves, MLflow."""

import csv
import json

import lightning as L
import pytest
import torch

from hybrids.cli import main
from hybrids.training.config import compose
from hybrids.training.run import train

QUICK = ["schedule.warmup_steps=2", "task.num_kv_pairs=4", "task.seq_len=32", "task.vocab_size=64",
         "trainer.batch_size=16", "trainer.progress_bar=false", "trainer.log_every=1"]


def config(tmp_path, *overrides, tracking=False):
    return compose([f"run.dir={tmp_path}/train", f"tracking.enabled={str(tracking).lower()}",
                    f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.artifacts={tmp_path}/artifacts",
                    *QUICK, *overrides])


def metric_rows(run_dir, key):
    """{step: value} over every attempt's metrics.csv, later attempts winning."""
    rows = {}
    for path in sorted((run_dir / "csv").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:])):
        with open(path) as f:
            rows.update({int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)})
    return rows


def test_short_mqar_run_learns(tmp_path):
    # chance is 1/31 (the value range of a 64-token vocabulary): 0.2 needs real in-context recall
    result = train(config(tmp_path, "model=llama-tiny", "trainer.batch_size=64", "trainer.max_steps=250",
                          "trainer.val_every=125", "optim.lr=3e-3", "schedule.warmup_steps=10"))
    assert result.steps == 250 and result.stop_reason is None
    assert result.metrics["val/accuracy"] > 0.2, result.metrics
    assert (result.run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (result.run_dir / "checkpoints" / "best.ckpt").is_file()
    assert (result.run_dir / "layout.txt").read_text().startswith("4A+F")


class Crash(L.Callback):
    def __init__(self, at_step):
        self.at_step = at_step

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.at_step:
            raise RuntimeError("simulated crash")


def test_killed_run_resumes_with_the_same_loss_curve(tmp_path):
    common = ["trainer.max_steps=16", "trainer.ckpt_every=5", "trainer.val_every=100"]
    whole = train(config(tmp_path / "a", *common))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config(tmp_path / "b", *common), callbacks=[Crash(12)])
    resumed = train(config(tmp_path / "b", *common))
    assert resumed.resumed_from.endswith("last.ckpt") and resumed.steps == 16
    a, b = metric_rows(whole.run_dir, "train/loss"), metric_rows(resumed.run_dir, "train/loss")
    assert sorted(b) == list(range(16)) or set(range(10, 16)) <= set(b)
    for step in range(10, 16):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), step


class Poison(L.Callback):
    def on_train_batch_start(self, trainer, module, *args):
        if trainer.global_step == 3:
            with torch.no_grad():
                next(module.model.parameters()).fill_(float("nan"))


def test_non_finite_loss_stops_the_run_and_records_why(tmp_path):
    result = train(config(tmp_path, "trainer.max_steps=20", "trainer.val_every=100"), callbacks=[Poison()])
    assert result.stop_reason == "non-finite loss nan at step 3"
    assert result.steps <= 4  # the step that saw the NaN skipped its update; the run ends there
    assert json.loads((result.run_dir / "stopped.json").read_text())["reason"] == result.stop_reason


@pytest.mark.parametrize(
    "override,message",
    [
        ("trainer.max_stepz=3", "max_stepz"),
        ("trainer.precision=fp8", "trainer.precision must be one of"),
        ("model=no-such-model", "no-such-model"),
        ("task.num_kv_pairz=3", "num_kv_pairz"),
        ("model.d_model=abc", "d_model"),
    ],
)
def test_config_errors_name_the_bad_key(tmp_path, override, message, capsys):
    code = main(["train", f"run.dir={tmp_path}", "tracking.enabled=false", override])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) <= 3


def test_cfg_job_prints_the_resolved_config(capsys):
    assert main(["train", "model=mamba-tiny", "trainer.max_steps=7", "--cfg", "job"]) == 0
    out = capsys.readouterr().out
    assert "layout: M\n" in out and "max_steps: 7" in out and "name: mqar" in out


def test_two_phase_schedule_lr_and_mix_are_logged_at_known_steps(tmp_path):
    cfg = config(tmp_path, "schedule=two_phase", "trainer.max_steps=40", "trainer.val_every=100",
                 "schedule.warmup_steps=4", "schedule.phase2_start=0.75", "schedule.rewarm_steps=4",
                 "schedule.rewarm_ratio=0.5", "schedule.replay_fraction=0.25", "optim.lr=0.01",
                 "+phase2_task={name: mqar, num_kv_pairs: 6, seq_len: 32, vocab_size: 64, seed: 1}")
    result = train(cfg)
    lr, mix = metric_rows(result.run_dir, "lr"), metric_rows(result.run_dir, "data/phase2_fraction")
    assert mix[29] == 0.0 and mix[30] == pytest.approx(0.75) and mix[39] == pytest.approx(0.75)
    assert lr[34] == pytest.approx(0.01 * 0.5, rel=1e-6)  # re-warm reaches rewarm_ratio * peak
    assert lr[39] < lr[34]


def test_mlflow_run_has_params_metrics_and_config_artifact(tmp_path):
    from mlflow import MlflowClient

    result = train(config(tmp_path, "trainer.max_steps=6", "trainer.val_every=3", tracking=True))
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(result.mlflow_run_id)
    assert run.data.params["model.layout"] == "2M:A*" and run.data.params["layout.resolved"] == "(2M:A*)x2:2M"
    assert int(run.data.params["stats.params_unique"]) == sum(p.numel() for p in
                                                              __import__("hybrids").model.build("zamba-tiny").parameters())
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert len(history) == 6 and "val/accuracy" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "layout.txt"} <= artifacts


def test_rerun_of_a_finished_run_still_reports_its_metrics(tmp_path):
    cfg = config(tmp_path, "trainer.max_steps=6", "trainer.val_every=100", "trainer.ckpt_every=3")
    first = train(cfg)
    again = train(cfg)  # resumes at max_steps: no step runs, the metrics come from a validation pass
    assert again.resumed_from is not None and again.steps == 6
    assert again.metrics["val/accuracy"] == pytest.approx(first.metrics["val/accuracy"])


def test_mfu_is_logged_from_the_share_aware_flop_count_where_the_peak_is_known(tmp_path, monkeypatch):
    """On a GPU of known peak (here: CPU with a patched 1 TFLOP/s peak), perf/mfu = tokens/s x training FLOPs
    per token (shared blocks at every invocation) / peak."""
    from hybrids import accounting

    monkeypatch.setattr(accounting, "peak_flops", lambda device: 1e12)
    result = train(config(tmp_path, "trainer.max_steps=4", "trainer.val_every=100"))
    rate, mfu = metric_rows(result.run_dir, "perf/tokens_per_s"), metric_rows(result.run_dir, "perf/mfu")
    flops = accounting.stats("zamba-tiny", seq_len=32).flops_training
    assert set(mfu) == set(rate) and len(mfu) >= 2
    assert all(mfu[s] == pytest.approx(rate[s] * flops / 1e12, rel=1e-4) for s in mfu)


def test_compile_mode_reaches_torch_compile_and_is_no_part_of_a_run(monkeypatch):
    """trainer.compile_mode (reduce-overhead: CUDA graphs) goes to torch.compile; like fused_ce it changes speed,
    not results, so a run's name (and a study's fingerprint) ignores it."""
    from hybrids.training.config import run_name, scored, to_dict
    from hybrids.training.run import prepare

    seen = {}
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: seen.update(kwargs) or model)
    common = ["model=zamba2-tiny", "task=mqar", "tracking.enabled=false", "trainer.compile=true"]
    graphs = compose([*common, "trainer.compile_mode=reduce-overhead"])
    prepare(graphs)
    assert seen == {"mode": "reduce-overhead"}
    plain = compose(common)
    assert run_name(graphs) == run_name(plain) and scored(to_dict(graphs)) == scored(to_dict(plain))
    with pytest.raises(Exception, match="trainer.compile_mode must be one of default, reduce-overhead"):
        compose([*common, "trainer.compile_mode=fastest"])


class OptimizerKind(L.Callback):
    fused = None

    def on_train_start(self, trainer, *_):
        self.fused = trainer.optimizers[0].defaults.get("fused")


def test_a_fused_adamw_clips_under_mixed_precision(tmp_path, monkeypatch):
    """The fused AdamW (the default on CUDA) under bf16-mixed, here on CPU: Lightning's precision plugin refuses to
    clip for a fused optimizer, so the module clips itself, and the loss curve is the unfused optimizer's."""
    from hybrids.training.module import LitHybrid

    common = ["trainer.max_steps=5", "trainer.val_every=100", "trainer.precision=bf16-mixed", "optim.grad_clip=0.05"]
    plain = train(config(tmp_path / "plain", *common))
    unclipped = train(config(tmp_path / "unclipped", *common, "optim.grad_clip=0"))
    monkeypatch.setattr(LitHybrid, "_fused_adamw", lambda self: True)
    kind = OptimizerKind()
    fused = train(config(tmp_path / "fused", *common), callbacks=[kind])
    assert kind.fused is True and fused.steps == 5
    a, b, c = (metric_rows(r.run_dir, "train/loss") for r in (plain, fused, unclipped))
    assert max(abs(a[s] - b[s]) for s in a) < 1e-3, (a, b)
    assert abs(a[4] - c[4]) > 10 * max(abs(a[s] - b[s]) for s in a), (a, c)  # the clip acts
