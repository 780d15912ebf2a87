"""RLBench tasks as TorchRL envs, with the ARSQ / CQN setup of docs/algorithm.md §5.1: ids ``rlbench:<task>``.

**Not run here**: RLBench needs CoppeliaSim 4.1 and PyRep, which this project's machines do not have; the tests cover
the parts that need no simulator (action bounds, observation conversion, specs and episode logic against a stand-in
task object, config parsing, the error message). Without RLBench, building an ``rlbench:`` env (or its spec) raises a
one-line :class:`~arsq_lightning.errors.ConfigError` saying what to install.

Setup (as CQN's ``rlbench_env.py``, which ARSQ reuses):

* observation: nested, ``pixels`` uint8 ``[4, 3, S, S]`` from the front, wrist, left- and right-shoulder cameras
  (``image_size`` S = 84) and ``proprio`` float32 ``[8]`` = 7 joint positions + the gripper-open flag; frame
  stacking (``frame_stack: 8`` in the paper) is done by :func:`arsq_lightning.envs.core.make_env`;
* action ``[8]``: 7 joint-position deltas (``JointPosition(absolute_mode=False)``) + a discrete gripper
  (``Discrete``: open when > 0.5), moved arm first (``MoveArmThenGripper``). The env's action box is
  ``[min - 0.2|min|, max + 0.2|max|]`` per dimension, from the demo actions' min / max (gripper statistics fixed at
  [0, 1], so its box is [0, 1.2]); the discretizer maps its unit grid linearly onto that box, which is CQN's mapping of
  [-1, 1] agent actions. See :func:`demo_action_bounds`;
* reward: sparse, 1 on the success step, which terminates the episode (``terminated``); the per-task time limit
  (:data:`EPISODE_LENGTHS`) truncates it (``truncated``, bootstrapped).

Env kwargs: ``image_size``, ``cameras``, ``demo_dataset`` (an HDF5 file from :mod:`arsq_lightning.data.rlbench_demos`,
for the action bounds) or explicit ``action_low`` / ``action_high``, ``dataset_root`` (RLBench's own demo store, for
``get_demos``), ``arm_max_velocity`` / ``arm_max_acceleration`` (2.0 / 8.0, the demo generator's settings),
``renderer`` (``opengl3`` or ``opengl``), ``headless``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Bounded, Categorical, Composite, Unbounded
from torchrl.envs import EnvBase

from arsq_lightning.envs.core import EnvSpec, nested_obs_dim
from arsq_lightning.errors import ConfigError, require
from arsq_lightning.keys import ACTION, DONE, OBSERVATION, PIXELS, PROPRIO, REWARD, TERMINATED, TRUNCATED

CAMERAS = ("front", "wrist", "left_shoulder", "right_shoulder")
PROPRIO_DIM = 8  # 7 joint positions + gripper open
ACTION_DIM = 8  # 7 joint-position deltas + gripper
ACTION_MARGIN = 0.2  # bounds widened by 20% of their magnitude (§5.1)
MAX_DEMO_DELTA = 0.2  # demos with a larger joint delta are skipped (§5.1)

# Per-task episode lengths (agent steps) of §5.1.
EPISODE_LENGTHS = {
    "reach_target": 50,
    **dict.fromkeys(("open_drawer", "lamp_on", "press_switch", "pick_up_cup", "sweep_to_dustpan",
                     "take_lid_off_saucepan", "insert_usb_in_computer"), 100),
    **dict.fromkeys(("open_door", "open_microwave", "turn_tap", "basketball_in_hoop"), 125),
    **dict.fromkeys(("stack_wine", "toilet_seat_up", "take_plate_off_colored_dish_rack", "put_money_in_safe",
                     "put_rubbish_in_bin", "meat_on_grill", "slide_block_to_target"), 150),
    **dict.fromkeys(("phone_on_base", "put_books_on_bookshelf"), 175),
    "open_oven": 225,
}

INSTALL_MESSAGE = ("RLBench is not installed: install CoppeliaSim 4.1 and PyRep (https://github.com/stepjam/PyRep), "
                   "then `pip install rlbench` (https://github.com/stepjam/RLBench), to use rlbench: envs")


def require_rlbench() -> None:
    """Raise the one-line install message unless RLBench (and with it PyRep / CoppeliaSim) can be imported."""
    try:
        import rlbench  # noqa: F401
    except Exception:  # ImportError, or PyRep's own error when CoppeliaSim is missing
        raise ConfigError(INSTALL_MESSAGE) from None


# --- actions ------------------------------------------------------------------------------------------------------
def widen(low: np.ndarray, high: np.ndarray, margin: float = ACTION_MARGIN) -> tuple[np.ndarray, np.ndarray]:
    """``[low - margin |low|, high + margin |high|]`` (CQN's ``_convert_action_to_raw`` bounds)."""
    low, high = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
    return low - margin * np.abs(low), high + margin * np.abs(high)


def demo_action_bounds(actions: np.ndarray, margin: float = ACTION_MARGIN) -> tuple[list[float], list[float]]:
    """The env's action box from demo actions ``[T, 8]``: per-dimension min / max of the 7 joint deltas, gripper
    statistics fixed at [0, 1], each widened by :func:`widen` (so the gripper box is [0, 1 + margin])."""
    actions = np.asarray(actions, dtype=np.float64).reshape(-1, ACTION_DIM)
    require(len(actions) > 0, "demo_action_bounds needs at least one demo action")
    low = np.append(actions[:, :-1].min(0), 0.0)
    high = np.append(actions[:, :-1].max(0), 1.0)
    low, high = widen(low, high, margin)
    return low.tolist(), high.tolist()


def default_action_bounds(margin: float = ACTION_MARGIN) -> tuple[list[float], list[float]]:
    """CQN's bounds without demos: joint deltas +-0.2 and gripper [0, 1], widened by :func:`widen`."""
    low, high = widen(np.append(np.full(7, -MAX_DEMO_DELTA), 0.0), np.append(np.full(7, MAX_DEMO_DELTA), 1.0), margin)
    return low.tolist(), high.tolist()


def to_unit(action: np.ndarray, low: Sequence[float], high: Sequence[float]) -> np.ndarray:
    """Env action -> agent space [-1, 1] (CQN's ``_convert_action_from_raw``)."""
    low, high = np.asarray(low), np.asarray(high)
    return (np.asarray(action) - low) / (high - low) * 2.0 - 1.0


def from_unit(action: np.ndarray, low: Sequence[float], high: Sequence[float]) -> np.ndarray:
    """Agent space [-1, 1] -> env action (CQN's ``_convert_action_to_raw``)."""
    low, high = np.asarray(low), np.asarray(high)
    return (np.asarray(action) + 1.0) / 2.0 * (high - low) + low


def resolve_action_bounds(action_low: Sequence[float] | None = None, action_high: Sequence[float] | None = None,
                          demo_dataset: str | None = None) -> tuple[list[float], list[float]]:
    """Explicit bounds, else the demos' (:func:`demo_action_bounds` of the HDF5 file's ``actions``), else CQN's
    defaults (:func:`default_action_bounds`)."""
    if action_low is not None or action_high is not None:
        require(action_low is not None and action_high is not None, "give both action_low and action_high")
        low, high = [float(x) for x in action_low], [float(x) for x in action_high]
        require(len(low) == len(high) == ACTION_DIM, f"RLBench actions have {ACTION_DIM} dims, got {len(low)}")
        require(all(lo < hi for lo, hi in zip(low, high)), f"action_low {low} must lie below action_high {high}")
        return low, high
    if demo_dataset:
        return demo_action_bounds(_stored_actions(os.path.expanduser(demo_dataset)))
    return default_action_bounds()


def _stored_actions(path: str) -> np.ndarray:
    """The ``actions`` dataset of a D4RL-layout HDF5 file (without reading its images)."""
    import h5py

    if not os.path.isfile(path) or not h5py.is_hdf5(path):
        raise ConfigError(f"{path}: no such HDF5 file (demo_dataset for the RLBench action bounds)")
    with h5py.File(path, "r") as f:
        if "actions" not in f:
            raise ConfigError(f"{path}: no 'actions' dataset")
        return np.asarray(f["actions"][()])


# --- observations ---------------------------------------------------------------------------------------------------
def convert_observation(obs, cameras: Sequence[str] = CAMERAS) -> dict[str, np.ndarray]:
    """An RLBench ``Observation`` (attributes ``<camera>_rgb`` ``[H, W, 3]`` uint8, ``joint_positions`` ``[7]``,
    ``gripper_open``) -> ``{"pixels": uint8 [V, 3, H, W], "proprio": float32 [8]}``."""
    images = []
    for camera in cameras:
        rgb = getattr(obs, f"{camera}_rgb", None)
        if rgb is None:
            raise ConfigError(f"the RLBench observation has no {camera}_rgb image (enable that camera)")
        images.append(np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1))
    proprio = np.append(np.asarray(obs.joint_positions, dtype=np.float32), np.float32(obs.gripper_open))
    return {PIXELS: np.stack(images), PROPRIO: proprio.astype(np.float32)}


