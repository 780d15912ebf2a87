"""arsq-compare's AUC (arsq_lightning/tools/compare.py): the time-average of a piecewise-linear evaluation curve
(works on NumPy 1.26 and 2)."""

from __future__ import annotations

import math

import numpy as np

from arsq_lightning.tools.compare import time_average


def test_time_average_of_a_piecewise_linear_curve_matches_dense_sampling():
    rng = np.random.default_rng(0)
    for _ in range(20):
        steps = np.sort(rng.choice(np.arange(0, 5000, 10), size=6, replace=False)).astype(float)
        curve = np.column_stack([steps, rng.normal(size=6)])
        dense = np.linspace(steps[0], steps[-1], 200_001)
        assert math.isclose(time_average(curve), np.interp(dense, steps, curve[:, 1]).mean(), abs_tol=1e-4)


def test_time_average_edge_cases():
    assert time_average(np.array([[0.0, 1.0], [10.0, 3.0]])) == 2.0  # a line: the mean of its ends
    assert time_average(np.array([[7.0, -4.0]])) == -4.0  # one evaluation: its value
    assert math.isnan(time_average(np.zeros((0, 2))))
