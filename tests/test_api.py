"""The top-level Python API: light to import, every name resolves, meta builds, override lists."""

import subprocess
import sys

import pytest
import torch

import hybrids
from blocks import ConfigError

HEAVY = ("lightning", "optuna", "mlflow", "hydra", "transformers")


def test_import_hybrids_loads_no_training_or_sweep_stack():
    code = f"import sys, hybrids; print([m for m in {HEAVY!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_public_name_resolves_to_its_definition():
    from analysis.frames import study_frame
    from hybrids import accounting, config, layout, model, save
    from hybrids.hf import interop as hf_interop
    from hybrids.training.run import train
    from search.runner import run_study

    expected = {
        "build": model.build, "HybridLM": model.HybridLM, "load_config": config.load_config,
        "ModelConfig": config.ModelConfig, "parse_layout": layout.parse_layout, "from_hf": hf_interop.from_hf,
        "to_hf": hf_interop.to_hf, "stats": accounting.stats, "Stats": accounting.Stats,
        "match_width": accounting.match_width, "from_pretrained": save.from_pretrained, "from_run": save.from_run,
        "train": train, "run_study": run_study, "study_frame": study_frame,
    }
    assert sorted(hybrids.__all__) == sorted(["__version__", *expected])
    for name, value in expected.items():
        assert getattr(hybrids, name) is value, name
        assert name in dir(hybrids)
    with pytest.raises(AttributeError, match="module 'hybrids' has no attribute 'nope'"):
        hybrids.nope  # noqa: B018


def test_the_api_builds_and_accounts():
    model = hybrids.build("zamba-tiny")
    assert isinstance(model, hybrids.HybridLM)
    assert str(hybrids.parse_layout("2M:A*", depth=6)) == str(model.layout)
    s = hybrids.stats("zamba-tiny")
    assert isinstance(s, hybrids.Stats) and s.params_unique == sum(p.numel() for p in model.parameters())
    assert hybrids.load_config("zamba-tiny", d_model=32).d_model == 32


def test_build_respects_the_callers_device_context():
    with torch.device("meta"):
        model = hybrids.build("zamba-7b")
    params = list(model.parameters())
    assert all(p.is_meta for p in params)
    assert sum(p.numel() for p in params) == 7_232_490_496
    assert all(p.device.type == "cpu" for p in hybrids.build("zamba-tiny").parameters())
    assert all(p.is_meta for p in hybrids.build("zamba2-2.7b", device="meta").parameters())


def test_train_takes_hydra_overrides(tmp_path):
    result = hybrids.train(["model=llama-tiny", "task=mqar", "trainer.max_steps=2", "schedule.warmup_steps=1",
                            "trainer.val_every=2", "trainer.val_batches=1", "trainer.batch_size=4",
                            "trainer.progress_bar=false", "task.seq_len=32", "task.num_kv_pairs=2",
                            "tracking.enabled=false", f"run.dir={tmp_path}"])
    assert result.steps == 2 and result.run_dir.parent == tmp_path and "val/loss" in result.metrics


def test_train_and_run_study_refuse_a_bare_string():
    with pytest.raises(ConfigError, match="train takes a TrainConfig or a list of overrides, got the string 'model=x'"):
        hybrids.train("model=x")
    with pytest.raises(ConfigError, match="run_study takes a StudyConfig or a list of key=value overrides"):
        hybrids.run_study("study=annealing")


def test_run_study_reads_sweep_arguments():
    with pytest.raises(ConfigError, match="unknown study key 'bogus'"):
        hybrids.run_study(["study=annealing", "bogus=1"])
