"""`hybrids eval`: a training run or a saved model on our long-context probes and lm-evaluation-harness tasks.

    hybrids eval run=runs/train/<name> [tasks=probes]            # phonebook + long_copy, offline, CPU
    hybrids eval model=out/zamba tasks=probes,hellaswag limit=100  # lm-eval tasks need `pip install hybrids[eval]`

Metrics are named "probe/<probe>/<seq_len>/accuracy", "probe/<probe>/<seq_len>/cache_bytes" and
"lm_eval/<task>/<metric>" (lm-eval's "acc,none" becomes "acc"). They are printed, written to
<out>/eval.json (default: <run or model folder>/eval/), and logged to MLflow unless mlflow=false: into the run's
own MLflow run when it was tracked (a sweep's trial run included, so the report and the MLflow UI compare
trials by them), else into a new run of the experiment "hybrids-eval". `evaluate` returns the same metrics to
Python code, e.g. an objective that trains, then scores the run by an eval metric.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from blocks import ConfigError
from hybrids.evaluation.probes import PROBES, as_metrics, rows, run_probes
from hybrids.model import HybridLM
from hybrids.save import from_pretrained, from_run, run_config, run_tokenizer, saved_tokenizer

log = logging.getLogger("hybrids")
USAGE = ("hybrids eval run=<run folder>|model=<saved model folder> [tasks=probes,<lm-eval task>,...] "
         "[checkpoint=last] [limit=N] [batch_size=8] [max_length=2048] [min_len=64] [max_len=1024] [n=32] "
         "[seed=0] [device=cpu] [tokenizer=byte|FILE] [task_path=DIR] [out=DIR] [mlflow=true]")
DEFAULT_URI = "sqlite:///runs/mlflow.db"


@dataclass
class EvalOptions:
    """What `hybrids eval` takes (see USAGE): one of run / model, the tasks and how to run them."""

    run: str | None = None
    model: str | None = None
    tasks: str = "probes"
    checkpoint: str = "last"
    limit: int | None = None  # lm-eval: examples per task
    batch_size: int = 8
    max_length: int = 2048  # lm-eval: tokens a scored window holds
    min_len: int = 64  # probes: the shortest length
    max_len: int = 1024  # probes: the longest length tried
    n: int = 32  # probes: examples per length
    seed: int = 0
    device: str = "cpu"
    tokenizer: str | None = None  # default: the run's or the saved model's
    task_path: str | None = None  # lm-eval: a folder of extra task YAMLs (offline tasks)
    out: str | None = None
    mlflow: bool = True

    def task_list(self) -> tuple[list[str], list[str]]:
        """(probes, lm-eval tasks) named by `tasks`; "probes" stands for every probe."""
        names = [t for t in self.tasks.split(",") if t]
        if not names:
            raise ConfigError(f"name at least one task: {USAGE}")
        probes = list(PROBES) if "probes" in names else [t for t in names if t in PROBES]
        return probes, [t for t in names if t != "probes" and t not in PROBES]


def parse_options(options: list[str]) -> EvalOptions:
    """key=value options of `hybrids eval` -> EvalOptions; anything else is one line naming the valid keys."""
    fields = {f.name: f for f in dataclasses.fields(EvalOptions)}
    values: dict = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or key not in fields:
            raise ConfigError(f"unknown eval option {option!r}; usage: {USAGE}")
        kind = str(fields[key].type)
        if kind.startswith("int"):
            try:
                values[key] = int(value)
            except ValueError:
                raise ConfigError(f"{key} must be an integer, got {value!r}") from None
            if values[key] < 1:
                raise ConfigError(f"{key} must be positive, got {value}")
        elif kind == "bool":
            if value.lower() not in ("true", "false"):
                raise ConfigError(f"{key} must be true or false, got {value!r}")
            values[key] = value.lower() == "true"
        else:
            values[key] = value
    opts = EvalOptions(**values)
    if (opts.run is None) == (opts.model is None):
        raise ConfigError(f"name one run or one saved model: {USAGE}")
    return opts


def load(opts: EvalOptions) -> tuple[HybridLM, object | None, Path]:
    """The model (eval mode, on opts.device), its tokenizer (None: no text tokenizer) and its folder.

    Raises:
        ConfigError: a folder that is no run or saved model, or a tokenizer larger than the model's vocabulary.
    """
    from hybrids.training.tokenizer import load_tokenizer

    if opts.run is not None:
        folder, name = Path(opts.run), opts.tokenizer or run_tokenizer(opts.run)
        model = from_run(folder, opts.checkpoint, device=opts.device)
    else:
        folder, name = Path(opts.model), opts.tokenizer or saved_tokenizer(opts.model)
        model = from_pretrained(folder, device=opts.device)
    tokenizer = load_tokenizer(name) if name is not None else None
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise ConfigError(f"the tokenizer's vocabulary ({tokenizer.vocab_size}) exceeds the model's "
                          f"({model.config.vocab_size}): name the tokenizer it was trained with (tokenizer=...)")
    return model, tokenizer, folder


def task_manager(tasks: list[str], task_path: str | None):
    """lm-eval's TaskManager, once every task in `tasks` is known to it.

    Raises:
        ConfigError: lm_eval not installed, or a task lm-eval does not know.
    """
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError(f"task(s) {', '.join(tasks)} need lm-evaluation-harness, which is not installed: "
                          "pip install 'hybrids[eval]' (or run the offline probes: tasks=probes)") from None
    if task_path is not None and not Path(task_path).is_dir():
        raise ConfigError(f"no such task folder: task_path={task_path}")
    manager = TaskManager(include_path=task_path, include_defaults=False) if task_path else None
    if manager is None or not all(manager.match_tasks([t]) for t in tasks):  # indexing lm-eval's own: ~15 s
        manager = TaskManager(include_path=task_path)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise ConfigError(f"lm-eval has no task {', '.join(map(repr, unknown))}"
                          + ("" if task_path else " (a folder of task YAMLs: task_path=DIR)"))
    return manager


def lm_eval_metrics(model: HybridLM, tokenizer, tasks: list[str], manager, opts: EvalOptions) -> dict[str, float]:
    """lm-evaluation-harness scores of `tasks` as flat metrics "lm_eval/<task>/<metric>"."""
    from lm_eval import simple_evaluate

    from hybrids.evaluation.adapter import HybridsLM, TextCodec

    adapter = HybridsLM(model, TextCodec(tokenizer), opts.batch_size, opts.max_length)
    results = simple_evaluate(model=adapter, tasks=tasks, task_manager=manager, limit=opts.limit,
                              log_samples=False, bootstrap_iters=0, random_seed=opts.seed,
                              numpy_random_seed=opts.seed, torch_random_seed=opts.seed, fewshot_random_seed=opts.seed)
    out = {}
    for task, scores in results["results"].items():
        for key, value in scores.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and "stderr" not in key:
                out[f"lm_eval/{task}/{key.replace(',none', '').replace(',', '.')}"] = float(value)
    return out


def evaluate(opts: EvalOptions | list[str]) -> dict:
    """Run `hybrids eval` (see the module docstring); returns {"metrics", "probes", "source", "out"}."""
    if not isinstance(opts, EvalOptions):
        opts = parse_options(list(opts))
    probes, tasks = opts.task_list()
    manager = task_manager(tasks, opts.task_path) if tasks else None
    model, tokenizer, folder = load(opts)
    if tasks and tokenizer is None:
        raise ConfigError("lm-eval tasks read text: this model has no text tokenizer (trained on a synthetic "
                          "task); name one with tokenizer=byte|FILE if it reads text")
    metrics: dict[str, float] = {}
    results = []
    if probes:
        encode = None
        if tokenizer is not None:
            def encode(text):
                return tokenizer.encode([text.encode("utf-8")])[0].tolist()
        task = run_config(folder).get("task", {}) if opts.run is not None else {}
        copy_options = {k: task[k] for k in ("num_digits", "vocab_size") if k in task} \
            if task.get("name") == "long_copy" else {}
        with torch.no_grad():
            results = run_probes(model, probes, encode, opts.min_len, opts.max_len, opts.n, opts.batch_size,
                                 opts.seed, copy_options, log=lambda m: print(f"hybrids: {m}"))
        metrics.update(as_metrics(results))
    if tasks:
        metrics.update(lm_eval_metrics(model, tokenizer, tasks, manager, opts))
    out = Path(opts.out) if opts.out else folder / "eval"
    out.mkdir(parents=True, exist_ok=True)
    record = {"source": str(folder), "checkpoint": opts.checkpoint if opts.run else None,
              "options": dataclasses.asdict(opts), "metrics": metrics, "probes": rows(results)}
    (out / "eval.json").write_text(json.dumps(record, indent=1) + "\n")
    if opts.mlflow:
        record["mlflow_run_id"] = log_to_mlflow(opts, folder, metrics, out / "eval.json")
    record["out"] = str(out)
    return record


def log_to_mlflow(opts: EvalOptions, folder: Path, metrics: dict[str, float], artifact: Path) -> str:
    """Log into the run's own MLflow run when it was tracked, else into a new "hybrids-eval" run; its id."""
    from mlflow import MlflowClient

    from hybrids.training.tracking import ensure_store, experiment_id, record_tags

    tracking = run_config(folder).get("tracking", {}) if opts.run is not None else {}
    uri = tracking.get("uri", DEFAULT_URI)
    ensure_store(uri)
    client = MlflowClient(tracking_uri=uri)
    stored = folder / "mlflow_run.json"
    if opts.run is not None and stored.is_file():
        run_id = json.loads(stored.read_text())["run_id"]
    else:
        exp = experiment_id(client, "hybrids-eval", tracking.get("artifacts", "runs/mlartifacts"))
        run_id = client.create_run(exp, run_name=f"eval {folder.name}", tags=record_tags()).info.run_id
        client.set_terminated(run_id)
    for key, value in metrics.items():
        client.log_metric(run_id, f"eval/{key}", value)
    client.log_artifact(run_id, str(artifact), "eval")
    return run_id


def table(record: dict) -> str:
    """The printed summary: probes against cache bytes, then lm-eval metrics."""
    lines = []
    if record["probes"]:
        lines.append(f"{'probe':<10} {'seq_len':>8} {'accuracy':>9} {'n':>5} {'KV bytes':>12} {'state bytes':>12}")
        for r in record["probes"]:
            lines.append(f"{r['probe']:<10} {r['seq_len']:>8} {r['accuracy']:>9.3f} {r['n']:>5} "
                         f"{r['kv_cache_bytes']:>12,} {r['state_bytes']:>12,}")
    for key, value in record["metrics"].items():
        if key.startswith("lm_eval/"):
            lines.append(f"{key:<40} {value:.4f}")
    lines.append(f"written: {record['out']}/eval.json")
    return "\n".join(lines)
