import math

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_poison(monkeypatch):
    """Seed every test; fill torch.empty with NaN so that uninitialised memory shows up in results."""
    torch.manual_seed(0)
    real_empty = torch.empty

    def empty(*args, **kwargs):
        # a `with torch.device(...)` context only recognises the real torch.empty: pass its device on
        kwargs.setdefault("device", torch.get_default_device())
        t = real_empty(*args, **kwargs)
        if t.is_floating_point() and t.device.type != "meta":
            t.fill_(math.nan)
        return t

    monkeypatch.setattr(torch, "empty", empty)
