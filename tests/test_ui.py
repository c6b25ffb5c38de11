"""End to end: `hybrids.ui.serve` on a study's SQLite store, read back over HTTP and in headless Chromium.

The store is what a sweep writes in-process: one parent run per study, one child run per trial, and the report's
figure logged to the parent, under an experiment whose artifact_location is an absolute file:// URI.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from types import SimpleNamespace

import pytest

from hybrids import ui

pytestmark = pytest.mark.ui

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# As root in a closed network: no sandbox, and no background connections that the network would refuse.
CHROMIUM_FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
    "--window-size=1400,900", "--virtual-time-budget=15000",
]
FIGURE_RGB = (1.0, 0.0, 1.0)  # magenta: no colour of MLflow's own UI, so its pixels on a screenshot are the figure's
RUN_NAMES = ("study attention-spacing", "trial 0", "trial 1")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _figure(path) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3), dpi=100, layout="constrained")
    ax.plot([1, 2, 3, 4], [3.1, 2.4, 2.2, 2.3], color=FIGURE_RGB, linewidth=6)
    ax.set(xlabel="attention spacing", ylabel="val/loss", title="objective")
    fig.savefig(path)
    plt.close(fig)
    return path.read_bytes()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A tracking store with a study's parent run, two trial runs under it, and a figure on the parent."""
    mlflow = pytest.importorskip("mlflow")
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    artifacts = root / "mlartifacts"
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment(
        "attention-spacing", artifact_location=f"{ui.artifact_root(artifacts)}/attention-spacing")
    parent = client.create_run(experiment_id, run_name=RUN_NAMES[0]).info.run_id
    for trial, spacing in enumerate((2, 4)):
        child = client.create_run(experiment_id, run_name=RUN_NAMES[1 + trial],
                                  tags={"mlflow.parentRunId": parent}).info.run_id
        client.log_param(child, "model.attn_every", spacing)
        for step, loss in enumerate((3.0, 2.5 - 0.1 * trial)):
            client.log_metric(child, "val/loss", loss, step=step)
        client.set_terminated(child)
    png = _figure(root / "objective.png")
    client.log_artifact(parent, str(root / "objective.png"), artifact_path="report")
    client.set_terminated(parent)
    return SimpleNamespace(root=root, uri=uri, artifacts=artifacts, experiment_id=experiment_id, parent=parent,
                           png=png, artifact_uri=client.get_run(parent).info.artifact_uri)


@pytest.fixture(scope="module")
def server(store):
    """The UI server on a free port, stopped with its workers when the module's tests end."""
    port = _free_port()
    proc = ui.serve(store.uri, store.artifacts, port=port, optuna_storage=None, wait=False)
    yield SimpleNamespace(proc=proc, url=f"http://127.0.0.1:{port}", log=store.artifacts.parent / "mlflow-server.log")
    ui.stop(proc)
    assert proc.poll() is not None


@pytest.fixture
def chromium():
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH: run .ci/install-browser as root (Debian's chromium)")
    return CHROMIUM


class _Page(HTMLParser):
    """The text nodes and <img> attributes of a DOM dump, leaving out scripts and styles."""

    def __init__(self, html: str):
        super().__init__()
        self.texts: list[str] = []
        self.images: list[dict[str, str]] = []
        self._skip = 0
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style"):
            self._skip += 1
        elif tag == "img":
            self.images.append({k: v or "" for k, v in attrs})

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self._skip -= 1

    def handle_data(self, data):
        if not self._skip and data.strip():
            self.texts.append(data.strip())


def _render(chromium: str, url: str, out_dir, name: str) -> _Page:
    """Load `url` in a fresh headless Chromium profile; screenshot to out_dir/name.png, return the rendered DOM."""
    cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={out_dir / f'profile-{name}'}",
           f"--screenshot={out_dir / f'{name}.png'}", "--dump-dom", url]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    return _Page(result.stdout)


