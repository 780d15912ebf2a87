"""Evaluation videos: one greedy episode rendered to an MP4 file and logged to the MLflow run.

Every ``data.video_every``-th evaluation of a ``fit`` (0: never) renders evaluation episode 0 again with the same
weights and seed, in a separate env that draws RGB frames, and logs ``videos/eval-update-<N>.mp4`` (``data.video_size``
pixels square). Renderable envs: gymnasium ids whose env renders ``rgb_array`` (the MuJoCo tasks; the classic-control
ones need pygame) and Meta-World (``metaworld:<task>``, the ``corner2`` camera). For another env the run logs one line
saying why there is no video and goes on.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from torchrl.envs.utils import ExplorationType, set_exploration_type

from arsq_lightning.envs.core import make_env
from arsq_lightning.policy import make_actor

# headless rendering (gymnasium's MuJoCo renderer reads it when it makes its GL context); a user's choice stays
os.environ.setdefault("MUJOCO_GL", "egl")

Frame = Callable[[], np.ndarray]  # () -> uint8 [H, W, 3] of the env's current state


def rendering_env(env_id: str, env_kwargs: dict, seed: int, size: int) -> tuple[object, Frame]:
    """A fresh env of ``env_id`` (not reset yet) and the function that draws its current frame.

    Raises:
        NotImplementedError: the env cannot draw frames (the message says why).
    """
    if env_id.startswith("metaworld:"):
        from arsq_lightning.envs.metaworld import MultiCameraRenderer

        env = make_env(env_id, seed=seed, **env_kwargs)
        sim = env.base_env.sim
        camera = MultiCameraRenderer(sim.model, ["corner2"], size)
        return env, lambda: camera.render(sim.data)[0].transpose(1, 2, 0)
    if ":" in env_id:
        raise NotImplementedError(f"no video for {env_id.partition(':')[0]}: envs (gymnasium and metaworld: only)")
    kwargs = {"render_mode": "rgb_array", **env_kwargs}
    try:
        try:
            env = make_env(env_id, seed=seed, width=size, height=size, **kwargs)  # MuJoCo envs take a frame size
        except TypeError:
            env = make_env(env_id, seed=seed, **kwargs)
        env.reset()
        env.base_env._env.render()  # classic control needs pygame here
    except Exception as err:  # noqa: BLE001 - an env that cannot render means no video, not a failed run
        raise NotImplementedError(f"{env_id} cannot render ({type(err).__name__}: {err})") from None
    return env, env.base_env._env.render


def record_episode(critic, env_id: str, env_kwargs: dict, seed: int, size: int, max_steps: int) -> np.ndarray:
    """Frames ``[T + 1, H, W, 3]`` (uint8) of one deterministic episode with ``critic`` acting, the reset frame
    first: the episode evaluation runs as its episode 0 when ``seed`` is ``data.eval_seed``."""
    env, frame = rendering_env(env_id, env_kwargs, seed, size)
    try:
        env.set_seed(seed)
        with set_exploration_type(ExplorationType.DETERMINISTIC):
            start = env.reset()
            frames = [frame()]
            env.rollout(max_steps, make_actor(critic), callback=lambda *_: frames.append(frame()),
                        auto_reset=False, tensordict=start, break_when_any_done=True)
            frames.append(frame())  # the rollout calls back between steps, not after the last one
    finally:
        env.close()
    return np.stack(frames)


def write_mp4(frames: np.ndarray, path: Path, fps: int) -> Path:
    """``frames [T, H, W, 3]`` uint8 as an H.264 MP4 (imageio's bundled ffmpeg)."""
    import imageio.v2 as imageio

    imageio.mimwrite(path, list(frames), fps=fps, macro_block_size=1)
    return path


class EvalVideo(Callback):
    """Renders evaluation episode 0 at every ``every``-th evaluation and logs it to the MLflow run (``videos/``)."""

    def __init__(self, every: int, size: int = 240, fps: int = 30):
        self.every, self.size, self.fps = every, size, fps
        self.evaluations = 0
        self._disabled = False

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.evaluations += 1
        if self._disabled or self.every < 1 or self.evaluations % self.every or trainer.sanity_checking:
            return
        loggers = [logger for logger in trainer.loggers if isinstance(logger, MLFlowLogger)]
        data = trainer.datamodule
        if not loggers or data is None:
            return
        try:
            frames = record_episode(pl_module.critic, data.hparams.env_id, data.env_kwargs, data.hparams.eval_seed,
                                    self.size, data.hparams.eval_max_steps)
        except NotImplementedError as err:
            print(f"arsq: no evaluation videos: {err}", file=sys.stderr)
            self._disabled = True
            return
        with tempfile.TemporaryDirectory() as folder:
            path = write_mp4(frames, Path(folder) / f"eval-update-{trainer.global_step}.mp4", self.fps)
            for logger in loggers:
                logger.experiment.log_artifact(logger.run_id, str(path), "videos")

    def state_dict(self) -> dict:
        return {"evaluations": self.evaluations}

    def load_state_dict(self, state_dict: dict) -> None:
        self.evaluations = int(state_dict.get("evaluations", 0))

