"""Time to solve Pendulum-v1: the quickstart (ARSQ) against Stable-Baselines3 SAC with rl-zoo's settings.

Both learners run in their own process with one torch thread, one after the other (the order alternates from seed to
seed, so the machine's load drifts onto both alike). Both are evaluated every 500 env frames on the same 10
deterministic episodes (episode ``k`` resets with seed ``10000 + k``); a learner has solved the task at the first
evaluation whose mean return is better than -200. Reported per learner: the env frames then, and the CPU seconds of
its process from the start of training to then, evaluations excluded.

SAC (rl-zoo ``sac.yml``, Pendulum-v1): learning rate 1e-3 and SB3's defaults otherwise (batch 256, 100 random frames
before learning, one update per frame, 2 x 256 networks, automatic entropy tuning). Ours: ``configs/quickstart.yaml``
as shipped, evaluated every 500 updates (one update per frame after its random warm-up), MLflow and checkpoints on.

    pip install 'arsq-lightning[bench]'     # stable-baselines3
    arsq-bench --solve-seeds 3              # this race plus the update / acting benchmarks
    python -m arsq_lightning.tools.solve_race --seeds 3 --max-frames 12000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

import lightning as L

SOLVED = -200.0
EVAL_EVERY = 500  # env frames
EVAL_EPISODES = 10
EVAL_SEED = 10_000
RESULT_PREFIX = "solve-race-result: "
MODULE = "arsq_lightning.tools.solve_race"  # not __name__, which is "__main__" under python -m


@dataclass
class Attempt:
    """One learner's run: ``frames`` and ``cpu_s`` at the first solving evaluation (``None`` if it never solved)."""
    learner: str
    seed: int
    frames: int | None
    cpu_s: float | None
    evaluations: list[tuple[int, float]]  # (env frames, mean return)


class Stopwatch:
    """One learner's attempt as it runs: process CPU seconds from :meth:`restart`, evaluations excluded, every
    evaluation's mean return, and the first that beats ``solved``."""

    def __init__(self, solved: float = SOLVED):
        self.solved = solved
        self.eval_start = self.eval_cpu = self.train_cpu = 0.0
        self.start = time.process_time()
        self.evaluations: list[tuple[int, float]] = []  # (env frames, mean return)
        self.result: tuple[int, float] | None = None  # (env frames, training CPU seconds) at the first solve

    def restart(self) -> None:
        self.start = time.process_time()

    def evaluation_starts(self) -> None:
        self.eval_start = time.process_time()
        self.train_cpu = self.eval_start - self.start - self.eval_cpu  # training so far, earlier evaluations excluded

    def evaluation_ends(self, frames: int | None = None, mean_return: float | None = None) -> bool:
        """Record the evaluation (none for ``frames`` None); true once the task is solved."""
        self.eval_cpu += time.process_time() - self.eval_start
        if frames is not None:
            self.evaluations.append((frames, mean_return))
            if self.result is None and mean_return > self.solved:
                self.result = (frames, self.train_cpu)
        return self.result is not None

    def report(self, learner: str, seed: int) -> None:
        """The attempt as one JSON line on stdout, which :func:`attempt` reads back."""
        frames, cpu = self.result if self.result is not None else (None, None)
        print(RESULT_PREFIX + json.dumps(Attempt(learner, seed, frames, cpu, self.evaluations).__dict__), flush=True)


class SolveClock(L.Callback):
    """A :class:`Stopwatch` on a fit: it stops the fit once an evaluation's mean return beats ``solved`` and reports
    the attempt when the fit ends."""

    def __init__(self, solved: float = SOLVED, seed: int = 0):
        self.watch, self.seed = Stopwatch(solved), seed

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.watch.restart()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.watch.evaluation_starts()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or "eval/return_mean" not in trainer.callback_metrics:
            self.watch.evaluation_ends()
            return
        mean_return = float(trainer.callback_metrics["eval/return_mean"])
        if self.watch.evaluation_ends(int(trainer.datamodule.frames), mean_return):
            trainer.should_stop = True

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.watch.report("arsq", self.seed)


def run_ours(seed: int, max_frames: int) -> None:
    """The quickstart with an evaluation every 500 updates, stopped when solved (in this process)."""
    from arsq_lightning.cli import main

    warmup = quickstart_warmup()  # update u comes after frame u + warm-up
    main(["fit", "--config", "quickstart", "--seed_everything", str(seed),
          "--trainer.max_steps", str(max_frames - warmup), "--trainer.val_check_interval", str(EVAL_EVERY),
          "--trainer.enable_progress_bar", "false", "--data.eval_episodes", str(EVAL_EPISODES),
          "--data.eval_seed", str(EVAL_SEED), "--trainer.callbacks+", f"{MODULE}.SolveClock",
          "--trainer.callbacks.init_args.seed", str(seed)])


