"""The glue between the LightningModule and the data module, as Lightning callbacks (the module registers them in
``configure_callbacks``). Each reads the data module's typed interface only: :meth:`OnlineDataModule.stats` and
:meth:`OnlineDataModule.action_samples`; data modules of other types are left alone.
"""

from __future__ import annotations

import time

import lightning as L
from lightning.pytorch.callbacks import Callback

from arsq_lightning.data.online import OnlineDataModule
from arsq_lightning.errors import ConfigError


def _data_module(trainer: L.Trainer) -> OnlineDataModule | None:
    data = trainer.datamodule
    return data if isinstance(data, OnlineDataModule) else None


class DataStatsLogger(Callback):
    """Every ``log_every_n_steps`` updates: env frames, updates, their rates, the phase and recent training returns
    (``train/env_frames``, ``train/grad_updates``, ``time/fps``, ``time/updates_per_s``, ``train/phase_online``,
    ``train/relabelled_episodes``, ``train/episode_return``)."""

    def __init__(self):
        self._clock: tuple[float, int, int] | None = None  # (time, frames, updates) at the previous log

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        data = _data_module(trainer)
        if data is None or trainer.global_step % max(1, trainer.log_every_n_steps) != 0:
            return
        stats, updates, now = data.stats(), trainer.global_step, time.perf_counter()
        metrics = {"train/env_frames": float(stats.env_frames), "train/grad_updates": float(updates)}
        if self._clock is not None:
            elapsed = max(now - self._clock[0], 1e-9)
            metrics["time/fps"] = (stats.env_frames - self._clock[1]) / elapsed
            metrics["time/updates_per_s"] = (updates - self._clock[2]) / elapsed
        if stats.online is not None:
            metrics["train/phase_online"] = float(stats.online)
        if stats.relabelled_episodes is not None:
            metrics["train/relabelled_episodes"] = float(stats.relabelled_episodes)
        if stats.mean_episode_return is not None:
            metrics["train/episode_return"] = stats.mean_episode_return
        self._clock = (now, stats.env_frames, updates)
        pl_module.log_dict(metrics, prog_bar=False, batch_size=1)
        if stats.online is not None:  # the phase in the progress bar: 0 offline, 1 online
            pl_module.log("online", float(stats.online), prog_bar=True, logger=False, batch_size=1)


class FitDiscretizer(Callback):
    """Before training, fit a data-adaptive discretizer (one whose ``needs_fit()`` is true) to the data module's
    dataset actions, once. A resumed run (``ckpt_path``) takes the fitted grid from the checkpoint instead, so the
    grid never changes mid-run."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        disc = pl_module.critic.discretizer
        if stage != "fit" or not disc.needs_fit() or trainer.ckpt_path is not None:
            return
        data = _data_module(trainer)
        samples = data.action_samples() if data is not None else None
        if samples is None:
            raise ConfigError(f"model.discretizer {type(disc).__name__} is fitted to dataset actions, but "
                              f"{type(trainer.datamodule).__name__} has none: use a dataset data module")
        disc.fit(samples.to(pl_module.device))
