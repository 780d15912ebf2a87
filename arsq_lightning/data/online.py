"""Online data: a TorchRL env, a ``Collector`` driven by the current policy and a tensordict replay buffer.

The training loader is an endless stream of :class:`UpdateTickets` (``trainer.max_steps`` ends the run). The data
module turns each ticket into its batch as the update starts (``on_before_batch_transfer``), collecting first so that
the number of gradient updates follows ``utd_ratio`` updates per env frame after ``learning_starts`` frames (the
first ``init_random_frames`` are uniform random actions). Lightning looks one loader item ahead; a ticket changes
no state, so a checkpoint holds the data of exactly the updates done (nothing collected or sampled ahead).
With ``num_envs`` > 1 the collector steps a TorchRL ``SerialEnv`` of that many copies of the task, acting for all of
them in one batched call; every frame of every copy counts towards ``utd_ratio``.
Evaluation episodes are the validation / test "batches": the loader's items are groups of up to ``num_envs``
episode indices (split over ranks by Lightning's sampler); each group is run deterministically with the module's
critic, side by side, and arrives at the module as its result rows ``[n, len(EPISODE_FIELDS)]``.
:meth:`OnlineDataModule.stats` is what callbacks read for logging.
"""

from __future__ import annotations

import atexit
import math
import os
import shutil
import tempfile
import warnings
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from torch.utils.data import DataLoader, IterableDataset
from torchrl.collectors import Collector
from torchrl.data import LazyMemmapStorage, LazyTensorStorage, TensorDictReplayBuffer
from torchrl.envs import EnvBase, SerialEnv
from torchrl.envs.utils import ExplorationType, set_exploration_type

from arsq_lightning.data import buffer_files
from arsq_lightning.data.d4rl import D4RL_REFERENCE_RETURNS, normalized_score, task_name
from arsq_lightning.data.frames import FrameStackStorage
from arsq_lightning.data.nstep import nstep_transitions
from arsq_lightning.envs.core import EnvSpec, env_spec_of, make_env
from arsq_lightning.envs.episodes import EpisodeRecord, EpisodeSeeds, replay_episode, sub_env_seed
from arsq_lightning.errors import ConfigError, require
from arsq_lightning.keys import (
    ACTION,
    NEXT_DONE,
    NEXT_EPISODE_REWARD,
    NEXT_OBSERVATION,
    NEXT_REWARD,
    NEXT_SUCCESS,
    NEXT_TERMINATED,
    NEXT_TRUNCATED,
    OBSERVATION,
    PIXELS,
)
from arsq_lightning.policy import make_actor

TRANSITION_KEYS = (OBSERVATION, ACTION, NEXT_OBSERVATION, NEXT_REWARD, NEXT_TERMINATED, NEXT_TRUNCATED, NEXT_DONE)


# One evaluated episode, as the float64 row ``[len(EPISODE_FIELDS)]`` the validation / test loader yields: its index,
# undiscounted return, length, success (1 / 0, NaN when the env does not report it), D4RL normalised score of the
# return (NaN for tasks without reference returns) and the env frames collected for training so far.
EPISODE_FIELDS = ("episode", "return", "length", "success", "normalized_score", "env_frames")


@dataclass(frozen=True)
class DataStats:
    """What the data module reports for logging (see :class:`~arsq_lightning.callbacks.DataStatsLogger`)."""

    env_frames: int  # env frames collected for training (this rank)
    mean_episode_return: float | None  # of the last finished training episodes (None before the first)
    online: bool | None = None  # offline-to-online modules: whether the online phase has begun
    relabelled_episodes: int | None = None  # online episodes added to the demo buffer


def _as_is(item):
    return item


@dataclass(frozen=True)
class PendingBatch:
    """A training loader item: the batch of the next update, drawn only when that update starts."""


class UpdateTickets(IterableDataset):
    """Endless stream of :class:`PendingBatch` tickets, one per update (see module doc)."""

    def __iter__(self) -> Iterator[PendingBatch]:
        while True:
            yield PendingBatch()