# --- the env ------------------------------------------------------------------------------------------------------
class RLBenchEnv(EnvBase):
    """A TorchRL env over a launched RLBench ``TaskEnvironment`` (see the module doc).

    Args:
        task: the task environment: ``reset() -> (descriptions, obs)``, ``step(action) -> (obs, reward, success)``.
        episode_length: time limit in agent steps.
        image_size: camera resolution (square).
        cameras: camera names, in view order.
        action_low: the action box's lower corner (8 values).
        action_high: the action box's upper corner (8 values).
        on_close: called when the env closes (shuts the simulator down).
    """

    def __init__(self, task, *, episode_length: int, image_size: int, cameras: Sequence[str] = CAMERAS,
                 action_low: Sequence[float], action_high: Sequence[float], on_close: Callable[[], None] | None = None):
        super().__init__(batch_size=[])
        require(episode_length >= 1, f"episode_length must be >= 1, got {episode_length}")
        self._task, self._on_close = task, on_close
        self.episode_length, self.cameras = episode_length, tuple(cameras)
        self._steps = 0
        self.observation_spec = Composite(observation=Composite(
            pixels=Bounded(0, 255, (len(self.cameras), 3, image_size, image_size), dtype=torch.uint8),
            proprio=Unbounded((PROPRIO_DIM,), dtype=torch.float32)))
        self.action_spec = Bounded(torch.tensor(action_low, dtype=torch.float32),
                                   torch.tensor(action_high, dtype=torch.float32), (ACTION_DIM,))
        self.reward_spec = Unbounded((1,), dtype=torch.float32)
        flag = Categorical(2, (1,), dtype=torch.bool)
        self.done_spec = Composite(done=flag.clone(), terminated=flag.clone(), truncated=flag.clone())

    def _observation(self, obs) -> TensorDict:
        converted = convert_observation(obs, self.cameras)
        return TensorDict({k: torch.from_numpy(v) for k, v in converted.items()}, [])

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs) -> TensorDict:
        _, obs = self._task.reset()
        self._steps = 0
        false = torch.zeros(1, dtype=torch.bool)
        return TensorDict({OBSERVATION: self._observation(obs), DONE: false, TERMINATED: false.clone(),
                           TRUNCATED: false.clone()}, [])

    def _step(self, tensordict: TensorDictBase) -> TensorDict:
        action = tensordict[ACTION].detach().cpu().numpy().astype(np.float32)
        obs, reward, success = self._task.step(action)
        self._steps += 1
        terminated = bool(success)
        truncated = not terminated and self._steps >= self.episode_length
        return TensorDict({OBSERVATION: self._observation(obs),
                           REWARD: torch.tensor([float(reward)], dtype=torch.float32),
                           DONE: torch.tensor([terminated or truncated]), TERMINATED: torch.tensor([terminated]),
                           TRUNCATED: torch.tensor([truncated])}, [])

    def _set_seed(self, seed: int | None) -> None:
        if seed is not None:  # RLBench samples variations and object poses from NumPy's global RNG
            np.random.seed(seed % 2**32)

    def close(self, *, raise_if_closed: bool = True) -> None:
        if self._on_close is not None:
            self._on_close()
            self._on_close = None
        super().close(raise_if_closed=raise_if_closed)


