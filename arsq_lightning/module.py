"""The LightningModule: batch -> ARSQ loss -> optimiser step -> Polyak update -> logs (ALGORITHM.md §3.3, §3.5).

Pluggable parts arrive as factories, so a config names a class and its own options while the sizes come from the
environment (``env_spec``, linked by the CLI from the data module):
``encoder(obs_dim)``, ``discretizer(action_low, action_high)``, ``head(feature_dim, action_dim, levels, bins)``
and optionally ``critic(encoder, discretizer, head)`` (default: ARSQ's :class:`ARSQCritic`; the CQN baseline is
``critic: arsq_lightning.CQNCritic`` with ``head: arsq_lightning.CQNHead`` and ``loss: arsq_lightning.CQNLoss``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from tensordict import TensorDictBase
from torch import Tensor, nn

from arsq_lightning.algos.arsq.critic import ARSQCritic
from arsq_lightning.algos.arsq.head import AutoregressiveHead
from arsq_lightning.algos.arsq.loss import ARSQLoss
from arsq_lightning.algos.cqn.critic import CQNCritic
from arsq_lightning.algos.cqn.loss import CQNLoss
from arsq_lightning.discretizers import CoarseToFineDiscretizer, Discretizer
from arsq_lightning.envs.core import EnvSpec
from arsq_lightning.errors import ConfigError
from arsq_lightning.nets.encoders import FlattenEncoder

EncoderFactory = Callable[[int], nn.Module]
DiscretizerFactory = Callable[[list, list], Discretizer]
HeadFactory = Callable[[int, int, int, int], nn.Module]
CriticFactory = Callable[[nn.Module, Discretizer, nn.Module], nn.Module]


def _adam(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=3e-4)


class ARSQModule(L.LightningModule):
    """ARSQ as a LightningModule.

    Args:
        env_spec: observation size and action bounds (linked from the data module by the CLI).

    Keyword Args:
        encoder: ``obs_dim -> module`` (default :class:`FlattenEncoder`).
        discretizer: ``(low, high) -> discretizer`` (default :class:`CoarseToFineDiscretizer`, 3 levels x 5 bins).
        head: ``(feature_dim, action_dim, levels, bins) -> head`` (default :class:`AutoregressiveHead`).
        critic: ``(encoder, discretizer, head) -> critic``; ``None`` builds an :class:`ARSQCritic` from the four
            options below (``soft_alpha`` ... ``compile_act``), which apply to it only.
        soft_alpha: training temperature ``alpha_s``.
        act_alpha: acting temperature ``alpha_a`` (``None``: same as ``soft_alpha``).
        act_network: ``online`` or ``target`` networks act.
        loss: the loss (default: the critic's own, :class:`ARSQLoss` with no conservative term for ARSQ).
        optimizer: ``params -> optimizer`` (default Adam, lr 3e-4, as official D4RL).
        tau: Polyak rate of the target networks.
        compile_act: compile the position-by-position acting loop with ``torch.compile`` (see ``ARSQCritic``).
    """

    def __init__(self, env_spec: EnvSpec | None = None, *, encoder: EncoderFactory = FlattenEncoder,
                 discretizer: DiscretizerFactory = CoarseToFineDiscretizer, head: HeadFactory = AutoregressiveHead,
                 critic: CriticFactory | None = None, soft_alpha: float = 0.01, act_alpha: float | None = None,
                 act_network: Literal["online", "target"] = "online", loss: ARSQLoss | CQNLoss | None = None,
                 optimizer: OptimizerCallable = _adam, tau: float = 0.005, compile_act: bool = False):
        super().__init__()
        if env_spec is None:
            raise ConfigError("model.env_spec is missing: pass the env's sizes (the CLI links them from data)")
        if not 0.0 < tau <= 1.0:
            raise ConfigError(f"model.tau must lie in (0, 1], got {tau}")
        self.save_hyperparameters()
        enc = encoder(env_spec.encoder_input)
        disc = discretizer(list(env_spec.action_low), list(env_spec.action_high))
        net = head(enc.out_dim, disc.action_dim, disc.levels, disc.bins)
        if critic is None:
            self.critic = ARSQCritic(enc, disc, net, soft_alpha=soft_alpha, act_alpha=act_alpha,
                                     act_network=act_network, compile_act=compile_act)
        else:
            self.critic = critic(enc, disc, net)
        self.loss_fn = loss if loss is not None else (CQNLoss() if isinstance(self.critic, CQNCritic) else ARSQLoss())
        if not isinstance(self.critic, self.loss_fn.critic_type):
            raise ConfigError(f"model.loss {type(self.loss_fn).__name__} trains a {self.loss_fn.critic_type.__name__}, "
                              f"but model.critic is a {type(self.critic).__name__}")
        self.optimizer_factory = optimizer
        self.tau = tau
        self.register_buffer("grad_updates", torch.zeros((), dtype=torch.long))
        self._eval_results: list[tuple[float, float, float, float]] = []  # (episode, return, length, success)
        self.last_eval_step = -1
        self.best_score = float("-inf")
        self._clock: tuple[float, int, int] | None = None

    @torch.no_grad()
    def act(self, obs: Tensor, *, deterministic: bool = True, generator: torch.Generator | None = None) -> Tensor:
        """Env-space actions ``[B, D]`` for observations ``[B, obs_dim]``."""
        return self.critic.act(obs, deterministic=deterministic, generator=generator)

    def setup(self, stage: str) -> None:
        """Fit a data-adaptive discretizer (one with ``fit``) to the data module's actions, once, before training.

        A resumed run (``ckpt_path``) takes the fitted map from the checkpoint instead, so it never changes mid-run.
        """
        disc = self.critic.discretizer
        resuming = self.trainer.ckpt_path is not None
        if stage != "fit" or not hasattr(disc, "fit") or bool(disc.fitted) or resuming:
            return
        samples = getattr(self.trainer.datamodule, "action_samples", lambda: None)()
        if samples is None:
            raise ConfigError(f"model.discretizer {type(disc).__name__} is fitted to dataset actions, but "
                              f"{type(self.trainer.datamodule).__name__} has none: use a dataset data module")
        disc.fit(samples.to(disc.low.device))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.critic.online_parameters())

    # --- training -------------------------------------------------------------------------------------------------
    def training_step(self, batch: TensorDictBase, batch_idx: int) -> Tensor:
        out = self.loss_fn(self.critic, batch)
        size = batch.shape[0]
        self.log_dict({f"train/{k}": v for k, v in out.items()}, batch_size=size, prog_bar=False)
        return out["loss"]

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.critic.polyak(self.tau)
        self.grad_updates += 1
        if self.trainer.global_step % max(1, self.trainer.log_every_n_steps) == 0:
            self._log_counters()

    def _log_counters(self) -> None:
        data = self.trainer.datamodule
        frames = getattr(data, "frames", 0)
        updates = int(self.grad_updates)
        now = time.perf_counter()
        metrics = {"train/env_frames": float(frames), "train/grad_updates": float(updates)}
        if self._clock is not None:
            elapsed = max(now - self._clock[0], 1e-9)
            metrics["time/fps"] = (frames - self._clock[1]) / elapsed
            metrics["time/updates_per_s"] = (updates - self._clock[2]) / elapsed
        if hasattr(data, "phase"):
            metrics["train/phase_online"] = float(data.phase == "online")
            metrics["train/relabelled_episodes"] = float(data.relabelled_episodes)
        returns = getattr(data, "episode_returns", None)
        if returns:
            metrics["train/episode_return"] = sum(returns) / len(returns)
        self._clock = (now, frames, updates)
        self.log_dict(metrics, prog_bar=False, batch_size=1)
        if "train/phase_online" in metrics:  # show the phase in the progress bar: 0 offline, 1 online
            self.log("online", metrics["train/phase_online"], prog_bar=True, logger=False, batch_size=1)

    # --- evaluation (validation / test loops run one deterministic episode per item) -------------------------------
    def validation_step(self, episode: int, batch_idx: int) -> None:
        episode_return, length, success = self.trainer.datamodule.evaluate_episode(self.critic, int(episode))
        self._eval_results.append((float(episode), episode_return, float(length), success))

    def test_step(self, episode: int, batch_idx: int) -> None:
        self.validation_step(episode, batch_idx)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("eval")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def _log_eval(self, prefix: str) -> None:
        rows = max(len(self._eval_results), getattr(self.trainer.datamodule.hparams, "eval_episodes", 1))
        padding = [(-1.0, 0.0, 0.0, 0.0)] * (rows - len(self._eval_results))  # all ranks gather equal shapes
        local = torch.tensor(self._eval_results + padding, dtype=torch.float64, device=self.device)
        self._eval_results = []
        gathered = self.all_gather(local).reshape(-1, 4)  # every rank's (episode, return, length, success)
        by_episode = {int(e): rest for e, *rest in gathered.tolist() if e >= 0}  # the sampler may repeat episodes
        returns, lengths, successes = torch.tensor(list(by_episode.values()), dtype=torch.float64).unbind(-1)
        data = self.trainer.datamodule
        frames = float(getattr(data, "frames", 0))
        score = data.normalized_score(float(returns.mean())) if hasattr(data, "normalized_score") else None
        if score is not None:
            self.best_score = max(self.best_score, score)
            self.log(f"{prefix}/normalized_score", score, batch_size=1, prog_bar=True)
            self.log(f"{prefix}/normalized_score_max", self.best_score, batch_size=1)  # the official code logs both
        self.log_dict({f"{prefix}/return_mean": returns.mean().float(),
                       f"{prefix}/return_std": returns.std(unbiased=False).float(),
                       f"{prefix}/episode_length": lengths.mean().float(),
                       f"{prefix}/episodes": float(returns.numel()), f"{prefix}/env_frames": frames},
                      prog_bar=False, batch_size=1)  # identical on every rank after the gather
        self.log(f"{prefix}/return", returns.mean().float(), prog_bar=True, batch_size=1, logger=False)
        if not successes.isnan().any():  # the env reports success (e.g. Meta-World, whatever its reward)
            self.log(f"{prefix}/success_rate", successes.mean().float(), prog_bar=True, batch_size=1)
        elif self.hparams.env_spec.success_reward:  # return 1 = success (sparse reward, episode ends on success)
            self.log(f"{prefix}/success_rate", (returns > 0.5).double().mean().float(), prog_bar=True, batch_size=1)
        self.last_eval_step = self.trainer.global_step
