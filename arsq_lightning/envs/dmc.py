"""DeepMind Control Suite tasks through TorchRL's ``DMControlWrapper``: ids ``dmc:<domain>-<task>`` (e.g. cheetah-run).

Env kwargs:

* ``observation: state`` (default): the dm_control observation dict flattened into one float vector, in the task's own
  key order (as DrQ-v2 / CQN do);
* ``observation: pixels``: a nested ``observation`` with ``pixels`` uint8 ``[1, 3, image_size, image_size]`` (one
  camera view, channels first) from MuJoCo's offscreen renderer; ``frame_stack`` (handled by
  :func:`arsq_lightning.envs.core.make_env`) stacks frames on the channel axis;
* ``image_size`` (84), ``camera_id`` (``None``: 2 for quadruped, else 0, as DrQ-v2), ``action_repeat`` (1; CQN's
  DMC setting is 2, docs/algorithm.md §6.5): each action is applied ``action_repeat`` times, rewards summed, and pixels
  rendered once per agent step.

Episodes end by dm_control's own time limit (1000 physics control steps, i.e. ``1000 / action_repeat`` agent steps),
reported as truncation; ``max_episode_steps`` shortens it (in agent steps). Rendering uses ``MUJOCO_GL=egl`` unless
the variable is already set (headless; on a CPU-only machine EGL runs Mesa's software renderer, ~20 ms per 84x84
frame here); it must be set before dm_control is first imported, which importing this module does.
"""

from __future__ import annotations

import os

import numpy as np

from arsq_lightning.envs.core import EnvSpec, nested_obs_dim
from arsq_lightning.errors import ConfigError, require
from arsq_lightning.keys import OBSERVATION, PIXELS

OBSERVATIONS = ("state", "pixels")
# dm_control picks its GL backend when first imported: choose headless EGL unless the user chose (import this module
# before dm_control; glfw, dm_control's first choice, needs a display).
os.environ.setdefault("MUJOCO_GL", "egl")


def _split(name: str) -> tuple[str, str]:
    domain, dash, task = name.partition("-")
    if not dash or not domain or not task:
        raise ConfigError(f"dmc ids look like dmc:<domain>-<task> (e.g. dmc:cheetah-run), got dmc:{name}")
    return domain, task


def _load(name: str, seed: int | None, max_episode_steps: int | None, action_repeat: int):
    """The dm_control ``control.Environment`` of ``domain-task`` with the requested time limit (in agent steps)."""
    try:
        from dm_control import suite
    except ImportError:
        raise ConfigError("dmc: envs need DeepMind Control: pip install 'dm_control<1.0.29' "
                          "(1.0.28 matches mujoco 3.3.0, which Meta-World 3.1.1 pins)") from None

    domain, task = _split(name)
    if (domain, task) not in suite.ALL_TASKS:
        raise ConfigError(f"unknown DeepMind Control task dmc:{name} (e.g. dmc:cheetah-run, dmc:walker-walk)")
    task_kwargs = {"random": seed}
    env = suite.load(domain, task, task_kwargs=task_kwargs)
    if max_episode_steps is not None:
        require(max_episode_steps >= 1, f"max_episode_steps must be >= 1, got {max_episode_steps}")
        # dm_control ends an episode once step_count >= time_limit / control_timestep (in physics control steps);
        # half a step below the target keeps float rounding from adding a step.
        task_kwargs["time_limit"] = (max_episode_steps * action_repeat - 0.5) * env.control_timestep()
        env = suite.load(domain, task, task_kwargs=task_kwargs)
    return env


class _ActionRepeat:
    """Repeat each action ``repeat`` times (rewards summed, stopping at the episode's end) *below* the pixel wrapper,
    so a frame is rendered once per agent step. Other attributes (``physics``, ``task``) come from the wrapped env."""

    def __init__(self, env, repeat: int):
        self._env, self._repeat = env, repeat

    def reset(self):
        return self._env.reset()

    def step(self, action):
        reward = 0.0
        for _ in range(self._repeat):
            time_step = self._env.step(action)
            reward += time_step.reward or 0.0
            if time_step.last():
                break
        return time_step._replace(reward=reward)

    def observation_spec(self):
        return self._env.observation_spec()

    def action_spec(self):
        return self._env.action_spec()

    def reward_spec(self):
        return self._env.reward_spec()

    def discount_spec(self):
        return self._env.discount_spec()

    def __getattr__(self, name):
        return getattr(self._env, name)