def quickstart_warmup() -> int:
    """The env frames before the shipped quickstart's first update: its ``learning_starts`` (by default the larger of
    ``init_random_frames`` and ``batch_size``), rounded up to whole collector batches (``frames_per_batch``)."""
    import yaml

    from arsq_lightning.data.online import first_update_frames
    from arsq_lightning.shipped_configs import resolve_config

    with open(resolve_config("quickstart")) as file:
        data = yaml.safe_load(file)["data"]["init_args"]
    starts = first_update_frames(data["init_random_frames"], data["batch_size"], data.get("learning_starts"))
    return -(-starts // data["frames_per_batch"]) * data["frames_per_batch"]


def run_sac(seed: int, max_frames: int) -> None:
    """SB3 SAC with rl-zoo's Pendulum settings, evaluated every 500 frames, stopped when solved (in this process)."""
    import gymnasium as gym
    import numpy as np
    from stable_baselines3 import SAC
    from stable_baselines3.common.callbacks import BaseCallback

    eval_env = gym.make("Pendulum-v1")

    def evaluate(model) -> float:
        returns = []
        for k in range(EVAL_EPISODES):
            obs, _ = eval_env.reset(seed=EVAL_SEED + k)
            total, done = 0.0, False
            while not done:
                action, _ = model.predict(obs, deterministic=True)
                obs, reward, terminated, truncated, _ = eval_env.step(action)
                total, done = total + float(reward), terminated or truncated
            returns.append(total)
        return float(np.mean(returns))

    class Clock(BaseCallback):
        def __init__(self):
            super().__init__()
            self.watch = Stopwatch()

        def _on_step(self) -> bool:  # false stops learning
            if self.num_timesteps % EVAL_EVERY:
                return True
            self.watch.evaluation_starts()
            return not self.watch.evaluation_ends(self.num_timesteps, evaluate(self.model))

    model = SAC("MlpPolicy", gym.make("Pendulum-v1"), learning_rate=1e-3, seed=seed, verbose=0)
    clock = Clock()
    model.learn(total_timesteps=max_frames, callback=clock)
    clock.watch.report("sac", seed)


def attempt(learner: str, seed: int, max_frames: int) -> Attempt:
    """Run one learner in a fresh process (one thread, a temporary folder for its MLflow store)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as folder:
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder}/mlflow.db"
        done = subprocess.run([sys.executable, "-m", MODULE, "--child", learner, "--seed", str(seed),
                               "--max-frames", str(max_frames)], cwd=folder, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{learner} seed {seed} failed (exit {done.returncode}): {done.stderr[-2000:]}")
    fields = json.loads(lines[-1].removeprefix(RESULT_PREFIX))
    fields["evaluations"] = [tuple(e) for e in fields["evaluations"]]
    return Attempt(**fields)


def race(seeds: int, max_frames: int) -> list[Attempt]:
    """Both learners on seeds ``0 .. seeds-1``, alternating which goes first."""
    results = []
    for seed in range(seeds):
        for learner in (("arsq", "sac") if seed % 2 == 0 else ("sac", "arsq")):
            results.append(attempt(learner, seed, max_frames))
            print(describe(results[-1]), flush=True)
    return results


def describe(a: Attempt) -> str:
    solved = f"solved at {a.frames} frames, {a.cpu_s:.1f} CPU s" if a.frames is not None else "not solved"
    curve = " ".join(f"{f}:{r:.0f}" for f, r in a.evaluations)
    return f"  {a.learner:4s} seed {a.seed}: {solved}   (frames:return {curve})"


def summary(results: list[Attempt]) -> dict[str, float]:
    """Medians over seeds (an unsolved attempt counts as infinitely slow) and the CPU ratio ours / SAC's."""
    def median(learner: str, field: str) -> float:
        values = [getattr(a, field) for a in results if a.learner == learner]
        return statistics.median(float("inf") if v is None else v for v in values)

    ours, sac = median("arsq", "cpu_s"), median("sac", "cpu_s")
    return {"solve_cpu_vs_sac": ours / sac, "solve_cpu_s_ours": ours, "solve_cpu_s_sac": sac,
            "solve_frames_ours": median("arsq", "frames"), "solve_frames_sac": median("sac", "frames")}


def format_summary(numbers: dict[str, float]) -> str:
    """The ``summary:`` line of ``key=value`` pairs that ends ``arsq-bench`` and this race."""
    return "summary: " + " ".join(f"{key}={value:.3g}" for key, value in numbers.items())


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per learner (default 3)")
    parser.add_argument("--max-frames", type=int, default=12000, help="give up after this many env frames")
    parser.add_argument("--child", choices=["arsq", "sac"], help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        import torch

        torch.set_num_threads(1)
        (run_ours if args.child == "arsq" else run_sac)(args.seed, args.max_frames)
        return
    results = race(args.seeds, args.max_frames)
    print(format_summary(summary(results)))


if __name__ == "__main__":
    main()
