"""The LightningModule: batch -> ARSQ loss -> optimiser step -> Polyak update -> logs (docs/algorithm.md §3.3, §3.5).

Pluggable parts arrive as factories, so a config names a class and its own options while the sizes come from the
environment (``env_spec``, linked by the CLI from the data module):
``encoder(obs_dim)``, ``discretizer(action_low, action_high)``, ``head(feature_dim, action_dim, levels, bins)``
and optionally ``critic(encoder, discretizer, head)`` (default: ARSQ's :class:`ARSQCritic`; the CQN baseline is
``critic: arsq_lightning.CQNCritic`` with ``head: arsq_lightning.CQNHead`` and ``loss: arsq_lightning.CQNLoss``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from tensordict import TensorDictBase
from torch import Tensor, nn

from arsq_lightning.algos.arsq.critic import ARSQCritic
from arsq_lightning.algos.arsq.head import AutoregressiveHead
from arsq_lightning.algos.base import Critic, Head, Loss, total_loss
from arsq_lightning.callbacks import DataStatsLogger, DivergenceGuard, FitDiscretizer, Preemption, RandomStates
from arsq_lightning.data.online import EPISODE_FIELDS, OnlineDataModule
from arsq_lightning.discretizers import CoarseToFineDiscretizer, Discretizer
from arsq_lightning.envs.core import EnvSpec
from arsq_lightning.errors import ConfigError, TrainingDiverged
from arsq_lightning.nets.encoders import Encoder, FlattenEncoder
from arsq_lightning.video import EvalVideo

EncoderFactory = Callable[[int], Encoder]
DiscretizerFactory = Callable[[list, list], Discretizer]
HeadFactory = Callable[[int, int, int, int], Head]
CriticFactory = Callable[[Encoder, Discretizer, Head], Critic]


def _adam(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=3e-4, fused=True)  # one kernel per step: ~2.4x faster than the default


def loss_terms(loss: Loss, critic: Critic, batch: TensorDictBase) -> dict[str, Tensor]:
    """The loss's terms (scalars) and their sum under ``loss``: what one update computes before its backward."""
    out = loss(critic, batch)
    return {"loss": total_loss(out), **out}


_COMPILED_LOSS_TERMS = None


def compiled_loss_terms():
    """:func:`loss_terms` through ``torch.compile(fullgraph=True)``, built on first use and shared by all modules (kept
    outside them so they stay picklable). Its backward is compiled too (AOTAutograd); a graph break is an error."""
    global _COMPILED_LOSS_TERMS
    if _COMPILED_LOSS_TERMS is None:
        _COMPILED_LOSS_TERMS = torch.compile(loss_terms, fullgraph=True)
    return _COMPILED_LOSS_TERMS


def compile_unavailable(device: torch.device) -> str | None:
    """Why ``torch.compile`` cannot build code for ``device`` here (TorchInductor needs a C++ compiler for CPU code
    and Triton for CUDA code), or ``None`` when it can."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "Triton is not installed (TorchInductor needs it for CUDA code)"
    if device.type == "cpu":
        from torch._inductor.cpp_builder import get_cpp_compiler

        try:
            get_cpp_compiler()
        except Exception:  # InvalidCxxCompiler, or a build without inductor's compiler search
            return "no C++ compiler found (TorchInductor needs g++ or clang++, or $CXX, for CPU code)"
    return None  # other backends: left to torch.compile


def build_optimizer(factory: OptimizerCallable, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """``factory(params)``; torch's own checks of the settings (e.g. "Invalid learning rate: -0.1") as one line."""
    try:
        return factory(params)
    except ValueError as err:
        raise ConfigError(f"model.optimizer: {err}") from None


def build_scheduler(factory: LRSchedulerCallable, optimizer: torch.optim.Optimizer):
    """``factory(optimizer)``; a bad setting (e.g. a ``LinearLR`` start factor outside (0, 1]) as one line."""
    try:
        return factory(optimizer)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"model.lr_scheduler: {err}") from None


