"""TorchRL environments and the sizes the model reads from them.

``make_env`` builds a ``GymEnv`` with the transforms every part of the project relies on: float32 observations,
a step counter (and optional time limit), and the running episode return ``episode_reward``. ``EnvSpec`` holds the
sizes linked from the data module into the model by the CLI, so they are never typed in YAML.

Ids of the form ``suite:name`` (``metaworld:reach-v3``, ``dmc:cheetah-run``, ``rlbench:reach_target``) go to the
suite's own module ``arsq_lightning.envs.<suite>`` (:data:`SUITES`), imported only when used, which implements
the :class:`Suite` protocol: ``make_base_env``, ``env_spec_of`` and ``missing_dataset_hint``.
A suite env's ``observation`` is a flat float vector or a nested TensorDict (e.g. ``pixels`` uint8 + ``proprio``),
described by ``EnvSpec.observation_shapes``.

Frame stacking (env kwarg ``frame_stack: k > 1``, nested observations only) appends TorchRL ``CatFrames`` transforms:
``pixels [V, C, H, W]`` are stacked on the channel axis (``[V, k * C, H, W]``, oldest frame first), every other entry
on its last axis (``proprio [P] -> [k * P]``), as CQN does (§5.1). After a reset the stack holds ``k`` copies of the
first frame, and ``("next", "observation")`` holds the next step's stack, so stored transitions are self-contained.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from dataclasses import dataclass, field
from typing import Protocol

import gymnasium as gym
import numpy as np
import torch
from torchrl.envs import (
    CatFrames,
    Compose,
    DoubleToFloat,
    EnvBase,
    GymEnv,
    RewardSum,
    StepCounter,
    Transform,
    TransformedEnv,
)

from arsq_lightning.errors import ConfigError
from arsq_lightning.keys import OBSERVATION, PIXELS


@dataclass
class EnvSpec:
    """Sizes of an environment: observation size and box action bounds (one value per action dim).

    ``observation_shapes`` is ``None`` for a flat vector observation of size ``obs_dim``; for a nested observation
    it maps each entry under ``observation`` to its shape (e.g. ``{"pixels": [4, 9, 84, 84], "proprio": [4]}``) and
    ``obs_dim`` is the total number of elements. ``success_reward`` marks sparse success tasks, whose evaluation also
    logs a success rate.
    """

    obs_dim: int
    action_low: list[float] = field(default_factory=list)
    action_high: list[float] = field(default_factory=list)
    observation_shapes: dict[str, list[int]] | None = None
    success_reward: bool = False  # reward is 1 on the success step (which ends the episode), else 0: return = success

    @property
    def encoder_input(self) -> int | dict[str, list[int]]:
        """What an encoder factory is called with: ``obs_dim`` for vectors, ``observation_shapes`` otherwise."""
        return self.obs_dim if self.observation_shapes is None else self.observation_shapes

    @property
    def action_dim(self) -> int:
        return len(self.action_low)


# Checkpoints store the spec among the module's hyperparameters; allow it under torch.load(weights_only=True).
torch.serialization.add_safe_globals([EnvSpec])


def make_env(env_id: str, *, seed: int = 0, max_episode_steps: int | None = None, **env_kwargs) -> TransformedEnv:
    """A seeded TorchRL env for a gymnasium id, with float32 observations and ``episode_reward``.

    Args:
        env_id: gymnasium id, e.g. ``Pendulum-v1`` or ``Hopper-v5``.
        seed: env seed.
        max_episode_steps: time limit passed to gymnasium (``None`` keeps the registered one).
        **env_kwargs: forwarded to ``gymnasium.make``.

    Raises:
        ConfigError: unknown id, or a non-box / non-vector space.
    """
    suite = _suite(env_id)
    frame_stack = _pop_frame_stack(env_id, env_kwargs)
    if suite is not None:
        base = suite.make_base_env(env_id.partition(":")[2], seed=seed, max_episode_steps=max_episode_steps,
                                   **env_kwargs)
        stacking = frame_stack_transforms(_nested_keys(base), frame_stack)
        # a suite's env may itself be a TransformedEnv: its transforms and these become one chain
        env = TransformedEnv(base, Compose(StepCounter(), DoubleToFloat(), RewardSum(), *stacking), auto_unwrap=True)
        env.set_seed(seed)
        return env
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
    """Read :class:`EnvSpec` from gymnasium's spaces (or the suite's module) without building a TorchRL env."""
    suite = _suite(env_id)
    frame_stack = _pop_frame_stack(env_id, env_kwargs)
    if suite is not None:
        spec = suite.env_spec_of(env_id.partition(":")[2], **env_kwargs)
        if frame_stack == 1:
            return spec
        if spec.observation_shapes is None:
            raise ConfigError(f"{env_id}: frame_stack needs a nested (pixel) observation; this env's is a flat vector")
        shapes = stacked_shapes(spec.observation_shapes, frame_stack)
        return dataclasses.replace(spec, obs_dim=nested_obs_dim(shapes), observation_shapes=shapes)
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


class Suite(Protocol):
    """A family of ``suite:name`` envs: a module under ``arsq_lightning.envs`` with these three functions."""

    def make_base_env(self, name: str, *, seed: int = 0, max_episode_steps: int | None = None, **kwargs) -> EnvBase:
        """The TorchRL env of task ``name`` (``make_env`` adds the common transforms)."""

    def env_spec_of(self, name: str, **kwargs) -> EnvSpec:
        """Its sizes, without starting a simulator when the suite can avoid it."""

    def missing_dataset_hint(self, name: str, path: str, **kwargs) -> str:
        """How to make a missing dataset file at ``path`` for the task, or ``""``."""


# Each suite's module, imported only when one of its ids is used (their simulators are optional dependencies).
SUITES = {"metaworld": "arsq_lightning.envs.metaworld", "dmc": "arsq_lightning.envs.dmc",
          "rlbench": "arsq_lightning.envs.rlbench"}


def _pop_frame_stack(env_id: str, env_kwargs: dict) -> int:
    """Remove ``frame_stack`` from the env kwargs (it is not the base env's option) and check it."""
    frame_stack = int(env_kwargs.pop("frame_stack", 1))
    if frame_stack < 1:
        raise ConfigError(f"frame_stack must be >= 1, got {frame_stack}")
    if frame_stack > 1 and _suite(env_id) is None:
        raise ConfigError(f"{env_id}: frame_stack is only supported for nested (pixel) observations of suite envs")
    return frame_stack


def _nested_keys(env) -> list[str]:
    """Entries of a nested ``observation`` (empty for a flat one)."""
    spec = env.observation_spec[OBSERVATION]
    return list(spec.keys()) if hasattr(spec, "keys") else []


def stacked_shapes(shapes: dict[str, list[int]], frame_stack: int) -> dict[str, list[int]]:
    """Shapes after stacking ``frame_stack`` frames: ``pixels`` on the channel axis (-3), other entries on the last."""
    out = {}
    for key, shape in shapes.items():
        shape = list(shape)
        axis = -3 if key == PIXELS else -1
        shape[axis] *= frame_stack
        out[key] = shape
    return out


def frame_stack_transforms(keys: list[str], frame_stack: int) -> list[Transform]:
    """``CatFrames`` over ``("observation", key)`` for every nested entry (see the module doc); none for ``k = 1``."""
    if frame_stack == 1:
        return []
    if not keys:
        raise ConfigError("frame_stack needs a nested (pixel) observation; this env's is a flat vector")
    by_axis: dict[int, list] = {}
    for key in keys:
        by_axis.setdefault(-3 if key == PIXELS else -1, []).append((OBSERVATION, key))
    return [CatFrames(N=frame_stack, dim=axis, in_keys=in_keys) for axis, in_keys in by_axis.items()]


def dataset_hint(env_id: str, path: str, **env_kwargs) -> str:
    """How to make a missing dataset file for this env (the suite's ``missing_dataset_hint``), or ``""``."""
    suite = _suite(env_id)
    return "" if suite is None else suite.missing_dataset_hint(env_id.partition(":")[2], path, **env_kwargs)


def nested_obs_dim(shapes: dict[str, list[int]]) -> int:
    """``EnvSpec.obs_dim`` of a nested observation: the elements of all its entries."""
    return sum(math.prod(shape) for shape in shapes.values())


def _suite(env_id: str) -> Suite | None:
    """The suite module for ``suite:name`` ids, ``None`` for gymnasium ids."""
    prefix, colon, _ = env_id.partition(":")
    if not colon:
        return None
    if prefix not in SUITES:
        raise ConfigError(f"unknown env suite {prefix!r} in {env_id!r}: use a gymnasium id or one of "
                          + ", ".join(f"{name}:<task>" for name in SUITES))
    return importlib.import_module(SUITES[prefix])


def stack_frames(frames: torch.Tensor, frame_stack: int, *, pixels: bool) -> torch.Tensor:
    """Stack an episode's frames offline exactly as the env-side ``CatFrames`` does (for demos stored unstacked).

    Args:
        frames: one episode, ``[T, V, C, H, W]`` (``pixels``) or ``[T, P]``.
        frame_stack: ``k``; step ``t`` holds frames ``t-k+1 .. t`` (oldest first), the first frame repeated before
            the episode's start.
        pixels: stack on the channel axis (``[T, V, k * C, H, W]``) rather than the last one (``[T, k * P]``).
    """
    steps = frames.shape[0]
    index = (torch.arange(steps)[:, None] + torch.arange(1 - frame_stack, 1)[None]).clamp(min=0)  # [T, k]
    stacked = frames[index]  # [T, k, ...]
    if pixels:
        t, k, v, c, h, w = stacked.shape
        return stacked.permute(0, 2, 1, 3, 4, 5).reshape(t, v, k * c, h, w)
    return stacked.reshape(steps, -1)
