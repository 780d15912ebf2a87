"""Lightning callbacks the module registers in ``configure_callbacks``: the glue to the data module (each reads its
typed interface only, :meth:`OnlineDataModule.stats` and :meth:`OnlineDataModule.action_samples`; data modules of
other types are left alone), the global random states of a resumed run, the divergence guard and preemption.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
import time

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar

from arsq_lightning.data.online import OnlineDataModule
from arsq_lightning.errors import ConfigError, TrainingDiverged


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
        bar = {"frames": float(stats.env_frames)}  # the progress bar's copies (not logged twice)
        if stats.online is not None:  # the phase: 0 offline, 1 online
            bar["online"] = float(stats.online)
        if stats.mean_episode_return is not None:
            bar["train_return"] = stats.mean_episode_return
        pl_module.log_dict(bar, prog_bar=True, logger=False, batch_size=1)


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


class DivergenceGuard(Callback):
    """Stops training in the update where a gradient becomes NaN or infinite (the module checks the loss terms), and
    on either kind of divergence writes ``diverged-update-<n>.ckpt`` (the weights that met the batch) and
    ``diverged-update-<n>-batch.pt`` (the batch) next to the run's checkpoints, to reproduce it."""

    def __init__(self):
        self._batch = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self._batch = batch

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        grads = {name: param.grad for name, param in pl_module.named_parameters() if param.grad is not None}
        # One host sync per update: a NaN or infinite gradient makes the total 2-norm non-finite (foreach norms: about
        # 10x faster on a CPU than isfinite per parameter). Huge finite gradients may overflow it; then look closer.
        if bool(torch.isfinite(torch.nn.utils.get_total_norm(list(grads.values())))):
            return
        for name, grad in grads.items():
            if not bool(torch.isfinite(grad).all()):
                raise TrainingDiverged(f"non-finite gradient of {name} at update {trainer.global_step}")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, TrainingDiverged) or self._batch is None:
            return
        directory = trainer.checkpoint_callback.dirpath if trainer.checkpoint_callback is not None else None
        directory = directory or trainer.default_root_dir
        stem = os.path.join(directory, f"diverged-update-{trainer.global_step}")
        trainer.save_checkpoint(stem + ".ckpt")
        if trainer.is_global_zero:
            torch.save(self._batch, stem + "-batch.pt")  # a TensorDict: torch.load(..., weights_only=False)
        exception.args = (f"{exception.args[0]}; weights and batch saved as {stem}.ckpt and {stem}-batch.pt",)


class Preemption(Callback):
    """SIGTERM or SIGINT end the run after the update in progress, with a checkpoint to resume from.

    Lightning stops at the end of the update after a SIGTERM; this makes SIGINT (Ctrl+C) do the same instead of
    interrupting mid-update, and on either writes ``last.ckpt`` (atomically) before the loggers close. The CLI then
    marks the MLflow run KILLED, prints the resume command and exits with 128 + the signal number.
    """

    def __init__(self):
        self.signal: int | None = None  # the signal that stopped the run
        self.checkpoint: str | None = None  # the checkpoint written then
        self._previous_sigint = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.signal, self.checkpoint = None, None
        if threading.current_thread() is threading.main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, lambda signum, frame: self._stop(trainer, signum))
            previous_sigterm = signal.getsignal(signal.SIGTERM)  # Lightning's own handler, which sets the flag

            def on_sigterm(signum, frame):
                self.signal = signum
                if callable(previous_sigterm):
                    previous_sigterm(signum, frame)

            signal.signal(signal.SIGTERM, on_sigterm)

    def _stop(self, trainer: L.Trainer, signum: int) -> None:
        self.signal = signum
        trainer._signal_connector.received_sigterm = True  # Lightning's "stop after this update"

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()
        callback = trainer.checkpoint_callback
        if self.signal is None or not isinstance(callback, ModelCheckpoint) or callback.dirpath is None:
            return
        self.checkpoint = os.path.join(callback.dirpath, callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION)
        callback.last_model_path = self.checkpoint  # saved with it, so a resume overwrites it (not last-v1.ckpt)
        trainer.save_checkpoint(self.checkpoint)

    def _restore(self) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None


class RandomStates(Callback):
    """Checkpoints hold the process's global random states (torch's, with CUDA also each device's, NumPy's and
    Python's), and a resumed fit restores them as training starts, after everything it builds first: it then draws
    the random numbers a run that never stopped would have drawn (the collector's random warm-up actions, image
    augmentation, ...). The data module keeps its own generators' states. Rank 0's states only: other ranks keep the
    seeds their data module gave them."""

    def __init__(self):
        self._restored: dict | None = None

    def state_dict(self) -> dict:
        numpy_state = np.random.get_state(legacy=False)
        state = {"torch": torch.get_rng_state(), "python": random.getstate(),
                 "numpy": {"key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                           "pos": int(numpy_state["state"]["pos"]), "has_gauss": int(numpy_state["has_gauss"]),
                           "gauss": float(numpy_state["gauss"])}}
        if torch.cuda.is_available():  # augmentation of images on a GPU draws from the device's generator
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = state_dict

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state, self._restored = self._restored, None
        if state is None or trainer.global_rank != 0:
            return
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        random.setstate(state["python"])
        saved = state["numpy"]
        np.random.set_state({"bit_generator": "MT19937", "has_gauss": saved["has_gauss"], "gauss": saved["gauss"],
                             "state": {"key": saved["key"].numpy().astype(np.uint32), "pos": saved["pos"]}})


class UpdatesProgressBar(TQDMProgressBar):
    """Lightning's progress bar counting updates out of ``trainer.max_steps`` (the run is one endless epoch, so the
    epoch counter and the logger version are left out); its fields are the values logged with ``prog_bar=True``:
    env frames, phase, training return, loss, and the last evaluation's return and success rate.

    ``refresh_rate`` (updates between redraws) defaults to 1 on a terminal and to ``LOG_REFRESH_RATE`` when the output
    goes to a file or a pipe, where every redraw is a new line of the log."""

    LOG_REFRESH_RATE = 100

    def __init__(self, refresh_rate: int | None = None):
        if refresh_rate is None:
            refresh_rate = 1 if sys.stderr.isatty() else self.LOG_REFRESH_RATE
        super().__init__(refresh_rate=refresh_rate)

    def on_train_epoch_start(self, trainer: L.Trainer, *_) -> None:
        super().on_train_epoch_start(trainer)
        bar = self.train_progress_bar
        bar.total, bar.initial, bar.n = trainer.max_steps, trainer.global_step, trainer.global_step
        bar.set_description("updates")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        # Lightning's bar shows batch_idx + 1, which restarts at 0 on resume; the update count does not
        super().on_train_batch_end(trainer, pl_module, outputs, batch, trainer.global_step - 1)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items
