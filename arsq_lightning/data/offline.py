"""Learning from a dataset, then online: demo buffer + RL buffer, exact mixing, two phases in one ``fit``
(docs/algorithm.md §4.1-§4.2).

* The dataset (D4RL HDF5 file or local Minari dataset) is split by :func:`~arsq_lightning.data.d4rl.split_demos`: the RL
  buffer gets the whole dataset (``demo = False``; the last, highest-return rows if it exceeds ``buffer_size``), the
  demo buffer the demo window (``demo = True``).
* Every batch holds exactly ``round(batch_size * demo_fraction)`` demo-buffer rows, the rest from the RL buffer.
* Phase 1, offline: ``pretrain_steps`` updates with no env interaction. Phase 2, online (unless ``online`` is false):
  the collector adds transitions (rewards scaled like the dataset's) to the RL buffer at ``utd_ratio`` updates per
  frame; with ``trajectories_per_round = k > 0`` the updates come after every ``k`` finished episodes, as in the
  official code (``k = 1``).
* ``relabel``: a finished online episode whose (scaled) return reaches the demo window's mean episode return joins the
  demo buffer (the official code compared it with the mean per-step reward, §8.4).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Literal

import torch
from tensordict import TensorDict, TensorDictBase

from arsq_lightning.data.d4rl import REWARD_SCALE_RULES, DemoSplit, reward_scale_of, split_demos
from arsq_lightning.data.datasets import check_against_env, read_d4rl_hdf5, read_minari
from arsq_lightning.data.online import TRANSITION_KEYS, DataStats, OnlineDataModule
from arsq_lightning.envs.core import dataset_hint
from arsq_lightning.errors import require
from arsq_lightning.keys import ACTION, DEMO, NEXT_REWARD, NSTEP_REWARDS, STEPS_TO_NEXT

STORED_KEYS = (*TRANSITION_KEYS, DEMO)


class OfflineToOnlineDataModule(OnlineDataModule):
    """A dataset-kick-started data module (see module doc); every :class:`OnlineDataModule` option applies online.

    Args:
        env_id: gymnasium id of the online / evaluation env (e.g. ``Hopper-v5``).
        dataset: a D4RL-layout ``.hdf5`` path (``~`` expanded), or ``minari:<dataset id>`` for a local Minari store.
        minari_root: the Minari store for ``minari:`` datasets (default ``$MINARI_DATASETS_PATH``).
        demo_percentile: centre of the demo window over the return-sorted transitions, in percent (clamped so the
            window fits; official 0; 100 with ``demo_ratio`` 50 is the best half).
        demo_ratio: the demo window's size in percent of the transitions (official 100 = all).
        reward_bias: added to every scaled reward (dataset and online).
        reward_scale: ``r * scale + bias`` for dataset and online rewards. ``max_reward`` (default) takes
            ``1 / max |r|`` over the dataset, so the largest per-step reward is 1, as a 0/1 success reward, and
            ``soft_alpha`` and the conservative clips mean the same on every task whatever the reward's units;
            ``auto`` takes ``1 / max |G|`` over the dataset's discounted returns-to-go ``G`` (discount
            ``value_gamma``), so values are of unit size (the TD term then weighs ~100x less against the
            conservative one; docs/benchmark.md compares the two); a number fixes it (the official D4RL configs: 1).
            Evaluation returns stay in the env's units.
        value_gamma: the discount of ``reward_scale: auto`` (use the loss's ``gamma``).
        clip_action: dataset actions are clipped to this fraction of the half-range around the centre (0.99999).
        drop_timeouts: drop dataset transitions that end by time-out (official).
        demo_fraction: share of every batch drawn from the demo buffer (official 0.5).
        pretrain_steps: offline updates before the online phase.
        online: collect online data after pretraining (false: pure offline training).
        trajectories_per_round: 0 interleaves updates with collection; k > 0 does the updates after k episodes.
        relabel: add online episodes that reach the demo mean return to the demo buffer.
        demo_buffer_factor: demo buffer capacity as a multiple of the demo window's size (official 2).
        n_step: steps per TD target (1: one-step, official); with ``n > 1`` the dataset's rows too become n-step
            rows within their episodes (see :class:`OnlineDataModule`).
        **kwargs: :class:`OnlineDataModule` options (``seed``, ``batch_size``, ``buffer_size``, ``utd_ratio``, ...).
    """

    def __init__(self, env_id: str = "Hopper-v5", *, dataset: str = "", minari_root: str | None = None,
                 demo_percentile: float = 0.0, demo_ratio: float = 100.0,
                 reward_scale: float | Literal["auto", "max_reward"] = "max_reward", value_gamma: float = 0.99,
                 reward_bias: float = 0.0,
                 clip_action: float = 0.99999, drop_timeouts: bool = True,
                 demo_fraction: float = 0.5, pretrain_steps: int = 0, online: bool = True,
                 trajectories_per_round: int = 0, relabel: bool = False, demo_buffer_factor: float = 2.0,
                 n_step: int = 1,
                 seed: int | None = None, max_episode_steps: int | None = None, env_kwargs: dict | None = None,
                 frames_per_batch: int | None = None, num_envs: int = 1, init_random_frames: int = 0,
                 learning_starts: int | None = 1,
                 utd_ratio: float = 1.0, batch_size: int = 512, buffer_size: int = 1_000_000,
                 eval_episodes: int = 10, eval_seed: int = 1_000_000, eval_max_steps: int = 100_000,
                 video_every: int = 5, video_size: int = 240, buffer_dir: str | None = None):
        super().__init__(env_id, seed=seed, max_episode_steps=max_episode_steps, env_kwargs=env_kwargs,
                         frames_per_batch=frames_per_batch, num_envs=num_envs, init_random_frames=init_random_frames,
                         learning_starts=learning_starts, utd_ratio=utd_ratio, batch_size=batch_size,
                         buffer_size=buffer_size, eval_episodes=eval_episodes, eval_seed=eval_seed,
                         eval_max_steps=eval_max_steps, video_every=video_every, video_size=video_size,
                         n_step=n_step, buffer_dir=buffer_dir)
        require(bool(dataset), "data.dataset is empty: give a D4RL .hdf5 path or minari:<dataset id>")
        require(0.0 <= demo_fraction <= 1.0, f"data.demo_fraction must lie in [0, 1], got {demo_fraction}")
        require(0.0 < clip_action <= 1.0, f"data.clip_action must lie in (0, 1], got {clip_action}")
        require(pretrain_steps >= 0, f"data.pretrain_steps must be >= 0, got {pretrain_steps}")
        require(trajectories_per_round >= 0, f"data.trajectories_per_round must be >= 0, got {trajectories_per_round}")
        require(demo_buffer_factor >= 1.0, f"data.demo_buffer_factor must be >= 1, got {demo_buffer_factor}")
        require(reward_scale in REWARD_SCALE_RULES or (isinstance(reward_scale, (int, float)) and reward_scale > 0),
                f"data.reward_scale must be 'auto', 'max_reward' or a positive number, got {reward_scale!r}")
        require(0.0 <= value_gamma < 1.0, f"data.value_gamma must lie in [0, 1), got {value_gamma}")
        self.save_hyperparameters()
        self.demo_batch = round(batch_size * demo_fraction)
        dataset = self.load_dataset()
        self.reward_scale = reward_scale_of(dataset, reward_scale, value_gamma)
        self.split: DemoSplit = split_demos(dataset, demo_percentile=demo_percentile,
                                            demo_ratio=demo_ratio, reward_scale=self.reward_scale,
                                            reward_bias=reward_bias, drop_timeouts=drop_timeouts,
                                            n_step=n_step)
        self.stored_keys = STORED_KEYS + ((NSTEP_REWARDS, STEPS_TO_NEXT) if n_step > 1 else ())
        self.demo_buffer = None
        self._round_frames = 0  # online frames whose updates are due (all frames unless trajectories_per_round > 0)
        self._episodes_in_round = 0
        self.relabelled_episodes = 0

    def setup(self, stage: str) -> None:
        """As :meth:`OnlineDataModule.setup`; also records the reward scale in use (``data/reward_scale``) and, for a
        file with the env's success flags, the share of successful episodes in the data and in the demo window
        (``data/success_rate``, ``data/demo_success_rate``: a demo set with failures teaches them too)."""
        super().setup(stage)
        if self.trainer is not None and self.trainer.logger is not None:
            params = {"data/reward_scale": self.reward_scale, "data/success_rate": self.split.success_rate,
                      "data/demo_success_rate": self.split.demo_success_rate}
            self.trainer.logger.log_hyperparams({k: v for k, v in params.items() if v is not None})

    # --- data -----------------------------------------------------------------------------------------------------
    def load_dataset(self) -> TensorDict:
        """Read and check the configured dataset (TED layout, see :mod:`arsq_lightning.data.datasets`)."""
        name = self.hparams.dataset
        if name.startswith("minari:"):
            data, source = read_minari(name.removeprefix("minari:"), root=self.hparams.minari_root), name
        else:
            path = Path(os.path.expanduser(name))
            # a missing file's error says how to make it where the env's suite knows (e.g. Meta-World's demos)
            hint = dataset_hint(self.hparams.env_id, name, **self.env_kwargs)
            data, source = read_d4rl_hdf5(path, missing_hint=hint), str(path)
        data = check_against_env(data, self.env_spec, source)
        low, high = torch.tensor(self.env_spec.action_low), torch.tensor(self.env_spec.action_high)
        centre, half = (high + low) / 2, (high - low) / 2 * self.hparams.clip_action
        data[ACTION] = data[ACTION].clamp(centre - half, centre + half)
        return data

    def action_samples(self) -> torch.Tensor:
        """The dataset's actions ``[n, D]`` (RL part and demo window), e.g. to fit a data-adaptive discretizer."""
        return torch.cat([self.split.rl[ACTION], self.split.demo[ACTION]])

    def stats(self) -> DataStats:
        """As :meth:`OnlineDataModule.stats`, plus the phase and the relabelled episodes."""
        return replace(super().stats(), online=self.phase == "online", relabelled_episodes=self.relabelled_episodes)

    def _create_buffers(self) -> None:
        hp = self.hparams
        self.buffer = self._make_buffer(hp.buffer_size, hp.batch_size - self.demo_batch)
        self.buffer.extend(self.split.rl.select(*self.stored_keys)[-hp.buffer_size:])  # keeps the highest returns
        capacity = max(1, int(self.split.demo.numel() * hp.demo_buffer_factor))
        self.demo_buffer = self._make_buffer(capacity, max(1, self.demo_batch), seed_offset=1)
        self.demo_buffer.extend(self.split.demo.select(*self.stored_keys))

    def load_state_dict(self, state: dict) -> None:
        """As :meth:`OnlineDataModule.load_state_dict`; the restored frames count as a finished round."""
        super().load_state_dict(state)
        self._round_frames = self.frames

    def _buffers(self) -> dict:
        return {"replay": self.buffer, "demo": self.demo_buffer}

    def needs_collector(self) -> bool:
        return self.hparams.online

    def sample(self) -> TensorDictBase:
        """``demo_batch`` rows from the demo buffer, then the rest from the RL buffer (exact counts)."""
        parts = []
        if self.demo_batch > 0:
            parts.append(self.demo_buffer.sample(self.demo_batch))
        if self.hparams.batch_size - self.demo_batch > 0:
            parts.append(self.buffer.sample(self.hparams.batch_size - self.demo_batch))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    # --- phases ---------------------------------------------------------------------------------------------------
    @property
    def phase(self) -> str:
        """``offline`` during pretraining (and forever when ``online`` is false), else ``online``."""
        offline = self.updates_done < self.hparams.pretrain_steps or not self.hparams.online
        return "offline" if offline else "online"

    def updates_owed(self) -> int:
        """Offline: always one. Online: ``floor(round_frames * utd_ratio) - online updates`` (<= 0: collect)."""
        if self.phase == "offline":
            return 1
        online_updates = self.updates_done - self.hparams.pretrain_steps
        return int(self._round_frames * self.hparams.utd_ratio) - online_updates

    def rows_to_store(self, batch: TensorDictBase) -> TensorDictBase:
        """Collected transitions ``[num_envs, steps]`` with rewards scaled as the dataset's and ``demo = False``."""
        rows = super().rows_to_store(batch).clone()
        rows[NEXT_REWARD] = rows[NEXT_REWARD] * self.reward_scale + self.hparams.reward_bias
        rows[DEMO] = torch.zeros(rows.shape, dtype=torch.bool)
        return rows

    def keeps_open_episodes(self) -> bool:
        return True  # rounds count finished episodes, and relabelling needs their rows

    def store(self, batch: TensorDictBase) -> None:
        """As :meth:`OnlineDataModule.store` (rows from :meth:`rows_to_store`); then close the round if it is
        complete."""
        super().store(batch)
        k = self.hparams.trajectories_per_round
        if k == 0 or self._episodes_in_round >= k:
            self._round_frames = self.frames  # every frame collected so far is online
            self._episodes_in_round = 0

    def finish_episode(self, episode: TensorDictBase) -> TensorDictBase:
        """As :meth:`OnlineDataModule.finish_episode`; count it in the round, and with ``relabel`` add its stored rows
        to the demo buffer if its return reaches the demo window's mean."""
        rows = super().finish_episode(episode)
        self._episodes_in_round += 1
        if self.hparams.relabel and float(episode[NEXT_REWARD].sum()) >= self.split.demo_mean_episode_return:
            relabelled = rows.clone()
            relabelled[DEMO] = torch.ones(relabelled.numel(), dtype=torch.bool)
            self.demo_buffer.extend(relabelled)
            self.relabelled_episodes += 1
        return rows
