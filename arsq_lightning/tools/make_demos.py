"""Demonstrations for Meta-World tasks from Meta-World's own scripted experts (``metaworld.policies``), in the project's
dataset format (D4RL-layout HDF5, read by ``OfflineToOnlineDataModule``'s ``data.dataset``).

Episode ``k`` resets the task with seed ``--seed + k`` (its goal and object positions), the scripted expert acts on the
39-d state, and optional noise makes it suboptimal: Gaussian noise of std ``--noise`` on every action (then clipped to
[-1, 1]) and/or, with probability ``--epsilon``, a uniformly random action. ``--only-success`` keeps the successful
episodes only (and runs episodes until ``--episodes`` successes or ``--max-tries``). Rewards, termination and time
limit are those of the project's env (``metaworld:<task>``, sparse reward 1 on success by default; with
``--reward dense`` Meta-World's shaped reward, and an episode does not end on success).

Mixed-quality datasets: several ``--noise`` levels share the expert episodes equally (episode ``k`` uses level
``k mod n``) and ``--random-episodes R`` of the ``--episodes`` are uniformly random (spread evenly through the file),
e.g. the benchmark's files (docs/benchmark.md)::

    arsq-demos --task push-v3 --episodes 120 --random-episodes 20 --noise 0.1 0.3 0.5 0.8 1.2 \
        --reward dense --max-episode-steps 150 --seed 100 --out datasets/metaworld/push-v3_mixed.hdf5

    arsq-demos --task reach-v3 --episodes 100 --out demos/metaworld/reach-v3.hdf5
    arsq-demos --task drawer-close-v3 --episodes 100 --noise 0.3 --max-episode-steps 150 \
        --out demos/metaworld/drawer-close-v3_noise0.3.hdf5
    arsq-demos --task reach-v3 --observation pixels --cameras corner2 gripperPOV \
        --out demos/metaworld/reach-v3_pixels.hdf5

State files are plain D4RL layout (``observations``, ``actions``, ``next_observations``, ``rewards``,
``terminals``, ``timeouts``), ``infos/success`` (the env's success flag per row) and ``metadata/*``: source, task,
noise levels, episodes, the data's success rate and mean return, per episode its return, success and noise
(``episode_noise``: -1 for a random episode), and the random episodes' mean return and success rate.
Pixel files store the nested observation as HDF5 groups ``observations/pixels`` (uint8 ``[T, V, 3k, H, W]`` for
``--frame-stack k``, gzip), ``observations/proprio`` (and ``observations/state``), without ``next_observations`` (the
next row's observation is the next observation; terminal rows need none), which ``read_d4rl_hdf5`` must learn to
read (see the project's notes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase

from arsq_lightning.data.datasets import write_d4rl_hdf5
from arsq_lightning.envs.core import make_env
from arsq_lightning.errors import ConfigError

SOURCE = "Meta-World scripted expert (metaworld.policies)"
# The experts' own gains trigger this warning; their actions are clipped to [-1, 1] anyway.
warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high")


class NoisyExpert:
    """``tensordict -> tensordict`` with ``action``: the task's scripted expert on the env's 39-d state, plus noise.

    Args:
        task: Meta-World task name.
        env: the TorchRL env (its base ``MetaWorldEnv`` exposes the last state as ``raw_observation``).
        noise: std of Gaussian action noise.
        epsilon: probability of a uniformly random action instead.
        rng: numpy generator for the noise.
    """

    def __init__(self, task: str, env, noise: float, epsilon: float, rng: np.random.Generator):
        from metaworld.policies import ENV_POLICY_MAP

        self.expert = ENV_POLICY_MAP[task]()
        self.base, self.noise, self.epsilon, self.rng = env.base_env, noise, epsilon, rng

    def __call__(self, td: TensorDictBase) -> TensorDictBase:
        action = np.asarray(self.expert.get_action(self.base.raw_observation), dtype=np.float64)
        if self.noise > 0:
            action = action + self.rng.normal(0.0, self.noise, size=action.shape)
        if self.epsilon > 0 and self.rng.random() < self.epsilon:
            action = self.rng.uniform(-1.0, 1.0, size=action.shape)
        td["action"] = torch.as_tensor(np.clip(action, -1.0, 1.0), dtype=torch.float32)
        return td


def env_kwargs(args: argparse.Namespace) -> dict:
    kwargs = {"observation": args.observation, "reward": args.reward, "max_episode_steps": args.max_episode_steps}
    if args.observation == "pixels":
        kwargs.update(cameras=args.cameras, image_size=args.image_size, include_state=args.include_state)
        if args.frame_stack > 1:
            kwargs["frame_stack"] = args.frame_stack
    return kwargs


def episode_noise(args: argparse.Namespace, k: int) -> float:
    """The noise std of episode ``k`` (-1: uniformly random actions): the ``R`` random episodes are spread evenly
    through the ``E`` episodes (``k`` is random when ``floor((k + 1) R / E)`` steps up), the others cycle through the
    noise levels."""
    random_before = k * args.random_episodes // args.episodes
    if (k + 1) * args.random_episodes // args.episodes > random_before:
        return -1.0
    return args.noise[(k - random_before) % len(args.noise)]


def rollouts(args: argparse.Namespace) -> tuple[TensorDict, dict[str, list], list[bool], int]:
    """Run episodes; returns (kept transitions with an ``episode`` id, per kept episode its ``returns``,
    ``successes`` and ``noise``, success of every episode run, episodes run)."""
    env = make_env(f"metaworld:{args.task}", seed=args.seed, **env_kwargs(args))
    expert = NoisyExpert(args.task, env, 0.0, args.epsilon, np.random.default_rng(args.seed))
    kept, stats, successes = [], {"returns": [], "successes": [], "noise": []}, []
    tries = 0
    while len(kept) < args.episodes and tries < max(args.max_tries, args.episodes):
        env.set_seed(args.seed + tries)
        noise = episode_noise(args, tries)
        expert.noise, expert.epsilon = (0.0, 1.0) if noise < 0 else (noise, args.epsilon)
        episode = env.rollout(env.base_env.max_episode_steps, expert, break_when_any_done=True)
        tries += 1
        success = bool(episode["next", "success"].any())
        successes.append(success)
        if success or not args.only_success:
            episode["episode"] = torch.full((episode.numel(),), len(kept), dtype=torch.long)
            kept.append(episode)
            for key, value in (("returns", float(episode["next", "reward"].sum())), ("successes", success),
                               ("noise", noise)):
                stats[key].append(value)
        if not args.only_success and tries >= args.episodes:
            break
    env.close()
    if not kept:
        raise SystemExit(f"make_demos: no successful episode in {tries} tries of {args.task}")
    return torch.cat(kept), stats, successes, tries


def write_nested_hdf5(path: Path, data: TensorDict, metadata: dict) -> None:
    """D4RL layout with the nested observation as groups ``observations/<key>`` (no ``next_observations``)."""
    import h5py

    with h5py.File(path, "w") as f:
        for key, value in data["observation"].items():
            array = value.numpy()
            image = array.dtype == np.uint8
            f.create_dataset(f"observations/{key}", data=array, chunks=(1, *array.shape[1:]) if image else None,
                             compression="gzip" if image else None)
        f["actions"] = data["action"].numpy()
        f["rewards"] = data["next", "reward"].reshape(-1).numpy()
        f["terminals"] = data["next", "terminated"].reshape(-1).numpy()
        f["timeouts"] = data["next", "truncated"].reshape(-1).numpy()
        for key, value in metadata.items():
            f[f"metadata/{key}"] = value


def write_success(path: Path, success: np.ndarray) -> None:
    """Add the env's per-row success flag as ``infos/success`` (D4RL files keep extra per-row data under infos/)."""
    import h5py

    with h5py.File(path, "a") as f:
        f["infos/success"] = success


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    data, stats, successes, tries = rollouts(args)
    returns = stats["returns"]
    meta = {"source": f"{SOURCE}, noise={args.noise}, epsilon={args.epsilon}, random episodes={args.random_episodes}",
            "env_id": f"metaworld:{args.task}", "task": args.task, "noise": np.asarray(args.noise),
            "epsilon": args.epsilon, "seed": args.seed, "reward": args.reward,
            "only_success": args.only_success, "episodes": len(returns), "episodes_run": tries,
            "success_rate": float(np.mean(successes)), "mean_return": float(np.mean(returns)),
            "data_success_rate": float(np.mean(stats["successes"])), "returns": np.asarray(returns),
            "episode_success": np.asarray(stats["successes"]), "episode_noise": np.asarray(stats["noise"]),
            "env_kwargs": json.dumps(env_kwargs(args))}
    random = np.asarray(stats["noise"]) < 0
    if random.any():
        meta["random_mean_return"] = float(np.asarray(returns)[random].mean())
        meta["random_success_rate"] = float(np.asarray(stats["successes"])[random].mean())
    out = Path(os.path.expanduser(args.out))
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.observation == "state":
        write_d4rl_hdf5(out, data, metadata=meta)
    else:
        write_nested_hdf5(out, data, meta)
    write_success(out, data["next", "success"].reshape(-1).numpy())
    lengths = torch.bincount(data["episode"]).float()
    print(f"make_demos: {args.task} {len(returns)} episodes ({tries} run, success rate {meta['success_rate']:.2f}), "
          f"{data.numel()} transitions, mean length {lengths.mean():.1f}, mean return {meta['mean_return']:.3f}, "
          f"noise {args.noise}, epsilon {args.epsilon} -> {out} ({out.stat().st_size / 1e6:.1f} MB, "
          f"{time.perf_counter() - start:.0f} s)")
    return meta


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", required=True, help="Meta-World task, e.g. reach-v3")
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--out", required=True, help="output .hdf5 path")
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0],
                        help="std of Gaussian action noise; several values share the expert episodes equally")
    parser.add_argument("--random-episodes", type=int, default=0,
                        help="how many of --episodes take uniformly random actions (spread evenly)")
    parser.add_argument("--epsilon", type=float, default=0.0, help="probability of a uniformly random action")
    parser.add_argument("--only-success", action="store_true", help="keep successful episodes only")
    parser.add_argument("--max-tries", type=int, default=0, help="episode cap with --only-success (default 3x)")
    parser.add_argument("--seed", type=int, default=0, help="episode k uses seed + k")
    parser.add_argument("--max-episode-steps", type=int, default=None, help="time limit (Meta-World: 500)")
    parser.add_argument("--reward", choices=("sparse", "dense"), default="sparse")
    parser.add_argument("--observation", choices=("state", "pixels"), default="state")
    parser.add_argument("--cameras", nargs="+", default=["corner2", "gripperPOV"])
    parser.add_argument("--image-size", type=int, default=84)
    parser.add_argument("--include-state", action="store_true", help="pixels: also store the 39-d state")
    parser.add_argument("--frame-stack", type=int, default=1, help="pixels: store stacks of this many frames")
    args = parser.parse_args(argv)
    if args.max_tries == 0:
        args.max_tries = 3 * args.episodes if args.only_success else args.episodes
    if args.episodes < 1 or min(args.noise) < 0 or not 0 <= args.epsilon <= 1:
        parser.error("--episodes must be >= 1, --noise >= 0 and --epsilon in [0, 1]")
    if not 0 <= args.random_episodes <= args.episodes or (args.random_episodes and args.only_success):
        parser.error("--random-episodes must lie in [0, --episodes] and cannot go with --only-success")
    return args


def cli(argv: list[str] | None = None) -> int:
    """The ``arsq-demos`` command: exit status 0, or 2 after a one-line error (e.g. Meta-World not installed)."""
    try:
        main(argv)
    except ConfigError as err:
        print(f"arsq-demos: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
