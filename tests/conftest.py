"""Shared fixtures. Heavy services (Ray clusters, MLflow servers) are started once per session
where tests can share them, and always stopped."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def storage(tmp_path, monkeypatch):
    """A private GENMEM_STORAGE for one test."""
    root = tmp_path / "store"
    monkeypatch.setenv("GENMEM_STORAGE", str(root))
    return root


@pytest.fixture(autouse=True)
def _torch_threads():
    # Two cores: keep intra-op threads fixed so timings and float reductions are repeatable.
    torch.set_num_threads(2)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
