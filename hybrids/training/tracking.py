"""MLflow on an explicit tracking URI (default sqlite:///runs/mlflow.db, artifacts under runs/).

A run directory remembers its MLflow run id, so a resumed run keeps logging into the same MLflow run.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from hybrids.training.config import TrainConfig

PACKAGE_ROOT = Path(__file__).resolve().parents[2]
STORAGE_TAG = "hybrids.storage"  # on a study's MLflow parent run: the Optuna storage the study is in


def ensure_store(uri: str) -> None:
    """Create the folder of a sqlite store, so that a fresh clone works without setup."""
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)


@functools.cache
def git_state(root: Path = PACKAGE_ROOT) -> tuple[str, bool] | None:
    """(commit, dirty) of the checkout holding the code, or None outside a git checkout (or without git).

    Only a checkout whose top level is `root` counts: an installed copy in a virtual environment that sits
    inside some repository must not report that repository's commit. Dirty means tracked files differ from
    the commit; untracked files (runs/, scratch scripts) do not count.
    """
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != Path(root).resolve():
            return None
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return commit, dirty


def command_line(argv: list[str] | None = None) -> str:
    """sys.argv as a shell command to paste again; `python -m hybrids.cli ...` reads as `hybrids ...`."""
    argv = list(sys.argv if argv is None else argv)
    if argv and argv[0].endswith(os.path.join("hybrids", "cli.py")):
        argv[0] = "hybrids"
    # MLflow refuses tag values over 8000 characters: a command line that long is cut rather than lose the run
    return shlex.join(argv)[:8000]


def record_tags() -> dict[str, str]:
    """What reproduces a run: the code's git commit (and whether the tree was dirty), the package version
    and the command line; tags for every MLflow run the toolkit creates (training, trial and study runs)."""
    import hybrids

    tags = {"hybrids.version": hybrids.__version__, "hybrids.command": command_line()}
    state = git_state()
    if state is not None:
        commit, dirty = state
        tags.update({"hybrids.git_commit": commit, "hybrids.git_dirty": str(dirty).lower(),
                     "mlflow.source.git.commit": commit})
    return tags


def experiment_id(client, name: str, artifacts: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    Path(artifacts).mkdir(parents=True, exist_ok=True)
    return client.create_experiment(name, artifact_location=Path(artifacts).resolve().as_uri() + f"/{name}")


def mlflow_logger(config: TrainConfig, run_dir: Path):
    """A Lightning MLFlowLogger for this run: the stored run id if the run directory has one."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow import MlflowClient

    t = config.tracking
    ensure_store(t.uri)
    client = MlflowClient(tracking_uri=t.uri)
    exp_id = experiment_id(client, t.experiment, t.artifacts)
    stored = run_dir / "mlflow_run.json"
    run_id = json.loads(stored.read_text())["run_id"] if stored.is_file() else None
    if run_id is None:
        tags = record_tags()
        if t.parent_run_id:
            tags["mlflow.parentRunId"] = t.parent_run_id
        run_id = client.create_run(exp_id, run_name=t.run_name or run_dir.name, tags=tags).info.run_id
        stored.write_text(json.dumps({"run_id": run_id}))
    return MLFlowLogger(experiment_name=t.experiment, tracking_uri=t.uri, run_id=run_id, log_model=False)


def record_stop(run_dir: Path, reason: str, mlflow=None) -> None:
    """Keep why a run stopped early next to its checkpoints and on its MLflow run."""
    (run_dir / "stopped.json").write_text(json.dumps({"reason": reason}) + "\n")
    if mlflow is not None:
        mlflow.experiment.set_tag(mlflow.run_id, "stop_reason", reason)
