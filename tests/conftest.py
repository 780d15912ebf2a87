"""Shared test setup: one CPU thread (the test machine is small and shared) and a fixed seed for every test."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same global RNG state, so random weights and data are reproducible."""
    torch.manual_seed(0)