def _check(observation: str, image_size, action_repeat) -> tuple[int, int]:
    """Validate the kwargs; returns ``image_size, action_repeat`` as ints (command-line dict overrides are strings)."""
    require(observation in OBSERVATIONS, f"dmc observation must be one of {OBSERVATIONS}, got {observation!r}")
    try:
        image_size, action_repeat = int(image_size), int(action_repeat)
    except ValueError:
        raise ConfigError(f"dmc image_size and action_repeat must be integers, got {image_size!r}, "
                          f"{action_repeat!r}") from None
    require(image_size >= 8, f"dmc image_size must be >= 8, got {image_size}")
    require(action_repeat >= 1, f"dmc action_repeat must be >= 1, got {action_repeat}")
    return image_size, action_repeat


def missing_dataset_hint(name: str, path: str, **kwargs) -> str:
    """No recipe to make a missing dataset for this suite: the error names the file only."""
    return ""


def make_base_env(name: str, *, seed: int = 0, max_episode_steps: int | None = None, observation: str = "state",
                  image_size: int = 84, action_repeat: int = 1, camera_id: int | None = None):
    """A TorchRL env for ``dmc:<name>`` with ``observation`` flat (state) or nested ``{pixels}`` (see module doc)."""
    from torchrl.envs import (
        CatTensors,
        Compose,
        DMControlWrapper,
        PermuteTransform,
        RenameTransform,
        TransformedEnv,
        UnsqueezeTransform,
    )

    image_size, action_repeat = _check(observation, image_size, action_repeat)
    env = _load(name, seed, max_episode_steps, action_repeat)
    if observation == "state":
        keys = list(env.observation_spec().keys())
        base = DMControlWrapper(env, frame_skip=action_repeat)
        scalars = [k for k in keys if len(base.observation_spec[k].shape) == 0]
        transforms = [UnsqueezeTransform(-1, in_keys=scalars)] if scalars else []
        transforms.append(CatTensors(in_keys=keys, out_key=OBSERVATION, del_keys=True, sort=False))
        return TransformedEnv(base, Compose(*transforms))
    from dm_control.suite.wrappers import pixels

    camera_id = (2 if _split(name)[0] == "quadruped" else 0) if camera_id is None else int(camera_id)
    rendered = pixels.Wrapper(_ActionRepeat(env, action_repeat), pixels_only=True,
                              render_kwargs={"height": image_size, "width": image_size, "camera_id": camera_id})
    base = DMControlWrapper(rendered)
    return TransformedEnv(base, Compose(
        PermuteTransform((-1, -3, -2), in_keys=[PIXELS]),  # [H, W, 3] -> [3, H, W]
        UnsqueezeTransform(-4, in_keys=[PIXELS]),  # one camera view: [1, 3, H, W]
        RenameTransform([PIXELS], [(OBSERVATION, PIXELS)]),
    ))


def env_spec_of(name: str, *, observation: str = "state", image_size: int = 84, action_repeat: int = 1,
                camera_id: int | None = None, max_episode_steps: int | None = None) -> EnvSpec:
    """Sizes of ``dmc:<name>`` read from dm_control's specs (nothing is rendered)."""
    image_size, action_repeat = _check(observation, image_size, action_repeat)
    env = _load(name, None, None, action_repeat)
    action = env.action_spec()
    low, high = np.broadcast_to(action.minimum, action.shape), np.broadcast_to(action.maximum, action.shape)
    if observation == "state":
        obs_dim = sum(int(np.prod(spec.shape)) for spec in env.observation_spec().values())
        return EnvSpec(obs_dim=obs_dim, action_low=low.astype(float).tolist(), action_high=high.astype(float).tolist())
    shapes = {PIXELS: [1, 3, image_size, image_size]}
    return EnvSpec(obs_dim=nested_obs_dim(shapes), action_low=low.astype(float).tolist(),
                   action_high=high.astype(float).tolist(), observation_shapes=shapes)

