"""``arsq`` command line: LightningCLI over :class:`ARSQModule` and :class:`OnlineDataModule`.

* ``parser_mode="omegaconf+"``: configs may interpolate (use relative keys such as ``${..data.batch_size}``) and
  command-line overrides re-resolve them.
* ``data.env_spec`` is linked into ``model.env_spec`` at instantiation: sizes come from the env, not the YAML.
* MLflow is the default logger, on a local SQLite store (``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``);
  the resolved config is logged as an artifact, checkpoints at the end of ``fit``.
* Checkpoints are written atomically (:class:`~arsq_lightning.checkpoint_io.AtomicCheckpointIO`).
* Bad settings raise :class:`~arsq_lightning.errors.ConfigError`, printed as one line.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib
import logging
import os
import re
import shlex
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Sequence

import torch
import yaml
from jsonargparse import Namespace
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from arsq_lightning.callbacks import Preemption, UpdatesProgressBar
from arsq_lightning.checkpoint_io import AtomicCheckpointIO, check_checkpoint
from arsq_lightning.data.offline import OfflineToOnlineDataModule  # noqa: F401 (a known `data` subclass for --help)
from arsq_lightning.data.online import OnlineDataModule
from arsq_lightning.errors import ConfigError, Preempted, TrainingDiverged, require
from arsq_lightning.module import ARSQModule, build_optimizer
from arsq_lightning.shipped_configs import describe_configs, resolve_config_args
from arsq_lightning.tracking import RunInCheckpoint, run_params, run_tags, save_learning_curve

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DESCRIPTION = ("arsq: train value-based continuous-control agents (ARSQ, auto-regressive soft Q-learning over "
               "coarse-to-fine discretised actions, and the CQN baseline) online, from datasets or from "
               "demonstrations, with runs tracked in MLflow. Start with: arsq fit --config quickstart (a shipped "
               "config's name or a path; `arsq configs` lists them). Deploy a checkpoint's policy with: "
               "arsq export --ckpt_path CKPT --out policy.pt2")


class MLflowSaveConfig(SaveConfigCallback):
    """Store the fully resolved config as ``config.yaml`` in the MLflow run (instead of a file in the log dir), with
    the run's tags and trainer params (:mod:`arsq_lightning.tracking`)."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                text = self.parser.dump(self.config, skip_none=False)
                logger.experiment.log_text(logger.run_id, text, "config.yaml")
                command = self.config.get("subcommand") or trainer.state.fn.value
                config = self.config[command] if self.config.get("subcommand") else self.config
                for key, value in run_tags(config, command, type(pl_module.critic).__name__).items():
                    logger.experiment.set_tag(logger.run_id, key, value)
                logger.log_hyperparams(run_params(config))


# Model options that say how to run the model, not what it is: a resume may change them.
RUNTIME_MODEL_OPTIONS = ("compile_update",)

# Trainer options that an RL run counted in updates fixes (epochs, batch limits, sanity checks, gradient
# accumulation) or that do not apply to it; they are left out of the parser (and of --help) and set here.
TRAINER_FIXED = {"max_epochs": None, "min_epochs": None, "min_steps": None, "check_val_every_n_epoch": None,
                 "num_sanity_val_steps": 0, "limit_train_batches": None, "limit_val_batches": None,
                 "limit_test_batches": None, "limit_predict_batches": None, "overfit_batches": 0.0,
                 "reload_dataloaders_every_n_epochs": 0, "use_distributed_sampler": True, "fast_dev_run": False,
                 "accumulate_grad_batches": 1, "barebones": False, "model_registry": None, "sync_batchnorm": False,
                 "inference_mode": True, "plugins": None}
PRECISION_HELP = ("32-true (fp32), bf16-mixed (matmuls in bf16; the normaliser, values, targets and losses in fp32) or "
                  "another Lightning precision. Unset, it is chosen per machine: bf16-mixed on a CPU-only machine "
                  "whose CPU has native bf16 (AVX512-BF16 / AMX), else 32-true")


