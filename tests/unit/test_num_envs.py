"""``data.num_envs``: several copies of the task stepped side by side for training and for evaluation."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from arsq_lightning import ARSQModule, ConfigError, OnlineDataModule
from arsq_lightning.envs.episodes import sub_env_seed

from helpers import FakeTrainer


class _RowwiseCritic(torch.nn.Module):
    """A critic that acts for each observation on its own, so that acting for a batch gives exactly what acting for
    each row alone gives (the comparison below is then about the envs, not about batched matmul rounding)."""

    def __init__(self, critic):
        super().__init__()
        self.critic, self.discretizer = critic, critic.discretizer

    def act(self, obs, *, deterministic: bool, generator=None):
        return torch.cat([self.critic.act(row[None], deterministic=deterministic, generator=generator)
                          for row in obs])


def _collecting(**kwargs) -> OnlineDataModule:
    data = OnlineDataModule("Pendulum-v1", init_random_frames=12, batch_size=8, buffer_size=500, **kwargs)
    data.trainer = FakeTrainer(global_rank=0, world_size=1, lightning_module=ARSQModule(data.env_spec),
                                state=SimpleNamespace(fn="fit"))
    data.setup("fit")
    data.train_dataloader()
    return data


def test_every_env_frame_counts_towards_the_update_to_data_ratio_and_each_env_runs_its_own_episodes():
    data = _collecting(num_envs=3, frames_per_batch=6, max_episode_steps=10)
    for _ in range(80):
        data.next_batch()
    needed = data.learning_starts + data.updates_done - 1  # UTD 1 over the frames of all envs
    assert needed <= data.frames < needed + 6 and len(data.buffer) == data.frames
    seeds = [s.seed for s in data._episode_seeds]
    assert seeds == [sub_env_seed(data.rank_seed, i) for i in range(3)] and seeds[0] == data.rank_seed
    assert len(set(seeds)) == 3
    steps = data.frames // 3  # each env took a third of the frames, in episodes of 10 steps
    assert len(data.episode_returns) == 3 * (steps // 10)
    records = data.current_episodes()
    assert [r.index for r in records] == [steps // 10] * 3
    assert [len(r.actions) for r in records] == [steps % 10] * 3
    assert not torch.equal(records[0].actions, records[1].actions)


def test_side_by_side_evaluation_gives_each_episode_what_it_gives_alone():
    """Hopper episodes end when the robot falls, at different steps: each env's episode is cut at its own end."""
    kwargs = dict(max_episode_steps=300, eval_episodes=5)
    alone, together = OnlineDataModule("Hopper-v5", **kwargs), OnlineDataModule("Hopper-v5", num_envs=3, **kwargs)
    torch.manual_seed(0)
    critic = _RowwiseCritic(ARSQModule(alone.env_spec).critic)
    expected = [alone.evaluate_episode(critic, k) for k in range(5)]
    groups = list(together.val_dataloader().dataset)
    assert groups == [[0, 1, 2], [3, 4]]
    assert [result for group in groups for result in together.evaluate_episodes(critic, group)] == expected
    assert len({length for _, length, _ in expected}) > 1


def test_frames_per_batch_must_split_evenly_over_the_envs():
    with pytest.raises(ConfigError, match="multiple of data.num_envs"):
        OnlineDataModule("Pendulum-v1", num_envs=4, frames_per_batch=6)
    with pytest.raises(ConfigError, match="num_envs must be >= 1"):
        OnlineDataModule("Pendulum-v1", num_envs=0)
