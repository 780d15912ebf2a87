"""Meta-World (MuJoCo) MT1 tasks as TorchRL envs: ids ``metaworld:<task>``, e.g. ``metaworld:reach-v3``.

One task, its goal / object positions drawn afresh at every reset from the env's seeded generator (Meta-World's
"goal-observable" single-task setting: the goal is part of the 39-d state), so ``set_seed(s)`` followed by a reset
always gives the same task instance and evaluation episodes with different seeds differ.

Observations (``observation`` entry):

* ``state``: the 39-d Meta-World vector (hand xyz, gripper opening, two objects' pose, the previous frame's 18
  values, goal xyz) as float32.
* ``pixels``: a sub-TensorDict with ``pixels`` uint8 ``[V, 3, H, W]`` (one view per camera, upright),
  ``proprio`` float32 ``[4]`` (hand xyz + gripper = state[:4]) and, with ``include_state``, ``state`` float32 ``[39]``.

Reward (docs/algorithm.md §5.1, as RLBench): ``sparse`` is exactly 1.0 on the step that succeeds and 0.0 otherwise, and
success terminates the episode, so an episode's return is its success (the success rate is the mean return);
``dense`` is Meta-World's shaped reward, and success does not end the episode unless ``terminate_on_success`` is
true (the default ``None`` terminates on success with the sparse reward only). Every
step also reports a boolean ``success``. Episodes are truncated after ``max_episode_steps`` (Meta-World: 500).

Rendering is MuJoCo's offscreen OpenGL on the CPU through its own GL context: ``MUJOCO_GL`` picks it (``egl``, the
default set here when unset; ``osmesa`` needs ``libosmesa6``). ``fast_render`` turns off shadows, reflections and
multisampling, which makes small frames many times cheaper. Meta-World's ``corner*`` cameras look at the table upside
down; their frames are rotated by 180 degrees.
"""

from __future__ import annotations

import atexit
import importlib
import os
import weakref
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Bounded, Categorical, Composite, Unbounded
from torchrl.envs import EnvBase

from arsq_lightning.envs.core import EnvSpec, nested_obs_dim
from arsq_lightning.errors import ConfigError, require
from arsq_lightning.keys import ACTION, DONE, OBSERVATION, PIXELS, PROPRIO, REWARD, SUCCESS, TERMINATED, TRUNCATED

os.environ.setdefault("MUJOCO_GL", "egl")  # only matters if mujoco is imported after this module

STATE_DIM = 39  # every Meta-World v3 task
PROPRIO_DIM = 4  # hand xyz + gripper opening
ACTION_DIM = 4  # hand dx, dy, dz (scaled by 1/100 m) + gripper effort, all in [-1, 1]
CAMERAS = ("topview", "corner", "corner2", "corner3", "corner4", "behindGripper", "gripperPOV")
UPSIDE_DOWN = ("corner", "corner2", "corner3", "corner4")
DEFAULT_CAMERAS = ("corner2", "gripperPOV")


def v3_environments() -> dict:
    """Meta-World's ``{task name: env class}`` of its v3 tasks; a one-line :class:`ConfigError` without Meta-World."""
    try:
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS
    except ImportError:
        raise ConfigError("metaworld: envs need Meta-World: pip install 'arsq-lightning[metaworld]'") from None
    return ALL_V3_ENVIRONMENTS


def task_names() -> list[str]:
    """All Meta-World v3 task names (``reach-v3``, ...)."""
    return list(v3_environments())


def _check(name: str, observation: str, cameras: Sequence[str], image_size: int, reward: str) -> None:
    require(name in task_names(), f"unknown Meta-World task {name!r}: use one of {', '.join(task_names())}")
    require(observation in ("state", "pixels"),
            f"metaworld observation must be 'state' or 'pixels', got {observation!r}")
    require(reward in ("sparse", "dense"), f"metaworld reward must be 'sparse' or 'dense', got {reward!r}")
    if observation == "pixels":
        require(len(cameras) > 0, "metaworld pixels need at least one camera")
        unknown = [c for c in cameras if c not in CAMERAS]
        require(not unknown, f"unknown Meta-World camera(s) {unknown}: use {', '.join(CAMERAS)}")
        require(8 <= image_size <= 480, f"metaworld image_size must lie in [8, 480], got {image_size}")


