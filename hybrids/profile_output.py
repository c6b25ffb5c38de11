"""What `hybrids profile` leaves behind: profile.csv, profile.png (cache bytes), profile-latency.png (prefill,
decode, training step and peak memory against context length) and, given a tracking URI, an MLflow run."""

from __future__ import annotations

import csv
from pathlib import Path

from hybrids.profile import COLUMNS


def write_csv(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _by_model(rows: list[dict], batch: int):
    """(model, its rows at `batch` sorted by length) per model, in the rows' order."""
    for name in dict.fromkeys(r["model"] for r in rows):
        yield name, sorted((r for r in rows if r["model"] == name and r["batch"] == batch), key=lambda r: r["seq_len"])


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bytes_figure(rows: list[dict], path: Path) -> Path:
    """Measured cache bytes (log) against sequence length (log), one line per model at the smallest batch,
    the accounting's prediction dashed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    batch = min(r["batch"] for r in rows)
    for name, part in _by_model(rows, batch):
        x = [r["seq_len"] for r in part]
        line, = ax.plot(x, [max(r["measured_bytes"], 1) for r in part], "-o", markersize=4,
                        label=f"{name} ({part[0]['layout']}, {part[0]['params']:,} params)")
        ax.plot(x, [max(r["predicted_bytes"], 1) for r in part], "--", color=line.get_color(), alpha=0.6)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel(f"KV cache + state bytes (batch {batch}); dashed: predicted")
    ax.set_title("Generation cache: flat for recurrent state, growing for KV caches", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _save(fig, path, plt)


PANELS = (("prefill_ms", "prefill ms"), ("decode_ms_per_token", "decode ms per token"),
          ("train_ms", "training step ms (fwd + bwd)"), ("train_peak_gib", "training step peak GiB"))


def latency_figure(rows: list[dict], path: Path) -> Path:
    """Four panels against sequence length (log-log), one line per model at the smallest batch: prefill ms,
    decode ms per token, training step ms and the training step's peak memory (CUDA only)."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    batch = min(r["batch"] for r in rows)
    for ax, (key, label) in zip(axes.flat, PANELS, strict=True):
        for name, part in _by_model(rows, batch):
            points = [(r["seq_len"], r[key]) for r in part if r[key] is not None]
            if points:
                ax.plot(*zip(*points, strict=True), "-o", markersize=4, label=f"{name} ({part[0]['params']:,})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(f"{label}, batch {batch}")
        ax.grid(alpha=0.3, which="both")
        if ax.lines:
            ax.set_yscale("log")
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "measured on CUDA only", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"Latency and memory against context length ({rows[0]['device']}, {rows[0]['dtype']})",
                 fontsize=10)
    return _save(fig, path, plt)


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def log_to_mlflow(rows: list[dict], uri: str, files: list[Path], params: dict) -> str:
    """One run in the "hybrids-profile" experiment: the grid as params, each row's measurements as metrics
    `<model>.b<batch>.<column>` at step = sequence length, the CSV and figures as artifacts; its id."""
    from mlflow import MlflowClient

    from hybrids.training.tracking import ensure_store, experiment_id, record_tags

    ensure_store(uri)
    client = MlflowClient(tracking_uri=uri)
    artifacts = str(Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts") if uri.startswith("sqlite:///") \
        else "runs/mlartifacts"
    run_id = client.create_run(experiment_id(client, "hybrids-profile", artifacts), run_name="profile",
                               tags=record_tags()).info.run_id
    for key, value in params.items():
        client.log_param(run_id, key, value)
    measured = [c for c in COLUMNS[8:] if c != "ratio"]
    for r in rows:
        for column in measured:
            if r[column] is not None:
                client.log_metric(run_id, f"{r['model']}.b{r['batch']}.{column}", float(r[column]), step=r["seq_len"])
    for f in files:
        client.log_artifact(run_id, str(f))
    client.set_terminated(run_id)
    return run_id
