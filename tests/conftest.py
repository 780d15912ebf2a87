"""Shared test setup: one CPU thread (the test machine is small and shared) and a fixed seed for every test."""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # offscreen rendering on the CPU; dm_control aborts when it picks glfw

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same global RNG state, so random weights and data are reproducible."""
    torch.manual_seed(0)
