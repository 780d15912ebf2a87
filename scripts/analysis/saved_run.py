"""A finished offline-to-online run, read back from its checkpoint for the analysis scripts beside this file, its
critic's ``Q(s, a)`` and the value bound they compare it with."""

from __future__ import annotations

import torch
from torch import Tensor

from arsq_lightning.algos.arsq.critic import ARSQCritic
from arsq_lightning.algos.cqn.critic import CQNCritic, at_bins
from arsq_lightning.data.offline import OfflineToOnlineDataModule
from arsq_lightning.keys import NEXT_REWARD
from arsq_lightning.module import ARSQModule


def load_run(checkpoint: str, dataset: str | None = None) -> tuple[ARSQModule, OfflineToOnlineDataModule]:
    """The run's module (critic in eval mode, on the CPU) and its data module rebuilt from the saved settings
    (``dataset``: the dataset file, if it is no longer where the run read it)."""
    torch.set_num_threads(1)
    module = ARSQModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=False)
    module.critic.eval()
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)["datamodule_hyper_parameters"]
    settings = {k: v for k, v in saved.items() if not k.startswith("_")}
    if dataset:
        settings["dataset"] = dataset
    return module, OfflineToOnlineDataModule(**settings)


def value_bound(data: OfflineToOnlineDataModule, gamma: float) -> float:
    """``max |r| / (1 - gamma)`` over the RL buffer's dataset rows, rewards as scaled for training: no discounted
    return exceeds it."""
    return float(data.split.rl[NEXT_REWARD].abs().max()) / (1.0 - gamma)


def action_value(critic: ARSQCritic | CQNCritic, obs: Tensor, action: Tensor) -> Tensor:
    """``Q(s, a)`` ``[B]``: ARSQ's minimum over its critics; CQN's mean over (level, dim) of its expected values at
    the action's bins (each an estimate of the same ``Q(s, a)``)."""
    if isinstance(critic, ARSQCritic):
        return critic.evaluate(obs, action)[0].min(0).values
    logits, codes = critic.evaluate(obs, action)
    return critic.head.expected_q(at_bins(logits, codes)).mean(dim=(1, 2))
