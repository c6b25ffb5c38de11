"""The issue-10 benchmarks run on CPU at tiny sizes and print the JSON the docs' tables are filled from."""

import argparse
import importlib
import json
import subprocess
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


def test_ddp_ceiling_is_one_gpu_at_one_ranks_batch(monkeypatch):
    """multi_gpu.py ddp --ceiling: the speed-up N ranks could reach with free communication is N times one GPU's
    tokens/s at one rank's batch over its tokens/s at the global batch; the share reached is DDP's speed-up over it."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    multi_gpu = importlib.import_module("multi_gpu")
    calls = []

    def train(overrides, run_dir, name):  # tokens/s by (devices, batch): 1 GPU 100 at 16, 80 at 8; 2 GPUs 150
        calls.append((name, [o for o in overrides if o.startswith(("trainer.batch_size", "trainer.devices"))]))
        speed = {"one": 100.0, "many": 150.0, "rank": 80.0}[name]
        return [{"step": str(s), "train/loss": "1.0", "perf/tokens_per_s": str(speed)} for s in range(10)], 1.0

    monkeypatch.setattr(multi_gpu, "_train", train)
    args = argparse.Namespace(devices=2, steps=10, batch=16, length=64, tiny=True, ceiling=True, set=[], ddp_set=[])
    out = multi_gpu.ddp(args)
    assert calls == [("one", ["trainer.batch_size=16", "trainer.devices=1"]),
                     ("many", ["trainer.batch_size=16", "trainer.devices=2"]),
                     ("rank", ["trainer.batch_size=8", "trainer.devices=1"])]
    assert out["speedup"] == 1.5 and out["rank_batch"] == 8
    assert out["speedup_without_communication"] == pytest.approx(1.6)
    assert out["share_of_it_reached"] == pytest.approx(1.5 / 1.6)


def test_step_profile_times_a_lightning_step_on_cpu(monkeypatch, capsys, one_thread):
    out = run(monkeypatch, capsys, "step_profile", ["--tiny", "--steps", "18", "--length", "16"])
    assert out["timed_steps"] == [10, 12] and out["ms_per_step"] > 0
    assert out["tokens_per_s"] == pytest.approx(2 * 16 / out["ms_per_step"] * 1e3)
    assert out["profile"] is None  # the device timeline needs CUDA


def test_step_profile_reads_device_idle_and_the_host_op_behind_it(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from step_profile import PROFILED, analyse

    def x(cat, name, ts, dur, tid=1):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid}

    # kernels cover [0, 15) and [20, 30) (two overlap): 25 us busy, a 5 us gap at [15, 20) while the host is inside
    # "step" > "python_work"; one sync; a thread with fewer ops is not the main one
    trace = {"traceEvents": [x("kernel", "k1", 0, 10, 7), x("kernel", "k2", 5, 10, 7), x("gpu_memcpy", "c", 20, 10, 7),
                             x("cpu_op", "step", 0, 40), x("cpu_op", "python_work", 14, 8),
                             x("cuda_runtime", "cudaStreamSynchronize", 25, 2), x("cpu_op", "other", 16, 2, tid=2),
                             x("cpu_op", "backward_op", 30, 10, tid=2),
                             x("cuda_runtime", "cudaStreamSynchronize", 32, 1, tid=2)]}
    out = analyse(trace)
    assert out["device_busy_ms_per_step"] == pytest.approx(25e-3 / PROFILED)
    assert out["device_idle_ms_per_step"] == pytest.approx(5e-3 / PROFILED)
    # every thread's syncs count (the backward thread's stall the step too), each named by the ops around it
    assert out["syncs_per_step"] == pytest.approx(2 / PROFILED)
    assert out["syncs_per_step_by_site"] == {"step": 1 / PROFILED, "backward_op": 1 / PROFILED}
    assert out["idle_by_host_op_ms_per_step"] == {"python_work": round(5e-3 / PROFILED, 3)}


def test_step_profile_refuses_too_few_steps_to_time_any(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from step_profile import main

    with pytest.raises(SystemExit, match="--steps must be at least 17"):
        main(["--tiny", "--steps", "16"])


def test_gpu_session_refuses_an_unknown_check_in_one_line(tmp_path):
    done = subprocess.run(["bash", str(BENCHMARKS / "gpu_session.sh"), "speed"], capture_output=True, text=True,
                          cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out")})
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == "usage: bash benchmarks/gpu_session.sh ceiling|ddp|tests (got 'speed')\n"
    assert not (tmp_path / "out").exists()  # nothing written
