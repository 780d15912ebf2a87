"""The optimiser: Adam is fused (one kernel per step) by default and in every shipped config; an optional learning-rate
schedule steps after every update."""

from __future__ import annotations

import pytest
import torch
import yaml

from arsq_lightning import ARSQModule, EnvSpec
from arsq_lightning.errors import ConfigError

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


def _multistep(milestones: list[int], gamma: float):
    return lambda optimizer: torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=gamma)


def test_a_learning_rate_schedule_steps_after_every_update():
    module = ARSQModule(EnvSpec(3, [-1.0], [1.0]), lr_scheduler=_multistep([3], 0.1))
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"  # Lightning steps it after each update, not each epoch
    rates = []
    for _ in range(5):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([3e-4, 3e-4, 3e-4, 3e-5, 3e-5])


def test_a_bad_schedule_is_one_line_before_the_run():
    def bad(optimizer):
        return torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.0)

    with pytest.raises(ConfigError, match="^model.lr_scheduler: .*factor") as err:
        ARSQModule(EnvSpec(3, [-1.0], [1.0]), lr_scheduler=bad)
    assert "\n" not in str(err.value)
