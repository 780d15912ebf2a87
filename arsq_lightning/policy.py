"""A TorchRL-compatible actor over an :class:`~arsq_lightning.algos.arsq.critic.ARSQCritic`.

The collector and the evaluation rollouts call it with TensorDicts. It samples from the Boltzmann policy when
TorchRL's exploration type is ``RANDOM`` (what collectors set) and takes the argmax otherwise (e.g. under
``set_exploration_type(ExplorationType.DETERMINISTIC)`` or outside any context).
"""

from __future__ import annotations

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModule
from torch import Tensor, nn
from torchrl.envs.utils import ExplorationType, exploration_type

from arsq_lightning.algos.arsq.critic import ARSQCritic
from arsq_lightning.keys import ACTION, OBSERVATION
from arsq_lightning.nets.augment import augmentation_disabled


class ARSQActor(nn.Module):
    """``observation [B, obs_dim] -> action [B, D]`` on the observation's device.

    A nested observation (a TensorDict ``[B]`` or unbatched ``[]``, e.g. ``pixels`` + ``proprio``) is passed to the
    critic's encoder as is. Image augmentation is switched off while acting.

    Args:
        critic: the critic that selects actions (shared, not copied: training updates are seen at once).
        generator: RNG for stochastic acting (one per rank, so ranks explore differently).
    """

    def __init__(self, critic: ARSQCritic, generator: torch.Generator | None = None):
        super().__init__()
        self.critic = critic
        self.generator = generator

    def forward(self, observation: Tensor | TensorDictBase) -> Tensor:
        device = self.critic.discretizer.low.device
        nested = isinstance(observation, TensorDictBase)
        squeeze = observation.batch_dims == 0 if nested else observation.dim() == 1
        obs = observation.unsqueeze(0) if squeeze else observation
        if self.generator is not None and self.generator.device != device:
            self.generator = torch.Generator(device).manual_seed(self.generator.initial_seed())
        with augmentation_disabled(self.critic):
            action = self.critic.act(obs.to(device), deterministic=exploration_type() != ExplorationType.RANDOM,
                                     generator=self.generator)
        out_device = _device_of(observation) if nested else observation.device
        action = action.to(out_device)
        return action.squeeze(0) if squeeze else action


def _device_of(observation: TensorDictBase) -> torch.device:
    """The TensorDict's device, or its first entry's when it has none."""
    if observation.device is not None:
        return observation.device
    return next(iter(observation.values(include_nested=True, leaves_only=True))).device


def make_actor(critic: ARSQCritic, generator: torch.Generator | None = None) -> TensorDictModule:
    """Wrap :class:`ARSQActor` to read ``observation`` and write ``action``."""
    return TensorDictModule(ARSQActor(critic, generator), in_keys=[OBSERVATION], out_keys=[ACTION])
