"""`hybrids eval`: the offline probes against cache bytes, options and errors, MLflow, and the lm-eval adapter
(skipped where lm_eval is not installed: it is the optional extra `eval`)."""

import json
import sys

import pytest
import torch
from torch import nn

from blocks import ConfigError
from hybrids.cli import main
from hybrids.evaluation import evaluate
from hybrids.evaluation.probes import hits, phonebook_examples, run_probes
from hybrids.model import build
from hybrids.training.tasks import IGNORE_INDEX
from hybrids.training.tokenizer import ByteTokenizer

BYTES = ByteTokenizer()


def encode(text):
    return BYTES.encode([text.encode()])[0].tolist()


@pytest.fixture
def saved(tmp_path):
    model = build("zamba2-tiny", d_model=32, vocab_size=257)
    return model, model.save_pretrained(tmp_path / "m", tokenizer="byte")


def test_phonebook_asks_for_a_number_the_book_holds():
    for ids, k in phonebook_examples(encode, 128, 4, seed=0):
        text = bytes(ids).decode()
        book, _, query = text.rpartition("\n")
        name, number = query.split(": ")
        assert len(ids) <= 128 and k == 8 and f"\n{name}: {number}\n" in "\n" + book + "\n"
        assert len(number) == 8 and number.startswith("555-")


class Oracle(nn.Module):
    """Logits that put all mass on a fixed answer tensor, and a cache-free failure past `fits` tokens."""

    def __init__(self, model, fits=10**9):
        super().__init__()
        self.inner, self.fits, self.config, self.embed = model, fits, model.config, model.embed
        self.answer = None

    def forward(self, x):
        if x.shape[1] > self.fits:
            raise torch.OutOfMemoryError("simulated")
        if self.answer is None:
            return torch.zeros(*x.shape, self.config.vocab_size)
        return nn.functional.one_hot(self.answer[:len(x)].clamp_min(0), self.config.vocab_size).float()


def test_hits_score_every_answer_token_and_ignore_padding(saved, one_thread):
    model = Oracle(saved[0])
    targets = torch.full((3, 6), IGNORE_INDEX)
    targets[:, 3:5] = torch.tensor([[7, 8], [7, 8], [7, 8]])
    answer = targets.clone()
    answer[1, 4] = 9  # one wrong digit: a miss
    model.answer = answer
    assert hits(model, torch.zeros(3, 6, dtype=torch.long), targets, batch_size=2).tolist() == [True, False, True]


def test_probes_report_the_caches_decoding_allocates_and_stop_where_memory_ends(saved, one_thread):
    model = saved[0].eval()
    results = run_probes(model, ["long_copy", "phonebook"], encode, min_len=64, max_len=128, n=4)
    assert [(r.probe, r.seq_len) for r in results] == [("long_copy", 64), ("long_copy", 128),
                                                       ("phonebook", 64), ("phonebook", 128)]
    for r in results:
        measured = model.allocate_cache(1, r.seq_len).nbytes()
        assert (r.kv_cache_bytes, r.state_bytes) == (measured["kv"], measured["state"])
        assert 0.0 <= r.accuracy <= 1.0 and r.n == 4
    assert results[0].kv_cache_bytes == 2 * 2 * 64 * 2 * 32 * 4  # 2 invocations x (K, V) x 64 x 2h x fp32
    said = []
    short = run_probes(Oracle(model, fits=70), ["long_copy"], None, min_len=32, max_len=256, n=2, log=said.append)
    assert [r.seq_len for r in short] == [32, 64]
    assert said == ["long_copy: length 128 does not fit in memory; stopping at 64"]