def observation_shapes(observation: str = "state", cameras: Sequence[str] = DEFAULT_CAMERAS, image_size: int = 84,
                       include_state: bool = False) -> dict[str, list[int]] | None:
    """Shapes under ``observation`` (``None`` for the flat state vector), without building an env."""
    if observation == "state":
        return None
    shapes = {PIXELS: [len(cameras), 3, image_size, image_size], PROPRIO: [PROPRIO_DIM]}
    if include_state:
        shapes["state"] = [STATE_DIM]
    return shapes


def env_spec_of(name: str, *, observation: str = "state", cameras: Sequence[str] = DEFAULT_CAMERAS,
                image_size: int = 84, include_state: bool = False, reward: str = "sparse",
                terminate_on_success: bool | None = None, **_ignored) -> EnvSpec:
    """Sizes of ``metaworld:<name>`` (fixed for every v3 task: nothing is built or rendered); ``_ignored`` takes the
    env options that do not change them (``max_episode_steps``, ``fast_render``)."""
    _check(name, observation, cameras, image_size, reward)
    shapes = observation_shapes(observation, cameras, image_size, include_state)
    obs_dim = STATE_DIM if shapes is None else nested_obs_dim(shapes)
    return EnvSpec(obs_dim=obs_dim, action_low=[-1.0] * ACTION_DIM, action_high=[1.0] * ACTION_DIM,
                   observation_shapes=shapes,
                   success_reward=reward == "sparse" and terminates_on_success(reward, terminate_on_success))


def terminates_on_success(reward: str, terminate_on_success: bool | None) -> bool:
    """Whether success ends the episode: as given, or by default with the sparse reward only."""
    return reward == "sparse" if terminate_on_success is None else terminate_on_success


def missing_dataset_hint(name: str, path: str, *, observation: str = "state",
                         cameras: Sequence[str] = DEFAULT_CAMERAS, image_size: int = 84, frame_stack: int = 1,
                         max_episode_steps: int | None = None, **_ignored) -> str:
    """The ``arsq-demos`` command that writes scripted-expert demos for this env to ``path``."""
    flags = f" --max-episode-steps {max_episode_steps}" if max_episode_steps else ""
    if observation == "pixels":
        flags += f" --observation pixels --cameras {' '.join(cameras)} --image-size {image_size}"
        flags += f" --frame-stack {frame_stack}" if frame_stack > 1 else ""
    return f"make it with: arsq-demos --task {name} --episodes 100 --noise 0.3{flags} --out {path}"


def make_base_env(name: str, *, seed: int = 0, max_episode_steps: int | None = None, **kwargs) -> MetaWorldEnv:
    """The suite entry point used by :func:`arsq_lightning.envs.core.make_env` (``kwargs``: see
    :class:`MetaWorldEnv`)."""
    return MetaWorldEnv(name, seed=seed, max_episode_steps=max_episode_steps, **kwargs)


def _gl_context_class():
    """MuJoCo's GL context class for ``MUJOCO_GL`` (chosen here, so it works even if mujoco was imported first)."""
    backend = os.environ.get("MUJOCO_GL", "egl").lower() or "egl"
    modules = {"egl": "mujoco.egl", "osmesa": "mujoco.osmesa", "glfw": "mujoco.glfw"}
    require(backend in modules, f"MUJOCO_GL={backend!r}: use egl, osmesa or glfw for Meta-World pixels")
    try:
        return importlib.import_module(modules[backend]).GLContext
    except Exception as err:  # noqa: BLE001 - missing system GL libraries surface as many error types
        hint = " (install libosmesa6)" if backend == "osmesa" else ""
        raise ConfigError(f"cannot use MuJoCo's {backend} renderer{hint}: {err}") from None


