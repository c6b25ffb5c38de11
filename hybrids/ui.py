"""Browse the tracking store: an MLflow server on the local store, and the command for optuna-dashboard.

    hybrids ui                      MLflow UI at http://127.0.0.1:5000 over sqlite:///runs/mlflow.db
    hybrids ui --port 5001 --no-wait

Sweeps write to the SQLite store in-process, so each experiment's artifact_location must be an absolute file:// URI
(use `artifact_root`). The server reads such a location itself: the UI lists and fetches artifacts through
/ajax-api/2.0/mlflow/artifacts/list and /get-artifact, which open the run's own artifact URI. A relative location
would be read relative to the server's working directory. An `mlflow-artifacts:/` location needs a running server
to log to, which an in-process sweep doesn't have.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class UIError(RuntimeError):
    """A server that can't start or answer, for a reason the user can fix (port taken, bad store, ...)."""


def artifact_root(path: str | os.PathLike) -> str:
    """The absolute file:// URI of an artifact folder, as experiments and the server must both name it.

    Args:
        path: the folder, absolute or relative to the working directory.

    Returns:
        A URI such as file:///work/main/runs/mlartifacts.
    """
    return Path(path).resolve().as_uri()


def absolute_tracking_uri(uri: str) -> str:
    """Resolve a relative SQLite URI (sqlite:///runs/mlflow.db) against the working directory; others unchanged."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/") and uri != prefix + ":memory:":
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def server_command(tracking_uri: str, artifacts: str | os.PathLike, host: str, port: int) -> list[str]:
    """The `mlflow server` command line that `serve` runs.

    Args:
        tracking_uri: backend store URI (absolute; see `absolute_tracking_uri`).
        artifacts: artifact folder of experiments the server creates, and of proxied (mlflow-artifacts:/) uploads.
        host: loopback interface to bind.
        port: TCP port.

    Returns:
        argv for subprocess.
    """
    root = artifact_root(artifacts)
    return [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", tracking_uri,
        "--default-artifact-root", root,
        "--serve-artifacts", "--artifacts-destination", root,
        "--host", host, "--port", str(port),
        # One worker starts in ~4 s instead of ~12 s with four; enough for one person's browser.
        "--workers", "1",
    ]


def _check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # Same option as uvicorn, so a port in TIME_WAIT counts as free and only a listener counts as taken.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            raise UIError(f"port {port} on {host} is already in use ({err.strerror}): "
                          "pick another with --port") from err


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _log_tail(log: Path, lines: int = 15) -> str:
    try:
        text = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Terminate a server started by `serve` with its workers (its own process group); SIGKILL after `timeout` s."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        proc.wait()


def _wait_until_up(proc: subprocess.Popen, url: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UIError(f"mlflow server exited with code {proc.returncode} before answering; "
                          f"last lines of {log}:\n{_log_tail(log)}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)
    stop(proc)
    raise UIError(f"mlflow server did not answer {url}/health within {timeout:.0f} s; "
                  f"last lines of {log}:\n{_log_tail(log)}")


def dashboard_hint(storage: str, port: int = 8080) -> str:
    """How to open optuna-dashboard on a study storage, next to the MLflow UI.

    Args:
        storage: an RDB URL or "journal:<path>" (optuna-dashboard takes a journal file by its path).
        port: the dashboard's port.
    """
    exe = shutil.which("optuna-dashboard") or str(Path(sys.executable).with_name("optuna-dashboard"))
    target = storage.removeprefix("journal:")
    hint = f"Optuna:    {exe} {target} --host 127.0.0.1 --port {port}   then open http://127.0.0.1:{port}"
    path = storage.removeprefix("sqlite:///") if storage.startswith("sqlite:///") else \
        target if storage.startswith("journal:") else None
    if path is not None and not Path(path).exists():
        hint += f"\n           (no study stored yet in {storage})"
    return hint


def study_storages(tracking_uri: str) -> list[str]:
    """The Optuna storages of the studies logged to an MLflow store (sweeps tag their parent runs with it).

    Returns:
        The distinct storage URLs, oldest study first; [] for a store without studies or one that can't be read.
    """
    from mlflow import MlflowClient

    from hybrids.training.tracking import STORAGE_TAG

    try:
        client = MlflowClient(tracking_uri=tracking_uri)
        ids = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(ids, filter_string=f"tags.`{STORAGE_TAG}` LIKE '%'",
                                  order_by=["attributes.start_time ASC"]) if ids else []
    except Exception:  # an empty or foreign store: fall back to the default hint
        return []
    return list(dict.fromkeys(r.data.tags[STORAGE_TAG] for r in runs))


def serve(
    tracking_uri: str = "sqlite:///runs/mlflow.db",
    artifacts: str | os.PathLike = "runs/mlartifacts",
    host: str = "127.0.0.1",
    port: int = 5000,
    optuna_storage: str | list[str] | None = "sqlite:///runs/optuna.db",
    wait: bool = True,
    timeout: float = 60.0,
) -> subprocess.Popen:
    """Start the MLflow UI and tracking server on the local store and wait until it answers HTTP.

    The server's output goes to mlflow-server.log next to the artifact folder. It runs in its own process group, so
    `stop` ends its workers too.

    Args:
        tracking_uri: backend store; a relative sqlite:/// path is resolved against the working directory and its
            folder is created.
        artifacts: artifact folder (created) for experiments the server creates; runs logged in-process keep
            their experiment's own artifact_location, which the server reads as long as it is an absolute file URI.
        host: a loopback address: the server has no authentication, so it is never exposed beyond this machine.
        port: TCP port of the UI.
        optuna_storage: study storage(s) to print the optuna-dashboard command for; None prints nothing.
        wait: block until Ctrl-C (or SIGTERM), then stop the server; False returns as soon as it answers.
        timeout: seconds to wait for the first answer.

    Returns:
        The server process: running if wait is False, ended otherwise.

    Raises:
        UIError: non-loopback host, port already taken, or a server that exits or never answers.
    """
    if host not in LOOPBACK:
        raise UIError(f"host {host!r} is not a loopback address ({', '.join(LOOPBACK)}): "
                      "the MLflow server has no authentication")
    tracking_uri = absolute_tracking_uri(tracking_uri)
    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    artifacts = Path(artifacts).resolve()
    artifacts.mkdir(parents=True, exist_ok=True)
    log = artifacts.parent / "mlflow-server.log"
    _check_port_free(host, port)

    env = dict(os.environ)
    # The job runner serves GenAI judges, which these studies don't use; without it the server starts 3x faster.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    with open(log, "w") as out:
        proc = subprocess.Popen(server_command(tracking_uri, artifacts, host, port), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    url = _url(host, port)
    try:
        _wait_until_up(proc, url, log, timeout)
        print(f"MLflow UI: {url}/#/experiments?workflowType=machine_learning")
        print(f"           store {tracking_uri}, artifacts {artifacts}, server log {log}")
        for storage in [optuna_storage] if isinstance(optuna_storage, str) else optuna_storage or []:
            print(dashboard_hint(storage))
        if wait:
            print("Ctrl-C stops the server.", flush=True)
            _block_until_interrupt(proc)
    except BaseException:
        stop(proc)
        raise
    if wait:
        stop(proc)
    return proc


def _block_until_interrupt(proc: subprocess.Popen) -> None:
    """Wait until the server ends by itself, or Ctrl-C or SIGTERM reaches this process."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `hybrids ui`."""
    parser.add_argument("--tracking-uri", default="sqlite:///runs/mlflow.db", help="MLflow backend store")
    parser.add_argument("--artifacts", default="runs/mlartifacts", help="artifact folder of new experiments")
    parser.add_argument("--port", type=int, default=5000, help="port of the MLflow UI (127.0.0.1 only)")
    parser.add_argument("--storage", default=None,
                        help="Optuna storage to print the optuna-dashboard command for (default: the storages "
                             "of the studies in the tracking store, else sqlite:///runs/optuna.db)")
    parser.add_argument("--no-wait", action="store_true", help="return once the server answers, leaving it running")


def main_ui(args: argparse.Namespace) -> int:
    """`hybrids ui`: serve until Ctrl-C; an error the user can fix ends in one line and exit code 2."""
    storages = [args.storage] if args.storage else study_storages(absolute_tracking_uri(args.tracking_uri)) \
        or ["sqlite:///runs/optuna.db"]
    try:
        proc = serve(args.tracking_uri, args.artifacts, port=args.port, optuna_storage=storages,
                     wait=not args.no_wait)
    except UIError as err:
        print(f"hybrids: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    if args.no_wait:
        print(f"server pid {proc.pid} (process group): stop it with  kill -- -{proc.pid}")
        return 0
    # SIGTERM from stop() is how a served session ends; anything else is the server failing on its own.
    return 0 if proc.returncode in (0, -signal.SIGTERM) else 1