def test_eval_cli_prints_the_probes_and_writes_json(saved, tmp_path, capsys):
    assert main(["eval", f"model={saved[1]}", "min_len=32", "max_len=64", "n=2", "tasks=long_copy",
                 f"out={tmp_path}/out", "mlflow=false"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["probe", "seq_len", "accuracy", "n", "KV", "bytes", "state", "bytes"]
    assert [line.split()[:2] for line in lines[1:3]] == [["long_copy", "32"], ["long_copy", "64"]]
    record = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert set(record["metrics"]) == {"probe/long_copy/32/accuracy", "probe/long_copy/32/cache_bytes",
                                      "probe/long_copy/64/accuracy", "probe/long_copy/64/cache_bytes"}


def test_results_go_to_mlflow(saved, tmp_path):
    from mlflow import MlflowClient

    record = evaluate([f"model={saved[1]}", "min_len=32", "max_len=32", "n=2", "tasks=long_copy"])
    logged = MlflowClient("sqlite:///runs/mlflow.db").get_run(record["mlflow_run_id"]).data.metrics
    assert logged == {f"eval/{k}": v for k, v in record["metrics"].items()}


@pytest.mark.parametrize("options, message", [
    (["tasks=probes"], "name one run or one saved model"),
    (["model=M", "limit=0"], "limit must be positive, got 0"),
    (["model=M", "colour=red"], "unknown eval option 'colour=red'"),
    (["model=M", "tasks=probes,hellaswag"], r"task\(s\) hellaswag need lm-evaluation-harness, which is not "
                                            r"installed: pip install 'hybrids\[eval\]'"),
    (["run=M"], "holds no config.yaml: not a training run folder"),
    (["model=M", "tokenizer=TOK"], r"the tokenizer's vocabulary \(300\) exceeds the model's \(257\)"),
])
def test_bad_eval_input_is_one_line(saved, tmp_path, monkeypatch, options, message):
    from tokenizers import Tokenizer, models

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as where the `eval` extra is not installed
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", None)

    Tokenizer(models.WordLevel({f"w{i}": i for i in range(300)}, unk_token="w0")).save(str(tmp_path / "t.json"))
    options = [o.replace("M", str(saved[1])).replace("TOK", str(tmp_path / "t.json")) for o in options]
    with pytest.raises(ConfigError, match=message):
        evaluate([*options, "mlflow=false"])


# lm-eval adapter: these need lm_eval (tests run in a venv with the `eval` extra)

def adapter(model, batch_size=2):
    pytest.importorskip("lm_eval")
    from hybrids.evaluation.adapter import HybridsLM, TextCodec

    return HybridsLM(model.eval(), TextCodec(BYTES), batch_size=batch_size, max_length=64)


class Request:
    def __init__(self, *args):
        self.args = args


def direct_logprob(model, context, continuation):
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = model(ids[:, :-1]).log_softmax(-1)[0]
    return float(logprobs[len(context) - 1:].gather(-1, ids[0, len(context):, None]).sum())


def test_loglikelihood_equals_the_direct_sum_whatever_the_batch_padding(saved):
    model = saved[0].eval()
    lm = adapter(model)
    pairs = [("The sky is", " blue"), ("A much longer context than the others", " here"), ("", "start")]
    got = lm.loglikelihood([Request(*p) for p in pairs])
    for (context, continuation), (score, _) in zip(pairs, got, strict=True):
        head, tail = encode(context) or [256], encode(continuation)
        assert score == pytest.approx(direct_logprob(model, head, tail), abs=1e-4)
    rolled = lm.loglikelihood_rolling([Request("short text")])[0]
    assert rolled == pytest.approx(direct_logprob(model, [256], encode("short text")), abs=1e-4)


def test_generate_until_is_greedy_decoding_cut_at_the_stop_string(saved):
    model = saved[0].eval()
    lm = adapter(model, batch_size=4)
    prompts = ["ab", "cd", "a longer prompt"]
    got = lm.generate_until([Request(p, {"until": [], "max_gen_toks": 5}) for p in prompts])
    for prompt, text in zip(prompts, got, strict=True):
        ids = model.generate(torch.tensor([encode(prompt)]), 5, eos_token_id=256)[0, len(prompt):].tolist()
        ids = ids[:ids.index(256)] if 256 in ids else ids
        assert text == bytes(ids).decode("utf-8", errors="replace")
    stop = got[0][1:2] if len(got[0]) > 1 else None
    if stop:
        cut = lm.generate_until([Request("ab", {"until": [stop], "max_gen_toks": 5})])[0]
        assert cut == got[0][:got[0].index(stop)]


def test_lm_eval_tasks_run_offline_from_a_task_folder(saved, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    rows = [{"question": "The sky is", "choices": [" blue", " green", " loud"], "answer": 0, "text": "Sky blue."},
            {"question": "Fire is", "choices": [" cold", " hot"], "answer": 1, "text": "Fire is hot."}]
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path}/tasks/rows.jsonl\n"
              "test_split: test\n")
    (tmp_path / "tasks" / "choice.yaml").write_text(
        "task: tiny_choice\n" + common + 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n')
    (tmp_path / "tasks" / "rolling.yaml").write_text(
        "task: tiny_rolling\n" + common + 'output_type: loglikelihood_rolling\ndoc_to_text: ""\n'
        'doc_to_target: "{{text}}"\nmetric_list:\n  - metric: bits_per_byte\n')
    record = evaluate([f"model={saved[1]}", "tasks=tiny_choice,tiny_rolling", f"task_path={tmp_path}/tasks",
                       "mlflow=false"])
    model = saved[0].eval()
    expected = []
    for r in rows:
        # lm-eval puts its target delimiter " " between the question and each choice
        scores = [direct_logprob(model, encode(r["question"]), encode(" " + c)) for c in r["choices"]]
        expected.append(float(max(range(len(scores)), key=scores.__getitem__) == r["answer"]))
    assert record["metrics"]["lm_eval/tiny_choice/acc"] == pytest.approx(sum(expected) / len(expected))
    nats = sum(-direct_logprob(model, [256], encode(r["text"])) for r in rows)
    bytes_ = sum(len(r["text"].encode()) for r in rows)
    assert record["metrics"]["lm_eval/tiny_rolling/bits_per_byte"] == pytest.approx(nats / bytes_ / 0.6931471805599453,
                                                                                    rel=1e-4)


def test_a_run_is_evaluated_with_its_own_long_copy_settings(tmp_path, one_thread):
    from hybrids.training.config import compose
    from hybrids.training.run import train

    run = train(compose([f"run.dir={tmp_path}", "tracking.enabled=false", "model=mamba2-tiny", "model.d_model=32",
                         "task=long_copy", "task.num_digits=4", "task.vocab_size=16", "task.distances=[8]",
                         "trainer.batch_size=2", "trainer.max_steps=2", "trainer.val_every=100",
                         "trainer.progress_bar=false", "schedule.warmup_steps=1"]))
    record = evaluate([f"run={run.run_dir}", "tasks=probes", "min_len=32", "max_len=64", "n=3", "mlflow=false"])
    assert [(r["probe"], r["seq_len"]) for r in record["probes"]] == [("long_copy", 32), ("long_copy", 64)]
    assert record["checkpoint"] == "last" and record["out"] == str(run.run_dir / "eval")
    assert record["probes"][0]["kv_cache_bytes"] == 0 and record["probes"][0]["state_bytes"] > 0  # pure Mamba2
