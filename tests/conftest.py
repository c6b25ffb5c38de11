import importlib
import importlib.util
import math
import os
import pkgutil
import uuid

import pytest
import torch
from torch.utils._device import DeviceContext


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _context_device():
    """The device of an enclosing `with torch.device(...)`, which only sees the real torch.empty."""
    for mode in reversed(torch.overrides._get_current_function_mode_stack()):
        if isinstance(mode, DeviceContext):
            return mode.device
    return None


@pytest.fixture(autouse=True)
def _seed_and_poison(monkeypatch):
    """Seed every test; fill torch.empty with NaN so that uninitialised memory shows up in results."""
    torch.manual_seed(0)
    real_empty = torch.empty

    def empty(*args, **kwargs):
        if kwargs.get("device") is None and (device := _context_device()) is not None:
            kwargs["device"] = device
        t = real_empty(*args, **kwargs)
        if t.is_floating_point() and t.device.type != "meta":
            with torch.no_grad():  # a leaf made with requires_grad=True (checkpoint's dummy) takes no in-place op
                t.fill_(math.nan)
        return t

    monkeypatch.setattr(torch, "empty", empty)


def _tile_volume(config) -> int:
    return math.prod(v for k, v in config.kwargs.items() if k.startswith("BLOCK")) * config.num_stages


@pytest.fixture(autouse=True, scope="session")
def _one_config_per_mamba_ssm_kernel():
    """GPU tests check numbers, not speed: each of mamba-ssm's autotuned Triton kernels keeps only its smallest config
    (tiles x stages: the first config of some needs more shared memory than an H200 has), which spares the ~100 s of
    benchmarking that every new shape otherwise costs."""
    if not torch.cuda.is_available() or importlib.util.find_spec("mamba_ssm") is None:
        yield
        return
    import mamba_ssm.ops.triton as package
    from triton.runtime.autotuner import Autotuner

    trimmed = []
    for info in pkgutil.iter_modules(package.__path__):
        try:
            module = importlib.import_module(f"{package.__name__}.{info.name}")
        except Exception:  # a module this build cannot import is not used by our tests either
            continue
        for kernel in vars(module).values():
            if isinstance(kernel, Autotuner) and len(kernel.configs) > 1:
                trimmed.append((kernel, kernel.configs))
                kernel.configs = [min(kernel.configs, key=_tile_volume)]
    yield
    for kernel, configs in trimmed:
        kernel.configs = configs


@pytest.fixture(autouse=True, scope="session")
def _outside_the_checkout(tmp_path_factory):
    """A test that leaves the default runs/ in place writes it under a session folder, never into the checkout
    (a checkout's own runs/ is the user's: studies, reports)."""
    here = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(here)


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads; on a busy 2-core machine threads make a step many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def postgres_url() -> str:
    """The test server's URL (HYBRIDS_TEST_POSTGRES, printed by `.ci/postgres start`); without it the test is
    skipped, or fails where HYBRIDS_REQUIRE_POSTGRES=1 (CI must run every PostgreSQL test)."""
    url = os.environ.get("HYBRIDS_TEST_POSTGRES")
    if not url:
        if os.environ.get("HYBRIDS_REQUIRE_POSTGRES") == "1":
            pytest.fail("HYBRIDS_REQUIRE_POSTGRES=1 but HYBRIDS_TEST_POSTGRES is unset (`.ci/postgres start` sets it)")
        pytest.skip("no PostgreSQL server: set HYBRIDS_TEST_POSTGRES (eval \"$(.ci/postgres start)\")")
    return url


@pytest.fixture
def postgres_databases():
    """Makes fresh databases on the test server (each call: one more URL), dropped afterwards."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    server = make_url(postgres_url())
    admin = create_engine(server, isolation_level="AUTOCOMMIT", pool_pre_ping=True)  # outlives a restart
    names = []

    def create() -> str:
        names.append(f"hybrids_test_{uuid.uuid4().hex[:10]}")
        with admin.connect() as conn:
            conn.execute(text(f"CREATE DATABASE {names[-1]}"))
        return server.set(database=names[-1]).render_as_string(hide_password=False)

    yield create
    with admin.connect() as conn:
        for name in names:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    admin.dispose()


@pytest.fixture
def postgres(postgres_databases):
    """A fresh database on the test server, dropped afterwards: its URL."""
    return postgres_databases()
