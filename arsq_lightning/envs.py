"""TorchRL environments and the sizes the model reads from them.

``make_env`` builds a ``GymEnv`` with the transforms every part of the project relies on: float32 observations,
a step counter (and optional time limit), and the running episode return ``episode_reward``. ``EnvSpec`` holds the
sizes linked from the data module into the model by the CLI, so they are never typed in YAML.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
import torch
from torchrl.envs import Compose, DoubleToFloat, GymEnv, RewardSum, StepCounter, TransformedEnv

from arsq_lightning.errors import ConfigError


@dataclass
class EnvSpec:
    """Sizes of an environment: observation size and box action bounds (one value per action dim)."""

    obs_dim: int
    action_low: list[float] = field(default_factory=list)
    action_high: list[float] = field(default_factory=list)

    @property
    def action_dim(self) -> int:
        return len(self.action_low)


# Checkpoints store the spec among the module's hyperparameters; allow it under torch.load(weights_only=True).
torch.serialization.add_safe_globals([EnvSpec])


def make_env(env_id: str, *, seed: int = 0, max_episode_steps: int | None = None, **env_kwargs) -> TransformedEnv:
    """A seeded TorchRL env for a gymnasium id, with float32 observations and ``episode_reward``.

    Args:
        env_id: gymnasium id, e.g. ``Pendulum-v1`` or ``Hopper-v5``.

    Keyword Args:
        seed: env seed.
        max_episode_steps: time limit passed to gymnasium (``None`` keeps the registered one).
        **env_kwargs: forwarded to ``gymnasium.make``.

    Raises:
        ConfigError: unknown id, or a non-box / non-vector space.
    """
    try:
        gym.spec(env_id)
    except gym.error.Error as err:
        raise ConfigError(f"unknown env id {env_id!r} ({err})") from None
    if max_episode_steps is not None:
        env_kwargs["max_episode_steps"] = max_episode_steps
    base = GymEnv(env_id, **env_kwargs)
    env = TransformedEnv(base, Compose(StepCounter(), DoubleToFloat(), RewardSum()))
    env.set_seed(seed)
    return env


def env_spec_of(env_id: str, **env_kwargs) -> EnvSpec:
    """Read :class:`EnvSpec` from gymnasium's spaces without building a TorchRL env."""
    try:
        probe = gym.make(env_id, **env_kwargs)
    except gym.error.Error as err:
        raise ConfigError(f"unknown env id {env_id!r} ({err})") from None
    obs_space, act_space = probe.observation_space, probe.action_space
    probe.close()
    if not isinstance(act_space, gym.spaces.Box) or len(act_space.shape) != 1:
        raise ConfigError(f"{env_id}: ARSQ needs a 1-D continuous (Box) action space, got {act_space}")
    if not np.all(np.isfinite(act_space.low)) or not np.all(np.isfinite(act_space.high)):
        raise ConfigError(f"{env_id}: the action space must be bounded, got {act_space}")
    if not isinstance(obs_space, gym.spaces.Box):
        raise ConfigError(f"{env_id}: only Box observation spaces are supported for now, got {obs_space}")
    return EnvSpec(obs_dim=int(np.prod(obs_space.shape)), action_low=act_space.low.astype(float).tolist(),
                   action_high=act_space.high.astype(float).tolist())