class MultiCameraRenderer:
    """Offscreen RGB frames of several fixed cameras: ``render(data) -> uint8 [V, 3, H, W]``, upright.

    Args:
        model: the ``MjModel`` (its ``vis.quality.offsamples`` is set to 0 when ``fast``).
        cameras: camera names.
        size: square frame size in pixels.
        fast: turn off shadows, reflections and multisampling.
    """

    def __init__(self, model, cameras: Sequence[str], size: int, fast: bool = True):
        import mujoco

        self._mj = mujoco
        if fast:
            model.vis.quality.offsamples = 0  # read when the MjrContext below allocates the offscreen buffer
        self._gl = _gl_context_class()(size, size)
        self._gl.make_current()
        self._model, self._size = model, size
        self._scene = mujoco.MjvScene(model, maxgeom=10_000)
        if fast:
            self._scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
            self._scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        self._option = mujoco.MjvOption()
        self._context = mujoco.MjrContext(model, mujoco.mjtFontScale.mjFONTSCALE_150)
        mujoco.mjr_setBuffer(mujoco.mjtFramebuffer.mjFB_OFFSCREEN, self._context)
        self._viewport = mujoco.MjrRect(0, 0, size, size)
        self._cameras = []
        for name in cameras:
            camera = mujoco.MjvCamera()
            camera.type = mujoco.mjtCamera.mjCAMERA_FIXED
            camera.fixedcamid = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, name)
            require(camera.fixedcamid >= 0, f"the Meta-World model has no camera {name!r}")
            self._cameras.append((camera, name in UPSIDE_DOWN))
        self._frame = np.empty((size, size, 3), dtype=np.uint8)
        # Free the GL objects at close(), when garbage-collected, or at exit before EGL's own exit hook (registered
        # when the first context was made) terminates the display: atexit runs hooks last-in first-out.
        self._release = weakref.finalize(self, _free_gl, self._context, self._gl)
        self._release.atexit = False
        atexit.register(self._release)

    def render(self, data) -> np.ndarray:
        mj = self._mj
        self._gl.make_current()
        out = np.empty((len(self._cameras), 3, self._size, self._size), dtype=np.uint8)
        for view, (camera, upside_down) in enumerate(self._cameras):
            mj.mjv_updateScene(self._model, data, self._option, None, camera, mj.mjtCatBit.mjCAT_ALL, self._scene)
            mj.mjr_render(self._viewport, self._scene, self._context)
            mj.mjr_readPixels(self._frame, None, self._viewport, self._context)
            # OpenGL rows run bottom-up: flip them; an upside-down camera needs a 180-degree turn on top of that,
            # which together is a left-right flip only.
            frame = self._frame[:, ::-1] if upside_down else self._frame[::-1]
            out[view] = frame.transpose(2, 0, 1)
        return out

    def close(self) -> None:
        self._release()


def _free_gl(context, gl) -> None:
    context.free()
    gl.free()


