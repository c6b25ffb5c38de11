"""Packaging: declared lower bounds hold for what is installed, the postgres extra's driver works, and the GPU
benchmark says "needs CUDA" on a CPU machine."""

import importlib.metadata
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

from blocks import ConfigError
from search.storage import open_storage

ROOT = Path(__file__).resolve().parents[1]


def _project() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _floors(requirements: list[str]) -> dict[str, str]:
    return {Requirement(r).name: str(Requirement(r).specifier) for r in requirements}


def test_lower_bounds_are_the_releases_the_code_needs():
    project = _project()
    extras = project["optional-dependencies"]
    assert _floors(project["dependencies"])["torch"] == ">=2.5"  # SDPA's enable_gqa
    assert _floors(extras["hf"])["transformers"] == _floors(extras["dev"])["transformers"] == ">=4.48"  # Zamba2
    assert _floors(extras["train"])["mlflow"] == ">=3"
    assert _floors(extras["sweep"])["optuna"] == ">=4"  # JournalFileBackend
    assert _floors(extras["postgres"]) == {"psycopg": ">=3.1", "sqlalchemy": ">=2.1"}
    assert Requirement(extras["postgres"][0]).extras == {"binary"}


def test_installed_packages_meet_the_declared_bounds():
    project = _project()
    requirements = [Requirement(r) for group in (project["dependencies"], *project["optional-dependencies"].values())
                    for r in group]
    checked = 0
    for req in requirements:
        try:
            version = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            continue  # an extra this environment does not install (cuda, postgres)
        assert req.specifier.contains(version, prereleases=True), f"{req.name} {version} does not meet {req}"
        checked += 1
    assert checked >= 10


def test_postgres_url_reaches_the_driver_and_fails_on_the_connection():
    pytest.importorskip("psycopg")
    # nothing listens on port 1: the error must come from the server connection, not from a missing driver
    with pytest.raises(ConfigError) as err:
        open_storage("postgresql://hybrids:secret@127.0.0.1:1/hybrids")
    message = str(err.value)
    assert message.startswith("cannot open study storage 'postgresql://hybrids:***@127.0.0.1:1/hybrids': "
                              "(psycopg.OperationalError) connection failed")
    assert "driver" not in message and "secret" not in message  # a password never reaches the screen or a log


def test_missing_postgres_driver_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg now fails as if not installed
    with pytest.raises(ConfigError, match=r"no database driver .*; pip install 'hybrids\[postgres\]' \(psycopg 3"):
        open_storage("postgresql://hybrids@127.0.0.1:1/hybrids")


def test_gpu_benchmark_says_needs_cuda_on_a_cpu_machine(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("gpu_blocks", ROOT / "benchmarks" / "gpu_blocks.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main([]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"gpu_blocks: needs CUDA (torch {torch.__version__} sees no CUDA device)\n"
