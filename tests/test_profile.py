"""`hybrids profile`: allocated cache bytes equal the accounting's prediction; the CSV; bad input in one line."""

import csv
import json

import pytest

from hybrids.cli import main
from hybrids.profile import COLUMNS, profile

SMALL = ["--seq-lens", "8", "16", "--batches", "1", "2", "--decode-tokens", "2", "--repeats", "1"]


@pytest.mark.parametrize("source", ["zamba-tiny", "zamba2-tiny", "mamba-tiny", "llama-tiny", "jamba-tiny"])
def test_measured_cache_bytes_equal_the_prediction(source, one_thread):
    rows = profile([source], [8, 16], [1, 3], decode_tokens=2, repeats=1, match=None)
    assert [(r["seq_len"], r["batch"]) for r in rows] == [(8, 1), (8, 3), (16, 1), (16, 3)]
    for r in rows:
        assert r["measured_bytes"] == r["predicted_bytes"] > 0 and r["ratio"] == 1.0
        assert r["prefill_ms"] > 0 and r["decode_ms_per_token"] > 0 and r["train_ms"] > 0
        assert r["train_tokens_per_s"] == pytest.approx(1e3 * r["batch"] * r["seq_len"] / r["train_ms"], rel=1e-3)
        assert r["prefill_peak_gib"] is None and r["train_peak_gib"] is None  # measured on CUDA only
    by = {(r["seq_len"], r["batch"]): r for r in rows}
    assert by[(8, 3)]["measured_bytes"] == 3 * by[(8, 1)]["measured_bytes"]  # linear in the batch
    assert by[(16, 1)]["state_bytes"] == by[(8, 1)]["state_bytes"]  # recurrent state: flat in length
    assert by[(16, 1)]["kv_bytes"] == 2 * by[(8, 1)]["kv_bytes"]  # KV cache: linear in length


def test_zamba_tiny_kv_bytes_by_hand(one_thread):
    (row,) = profile(["zamba-tiny"], [16], [1], decode_tokens=2, repeats=1, match=None)
    # 2 shared invocations x (K, V) x 16 positions x attention width 2 x 64 (concatenated input) x 4 bytes (fp32)
    assert row["kv_bytes"] == 2 * 2 * 16 * 128 * 4 == 32_768


def test_cli_writes_the_csv_figures_json_and_an_mlflow_run(tmp_path, capsys, one_thread):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["profile", "mamba-tiny", "llama-tiny", *SMALL, "--out", str(tmp_path), "--tracking-uri", uri]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (tmp_path / "profile-latency.png").stat().st_size > 20_000
    run = MlflowClient(tracking_uri=uri).get_run(printed["mlflow_run_id"])
    assert run.data.params["models"] == "mamba-tiny llama-tiny" and run.data.params["seq_lens"] == "8 16"
    history = MlflowClient(tracking_uri=uri).get_metric_history(run.info.run_id, "llama-tiny.b2.train_ms")
    assert sorted(m.step for m in history) == [8, 16] and all(m.value > 0 for m in history)
    artifacts = {a.path for a in MlflowClient(tracking_uri=uri).list_artifacts(run.info.run_id)}
    assert artifacts == {"profile.csv", "profile.png", "profile-latency.png"}
    with open(tmp_path / "profile.csv") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == COLUMNS
    assert len(rows) == len(printed["rows"]) == 8 and (tmp_path / "profile.png").stat().st_size > 10_000
    params = {r["model"]: int(r["params"]) for r in rows}
    target = printed["rows"][0]["params"]  # matched to zamba-tiny by default: within 6%
    assert all(abs(p / params["mamba-tiny"] - 1) < 0.06 for p in params.values()) and target > 0
    assert {r["kv_bytes"] for r in rows if r["model"] == "mamba-tiny"} == {"0"}


@pytest.mark.parametrize(("argv", "message"), [
    (["mamba-tiny", "--set", "nope=1"], "nope"),
    (["--batches", "0"], "must be positive integers"),
    (["--seq-lens", "2", "--decode-tokens", "4"], "seq_len must exceed decode_tokens = 4"),
    (["--device", "cuda:7"], "CUDA is not available"),
])
def test_bad_input_fails_in_one_line(argv, message, tmp_path, capsys, one_thread, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(["profile", *argv, "--match", "none", "--repeats", "1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_tracking_uri_without_mlflow_fails_before_measuring(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    monkeypatch.setattr("hybrids.profile.profile", lambda *a, **k: pytest.fail("measured before the check"))
    assert main(["profile", "--out", str(tmp_path), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]) == 2
    err = capsys.readouterr().err
    assert "--tracking-uri needs MLflow" in err and err.count("\n") == 1
    assert not any(tmp_path.iterdir())


def test_memory_latency_benchmark_runs_the_five_models_at_matched_params(tmp_path, capsys, one_thread):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_latency.py"
    spec = importlib.util.spec_from_file_location("memory_latency", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.run(["--out", str(tmp_path), "--seq-lens", "8", "--batches", "1", "--decode-tokens", "2",
                      "--repeats", "1"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["model"] for r in rows] == bench.MODELS
    params = [r["params"] for r in rows]
    # the nearest widths the blocks accept (Mamba2 heads of 16 channels, 4 attention heads): within 8% of zamba-tiny
    assert all(abs(p / rows[3]["params"] - 1) < 0.08 for p in params) and all(r["ratio"] == 1.0 for r in rows)
