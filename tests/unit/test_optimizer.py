"""The optimiser: Adam is fused (one kernel per step) by default and in every shipped config."""

from __future__ import annotations

import yaml

from arsq_lightning import ARSQModule, EnvSpec

from helpers import REPO


def test_the_default_adam_is_fused():
    module = ARSQModule(EnvSpec(3, [-1.0], [1.0]))
    assert module.configure_optimizers().defaults["fused"] is True


def test_every_shipped_optimiser_is_fused():
    found = 0
    for path in (REPO / "configs").glob("**/*.yaml"):
        optimizer = (yaml.safe_load(path.read_text()) or {}).get("model", {}).get("optimizer")
        if optimizer:
            found += 1
            assert optimizer["init_args"].get("fused") is True, path
    assert found >= 20
