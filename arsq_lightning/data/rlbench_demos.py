"""Demos saved by RLBench's dataset generator -> TED transitions / a D4RL-layout HDF5 file
(docs/algorithm.md §5.1, §5.3).

The layout read (RLBench's ``dataset_generator.py``, the same one ``rlbench.utils.get_stored_demos`` reads)::

    <root>/<task>/variation<v>/episodes/episode<i>/
        low_dim_obs.pkl           # pickled rlbench.demo.Demo: its Observation objects, image fields set to None
        front_rgb/0.png 1.png ... # one PNG per step for every camera folder <camera>_rgb
        wrist_rgb/  left_shoulder_rgb/  right_shoulder_rgb/   (depth, mask and overhead folders are ignored)

The pickle is read **without RLBench installed**: every ``rlbench.*`` / ``pyrep.*`` class in it is restored as a
plain attribute record. Unpickling runs code named by the file, so only read demos you trust.

Conversion, as CQN's ``convert_demo_to_timesteps``: step ``t >= 1`` gets the action ``[joint deltas, gripper]`` with
joint deltas ``misc["joint_position_action"][:7] - joint_positions[t-1]`` when the demo recorded the commanded joint
positions (else ``joint_positions[t] - joint_positions[t-1]``) and gripper ``1`` if step ``t`` has the gripper open,
else ``0``; an episode whose joint delta exceeds 0.2 in magnitude anywhere is skipped. The last transition has
reward 1 and is terminal (success). Observations are ``pixels`` uint8 ``[V, 3, S, S]`` + ``proprio`` float32 ``[8]``,
frame-stacked like the env (:func:`arsq_lightning.envs.core.stack_frames`).

Command line (writes the HDF5 file the RLBench configs read)::

    python -m arsq_lightning.data.rlbench_demos ~/rlbench_data open_drawer demos/rlbench/open_drawer.hdf5 \
        --frame-stack 8
"""

from __future__ import annotations

import argparse
import pickle
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tensordict import TensorDict

from arsq_lightning.envs.core import stack_frames
from arsq_lightning.envs.rlbench import ACTION_DIM, CAMERAS, MAX_DEMO_DELTA
from arsq_lightning.errors import ConfigError
from arsq_lightning.keys import ACTION, DONE, EPISODE, NEXT, OBSERVATION, PIXELS, PROPRIO, REWARD, TERMINATED, TRUNCATED

LOW_DIM_PICKLE = "low_dim_obs.pkl"


class _Record:
    """Stand-in for RLBench's ``Demo`` / ``Observation`` classes: pickle restores their attributes into it."""


class _DemoUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module.split(".")[0] in ("rlbench", "pyrep"):
            return _Record
        return super().find_class(module, name)


def _observations(demo) -> list:
    """The per-step observations of an unpickled ``Demo`` (or of a plain list of observations)."""
    if isinstance(demo, (list, tuple)):
        return list(demo)
    steps = getattr(demo, "_observations", None)
    if steps is None:
        raise ConfigError(f"unexpected {LOW_DIM_PICKLE} content: {type(demo).__name__} without observations")
    return list(steps)


def _image(path: Path, size: int | None) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        if size is not None and image.size != (size, size):
            image = image.resize((size, size))
        return np.asarray(image, dtype=np.uint8)


def load_episode(folder: str | Path, *, cameras: Sequence[str] = CAMERAS, image_size: int | None = None) -> dict:
    """One saved episode: ``pixels`` uint8 ``[T, V, 3, H, W]``, ``proprio`` float32 ``[T, 8]`` and ``actions``
    float32 ``[T - 1, 8]`` (see the module doc)."""
    folder = Path(folder)
    with open(folder / LOW_DIM_PICKLE, "rb") as f:
        steps = _observations(_DemoUnpickler(f).load())
    if len(steps) < 2:
        raise ConfigError(f"{folder}: a demo needs at least 2 steps, got {len(steps)}")
    views = []
    for camera in cameras:
        camera_dir = folder / f"{camera}_rgb"
        if not camera_dir.is_dir() or len(list(camera_dir.glob("*.png"))) != len(steps):
            raise ConfigError(f"{camera_dir}: expected {len(steps)} PNG images (one per step)")
        views.append(np.stack([_image(camera_dir / f"{t}.png", image_size) for t in range(len(steps))]))
    joints = np.stack([np.asarray(s.joint_positions, dtype=np.float32) for s in steps])
    gripper = np.array([float(s.gripper_open) for s in steps], dtype=np.float32)
    actions = []
    for t in range(1, len(steps)):
        misc = getattr(steps[t], "misc", None) or {}
        target = np.asarray(misc["joint_position_action"][:-1]) if "joint_position_action" in misc else joints[t]
        actions.append(np.append(target - joints[t - 1], 1.0 if gripper[t] == 1 else 0.0))
    pixels = np.stack(views, axis=1).transpose(0, 1, 4, 2, 3)  # [T, V, H, W, 3] -> [T, V, 3, H, W]
    return {PIXELS: np.ascontiguousarray(pixels), PROPRIO: np.column_stack([joints, gripper]),
            "actions": np.asarray(actions, dtype=np.float32).reshape(-1, ACTION_DIM)}