def first_update_frames(init_random_frames: int, batch_size: int, learning_starts: int | None = None) -> int:
    """Frames in the buffer before the first update: ``learning_starts``, by default the larger of the random
    warm-up and one batch."""
    return max(init_random_frames, batch_size) if learning_starts is None else learning_starts


class OnlineDataModule(L.LightningDataModule):
    """Env, collector, replay buffer and evaluation episodes for online training on a gymnasium task.

    Args:
        env_id: gymnasium id (``Pendulum-v1``, ``Hopper-v5``, ...).
        seed: base seed; rank ``r`` uses ``seed + 1000 * r`` for its env, buffer sampling and exploration.
            ``None``: the CLI's ``seed_everything`` (0 outside the CLI).
        max_episode_steps: time limit (``None`` keeps gymnasium's).
        env_kwargs: extra ``gymnasium.make`` arguments.
        frames_per_batch: env frames per collector iteration, over all envs (a multiple of ``num_envs``; ``None``:
            one step of every env).
        num_envs: copies of the task stepped side by side (a TorchRL ``SerialEnv``) for training and evaluation;
            the policy acts for all of them in one batched call. 1: a single env.
        init_random_frames: uniformly random frames before the policy acts.
        learning_starts: frames before the first update (``None``: ``max(init_random_frames, batch_size)``).
        utd_ratio: gradient updates per env frame.
        batch_size: transitions per update.
        buffer_size: replay capacity (transitions).
        eval_episodes: deterministic episodes per validation / test run.
        eval_seed: episode ``k`` of an evaluation resets with seed ``eval_seed + k``.
        eval_max_steps: cap on one evaluation episode's length.
        video_every: every this many evaluations, evaluation episode 0 is rendered to an MP4 file logged to the
            MLflow run under ``videos/`` (0: never; envs that cannot render are skipped with one line).
        video_size: frame height = width of the videos, in pixels.
        n_step: steps per TD target (1: one-step). With ``n > 1`` every row carries the rewards of the next ``n``
            steps of its episode and the observation after them (:mod:`arsq_lightning.data.nstep`; the loss discounts
            them with its gamma); collected rows enter the buffer when their episode ends (so episodes must end, by
            the task or a time limit), and a checkpoint keeps those of the episodes under way.
        buffer_dir: keep the replay buffers in memory-mapped files (TorchRL's ``LazyMemmapStorage``; for pixel
            observations the frame pool) in a new temporary folder under this one, removed when the process ends,
            instead of RAM. ``None``: RAM.
    """

    def __init__(self, env_id: str = "Pendulum-v1", *, seed: int | None = None, max_episode_steps: int | None = None,
                 env_kwargs: dict | None = None, frames_per_batch: int | None = None, num_envs: int = 1,
                 init_random_frames: int = 1000, learning_starts: int | None = None, utd_ratio: float = 1.0,
                 batch_size: int = 256,
                 buffer_size: int = 1_000_000, eval_episodes: int = 10, eval_seed: int = 1_000_000,
                 eval_max_steps: int = 100_000, video_every: int = 5, video_size: int = 240, n_step: int = 1,
                 buffer_dir: str | None = None):
        super().__init__()
        frames_per_batch = num_envs if frames_per_batch is None else frames_per_batch
        for name, value in (("num_envs", num_envs), ("frames_per_batch", frames_per_batch), ("batch_size", batch_size),
                            ("buffer_size", buffer_size), ("eval_episodes", eval_episodes)):
            require(value >= 1, f"data.{name} must be >= 1, got {value}")
        require(frames_per_batch % num_envs == 0, f"data.frames_per_batch ({frames_per_batch}) must be a multiple of "
                f"data.num_envs ({num_envs}): each env takes frames_per_batch / num_envs steps per collection")
        require(utd_ratio > 0, f"data.utd_ratio must be positive, got {utd_ratio}")
        require(buffer_size >= batch_size, f"data.buffer_size ({buffer_size}) must hold a batch ({batch_size})")
        require(init_random_frames >= 0, f"data.init_random_frames must be >= 0, got {init_random_frames}")
        require(n_step >= 1, f"data.n_step must be >= 1, got {n_step}")
        require(video_every >= 0 and video_size >= 16,
                f"data.video_every must be >= 0 and data.video_size >= 16, got {video_every} and {video_size}")
        self.save_hyperparameters()
        if buffer_dir is not None:
            require(os.access(_made(buffer_dir), os.W_OK), f"data.buffer_dir {buffer_dir} is not writable")
        self.frames_per_batch = frames_per_batch
        self.env_kwargs = dict(env_kwargs or {})
        if max_episode_steps is not None:
            self.env_kwargs["max_episode_steps"] = max_episode_steps
        self.env_spec: EnvSpec = env_spec_of(env_id, **self.env_kwargs)
        self.learning_starts = first_update_frames(init_random_frames, batch_size, learning_starts)
        require(self.learning_starts >= 1, f"data.learning_starts must be >= 1, got {self.learning_starts}")
        self.frames, self.updates_done = 0, 0
        # Where this rank's own collection started: non-zero after a resume on ranks other than 0 (see load_state_dict).
        self._frames_origin, self._updates_origin = 0, 0
        self.episode_returns: deque[float] = deque(maxlen=20)
        self.base_seed = 0 if seed is None else seed
        self.rank_seed = self.base_seed
        self.buffer: TensorDictReplayBuffer | None = None
        self._collector: Collector | None = None
        self._episode_seeds: list[EpisodeSeeds] = []  # each training env's per-episode seeding
        self._episode_actions: list[list[torch.Tensor]] = []  # per training env: the actions of its episode under way
        # per training env: stored rows of its episode under way (kept with n_step > 1 or where a subclass needs them)
        self._open_episodes: list[list[TensorDictBase]] = [[] for _ in range(num_envs)]
        self._pending_episodes: list[EpisodeRecord] | None = None  # a checkpoint's unfinished episodes, for resume
        self._stopped_episodes: list[EpisodeRecord] | None = None  # those under way when fit ended (final checkpoint)
        self._eval_env = None
        self._pending_buffer_state: dict | Path | None = None  # restored once the buffers exist
        self._acting_generator = torch.Generator()  # exploration noise of the collecting policy (seeded in setup)

    # --- lifecycle ------------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        self.rank_seed = self.base_seed + 1000 * self._rank()
        if stage == "fit":  # not when a fit's final evaluation sets up again: the final checkpoint keeps the state
            self._acting_generator.manual_seed(self.rank_seed)  # Lightning restores a checkpoint's state after setup
        if self.trainer is not None and self.trainer.world_size > 1:
            torch.manual_seed(self.rank_seed)  # the collector's random warm-up actions come from the global RNG

    def _rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    def make_env(self, seed: int):
        """A fresh env of this module's task (see :func:`arsq_lightning.envs.core.make_env`)."""
        return make_env(self.hparams.env_id, seed=seed, **self.env_kwargs)

    def train_dataloader(self) -> DataLoader:
        if self.buffer is None:
            self.build_buffers()
        if self._collector is None and self.needs_collector():
            critic = self.trainer.lightning_module.critic
            actor = make_actor(critic, self._acting_generator)
            env = self.training_env(self.collection_seed())
            self._collector = Collector(env, actor,
                                        frames_per_batch=self.frames_per_batch, total_frames=-1,
                                        init_random_frames=max(0, self.hparams.init_random_frames - self.frames),
                                        exploration_type=ExplorationType.RANDOM, track_traj_ids=False,
                                        auto_register_policy_transforms=False)
            self._episode_actions = [[] for _ in self._episode_seeds]
            continued = self._pending_episodes is not None and self._continue_episodes(env, self._pending_episodes)
            self._pending_episodes = None
            if not continued:
                self._episodes_restart()
            self._collector_iter = iter(self._collector)
        return DataLoader(UpdateTickets(), batch_size=None, collate_fn=_as_is, num_workers=0)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Lightning's hook as an update starts: a training ticket becomes its batch; other batches pass unchanged."""
        return self.next_batch() if isinstance(batch, PendingBatch) else batch

    def next_batch(self) -> TensorDictBase:
        """The next update's batch: collect until an update is owed, count the update, sample."""
        while self.updates_owed() <= 0:
            self.collect()
        self.updates_done += 1
        return self.sample()

    def collection_seed(self) -> int:
        """The training envs' seed (env ``i``'s episode ``k`` resets with
        :func:`~arsq_lightning.envs.episodes.episode_seed` of :func:`~arsq_lightning.envs.episodes.sub_env_seed`
        ``(seed, i)`` and ``k``): the rank's seed, also after a resume that continues the checkpoint's episodes; a
        rank that resumes without them (a checkpoint that recorded none, or another ``num_envs``) derives a new seed
        from it and the frames so far, so as not to replay the episodes it began with."""
        if self.frames == 0 or self._pending_episodes is not None:
            return self.rank_seed
        return int(np.random.SeedSequence([self.rank_seed, self.frames]).generate_state(1)[0])

    def training_env(self, seed: int) -> EnvBase:
        """The collector's env: one env (``num_envs`` 1) or a ``SerialEnv`` of ``num_envs``; each seeds its episodes
        from ``sub_env_seed(seed, i)`` through its own :class:`EpisodeSeeds` (kept in ``_episode_seeds``)."""
        def one_env(i: int) -> EnvBase:
            env = self.make_env(sub_env_seed(seed, i))
            env.append_transform(EpisodeSeeds(sub_env_seed(seed, i)))
            return env

        env = _side_by_side([partial(one_env, i) for i in range(self.hparams.num_envs)])
        self._episode_seeds = [sub.transform[-1] for sub in _sub_envs(env)]
        return env

    def _episodes_restart(self) -> None:
        """Collection begins with a new episode in every env (a fresh start, or a resume that could not continue
        the checkpoint's episodes): rows of unfinished episodes end where they were cut; with ``n_step > 1`` they
        enter the buffer as n-step rows of a cut episode (bootstrapping from their last observation)."""
        for rows in self._open_episodes:
            if rows and self.hparams.n_step > 1:
                self.buffer.extend(self.nstep_rows(torch.cat(rows)))
        self._open_episodes = [[] for _ in range(self.hparams.num_envs)]

    def _continue_episodes(self, env: EnvBase, records: list[EpisodeRecord]) -> bool:
        """Put the collector back into a checkpoint's unfinished episodes (one per env) by replaying their actions
        (true); if an env does not reproduce its episode (not deterministic), every env starts its next episode
        instead, with a warning (false)."""
        carriers = [replay_episode(sub, seeds, record)
                    for sub, seeds, record in zip(_sub_envs(env), self._episode_seeds, records, strict=True)]
        self._episode_actions = [[record.actions] for record in records]
        continued = all(carrier is not None for carrier in carriers)
        if not continued:
            index = next(record.index for record, carrier in zip(records, carriers) if carrier is None)
            warnings.warn(f"the training env did not reproduce its unfinished episode {index} from its seed "
                          "and actions (is it deterministic?); the resumed run starts the next episode", stacklevel=2)
            with torch.no_grad():
                carrier = env.reset()
            self._episode_actions = [[] for _ in records]
        else:
            carrier = carriers[0] if self.hparams.num_envs == 1 else torch.stack(carriers)
        if self._collector._carrier.device is None:
            carrier.clear_device_()
        self._collector._carrier = carrier  # TorchRL's rollout state: the env output its next step starts from
        return continued

    def current_episodes(self) -> list[EpisodeRecord] | None:
        """The training episode under way in each env (after fit: those it stopped in; ``None`` before collection
        starts)."""
        if self._collector is None:
            return self._stopped_episodes
        carrier = self._collector._carrier.exclude("collector")  # [num_envs], or [] for one env
        states = carrier.unbind(0) if self.hparams.num_envs > 1 else [carrier]
        records = []
        for seeds, taken, state in zip(self._episode_seeds, self._episode_actions, states, strict=True):
            actions = torch.cat(taken) if taken else torch.zeros(0, self.env_spec.action_dim)
            records.append(EpisodeRecord(seeds.episodes - 1, actions, state.to_dict()))
        return records

    def needs_collector(self) -> bool:
        """Whether training interacts with the env (subclasses may train from data only)."""
        return True

    def teardown(self, stage: str) -> None:
        if self._collector is not None and stage == "fit":
            self._stopped_episodes = self.current_episodes()  # the final checkpoint is written after teardown
            self._collector.shutdown()
            self._collector = None
        if self._eval_env is not None:
            self._eval_env.close()
            self._eval_env = None

    def _make_buffer(self, capacity: int, batch_size: int, seed_offset: int = 0) -> TensorDictReplayBuffer:
        """A replay buffer sampling with this rank's own generator; with pixel observations it keeps each frame once
        (:mod:`~arsq_lightning.data.frames`)."""
        generator = torch.Generator().manual_seed(self.rank_seed + seed_offset)
        shapes = self.env_spec.observation_shapes
        folder = None if self.hparams.buffer_dir is None else buffer_folder(self.hparams.buffer_dir)
        if shapes is not None and PIXELS in shapes:
            storage = FrameStackStorage(capacity, frame_stack=int(self.env_kwargs.get("frame_stack", 1)),
                                        frame_dir=folder)
        elif folder is not None:
            storage = LazyMemmapStorage(capacity, scratch_dir=folder)  # the folder goes at exit (buffer_folder)
        else:
            storage = LazyTensorStorage(capacity)
        return TensorDictReplayBuffer(storage=storage, batch_size=batch_size, generator=generator)

    def build_buffers(self) -> None:
        """Create the replay buffers (an offline-to-online module fills them with the dataset's rows), then restore a
        checkpoint's contents if one was loaded before they existed. Training calls it; call it yourself to sample
        batches without a trainer (e.g. ``scripts/analysis/bench_update.py``)."""
        self._create_buffers()
        if self._pending_buffer_state is not None:
            self._restore_buffers(self._pending_buffer_state)
            self._pending_buffer_state = None

    def _create_buffers(self) -> None:
        self.buffer = self._make_buffer(self.hparams.buffer_size, self.hparams.batch_size)

    def sample(self) -> TensorDictBase:
        """One training batch."""
        return self.buffer.sample()

    # --- collection -----------------------------------------------------------------------------------------------
    def updates_owed(self) -> int:
        """Updates due now (<= 0: collect first): ``floor((frames - learning_starts) * utd_ratio) + 1 - updates``.

        The first update happens once ``learning_starts`` frames are in the buffer; frames and updates count from
        this rank's own start of collection.
        """
        frames = self.frames - self._frames_origin
        if frames < self.learning_starts or len(self.buffer) < self.hparams.batch_size:
            return 0
        updates = self.updates_done - self._updates_origin
        return int((frames - self.learning_starts) * self.hparams.utd_ratio) + 1 - updates

    def collect(self) -> None:
        """Step the collector once, store the transitions, record finished episodes' returns and the actions of
        the episodes under way."""
        batch = next(self._collector_iter).reshape(self.hparams.num_envs, -1)  # [num_envs, steps]: each env's frames
        self.frames += batch.numel()
        for stream, taken in zip(batch.unbind(0), self._episode_actions, strict=True):
            done = stream[NEXT_DONE].reshape(-1)
            ends = done.nonzero().reshape(-1)
            if len(ends):
                self.episode_returns.extend(stream[NEXT_EPISODE_REWARD].reshape(-1)[done].tolist())
                taken.clear()
            start = int(ends[-1]) + 1 if len(ends) else 0
            if start < len(stream):
                taken.append(stream[ACTION][start:].clone())
        self.store(batch)

    def store(self, batch: TensorDictBase) -> None:
        """Put collected transitions ``[num_envs, steps]`` into the replay buffer: at once, or (``n_step > 1``) as
        n-step rows when their episode ends (:meth:`finish_episode`)."""
        rows = self.rows_to_store(batch)
        if self.hparams.n_step == 1:
            self.buffer.extend(rows.reshape(-1))
        if not self.keeps_open_episodes():
            return
        for stream, open_rows in zip(rows.unbind(0), self._open_episodes, strict=True):
            ends = torch.nonzero(stream[NEXT_DONE].reshape(-1)).reshape(-1).tolist()
            start = 0
            for end in ends:
                self.finish_episode(torch.cat([*open_rows, stream[start:end + 1]]))
                open_rows.clear()
                start = end + 1
            if start < stream.numel():
                open_rows.append(stream[start:])

    def rows_to_store(self, batch: TensorDictBase) -> TensorDictBase:
        """The rows ``[num_envs, steps]`` a collection adds: its transitions' keys."""
        return batch.select(*TRANSITION_KEYS)

    def keeps_open_episodes(self) -> bool:
        """Whether stored rows wait in ``_open_episodes`` until their episode ends (n-step rows need the steps
        after them)."""
        return self.hparams.n_step > 1

    def finish_episode(self, episode: TensorDictBase) -> TensorDictBase:
        """An episode's rows ``[T]`` once it ended: with ``n_step > 1`` they enter the buffer as n-step rows.
        Returns the rows as the buffer stores them (the episode itself with ``n_step`` 1)."""
        if self.hparams.n_step == 1:
            return episode
        rows = self.nstep_rows(episode)
        self.buffer.extend(rows)
        return rows

    def nstep_rows(self, episode: TensorDictBase) -> TensorDictBase:
        """One episode's rows ``[T]`` (or a cut one's) as ``n_step``-step rows."""
        return nstep_transitions(episode, self.hparams.n_step)

    def normalized_score(self, episode_return: float) -> float | None:
        """D4RL normalised score of a return on this task (``None`` for tasks without D4RL reference returns)."""
        name = task_name(self.hparams.env_id)
        return normalized_score(name, episode_return) if name in D4RL_REFERENCE_RETURNS else None

    def stats(self) -> DataStats:
        """Counters and recent training returns, for logging."""
        returns = self.episode_returns
        return DataStats(env_frames=self.frames, mean_episode_return=sum(returns) / len(returns) if returns else None)

    def action_samples(self) -> torch.Tensor | None:
        """Dataset actions ``[n, D]`` to fit a data-adaptive discretizer to; ``None``: this module has no dataset."""
        return None

    # --- evaluation -----------------------------------------------------------------------------------------------
    def val_dataloader(self) -> DataLoader:
        """Evaluation episodes: each item is a group of up to ``num_envs`` episode indices, turned into their result
        rows by running them side by side."""
        episodes, width = list(range(self.hparams.eval_episodes)), self.hparams.num_envs
        groups = [episodes[i:i + width] for i in range(0, len(episodes), width)]
        # a loader with its own generator: starting it draws no seed from torch's global RNG, which pixel augmentation
        # and random warm-up actions draw from. An evaluation then changes nothing of what training draws next, and
        # a run stopped after its own final evaluation resumes as one that did not stop (callbacks.RandomStates)
        return DataLoader(groups, batch_size=None, collate_fn=self._episode_rows, generator=torch.Generator())

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def _episode_rows(self, episodes: list[int]) -> torch.Tensor:
        """Run evaluation episodes ``episodes`` with the module's critic: their float64 rows
        ``[len(episodes), len(EPISODE_FIELDS)]``."""
        rows = []
        for episode, (episode_return, length, success) in zip(
                episodes, self.evaluate_episodes(self.trainer.lightning_module.critic, episodes), strict=True):
            score = self.normalized_score(episode_return)
            rows.append([episode, episode_return, length, success, math.nan if score is None else score, self.frames])
        return torch.tensor(rows, dtype=torch.float64)

    def evaluate_episode(self, critic, episode: int) -> tuple[float, int, float]:
        """Run one deterministic episode with ``critic`` acting; returns (undiscounted return, length, success)."""
        return self.evaluate_episodes(critic, [episode])[0]

    @torch.no_grad()
    def evaluate_episodes(self, critic, episodes: list[int]) -> list[tuple[float, int, float]]:
        """Run deterministic episodes (at most ``num_envs``, side by side) with ``critic`` acting; episode ``k``
        resets with seed ``eval_seed + k``. Returns (undiscounted return, length, success) per episode.

        ``success`` is 1.0 when the env reported ``success`` at any step, 0.0 when it never did, and NaN for envs that
        do not report success."""
        require(1 <= len(episodes) <= self.hparams.num_envs,
                f"{len(episodes)} evaluation episodes at once for data.num_envs {self.hparams.num_envs}")
        if self._eval_env is None:
            self._eval_env = self._evaluation_env()
        subs = _sub_envs(self._eval_env)
        for i, sub in enumerate(subs):  # spare envs repeat the last episode (their results are dropped)
            sub.set_seed(self.hparams.eval_seed + episodes[min(i, len(episodes) - 1)])
        with set_exploration_type(ExplorationType.DETERMINISTIC):
            rollout = self._eval_env.rollout(self.hparams.eval_max_steps, make_actor(critic),
                                             break_when_any_done=len(subs) == 1, break_when_all_done=len(subs) > 1)
        rollout = rollout.reshape(len(subs), -1)  # [envs, steps]; an env that is done stays done
        results = []
        for stream in rollout.unbind(0)[:len(episodes)]:
            done = stream[NEXT_DONE].reshape(-1)
            length = int(done.nonzero()[0]) + 1 if done.any() else len(stream)  # eval_max_steps ends it otherwise
            stream = stream[:length]
            success = float(stream[NEXT_SUCCESS].any()) if NEXT_SUCCESS in stream.keys(True) else math.nan
            results.append((float(stream[NEXT_REWARD].sum()), length, success))
        return results

    def _evaluation_env(self) -> EnvBase:
        """One env, or a ``SerialEnv`` of ``num_envs``, for evaluation episodes (seeded per episode)."""
        return _side_by_side([partial(self.make_env, self.hparams.eval_seed)] * self.hparams.num_envs)

    # --- checkpointing --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Counters and recent returns, stored in the checkpoint, and every rank's replay buffers and acting RNG.

        With a checkpoint directory (``arsq fit`` always has one) each rank writes its buffers beside the checkpoint
        (:mod:`~arsq_lightning.data.buffer_files`) and the checkpoint names the folder; without one, rank 0's buffers
        go into the checkpoint itself (Lightning writes rank 0's state only).
        """
        rank_state = self._rank_state()
        state = {"frames": self.frames, "updates_done": self.updates_done,
                 "episode_returns": list(self.episode_returns), **rank_state}
        buffers = {name: b for name, b in self._buffers().items() if b is not None}
        directory = self._checkpoint_directory()
        if directory is not None and buffers:
            name = buffer_files.folder_name(self.trainer.global_step)
            buffer_files.save(buffers, Path(directory, name, f"rank-{self._rank()}"), rank_state)
            state["buffer_folder"], state["buffer_root"] = name, os.path.abspath(directory)  # root: where written
        elif self._rank() == 0:
            embedded = {name: _buffer_state(b) for name, b in buffers.items() if len(b)}
            if embedded:
                state["buffers"] = embedded
        return state

    def _rank_state(self) -> dict:
        """What each rank saves of its own beside its buffers: the acting RNG, the training episode under way and
        the rows of it that are not in a buffer yet."""
        episodes = self.current_episodes()
        open_rows = []
        for rows in self._open_episodes:
            episode = torch.cat(rows) if rows else None
            open_rows.append(None if episode is None else {"rows": episode.to_dict(), "length": episode.numel()})
        return {"acting_rng": self._acting_generator.get_state(),
                "episodes": None if episodes is None else [episode.to_dict() for episode in episodes],
                "open_rows": open_rows}

    def _restore_rank_state(self, state: dict) -> None:
        """The acting RNG, the unfinished training episodes and their stored rows; the episodes of a run with
        another ``num_envs`` are not continued (every env starts a new episode)."""
        self._acting_generator.set_state(state["acting_rng"])
        saved = state.get("episodes")
        if saved is None and state.get("episode") is not None:  # written before num_envs (one env)
            saved = [state["episode"]]
        if saved is not None and len(saved) != self.hparams.num_envs:
            warnings.warn(f"the checkpoint's run collected with {len(saved)} envs, this one with data.num_envs "
                          f"{self.hparams.num_envs}: every env starts a new episode", stacklevel=2)
            saved = None
        self._pending_episodes = None if saved is None else [EpisodeRecord.from_dict(episode) for episode in saved]
        rows = state.get("open_rows") or [None] * self.hparams.num_envs
        self._open_episodes = [[] if r is None else [TensorDict(r["rows"], [r["length"]])] for r in rows]

    def _buffers(self) -> dict[str, TensorDictReplayBuffer | None]:
        """The replay buffers a checkpoint holds, by name."""
        return {"replay": self.buffer}

    def _checkpoint_directory(self) -> str | None:
        """The local folder the checkpoints go to, or ``None`` (no checkpoint callback, or a remote path)."""
        callback = self.trainer.checkpoint_callback if self.trainer is not None else None
        directory = None if callback is None else callback.dirpath  # a ModelCheckpoint
        if directory is None or ("://" in str(directory) and not str(directory).startswith("file://")):
            return None
        return str(directory).removeprefix("file://")

    def load_state_dict(self, state: dict) -> None:
        """Restore counters; when fitting, each rank restores its own buffers and acting RNG. A rank whose buffers
        were not saved (rank > 0 of an old checkpoint, or a larger world) starts collecting afresh."""
        self.frames, self.updates_done = state["frames"], state["updates_done"]
        self.episode_returns.extend(state.get("episode_returns", []))
        if not (self.trainer is None or self.trainer.state.fn == "fit"):
            return
        saved = self._saved_buffers(state)
        if saved is None:
            self._frames_origin, self._updates_origin = self.frames, self.updates_done  # a new warm-up
            return
        if "acting_rng" in state and not isinstance(saved, Path):  # a folder holds this rank's own
            self._restore_rank_state(state)
        if self.buffer is None:
            self._pending_buffer_state = saved
        else:
            self._restore_buffers(saved)

    def _saved_buffers(self, state: dict) -> dict | Path | None:
        """This rank's saved buffers: embedded in the checkpoint (a dict), a folder beside it, or ``None``."""
        if "buffer_folder" in state:
            checkpoint = self.trainer.ckpt_path if self.trainer is not None else None
            require(checkpoint is not None, "a checkpoint with its buffers beside it is restored through fit's "
                    "--ckpt_path")
            folder = buffer_files.rank_folder(checkpoint, state["buffer_folder"], self._rank())
            if self._rank() == 0 or buffer_files.is_complete(folder):
                return folder  # rank 0's folder must be there: a missing one is a one-line error
            return None
        return state.get("buffers") if self._rank() == 0 else None

    def _restore_buffers(self, saved: dict | Path) -> None:
        if isinstance(saved, Path):
            extra = buffer_files.load({n: b for n, b in self._buffers().items() if b is not None}, saved)
            self._restore_rank_state(extra)
            return
        for name, buffer in self._buffers().items():
            if name in saved:
                buffer.empty()
                _restore_buffer(buffer, saved[name])


def _made(folder: str) -> str:
    """``folder`` (``~`` expanded), created if missing; a folder that cannot be made is a one-line error."""
    folder = os.path.expanduser(folder)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"data.buffer_dir: cannot create {folder}: {error.strerror}") from None
    return folder