def _episode_length(name: str, max_episode_steps: int | None) -> int:
    if max_episode_steps is not None:
        return int(max_episode_steps)
    if name not in EPISODE_LENGTHS:
        raise ConfigError(f"rlbench:{name} has no known episode length; set data.max_episode_steps")
    return EPISODE_LENGTHS[name]


def _launch(name: str, *, image_size: int, cameras: Sequence[str], dataset_root: str, arm_max_velocity: float,
            arm_max_acceleration: float, renderer: str, headless: bool):
    """Start CoppeliaSim with CQN's observation and action configuration; returns ``(environment, task)``."""
    from pyrep.const import RenderMode
    from rlbench.action_modes.action_mode import MoveArmThenGripper
    from rlbench.action_modes.arm_action_modes import JointPosition
    from rlbench.action_modes.gripper_action_modes import Discrete
    from rlbench.environment import Environment
    from rlbench.observation_config import ObservationConfig
    from rlbench.utils import name_to_task_class

    obs_config = ObservationConfig()
    obs_config.set_all_high_dim(False)
    obs_config.set_all_low_dim(False)
    obs_config.joint_positions = obs_config.gripper_open = True
    for camera in cameras:
        config = getattr(obs_config, f"{camera}_camera")
        config.rgb, config.image_size = True, (image_size, image_size)
        config.render_mode = RenderMode.OPENGL3 if renderer == "opengl3" else RenderMode.OPENGL
    action_mode = MoveArmThenGripper(arm_action_mode=JointPosition(False), gripper_action_mode=Discrete())
    environment = Environment(action_mode, obs_config=obs_config, dataset_root=dataset_root, headless=headless,
                              arm_max_velocity=arm_max_velocity, arm_max_acceleration=arm_max_acceleration)
    environment.launch()
    return environment, environment.get_task(name_to_task_class(name))