def episode_transitions(episode: dict, *, frame_stack: int = 1) -> TensorDict:
    """TED transitions ``[T - 1]`` of a loaded episode: success reward 1 and ``terminated`` on the last one."""
    pixels = stack_frames(torch.from_numpy(episode[PIXELS]), frame_stack, pixels=True)
    proprio = stack_frames(torch.from_numpy(episode[PROPRIO]), frame_stack, pixels=False)
    n = len(episode["actions"])
    last = torch.zeros(n, 1, dtype=torch.bool)
    last[-1] = True
    return TensorDict({
        OBSERVATION: {PIXELS: pixels[:-1], PROPRIO: proprio[:-1]},
        ACTION: torch.from_numpy(episode["actions"]),
        NEXT: {OBSERVATION: {PIXELS: pixels[1:], PROPRIO: proprio[1:]}, REWARD: last.float(),
               TERMINATED: last, TRUNCATED: torch.zeros_like(last), DONE: last.clone()},
    }, batch_size=[n])


def episode_folders(root: str | Path, task: str, variation: int = 0) -> list[Path]:
    """``episode<i>`` folders of a task variation, in episode order."""
    base = Path(root).expanduser() / task / f"variation{variation}" / "episodes"
    if not base.is_dir():
        raise ConfigError(f"no RLBench demos for {task!r} at {base}")
    folders = [p for p in base.iterdir() if re.fullmatch(r"episode\d+", p.name)]
    return sorted(folders, key=lambda p: int(p.name.removeprefix("episode")))


def read_rlbench_demos(root: str | Path, task: str, *, variation: int = 0, cameras: Sequence[str] = CAMERAS,
                       image_size: int | None = 84, frame_stack: int = 1, max_episodes: int | None = None,
                       max_delta: float = MAX_DEMO_DELTA) -> tuple[TensorDict, int]:
    """All usable demos of a task as one TED TensorDict ``[N]`` (with ``episode``), and the number skipped because
    a joint delta exceeded ``max_delta``."""
    chunks, skipped = [], 0
    for folder in episode_folders(root, task, variation)[:max_episodes]:
        episode = load_episode(folder, cameras=cameras, image_size=image_size)
        if np.abs(episode["actions"][:, :-1]).max() > max_delta:
            skipped += 1
            continue
        data = episode_transitions(episode, frame_stack=frame_stack)
        data[EPISODE] = torch.full((data.numel(),), len(chunks), dtype=torch.long)
        chunks.append(data)
    if not chunks:
        raise ConfigError(f"no usable RLBench demo for {task!r} under {root} ({skipped} skipped for large deltas)")
    return torch.cat(chunks), skipped


def main(args: list[str] | None = None) -> None:
    """Convert a task's saved demos into the HDF5 file an ``rlbench`` config reads (see the module doc)."""
    from arsq_lightning.data.datasets import write_d4rl_hdf5

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="RLBench dataset root (the generator's --save_path)")
    parser.add_argument("task", help="task name, e.g. open_drawer")
    parser.add_argument("out", help="output .hdf5 path")
    parser.add_argument("--variation", type=int, default=0)
    parser.add_argument("--episodes", type=int, default=100, help="at most this many demos (paper: 100)")
    parser.add_argument("--frame-stack", type=int, default=8, help="must match the config's env frame_stack")
    parser.add_argument("--image-size", type=int, default=84)
    opts = parser.parse_args(args)
    data, skipped = read_rlbench_demos(opts.root, opts.task, variation=opts.variation, image_size=opts.image_size,
                                       frame_stack=opts.frame_stack, max_episodes=opts.episodes)
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    write_d4rl_hdf5(opts.out, data, metadata={"source": f"RLBench dataset generator demos of {opts.task}",
                                               "frame_stack": opts.frame_stack, "skipped_demos": skipped})
    print(f"wrote {data.numel()} transitions from {int(data['episode'].max()) + 1} demos to {opts.out} "
          f"({skipped} skipped for joint deltas > {MAX_DEMO_DELTA})")


if __name__ == "__main__":
    main()