class ARSQModule(L.LightningModule):
    """ARSQ as a LightningModule.

    Args:
        env_spec: observation size and action bounds (linked from the data module by the CLI).
        encoder: ``obs_dim -> module`` (default :class:`FlattenEncoder`).
        discretizer: ``(low, high) -> discretizer`` (default :class:`CoarseToFineDiscretizer`, 3 levels x 5 bins).
        head: ``(feature_dim, action_dim, levels, bins) -> head`` (default :class:`AutoregressiveHead`).
        critic: ``(encoder, discretizer, head) -> critic`` (default :class:`ARSQCritic` with its defaults; its
            options, e.g. ``soft_alpha`` and ``act_network``, are set in the critic's ``init_args``).
        loss: the loss (default: the critic's own, :class:`ARSQLoss` with no conservative term for ARSQ).
        optimizer: ``params -> optimizer`` (default Adam, lr 3e-4 as official D4RL, fused).
        lr_scheduler: ``optimizer -> scheduler``, stepped after every update (default none: a constant learning
            rate), e.g. ``torch.optim.lr_scheduler.MultiStepLR`` with ``milestones [2000], gamma 0.1``.
        tau: Polyak rate of the target networks.
        compile_update: run the loss and its backward through ``torch.compile`` (one graph each, no host sync
            inside; tens of seconds of compilation at the first update; measured speed in docs/usage.md). Where
            nothing can compile (no C++ compiler for CPU code, no Triton for CUDA) fit warns and runs eagerly.
    """

    def __init__(self, env_spec: EnvSpec | None = None, *, encoder: EncoderFactory = FlattenEncoder,
                 discretizer: DiscretizerFactory = CoarseToFineDiscretizer, head: HeadFactory = AutoregressiveHead,
                 critic: CriticFactory = ARSQCritic, loss: Loss | None = None, optimizer: OptimizerCallable = _adam,
                 lr_scheduler: LRSchedulerCallable | None = None, tau: float = 0.005, compile_update: bool = False):
        super().__init__()
        if env_spec is None:
            raise ConfigError("model.env_spec is missing: pass the env's sizes (the CLI links them from data)")
        if not 0.0 < tau <= 1.0:
            raise ConfigError(f"model.tau must lie in (0, 1], got {tau}")
        self.save_hyperparameters()
        enc = encoder(env_spec.encoder_input)
        disc = discretizer(list(env_spec.action_low), list(env_spec.action_high))
        net = head(enc.out_dim, disc.action_dim, disc.levels, disc.bins)
        self.critic = critic(enc, disc, net)
        self.loss_fn = loss if loss is not None else self.critic.default_loss()
        if not isinstance(self.critic, self.loss_fn.critic_type):
            raise ConfigError(f"model.loss {type(self.loss_fn).__name__} trains a {self.loss_fn.critic_type.__name__}, "
                              f"but model.critic is a {type(self.critic).__name__}")
        probe = build_optimizer(optimizer, [nn.Parameter(torch.zeros(1))])  # bad settings fail now, not mid-run
        if lr_scheduler is not None:
            build_scheduler(lr_scheduler, probe)
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.tau, self.compile_update = tau, compile_update
        self._eval_rows: list[Tensor] = []  # evaluated episodes of this rank, each [len(EPISODE_FIELDS)]
        self.last_eval_step = -1  # the update after which the latest evaluation ran
        self.best_score = float("-inf")
        self.best_eval: tuple[float, int] | None = None  # (best mean evaluation return, the update it came after)

    @torch.no_grad()
    def act(self, obs: Tensor, *, deterministic: bool = True, generator: torch.Generator | None = None) -> Tensor:
        """Env-space actions ``[B, D]`` for observations ``[B, obs_dim]``."""
        return self.critic.act(obs, deterministic=deterministic, generator=generator)

    def configure_callbacks(self) -> list[Callback]:
        """Counters and rates in the logs, fitting a data-adaptive discretizer, stopping on divergence, ending cleanly
        on SIGTERM / SIGINT, restoring the global random states on resume, evaluation videos (``data.video_every``)."""
        callbacks = [DataStatsLogger(), FitDiscretizer(), DivergenceGuard(), Preemption(), RandomStates()]
        data = self.trainer.datamodule if self._trainer is not None else None
        if isinstance(data, OnlineDataModule) and data.hparams.video_every > 0:
            callbacks.append(EvalVideo(data.hparams.video_every, data.hparams.video_size))
        # a callback of a type the trainer already has is kept (the validate after fit, or the user's own settings)
        present = {type(callback) for callback in self.trainer.callbacks} if self._trainer is not None else set()
        return [callback for callback in callbacks if type(callback) not in present]

    def configure_optimizers(self) -> torch.optim.Optimizer | dict:
        optimizer = build_optimizer(self.optimizer_factory, self.critic.online_parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = build_scheduler(self.scheduler_factory, optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # a resumed run goes on from the best evaluation so far (eval/normalized_score_max, the end summary)
        checkpoint["best_score"], checkpoint["best_eval"] = self.best_score, self.best_eval

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.best_score = checkpoint.get("best_score", float("-inf"))
        self.best_eval = checkpoint.get("best_eval")

    # --- training -------------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        reason = compile_unavailable(self.device) if self.compile_update else None
        if reason is not None:  # a recipe that compiles by default still runs where nothing can compile
            warnings.warn(f"model.compile_update: {reason}; the updates run eagerly (same loss, slower)", stacklevel=2)
            self.compile_update = False

    def training_step(self, batch: TensorDictBase, batch_idx: int) -> Tensor:
        out = (compiled_loss_terms() if self.compile_update else loss_terms)(self.loss_fn, self.critic, batch)
        # One host sync per update: a non-finite term makes the sum non-finite. Stop before the optimiser step, so
        # the weights stay those that met this batch.
        if not bool(torch.isfinite(out["loss"])):
            bad = [name for name, value in out.items() if not bool(torch.isfinite(value).all())]
            raise TrainingDiverged(f"non-finite {', '.join('train/' + name for name in bad)} at update "
                                   f"{self.trainer.global_step}")
        if (self.trainer.global_step + 1) % max(1, self.trainer.log_every_n_steps) == 0:  # Lightning's logging steps
            self.log_dict({f"train/{k}": v for k, v in out.items()}, batch_size=batch.shape[0], prog_bar=False)
            self.log("loss", out["loss"], batch_size=batch.shape[0], prog_bar=True, logger=False)
            if self.scheduler_factory is not None:
                self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=batch.shape[0])
        return out["loss"]

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.critic.polyak(self.tau)

    # --- evaluation: the loaders yield evaluated episodes, rows [n, len(EPISODE_FIELDS)] per item ---------------
    def validation_step(self, rows: Tensor, batch_idx: int) -> None:
        self._eval_rows.extend(rows.reshape(-1, len(EPISODE_FIELDS)).unbind(0))

    def test_step(self, rows: Tensor, batch_idx: int) -> None:
        self.validation_step(rows, batch_idx)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("eval")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def _log_eval(self, prefix: str) -> None:
        episodes = self._gather_episodes()  # {field: [episodes]}, every rank's, each episode once
        returns, successes, scores = episodes["return"], episodes["success"], episodes["normalized_score"]
        if not scores.isnan().any():
            score = float(scores.mean())
            self.best_score = max(self.best_score, score)
            self.log(f"{prefix}/normalized_score", score, batch_size=1, prog_bar=True)
            self.log(f"{prefix}/normalized_score_max", self.best_score, batch_size=1)  # the official code logs both
        self.log_dict({f"{prefix}/return_mean": returns.mean().float(),
                       f"{prefix}/return_std": returns.std(unbiased=False).float(),
                       f"{prefix}/episode_length": episodes["length"].mean().float(),
                       f"{prefix}/episodes": float(returns.numel()),
                       f"{prefix}/env_frames": episodes["env_frames"].max().float()},
                      prog_bar=False, batch_size=1)  # identical on every rank after the gather
        self.log(f"{prefix}/return", returns.mean().float(), prog_bar=True, batch_size=1, logger=False)
        mean_return = float(returns.mean())
        if prefix == "eval" and (self.best_eval is None or mean_return > self.best_eval[0]):
            self.best_eval = (mean_return, self.trainer.global_step)
        if not successes.isnan().any():  # the env reports success (e.g. Meta-World, whatever its reward)
            self.log(f"{prefix}/success_rate", successes.mean().float(), prog_bar=True, batch_size=1)
        elif self.hparams.env_spec.success_reward:  # return 1 = success (sparse reward, episode ends on success)
            self.log(f"{prefix}/success_rate", (returns > 0.5).double().mean().float(), prog_bar=True, batch_size=1)
        self.last_eval_step = self.trainer.global_step

    def _gather_episodes(self) -> dict[str, Tensor]:
        """Every rank's evaluated episodes, by field (:data:`EPISODE_FIELDS`), each episode once (the distributed
        sampler may give an episode to two ranks)."""
        width = len(EPISODE_FIELDS)
        local = torch.stack(self._eval_rows).to(self.device) if self._eval_rows else torch.zeros(0, width)
        self._eval_rows = []
        rows = int(self.all_gather(torch.tensor(local.shape[0], device=self.device)).max())
        padding = torch.full((rows - local.shape[0], width), -1.0, dtype=torch.float64, device=self.device)
        gathered = self.all_gather(torch.cat([local.double().to(self.device), padding])).reshape(-1, width)
        by_episode = {int(row[0]): row for row in gathered if row[0] >= 0}
        table = torch.stack(list(by_episode.values()))  # [episodes, width]
        return dict(zip(EPISODE_FIELDS, table.unbind(-1)))
