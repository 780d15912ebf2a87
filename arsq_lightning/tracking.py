"""What an MLflow run records besides the metrics (tags saying what ran, the trainer settings as params), and the
logger that continues a run when a checkpoint is resumed.

Tags: ``arsq.version``, ``arsq.algorithm`` (``ARSQ``, ``CQN``), ``arsq.env_id``, ``arsq.config`` (the config files,
in order), ``arsq.command`` (``fit`` / ``validate`` / ``test``), ``arsq.ckpt_path`` (the checkpoint a run started
from or evaluated) and, when the package runs from a git checkout, ``git.commit`` and ``git.dirty``. Params: the
seed and the trainer settings that shape a run (``trainer/max_steps`` ...); the model and data settings are logged by
Lightning from the modules' hyperparameters.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

import arsq_lightning

TRAINER_PARAMS = ("max_steps", "val_check_interval", "log_every_n_steps", "precision", "accelerator", "devices",
                  "num_nodes", "strategy")
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # read by the MLflow UI to pick the experiment's view


def git_state(directory: Path) -> dict[str, str]:
    """``git.commit`` and ``git.dirty`` of the checkout holding ``directory``; empty outside git (e.g. a wheel)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git.commit": commit, "git.dirty": str(dirty).lower()}


def run_tags(config, command: str, critic_name: str) -> dict[str, str]:
    """The tags of a run of ``command`` with the parsed ``config`` (one subcommand's namespace)."""
    files = [str(path) for path in (config.get("config") or [])]
    tags = {"arsq.version": arsq_lightning.__version__, "arsq.algorithm": critic_name.removesuffix("Critic"),
            "arsq.env_id": str(config.data.init_args.get("env_id")), "arsq.config": ", ".join(files) or "(none)",
            "arsq.command": command}
    if config.get("ckpt_path"):
        tags["arsq.ckpt_path"] = str(config.ckpt_path)
    return {**tags, **git_state(Path(arsq_lightning.__file__).resolve().parent)}


def run_params(config) -> dict[str, str]:
    """The seed and the trainer settings, as MLflow params (strings)."""
    params = {"seed_everything": str(config.get("seed_everything"))}
    params.update({f"trainer/{name}": str(config.trainer.get(name)) for name in TRAINER_PARAMS})
    return params


def save_learning_curve(client, run_id: str, path: str) -> bool:
    """Plot the run's evaluation return (and success rate, where logged) against env frames into ``path`` (a PNG);
    against updates for a run that collected no frames. False when the run has no evaluation yet."""
    from matplotlib.figure import Figure  # no pyplot: the process's plotting backend stays untouched

    def history(key: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(run_id, key)}

    returns, frames, success = history("eval/return_mean"), history("eval/env_frames"), history("eval/success_rate")
    if not returns:
        return False
    steps = sorted(returns)
    by_frames = len({frames.get(step) for step in steps}) > 1
    x = [frames.get(step, 0.0) if by_frames else step + 1 for step in steps]
    panels = [("eval/return_mean", returns)] + ([("eval/success_rate", success)] if success else [])
    figure = Figure(figsize=(4.5 * len(panels), 3.2))
    for axis, (name, values) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
        axis.plot(x, [values.get(step, float("nan")) for step in steps], marker="o")
        axis.set(xlabel="env frames" if by_frames else "updates", ylabel=name, title=name)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return True


class ResumableMLFlowLogger(MLFlowLogger):
    """Lightning's MLflow logger, able to continue a run: given the ``run_id`` of an existing run (the CLI passes the
    one a resumed checkpoint was written by), it marks the run RUNNING again, logs each metric only past the last step
    the run already holds for it (a run killed after its checkpoint had logged those steps once already), and records
    a param the run already holds with another value (say a larger ``trainer/max_steps``) as the tag
    ``arsq.changed.<key>`` = ``"<old> -> <new>"``, since MLflow params cannot change.

    Args:
        system_metrics: also log MLflow's system metrics (``system/cpu_utilization_percentage``, memory, disk,
            network, GPU when there is one) every ``system_metrics_interval`` seconds while the run is open.
        system_metrics_interval: seconds between two samples of the system metrics.
        *args, **kwargs: Lightning's ``MLFlowLogger`` (``experiment_name``, ``tracking_uri``, ``run_name``, ``tags``,
            ``run_id``, ...).
    """

    def __init__(self, *args: Any, system_metrics: bool = False, system_metrics_interval: float = 10.0,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._continues_run = self._run_id is not None
        self._last_steps: dict[str, int] = {}  # metric -> the last step the continued run holds
        self._params: dict[str, str] = {}  # the continued run's params
        self._system_metrics, self._system_metrics_interval = system_metrics, system_metrics_interval
        self._monitor = None  # MLflow's SystemMetricsMonitor thread, once started

    def _start_system_metrics(self) -> None:
        """Start MLflow's system-metrics thread for this run (continuing its steps on a resumed run), once."""
        if not self._system_metrics or self._monitor is not None:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor  # needs psutil

        self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=self._system_metrics_interval,
                                             resume_logging=True, tracking_uri=self._tracking_uri)
        self._monitor.start()

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
        super().finalize(status)

    def _open_continued_run(self) -> None:
        """Read what the continued run already holds, once, and mark it RUNNING."""
        if not self._continues_run:
            return
        self._continues_run = False
        client = self.experiment
        run = client.get_run(self.run_id)
        self._params = dict(run.data.params)
        self._last_steps = {key: max(m.step for m in client.get_metric_history(self.run_id, key))
                            for key in run.data.metrics}
        if run.info.status != "RUNNING":
            client.update_run(self.run_id, "RUNNING")

    def _mark_experiment_kind(self) -> None:
        """Tag the experiment as model training, so that the MLflow UI opens it in its training view (MLflow 3
        guesses its GenAI view for an untagged experiment)."""
        experiment = self.experiment.get_experiment(self.experiment_id)
        if EXPERIMENT_KIND_TAG not in experiment.tags:
            self.experiment.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, "custom_model_development")

    @rank_zero_only
    def log_hyperparams(self, params) -> None:
        self._open_continued_run()
        self._start_system_metrics()
        self._mark_experiment_kind()
        flat = _flatten_dict(_convert_params(params))
        for key, value in flat.items():
            text = str(value)[:250]  # as MLflow stores a param
            if key in self._params and self._params[key] != text:
                self.experiment.set_tag(self.run_id, f"arsq.changed.{key}", f"{self._params[key]} -> {text}")
        new = {key: value for key, value in flat.items() if key not in self._params}
        if new:
            super().log_hyperparams(new)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._open_continued_run()
        fresh = {key: value for key, value in metrics.items() if (step or 0) > self._last_steps.get(key, -1)}
        if fresh:
            super().log_metrics(fresh, step)


class RunInCheckpoint(Callback):
    """Checkpoints hold the MLflow run that wrote them (``checkpoint["mlflow_run"]``: ``run_id``, ``tracking_uri``),
    so that resuming one continues that run."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger) and logger.run_id is not None:
                checkpoint["mlflow_run"] = {"run_id": logger.run_id, "tracking_uri": logger._tracking_uri}