def missing_dataset_hint(name: str, path: str, **kwargs) -> str:
    """No recipe to make a missing dataset for this suite: the error names the file only."""
    return ""


def make_base_env(name: str, *, seed: int = 0, max_episode_steps: int | None = None, image_size: int = 84,
                  cameras: Sequence[str] = CAMERAS, demo_dataset: str | None = None,
                  action_low: Sequence[float] | None = None, action_high: Sequence[float] | None = None,
                  dataset_root: str = "", arm_max_velocity: float = 2.0, arm_max_acceleration: float = 8.0,
                  renderer: str = "opengl3", headless: bool = True) -> RLBenchEnv:
    """Launch RLBench and wrap task ``name`` (see the module doc). Raises the install message without RLBench."""
    require_rlbench()
    low, high = resolve_action_bounds(action_low, action_high, demo_dataset)
    environment, task = _launch(name, image_size=int(image_size), cameras=cameras, dataset_root=dataset_root,
                                arm_max_velocity=arm_max_velocity, arm_max_acceleration=arm_max_acceleration,
                                renderer=renderer, headless=headless)
    env = RLBenchEnv(task, episode_length=_episode_length(name, max_episode_steps), image_size=int(image_size),
                     cameras=cameras, action_low=low, action_high=high, on_close=environment.shutdown)
    env.set_seed(seed)
    return env


def rlbench_env_spec(*, image_size: int = 84, cameras: Sequence[str] = CAMERAS, action_low: Sequence[float],
                     action_high: Sequence[float]) -> EnvSpec:
    """The :class:`EnvSpec` of an RLBench env with these settings (no simulator needed)."""
    shapes = {PIXELS: [len(cameras), 3, int(image_size), int(image_size)], PROPRIO: [PROPRIO_DIM]}
    return EnvSpec(obs_dim=nested_obs_dim(shapes), action_low=list(action_low),
                   action_high=list(action_high), observation_shapes=shapes, success_reward=True)


def env_spec_of(name: str, *, image_size: int = 84, cameras: Sequence[str] = CAMERAS, demo_dataset: str | None = None,
                action_low: Sequence[float] | None = None, action_high: Sequence[float] | None = None,
                max_episode_steps: int | None = None, **launch_kwargs) -> EnvSpec:
    """Sizes of ``rlbench:<name>``; fails early with the install message when RLBench is missing."""
    require_rlbench()
    _episode_length(name, max_episode_steps)
    low, high = resolve_action_bounds(action_low, action_high, demo_dataset)
    return rlbench_env_spec(image_size=image_size, cameras=cameras, action_low=low, action_high=high)