def buffer_folder(root: str) -> str:
    """A new folder under ``root`` for one buffer's memory-mapped files, removed when the process ends."""
    folder = tempfile.mkdtemp(prefix="arsq-buffer-", dir=_made(root))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def _side_by_side(factories: list) -> EnvBase:
    """The env one factory makes, or a started ``SerialEnv`` of one env per factory."""
    if len(factories) == 1:
        return factories[0]()
    env = SerialEnv(len(factories), factories)
    env.start()
    return env


def _sub_envs(env: EnvBase) -> list[EnvBase]:
    """The envs stepped side by side: a started ``SerialEnv``'s own envs, or ``[env]``."""
    return list(env._envs) if isinstance(env, SerialEnv) else [env]


def _buffer_state(buffer: TensorDictReplayBuffer) -> dict:
    """The filled rows (a copy, not the preallocated storage), the write cursor and the sampling RNG state."""
    filled = len(buffer)
    return {"data": buffer.storage[:filled].clone().to_dict(), "length": filled,
            "writer": buffer._writer.state_dict(), "rng": buffer._rng.get_state()}


def _restore_buffer(buffer: TensorDictReplayBuffer, saved: dict) -> None:
    buffer.extend(TensorDict(saved["data"], batch_size=[saved["length"]]))
    buffer._writer.load_state_dict(saved["writer"])
    buffer._rng.set_state(saved["rng"])