class MetaWorldEnv(EnvBase):
    """One Meta-World task as a TorchRL env (see the module doc for observations, reward and rendering).

    Args:
        name: task name, e.g. ``reach-v3``.
        seed: seed of the task-instance generator (goal and object positions at each reset).
        max_episode_steps: truncation length (``None``: Meta-World's 500).
        observation: ``state`` (flat 39-d vector) or ``pixels`` (nested pixels + proprio [+ state]).
        cameras: camera names for ``pixels``, from ``topview``, ``corner``..``corner4``, ``behindGripper``,
            ``gripperPOV``.
        image_size: frame height = width.
        include_state: add the 39-d state under ``observation/state`` in pixel mode.
        reward: ``sparse`` (1 on success, else 0) or ``dense`` (Meta-World's shaped reward).
        terminate_on_success: end the episode (``terminated``) on the first success (``None``: with the sparse reward
            only).
        fast_render: no shadows, reflections or multisampling.
    """

    def __init__(self, name: str, *, seed: int = 0, max_episode_steps: int | None = None,
                 observation: Literal["state", "pixels"] = "state", cameras: Sequence[str] = DEFAULT_CAMERAS,
                 image_size: int = 84, include_state: bool = False, reward: Literal["sparse", "dense"] = "sparse",
                 terminate_on_success: bool | None = None, fast_render: bool = True):
        _check(name, observation, cameras, image_size, reward)
        require(max_episode_steps is None or max_episode_steps >= 1,
                f"metaworld max_episode_steps must be >= 1, got {max_episode_steps}")
        super().__init__(device="cpu", batch_size=[])
        env = v3_environments()[name]()
        env._partially_observable = False  # the goal is part of the state (goal-observable single task)
        del env.sawyer_observation_space  # a cached property that depends on the flag above
        env._freeze_rand_vec, env.seeded_rand_vec = False, True  # a new task instance per reset, from env.np_random
        env._set_task_called = True
        env.max_path_length = max_episode_steps or env.max_path_length
        self.task, self.sim = name, env
        self.observation_mode, self.cameras, self.image_size = observation, tuple(cameras), image_size
        self.include_state, self.reward_mode = include_state, reward
        self.terminate_on_success = terminates_on_success(reward, terminate_on_success)
        self.max_episode_steps = env.max_path_length
        self.raw_observation: np.ndarray | None = None  # the last 39-d state (for scripted policies)
        self.renderer = (MultiCameraRenderer(env.model, cameras, image_size, fast=fast_render)
                         if observation == "pixels" else None)
        self._make_specs()
        self.set_seed(seed)

    def _make_specs(self) -> None:
        shapes = observation_shapes(self.observation_mode, self.cameras, self.image_size, self.include_state)
        if shapes is None:
            obs_spec = Unbounded(shape=(STATE_DIM,), dtype=torch.float32)
        else:
            entries = {PIXELS: Bounded(0, 255, shape=shapes[PIXELS], dtype=torch.uint8),
                       PROPRIO: Unbounded(shape=(PROPRIO_DIM,), dtype=torch.float32)}
            if self.include_state:
                entries["state"] = Unbounded(shape=(STATE_DIM,), dtype=torch.float32)
            obs_spec = Composite(entries)
        self.observation_spec = Composite(observation=obs_spec,
                                          success=Categorical(2, shape=(1,), dtype=torch.bool))
        self.action_spec = Bounded(-1.0, 1.0, shape=(ACTION_DIM,), dtype=torch.float32)
        self.reward_spec = Unbounded(shape=(1,), dtype=torch.float32)
        self.done_spec = Composite({key: Categorical(2, shape=(1,), dtype=torch.bool)
                                    for key in (DONE, TERMINATED, TRUNCATED)})

    def _observe(self, state: np.ndarray, success: bool) -> TensorDict:
        self.raw_observation = state
        vector = torch.as_tensor(state, dtype=torch.float32)
        if self.renderer is None:
            obs = vector
        else:
            obs = TensorDict({PIXELS: torch.from_numpy(self.renderer.render(self.sim.data)),
                              PROPRIO: vector[:PROPRIO_DIM].clone()}, batch_size=[])
            if self.include_state:
                obs["state"] = vector
        return TensorDict({OBSERVATION: obs, SUCCESS: torch.tensor([success])}, batch_size=[])

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs) -> TensorDictBase:
        state, _ = self.sim.reset()
        out = self._observe(state, False)
        for key in (DONE, TERMINATED, TRUNCATED):
            out[key] = torch.zeros(1, dtype=torch.bool)
        return out

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        action = tensordict[ACTION].detach().cpu().numpy().astype(np.float32)
        state, dense, _, truncated, info = self.sim.step(action)
        success = bool(info["success"])
        reward = float(success) if self.reward_mode == "sparse" else float(dense)
        terminated = success and self.terminate_on_success
        truncated = bool(truncated) and not terminated
        out = self._observe(state, success)
        out[REWARD] = torch.tensor([reward], dtype=torch.float32)
        out[TERMINATED] = torch.tensor([terminated])
        out[TRUNCATED] = torch.tensor([truncated])
        out[DONE] = torch.tensor([terminated or truncated])
        return out

    def _set_seed(self, seed: int | None) -> None:
        self.sim.seed(0 if seed is None else int(seed))

    def close(self, *, raise_if_closed: bool = True) -> None:
        if self.renderer is not None:
            self.renderer.close()
            self.renderer = None
        self.sim.close()
        super().close(raise_if_closed=raise_if_closed)
