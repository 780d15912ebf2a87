"""Where greedy Meta-World episodes end against the task's success radius (docs/benchmark.md, seventeenth round).

    python scripts/analysis/metaworld_failures.py --task reach-v3 CHECKPOINT [--episodes 30]
    python scripts/analysis/metaworld_failures.py --task reach-v3 --expert 0.1      # the scripted expert, noise 0.1

Runs ``--episodes`` episodes of ``--max-steps`` steps (the benchmark's 150, dense reward) with the checkpoint's greedy
policy (ARSQ or CQN) or Meta-World's scripted expert plus Gaussian noise, and prints per episode: success (at any
step, as ``eval/success_rate``), the smallest and the final distance that decides success (reach: gripper centre to
goal; tasks with an object: object to goal, in the table's plane) and the final gripper-centre-minus-goal offset.
Meta-World counts success within 0.05 of the goal. The last line gives the success rate and medians.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

os.environ.setdefault("MUJOCO_GL", "egl")

from arsq_lightning.checkpoint_io import check_checkpoint  # noqa: E402
from arsq_lightning.envs.metaworld import MetaWorldEnv  # noqa: E402
from arsq_lightning.errors import ConfigError  # noqa: E402
from arsq_lightning.module import ARSQModule  # noqa: E402


def success_distance(env: MetaWorldEnv) -> float:
    """Reach: gripper centre to goal; else the first object to the goal in the table's plane (x, y)."""
    sim = env.sim
    if env.task.startswith("reach"):
        return float(np.linalg.norm(sim.tcp_center - sim._target_pos))
    return float(np.linalg.norm(sim._get_pos_objects()[:2] - sim._target_pos[:2]))


def vector(values: np.ndarray) -> str:
    """``[x, y, z]`` with signs and three decimals."""
    return "[" + " ".join(f"{v:+.3f}" for v in values) + "]"


def make_actor(args: argparse.Namespace, task: str):
    """``raw 39-d state -> action [4]``: the checkpoint's greedy policy, or the scripted expert plus noise."""
    if args.checkpoint:
        check_checkpoint(args.checkpoint)
        module = ARSQModule.load_from_checkpoint(args.checkpoint, map_location="cpu", weights_only=False)
        critic = module.critic.eval()
        return lambda state: critic.act(torch.as_tensor(state, dtype=torch.float32)[None], deterministic=True)[0]
    from metaworld.policies import ENV_POLICY_MAP

    expert, rng = ENV_POLICY_MAP[task](), np.random.default_rng(args.seed)
    return lambda state: np.clip(expert.get_action(state) + args.expert * rng.standard_normal(4), -1.0, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", nargs="?", help="a run's checkpoint (omit with --expert)")
    parser.add_argument("--task", required=True, help="Meta-World task, e.g. reach-v3")
    parser.add_argument("--expert", type=float, default=None, help="run the scripted expert with this noise std")
    parser.add_argument("--episodes", type=int, default=30)
    parser.add_argument("--max-steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=777, help="seed of the task instances (goals, objects)")
    args = parser.parse_args()
    if (args.checkpoint is None) == (args.expert is None):
        parser.error("give a checkpoint or --expert NOISE, not both")
    torch.set_num_threads(1)
    env = MetaWorldEnv(args.task, seed=args.seed, max_episode_steps=args.max_steps, observation="state",
                       reward="dense")
    try:
        act = make_actor(args, args.task)
    except ConfigError as error:
        parser.exit(2, f"error: {error}\n")
    rows = []
    for episode in range(args.episodes):
        env.reset()
        state, success, distances = env.raw_observation, False, []
        for _ in range(args.max_steps):
            state, _, _, _, info = env.sim.step(np.asarray(act(state), dtype=np.float32))
            success |= bool(info["success"])
            distances.append(success_distance(env))
        offset = env.sim.tcp_center - env.sim._target_pos
        rows.append((success, min(distances), distances[-1], *offset))
        print(f"episode {episode:3d}  success {int(success)}  distance min {min(distances):.3f} final "
              f"{distances[-1]:.3f}  gripper - goal {vector(offset)}")
    table = np.array(rows, dtype=float)
    failed = table[table[:, 0] == 0]
    failures = np.median(failed[:, 1]) if len(failed) else float("nan")
    print(f"success {table[:, 0].mean():.2f} over {len(rows)} episodes; median smallest distance "
          f"{np.median(table[:, 1]):.3f} (failures: {failures:.3f}); success radius 0.05; median final gripper - goal "
          f"{vector(np.median(table[:, 3:], axis=0))}")


if __name__ == "__main__":
    main()