def _figure_pixels(screenshot) -> int:
    import matplotlib.image

    rgb = matplotlib.image.imread(screenshot)[..., :3]
    assert rgb.shape == (900, 1400, 3)
    return int(((rgb[..., 0] > 0.85) & (rgb[..., 1] < 0.2) & (rgb[..., 2] > 0.85)).sum())


def test_refuses_taken_port_and_public_host(store):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        with pytest.raises(ui.UIError, match=f"port {sock.getsockname()[1]} .* already in use"):
            ui.serve(store.uri, store.artifacts, port=sock.getsockname()[1], wait=False)
    with pytest.raises(ui.UIError, match="not a loopback address"):
        ui.serve(store.uri, store.artifacts, host="0.0.0.0", port=_free_port(), wait=False)


def test_command_serves_the_local_store(store):
    cmd = ui.server_command(store.uri, store.artifacts, "127.0.0.1", 5000)
    assert cmd[cmd.index("--backend-store-uri") + 1] == store.uri
    assert cmd[cmd.index("--default-artifact-root") + 1] == store.artifacts.as_uri()
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert ui.absolute_tracking_uri("sqlite:///runs/mlflow.db").startswith("sqlite:////")
    assert ui.absolute_tracking_uri(store.uri) == store.uri


def test_server_returns_logged_figure(store, server):
    assert store.artifact_uri == f"{store.artifacts.as_uri()}/attention-spacing/{store.parent}/artifacts"
    query = urllib.parse.urlencode({"run_uuid": store.parent, "path": "report"})
    with urllib.request.urlopen(f"{server.url}/ajax-api/2.0/mlflow/artifacts/list?{query}") as response:
        files = json.load(response)["files"]
    assert files == [{"path": "report/objective.png", "is_dir": False, "file_size": len(store.png)}]
    query = urllib.parse.urlencode({"run_uuid": store.parent, "path": "report/objective.png"})
    with urllib.request.urlopen(f"{server.url}/get-artifact?{query}") as response:
        body = response.read()
    assert body[:8] == b"\x89PNG\r\n\x1a\n"
    assert body == store.png


def test_runs_page_lists_study_runs(store, server, chromium, tmp_path):
    # Sorted by name the table lists trial runs flat; sorted by start time (the default) it folds them under
    # their parent until clicked.
    sort = urllib.parse.urlencode({"orderByKey": "tags.`mlflow.runName`", "orderByAsc": "true",
                                   "workflowType": "machine_learning"})
    page = _render(chromium, f"{server.url}/#/experiments/{store.experiment_id}/runs?{sort}", tmp_path, "runs")
    assert "attention-spacing" in page.texts
    assert [text for text in page.texts if text in RUN_NAMES] == list(RUN_NAMES)
    assert "3 matching runs" in " ".join(page.texts)
    assert _figure_pixels(tmp_path / "runs.png") == 0


def test_artifact_page_shows_figure(store, server, chromium, tmp_path):
    route = f"#/experiments/{store.experiment_id}/runs/{store.parent}/artifacts/report/objective.png"
    page = _render(chromium, f"{server.url}/{route}?workflowType=machine_learning", tmp_path, "artifact")
    assert RUN_NAMES[0] in page.texts
    # The UI fetches the bytes from /get-artifact and shows them through a blob: URL.
    figures = [img for img in page.images if img.get("alt") == "report/objective.png"]
    assert len(figures) == 1 and figures[0]["src"].startswith(f"blob:{server.url}/")
    fetched = re.findall(rf'"GET /get-artifact\?path=report%2Fobjective\.png&run_uuid={store.parent} HTTP/1\.1" '
                         r"(\d+)", server.log.read_text())
    assert fetched and set(fetched) <= {"200", "304"}
    # The plotted line, in its own colour, is on screen: a 6 px line across most of a 400 px wide figure.
    assert _figure_pixels(tmp_path / "artifact.png") > 1000