class ArsqCLI(LightningCLI):
    """LightningCLI with the project's links, defaults and end-of-run summary."""

    def add_core_arguments_to_parser(self, parser) -> None:
        """Lightning's, with the Trainer options of ``TRAINER_FIXED`` left out."""
        parser.add_class_arguments(self.trainer_class, "trainer", fail_untyped=False, instantiate=False,
                                   sub_configs=True, skip=set(TRAINER_FIXED))
        parser.set_defaults({"trainer." + k: v for k, v in self.trainer_defaults.items() if k != "callbacks"})
        parser._option_string_actions["--trainer.precision"].help = PRECISION_HELP
        parser.add_lightning_class_args(self._model_class, "model", subclass_mode=self.subclass_mode_model)
        parser.add_lightning_class_args(self._datamodule_class, "data", subclass_mode=self.subclass_mode_data)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--num_threads", type=int, default=1,
                            help="torch CPU threads per process (1 is fastest when an env runs beside the learner)")
        parser.link_arguments("data.env_spec", "model.env_spec", apply_on="instantiate")
        # ModelCheckpoint's options less the epoch-based ones and those the project fixes (Preemption saves on a signal)
        parser.add_class_arguments(ModelCheckpoint, "checkpoint", fail_untyped=False, sub_configs=True,
                                   skip={"every_n_epochs", "save_on_train_epoch_end", "enable_version_counter",
                                         "save_on_exception", "auto_insert_metric_name"})
        parser.callback_keys.append("checkpoint")  # instantiated and handed to the trainer as a callback
        # Keep the newest checkpoint of every evaluation (Lightning 2.6 refreshes last.ckpt only when a top-k
        # checkpoint is written, so monitoring the return would leave last.ckpt stale).
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 1})

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``fit``, ``validate`` and ``test`` (``predict`` is not offered: acting is ``ARSQModule.act``)."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name != "predict"}

    def instantiate_trainer(self, **kwargs) -> Trainer:
        """The trainer, writing checkpoints atomically unless a custom checkpoint writer was configured."""
        trainer = super().instantiate_trainer(**{**TRAINER_FIXED, **kwargs})
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        trainer.callbacks.append(RunInCheckpoint())
        write_checkpoints_into_run(trainer)
        # Lightning's default bar (Rich when installed, else tqdm) -> the bar counting updates
        trainer.callbacks = [UpdatesProgressBar() if type(c) in (RichProgressBar, TQDMProgressBar) else c
                             for c in trainer.callbacks]
        return trainer

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        torch.set_num_threads(max(1, config.num_threads))
        check_budget(config.trainer.max_steps, config.trainer.val_check_interval)
        check_optimizer(config.model.optimizer)
        warn_slow_bf16(str(config.trainer.precision), str(config.trainer.accelerator))
        if config.data.init_args.get("seed") is None:  # one seed drives everything unless data.seed is given
            config.data.init_args.seed = int(config.seed_everything) if config.seed_everything is not False else 0
        logger = self._mlflow_logger_config(config)
        if logger is not None and not logger.init_args.get("run_name"):  # MLflow's generator is seeded
            logger.init_args.run_name = default_run_name(config)

    def instantiate_classes(self) -> None:
        """Check the output places (one line each) and create the MLflow store, then build everything: the I/O
        happens only when something is built, and before the logger, which opens the store."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_writable(config.trainer.default_root_dir or ".", "trainer.default_root_dir")
        logger = self._mlflow_logger_config(config)
        if logger is not None:
            check_tracking_uri(logger.init_args.tracking_uri)
            prepare_sqlite_store(logger.init_args.tracking_uri, logger.init_args.experiment_name)
            if self.subcommand == "fit" and not logger.init_args.get("run_id"):  # a resume continues its run
                logger.init_args.run_id = continued_run_id(self.checkpoint_run, logger.init_args.tracking_uri)
            elif self.subcommand != "fit" and self.checkpoint_run:  # validate / test: say which run they evaluate
                logger.init_args.tags = {**(logger.init_args.get("tags") or {}),
                                         "arsq.source_run": self.checkpoint_run["run_id"]}
        super().instantiate_classes()

    @staticmethod
    def _mlflow_logger_config(config):
        """The trainer's MLflow logger settings, or ``None`` when another (or no) logger is configured."""
        logger = config.trainer.logger
        if logger and not isinstance(logger, (list, bool)) and str(logger.class_path).endswith("MLFlowLogger"):
            return logger
        return None

    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` first: Lightning reads the checkpoint's hyperparameters here, before any hook."""
        self.checkpoint_run: dict | None = None  # the MLflow run that wrote --ckpt_path (continued by `fit`)
        if self.config.get("subcommand"):
            path = self.config[self.config.subcommand].get("ckpt_path")
            if path not in (None, "last", "best", "hpc", "registry"):
                saved = check_checkpoint(path, needs_buffers=self.config.subcommand == "fit")
                self._check_model_matches(path, saved.get("hyper_parameters", {}))
                self.checkpoint_run = saved.get("mlflow_run")
        model = self.config[self.config.subcommand]["model"] if self.config.get("subcommand") else None
        runtime = {key: model.get(key) for key in RUNTIME_MODEL_OPTIONS} if model is not None else {}
        super()._parse_ckpt_path()
        if model is not None:  # the checkpoint's env spec came in with its settings; the data module's is linked in at
            self.config[self.config.subcommand]["model"]["env_spec"] = None  # instantiation (and it does not dump)
        for key, value in runtime.items():  # how to run the model, not what it is: the command line's setting stands
            self.config[self.config.subcommand]["model"][key] = value

    def _check_model_matches(self, path: str, saved: dict) -> None:
        """Lightning replaces the model settings with the checkpoint's (``saved``) on resume; stop instead of
        silently ignoring the ones that differ (trainer and data settings, e.g. the budget, may change)."""
        given = yaml.safe_load(self.parser.dump(self.config, skip_none=False))[self.config.subcommand]["model"]
        ignored = {"_instantiator", "env_spec", "_class_path", *RUNTIME_MODEL_OPTIONS}
        ours = _flatten({k: v for k, v in given.items() if k not in ignored})
        theirs = _flatten(yaml.safe_load(yaml.safe_dump(
            {k: v for k, v in saved.items() if k not in ignored}, default_flow_style=False)))
        # settings both sides have (an option added since the checkpoint was written is not a difference)
        differ = sorted(key for key in ours.keys() & theirs.keys() if ours[key] != theirs[key])
        require(not differ, f"--ckpt_path {path} was trained with other model settings: "
                + ", ".join(f"model.{key} ({theirs[key]!r} there, {ours[key]!r} here)" for key in differ[:6])
                + ("" if len(differ) <= 6 else ", ..."))

    def fit(self, **kwargs) -> None:
        """``trainer.fit``; a SIGTERM / SIGINT ends it with the MLflow run KILLED and :class:`Preempted` raised."""
        self.fit_started = time.perf_counter()
        try:
            self.trainer.fit(**kwargs)
        except RuntimeError as err:
            if "Error(s) in loading state_dict" not in str(err):
                raise
            raise ConfigError(f"--ckpt_path {kwargs.get('ckpt_path')}: its networks do not fit this config's env "
                              f"(e.g. other observation or action sizes): {str(err).splitlines()[1].strip()}") from None
        except SIGTERMException:
            preemption = next(c for c in self.trainer.callbacks if isinstance(c, Preemption))
            for logger in self.trainer.loggers:
                if isinstance(logger, MLFlowLogger) and self.trainer.is_global_zero:
                    logger.experiment.set_terminated(logger.run_id, "KILLED")
            raise Preempted(preemption.signal or signal.SIGTERM, self.trainer.global_step,
                            preemption.checkpoint) from None

    def after_fit(self) -> None:
        """Evaluate (and checkpoint) the final weights if the last in-fit evaluation came before the last update."""
        trainer = self.trainer
        if self.model.last_eval_step != trainer.global_step and not trainer.interrupted:
            trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
            self._save_final_checkpoint()
        self._log_learning_curve()
        self._print_summary("eval", fit_lines(self.trainer, self.model, time.perf_counter() - self.fit_started))

    def _log_learning_curve(self) -> None:
        """``learning_curve.png`` in the MLflow run (:func:`~arsq_lightning.tracking.save_learning_curve`)."""
        for logger in self.trainer.loggers:
            if isinstance(logger, MLFlowLogger) and self.trainer.is_global_zero:
                with tempfile.TemporaryDirectory() as folder:
                    path = os.path.join(folder, "learning_curve.png")
                    if save_learning_curve(logger.experiment, logger.run_id, path):
                        logger.experiment.log_artifact(logger.run_id, path)

    def _save_final_checkpoint(self) -> None:
        callback = self.trainer.checkpoint_callback
        if callback is None or callback.dirpath is None:
            return
        path = os.path.join(callback.dirpath, "last.ckpt")
        self.trainer.save_checkpoint(path, weights_only=False)  # the full state: it resumes
        callback.last_model_path = path
        for logger in self.trainer.loggers:
            if isinstance(logger, MLFlowLogger) and logger._log_model and self.trainer.is_global_zero:
                logger.experiment.log_artifact(logger.run_id, path, "last")

    def after_validate(self) -> None:
        self._print_summary("eval")

    def after_test(self) -> None:
        self._print_summary("test")

    @rank_zero_only
    def _print_summary(self, prefix: str, extra: Sequence[str] = ()) -> None:
        metrics = self.trainer.callback_metrics
        mean, std = metrics.get(f"{prefix}/return_mean"), metrics.get(f"{prefix}/return_std")
        lines = []
        if mean is not None:
            success = metrics.get(f"{prefix}/success_rate")
            lines.append(f"final {prefix} return: {float(mean):.1f} ± {float(std):.1f} "
                         f"over {int(metrics[f'{prefix}/episodes'])} deterministic episodes"
                         + (f", success rate {float(success):.2f}" if success is not None else ""))
        lines += extra
        for logger in self.trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                lines.append(f"MLflow run {logger.run_id} (experiment '{logger._experiment_name}') "
                             f"in {logger._tracking_uri}")
                lines.append(f"open it with: mlflow ui --backend-store-uri {logger._tracking_uri}  "
                             "(the UI: pip install 'arsq-lightning[ui]')")
        print("\n".join(lines), flush=True)


def fit_lines(trainer: Trainer, module: ARSQModule, seconds: float) -> list[str]:
    """The end summary's lines about a fit: best evaluation, updates, env frames, wall time, checkpoint."""
    lines = []
    if module.best_eval is not None:
        lines.append(f"best eval return: {module.best_eval[0]:.1f} (after update {module.best_eval[1]})")
    frames = trainer.datamodule.stats().env_frames if isinstance(trainer.datamodule, OnlineDataModule) else None
    lines.append(f"{trainer.global_step} updates" + (f", {frames} env frames" if frames is not None else "")
                 + f", {seconds / 60:.1f} min")
    checkpoint = trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback is not None else ""
    if checkpoint:
        lines.append(f"checkpoint: {checkpoint}")
    return lines


def default_run_name(config) -> str:
    """``<last config file>-s<seed>-<date-time>-<4 hex digits>``, e.g. ``quickstart-s0-20261202-091500-3fa2``: the
    random suffix (from the OS, not the seeded generators) keeps runs started in the same second apart."""
    files = config.get("config") or []
    stem = os.path.splitext(os.path.basename(str(files[-1])))[0] if files else "arsq"  # an overlay names the run
    return f"{stem}-s{config.get('seed_everything')}-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"


def check_budget(max_steps: int, val_check_interval: int | float | None) -> None:
    """One-line errors for budgets Lightning would accept and then fail on (or loop forever with)."""
    require(max_steps is not None and max_steps >= 1,
            f"trainer.max_steps must be >= 1 (gradient updates; the training stream never ends), got {max_steps}")
    if isinstance(val_check_interval, float):
        require(0.0 < val_check_interval <= 1.0,
                f"trainer.val_check_interval as a fraction must lie in (0, 1], got {val_check_interval}")
    elif val_check_interval is not None:
        require(val_check_interval >= 1, f"trainer.val_check_interval must be >= 1 update, got {val_check_interval}")


def check_optimizer(optimizer) -> None:
    """Build the configured optimiser (``class_path`` / ``init_args``) on a dummy parameter, so that a bad setting is
    one line before the MLflow store is set up (seconds) rather than when the model is. The default optimiser (a
    function, not a ``class_path``) needs no check."""
    if not isinstance(optimizer, Namespace) or "class_path" not in optimizer:
        return
    module, _, name = str(optimizer.class_path).rpartition(".")
    optimizer_class = getattr(importlib.import_module(module), name)
    settings = optimizer.init_args.as_dict() if optimizer.get("init_args") is not None else {}
    build_optimizer(lambda params: optimizer_class(params, **settings), [torch.nn.Parameter(torch.zeros(1))])


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls natively (AVX512 / AMX; oneDNN's own test). Without it bf16 is emulated."""
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)  # private: absent in some builds
    return bool(probe()) if probe is not None else False


def default_precision() -> str:
    """``trainer.precision`` when a config does not set it: ``bf16-mixed`` on a CPU-only machine whose CPU runs bf16
    natively (there it learned as fp32 did and updated about 2x faster at the paper's nets, docs/measurements.md),
    else ``32-true`` (CPUs that emulate bf16, and CUDA machines until bf16 is measured on one)."""
    return "bf16-mixed" if not torch.cuda.is_available() and cpu_has_native_bf16() else "32-true"


def warn_slow_bf16(precision: str, accelerator: str) -> None:
    """One stderr line when bf16 would run on a CPU that emulates it: there it is many times slower than fp32."""
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if precision.startswith("bf16") and on_cpu and not cpu_has_native_bf16():
        print(f"arsq: warning: trainer.precision {precision} on a CPU without native bf16 (no AVX512 / AMX) is "
              "emulated and many times slower than fp32: use --trainer.precision 32-true", file=sys.stderr)


def check_writable(directory: str, what: str) -> None:
    """One line if ``directory`` cannot be created or written (instead of retries and a long traceback later)."""
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        raise ConfigError(f"{what}: cannot write to {directory} ({err.strerror})") from None


def check_tracking_uri(uri: str | None) -> None:
    """One line, within seconds, for an MLflow store that cannot be written or a server that does not answer."""
    uri = uri or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///"):
        check_writable(os.path.dirname(os.path.abspath(uri.removeprefix("sqlite:///"))), f"MLflow store {uri}")
    elif uri.startswith(("http://", "https://")):
        check_server_answers(uri)
    elif "://" not in uri or uri.startswith("file://"):
        check_writable(uri.removeprefix("file://"), "MLflow store")


def check_server_answers(uri: str, timeout: float = 5.0) -> None:
    """One line unless the server at ``uri`` answers an HTTP request (any status) within ``timeout`` seconds: a
    refused connection, or a socket that accepts but never replies (MLflow's own client would retry for minutes)."""
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        pass  # it answered, e.g. 401 or 404: the MLflow client reports what is wrong, if anything
    except (OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise ConfigError(f"MLflow tracking server {uri} does not answer ({reason}); start it, or use a local "
                          "store: MLFLOW_TRACKING_URI=sqlite:///mlflow.db") from None


def write_checkpoints_into_run(trainer: Trainer) -> None:
    """With a local artifact store (the default), checkpoints are written straight into the MLflow run's artifacts
    (``checkpoints/``), so each is stored once; with a remote one (or a ``checkpoint.dirpath`` of your own) they stay
    where Lightning puts them, and the logger copies them into the run (``log_model``)."""
    callback = trainer.checkpoint_callback
    for logger in trainer.loggers:
        if not isinstance(logger, MLFlowLogger) or callback is None or callback.dirpath is not None:
            continue
        if trainer.is_global_zero:  # other ranks get the folder from rank 0 when the callback sets up
            artifacts = logger.experiment.get_run(logger.run_id).info.artifact_uri
            if "://" in artifacts and not artifacts.startswith("file://"):
                continue
            callback.dirpath = os.path.join(urllib.parse.urlparse(artifacts).path or artifacts, "checkpoints")
        logger._log_model = False


def continued_run_id(checkpoint_run: dict | None, tracking_uri: str) -> str | None:
    """The MLflow run a resumed ``fit`` continues: the one that wrote the checkpoint, if it is in this store."""
    if not checkpoint_run or checkpoint_run.get("tracking_uri") != tracking_uri:
        return None
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        run = MlflowClient(tracking_uri).get_run(checkpoint_run["run_id"])
    except MlflowException:  # deleted, or the store was replaced: a new run
        return None
    return run.info.run_id if run.info.lifecycle_stage == "active" else None


def quiet_library_chatter() -> None:
    """Drop the libraries' lines that say nothing about this run: Lightning's advertisement for its cloud logger, a
    deprecation inside Lightning, TorchRL's INFO lines (``RL_LOGGING_LEVEL`` set by the user wins), and the warning
    about passing the CLI's arguments explicitly (intended: the resolved arguments replace ``sys.argv``'s)."""
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(lambda record: "litlogger" not in record.getMessage())
    if "RL_LOGGING_LEVEL" not in os.environ:
        logging.getLogger("torchrl").setLevel(logging.WARNING)


def prepare_sqlite_store(uri: str | None, experiment: str) -> None:
    """Create a local SQLite store's tables and the experiment once, under a file lock, so that runs started together
    in a fresh folder do not race to create them (MLflow's own set-up is not safe against that)."""
    uri = uri or DEFAULT_TRACKING_URI
    if not uri.startswith("sqlite:///"):
        return
    from mlflow.tracking import MlflowClient

    quiet = {name: logging.getLogger(name) for name in ("mlflow", "alembic")}  # table creation logs at INFO
    levels = {name: log.level for name, log in quiet.items()}
    with open(os.path.abspath(uri.removeprefix("sqlite:///")) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            for log in quiet.values():
                log.setLevel(logging.WARNING)
            client = MlflowClient(uri)
            if client.get_experiment_by_name(experiment) is None:
                client.create_experiment(experiment)
        finally:
            for name, log in quiet.items():
                log.setLevel(levels[name])


def _trainer_defaults() -> dict:
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)
    return {
        "logger": {"class_path": "arsq_lightning.tracking.ResumableMLFlowLogger",
                   "init_args": {"experiment_name": "arsq", "tracking_uri": tracking_uri, "log_model": True}},
        "default_root_dir": "runs",
        "precision": default_precision(),
        "val_check_interval": 5000,
        "max_steps": 100_000,
    }


def build_cli(args: list[str] | None = None, *, run: bool = True) -> ArsqCLI:
    """Parse ``args`` (``None``: ``sys.argv``), instantiate, and run the subcommand unless ``run`` is false."""
    return ArsqCLI(ARSQModule, OnlineDataModule, args=args, run=run, subclass_mode_data=True,
                   auto_configure_optimizers=False,  # the optimiser is model.optimizer, not a top-level --optimizer
                   parser_kwargs={"parser_mode": "omegaconf+", "exit_on_error": False, "description": DESCRIPTION},
                   save_config_callback=MLflowSaveConfig,
                   save_config_kwargs={"overwrite": True, "save_to_log_dir": False},
                   trainer_defaults=_trainer_defaults())


def _config_error_in(exc: BaseException) -> BaseException | None:
    """The ConfigError / argparse error that caused ``exc`` (jsonargparse wraps errors raised while instantiating)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, (ConfigError, argparse.ArgumentError)):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


_PARSER_KEY = re.compile(r'Parser key "([^"]+)"')
_EXPECTED_TYPE = re.compile(r"Expected an? <class '([\w.]+)'>")
_GIVEN_VALUE = re.compile(r"(?:Got|Given) value: (.+?)(?:\. Got value:|$)", re.M)
_SUBTYPES = re.compile(r"Subtypes: \[(.*)\]")
_LITERAL = re.compile(r"Literal\[([^\]]*)\]")
_CLASS = re.compile(r"<class '([\w.]+)'>")


def one_line_error(message: str) -> str:
    """jsonargparse's multi-line type error as one line: ``key.path: expected int, got 'abc'``.

    The key path joins the nested ``Parser key`` names (``data`` + ``batch_size``); the type is the first one the
    parser expected; the value is the first plain one it was given. A message it cannot read keeps its first line.
    """
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return message.strip()
    keys = _PARSER_KEY.findall(message)
    innermost = message[message.rfind("Parser key"):]  # the error of the deepest key
    values = [v.rstrip(".") for v in _GIVEN_VALUE.findall(message) if not v.startswith(("Namespace(", "NestedArg("))]
    subtypes = _SUBTYPES.search(innermost)
    if subtypes:  # a Union: the literal values and classes it accepts
        choices = [c.strip() for lit in _LITERAL.findall(subtypes.group(1)) for c in lit.split(",")]
        choices += [c.rsplit(".", 1)[-1] for c in _CLASS.findall(subtypes.group(1)) if c != "NoneType"]
        expected = "one of " + ", ".join(choices)
    else:
        match = _EXPECTED_TYPE.search(innermost)
        expected = match.group(1).rsplit(".", 1)[-1] if match else None
    if keys and expected and values:
        return f"{'.'.join(keys)}: expected {expected}, got {values[0]!r}"
    return f"{lines[0].rstrip(':')} ({lines[1]})"


def _flatten(tree, prefix: str = "") -> dict:
    """Nested dicts as ``{"a.b.c": value}`` (lists and tuples as lists)."""
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: list(tree) if isinstance(tree, tuple) else tree}


def _with_ckpt_path(args: list[str] | None, checkpoint: str) -> list[str]:
    """The command-line arguments with ``--ckpt_path`` set to ``checkpoint`` (any earlier one dropped)."""
    args, kept, skip = list(sys.argv[1:] if args is None else args), [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--ckpt_path":
            skip = True
        elif not arg.startswith("--ckpt_path="):
            kept.append(arg)
    return [*kept, "--ckpt_path", checkpoint]


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``arsq`` console script; bad settings exit with status 2 and a one-line message.

    ``arsq configs`` lists the shipped configs; ``arsq export`` writes a checkpoint's policy
    (:mod:`arsq_lightning.export`); ``--config`` takes a path or a shipped config's name."""
    args = list(sys.argv[1:] if args is None else args)
    if args[:1] == ["configs"]:
        print(describe_configs())
        return
    quiet_library_chatter()
    try:
        if args[:1] == ["export"]:
            from arsq_lightning.export import export_main  # the export imports the module, which imports nothing here

            export_main(args[1:])
            return
        args = resolve_config_args(args)
        build_cli(args)
    except Preempted as exc:
        print(f"arsq: {exc}", file=sys.stderr)
        if exc.checkpoint is not None:
            print("arsq: resume with: " + shlex.join(["arsq", *_with_ckpt_path(args, exc.checkpoint)]), file=sys.stderr)
        sys.exit(128 + exc.signum)
    except TrainingDiverged as exc:
        print(f"arsq: error: training diverged: {exc}", file=sys.stderr)
        sys.exit(1)
    except Exception as exc:  # noqa: BLE001 - re-raised unless it is a configuration error
        err = _config_error_in(exc)
        if err is None:
            raise
        print(f"arsq: error: {one_line_error(str(err))}", file=sys.stderr)
        print("arsq: see `arsq --help` or `arsq fit --help` for the accepted options", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
