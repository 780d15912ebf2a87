"""Shared test setup: one CPU thread (the test machine is small and shared), a fixed seed for every test, and the
markers that follow the folders: ``tests/unit`` (no marker: fast), ``tests/e2e`` (``e2e``: whole runs through the
CLI and scripts), ``tests/slow`` (``slow``: learning, DDP, compilation, dataset generation).

    python -m pytest -q                              # everything (the README's test command)
    python -m pytest -q -m "not e2e and not slow"    # the unit suite
    python -m pytest -q -m gpu                       # the tests that also run on a CUDA device (skipped without)
"""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # offscreen rendering on the CPU; dm_control aborts when it picks glfw

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        folder = item.path.parent.name
        if folder in ("e2e", "slow"):
            item.add_marker(getattr(pytest.mark, folder))


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same global RNG state, so random weights and data are reproducible."""
    torch.manual_seed(0)
