"""MLflow on an explicit tracking URI (default sqlite:///runs/mlflow.db, artifacts under runs/).

A run directory remembers its MLflow run id, so a resumed run keeps logging into the same MLflow run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from hybrids.training.config import TrainConfig

STORAGE_TAG = "hybrids.storage"  # on a study's MLflow parent run: the Optuna storage the study is in


def ensure_store(uri: str) -> None:
    """Create the folder of a sqlite store, so that a fresh clone works without setup."""
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)


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
        tags = {"mlflow.parentRunId": t.parent_run_id} if t.parent_run_id else {}
        run_id = client.create_run(exp_id, run_name=t.run_name or run_dir.name, tags=tags).info.run_id
        stored.write_text(json.dumps({"run_id": run_id}))
    return MLFlowLogger(experiment_name=t.experiment, tracking_uri=t.uri, run_id=run_id, log_model=False)


def record_stop(run_dir: Path, reason: str, mlflow=None) -> None:
    """Keep why a run stopped early next to its checkpoints and on its MLflow run."""
    (run_dir / "stopped.json").write_text(json.dumps({"reason": reason}) + "\n")
    if mlflow is not None:
        mlflow.experiment.set_tag(mlflow.run_id, "stop_reason", reason)
