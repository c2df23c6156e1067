"""Shared fixtures: the tiny demo model, built once per test session through the
real save_pretrained/from_pretrained path."""

from __future__ import annotations

import os

import pytest
import torch

# Two cores: keep torch from oversubscribing when gRPC threads also run.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is present")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """DemoPaths of the tiny base and its demo adapters (pirate r=8, poet r=4)."""
    from qlora_serve.server.demo import ensure_demo

    return ensure_demo(tmp_path_factory.mktemp("demo-cache"))
