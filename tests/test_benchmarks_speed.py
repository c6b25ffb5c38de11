"""The issue-10 benchmarks run on CPU at tiny sizes and print the JSON the docs' tables are filled from."""

import importlib
import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
pytest.importorskip("transformers")


def run(monkeypatch, capsys, name, argv):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # as `python benchmarks/<name>.py` finds reference_models
    assert importlib.import_module(name).main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_train_throughput_rows_on_cpu(monkeypatch, capsys, one_thread):
    out = run(monkeypatch, capsys, "train_throughput",
              ["--tiny", "--steps", "1", "--batch", "1", "--length", "16", "--rows", "ours_auto", "hf_llama",
               "--fused-ce", "true"])
    assert (out["device"], out["precision"], out["peak_flops"]) == ("cpu", "fp32", None)
    ours, hf = out["rows"]["ours_auto"], out["rows"]["hf_llama"]
    assert (ours["loss"], hf["loss"]) == ("fused", "hf")
    assert ours["tokens_per_s"] > 0 and hf["tokens_per_s"] > 0
    assert ours["peak_gib"] is None and ours["mfu"] is None


def test_decode_rows_on_cpu(monkeypatch, capsys, one_thread):
    out = run(monkeypatch, capsys, "decode", ["--tiny", "--prompts", "8", "--new-tokens", "3", "--repeats", "1",
                                              "--rows", "ours_llama"])
    assert sorted(out["rows"]) == ["ours_llama/dynamic", "ours_llama/static"]
    for row in out["rows"].values():
        assert row["8"]["ttft_s"] > 0 and set(row["8"]) == {"ttft_s", "tokens_per_s"}


def test_order_sensitivity_on_cpu_fp32_reorderings_agree(monkeypatch, capsys, one_thread):
    out = run(monkeypatch, capsys, "order_sensitivity", ["--tiny", "--steps", "4", "--length", "16"])
    assert set(out) >= {"fp32_whole", "fp32_rotated-1", "bf16_whole", "bf16_rotated-2", "bf16_halves"}
    assert out["fp32_whole"]["max_abs_loss_diff"] == 0 and out["bf16_whole"]["max_abs_loss_diff"] == 0
    assert out["fp32_rotated-1"]["max_abs_loss_diff"] < 1e-5  # the same mean loss up to fp32 rounding


def test_allreduce_between_cpu_processes_sums_and_times(monkeypatch, capsys):
    out = run(monkeypatch, capsys, "allreduce", ["--tiny", "--numel", "1000", "--repeats", "2"])
    assert (out["backend"], out["devices"], out["numel"]) == ("gloo", 2, 1000)
    for dtype, size in (("float32", 4), ("bfloat16", 2)):
        assert out[dtype]["sums_right"] and out[dtype]["bytes"] == 1000 * size and out[dtype]["ms"] > 0
        assert out[dtype]["busbw_GBps"] == out[dtype]["algbw_GBps"]  # 2(n-1)/n = 1 for two processes
