"""OnlineDataModule: update-to-data accounting, replay checkpoint contents, per-rank resume, random states."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tensordict import TensorDict
from torchrl.data import LazyTensorStorage, ReplayBuffer

from arsq_lightning import ARSQModule, ConfigError, OnlineDataModule
from arsq_lightning.callbacks import RandomStates
from arsq_lightning.data.online import PendingBatch

from helpers import FakeTrainer


def _data_with_collector(**kwargs) -> OnlineDataModule:
    data = OnlineDataModule("Pendulum-v1", frames_per_batch=5, init_random_frames=20, batch_size=8, buffer_size=500,
                            **kwargs)
    data.trainer = FakeTrainer(global_rank=0, world_size=1, lightning_module=ARSQModule(data.env_spec),
                                state=SimpleNamespace(fn="fit"))
    data.setup("fit")
    data.train_dataloader()
    return data


def _data_after_updates(updates: int) -> OnlineDataModule:
    """A data module that has collected and served ``updates`` batches."""
    data = _data_with_collector()
    for _ in range(updates):
        data.next_batch()
    return data


@pytest.mark.parametrize("utd", [1.0, 0.5, 2.0])
def test_updates_follow_the_update_to_data_ratio(utd):
    data = _data_with_collector(utd_ratio=utd)
    for _ in range(40):
        batch = data.next_batch()
        assert batch.shape == (8,) and "observation" in batch.keys()
    # the i-th update (1-based) needs learning_starts + (i - 1) / utd frames
    needed = data.learning_starts + (data.updates_done - 1) / utd
    assert needed <= data.frames < needed + 5 + 1 / utd  # collected only as much as owed (5 frames per batch)


def test_checkpoint_holds_only_the_filled_part_of_the_buffer():
    data = _data_after_updates(3)
    state = data.state_dict()
    filled = len(data.buffer)
    saved = state["buffers"]["replay"]["data"]["observation"]
    assert state["buffers"]["replay"]["length"] == filled == data.frames
    assert saved.shape == (filled, 3) and saved.untyped_storage().nbytes() == filled * 3 * 4  # not the capacity

    fresh = _data_with_collector()
    fresh.load_state_dict(state)
    assert len(fresh.buffer) == filled  # replaced, not appended to what the fresh collector had stored
    assert torch.equal(fresh.buffer.storage[:filled]["observation"], data.buffer.storage[:filled]["observation"])
    assert fresh.frames == data.frames and fresh.updates_done == data.updates_done  # counters restored


def test_the_loader_looks_ahead_without_touching_the_data():
    """Lightning fetches the next loader item before the update; that must neither collect nor sample."""
    data = _data_after_updates(3)
    before = (data.frames, data.updates_done, len(data.buffer), data.buffer._rng.get_state())
    stream = iter(data.train_dataloader())
    tickets = [next(stream) for _ in range(5)]
    assert all(isinstance(t, PendingBatch) for t in tickets)
    assert (data.frames, data.updates_done, len(data.buffer)) == before[:3]
    assert torch.equal(data.buffer._rng.get_state(), before[3])
    batch = data.on_before_batch_transfer(tickets[0], 0)  # the update starts: now its batch is drawn
    assert batch.shape == (8,) and data.updates_done == 4
    row = torch.zeros(6)
    assert data.on_before_batch_transfer(row, 0) is row  # evaluation rows pass unchanged


def test_checkpoint_restores_the_acting_generator():
    data = _data_after_updates(3)
    data._acting_generator.manual_seed(123)
    torch.rand(5, generator=data._acting_generator)
    state = data.state_dict()
    fresh = _data_with_collector()  # seeded afresh in setup
    fresh.load_state_dict(state)
    assert torch.equal(torch.rand(5, generator=fresh._acting_generator),
                       torch.rand(5, generator=data._acting_generator))


def test_random_states_return_when_a_resumed_fit_starts_training():
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    torch.randn(3), np.random.randn(3)  # a cached Gaussian in NumPy's state too
    saved = RandomStates().state_dict()
    expected = (torch.rand(4), np.random.rand(4), np.random.randn(1), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)  # what a fresh process would draw instead
    restored = RandomStates()
    restored.load_state_dict(saved)
    restored.on_train_start(FakeTrainer(global_rank=0), None)
    got = (torch.rand(4), np.random.rand(4), np.random.randn(1), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert np.array_equal(got[2], expected[2]) and got[3] == expected[3]
    other = RandomStates()
    other.load_state_dict(saved)
    other.on_train_start(FakeTrainer(global_rank=1), None)  # other ranks keep their own seeds
    assert not torch.equal(torch.rand(4), expected[0])


def test_other_ranks_do_not_take_rank_zero_buffer_on_resume():
    data = _data_after_updates(3)
    state = data.state_dict()

    rank1 = OnlineDataModule("Pendulum-v1", frames_per_batch=5, init_random_frames=20, batch_size=8, buffer_size=500)
    rank1.trainer = FakeTrainer(global_rank=1, world_size=2, state=SimpleNamespace(fn="fit"))
    rank1.load_state_dict(state)
    assert rank1._pending_buffer_state is None
    assert rank1.frames == state["frames"] and rank1.updates_done == state["updates_done"]
    # a full batch in the buffer, but no frame collected by this rank since the resume: it owes no update yet
    rank1.buffer = ReplayBuffer(storage=LazyTensorStorage(500))
    rank1.buffer.extend(TensorDict({"observation": torch.zeros(8, 3)}, batch_size=[8]))
    assert rank1.updates_owed() == 0  # it warms up on its own data first


def test_every_rank_saves_and_restores_its_own_buffer_beside_the_checkpoint(tmp_path):
    """With a checkpoint folder each rank writes its buffer and acting RNG there; on resume each rank reads its own
    (rank 1 continues without a new warm-up), and a rank with no saved folder warms up afresh."""
    ranks = []
    for rank in (0, 1):
        data = _data_with_collector(seed=rank)  # different data per rank
        data.trainer.global_rank, data.trainer.world_size = rank, 2
        data.trainer.checkpoint_callback = SimpleNamespace(dirpath=str(tmp_path / "ckpts"))
        for _ in range(3):
            data.next_batch()
        data.trainer.global_step = 3
        ranks.append((data, data.state_dict()))
    assert all(state["buffer_folder"] == "buffers/update-3" and "buffers" not in state for _, state in ranks)
    for rank, (data, _) in enumerate(ranks):
        restored = OnlineDataModule("Pendulum-v1", frames_per_batch=5, init_random_frames=20, batch_size=8,
                                    buffer_size=500)
        restored.trainer = FakeTrainer(global_rank=rank, world_size=2, state=SimpleNamespace(fn="fit"),
                                        ckpt_path=str(tmp_path / "ckpts" / "last.ckpt"))
        restored.load_state_dict(ranks[0][1])  # Lightning gives every rank rank 0's state
        restored.build_buffers()
        assert (restored._frames_origin, restored._updates_origin) == (0, 0)  # no new warm-up
        filled = len(data.buffer)
        assert len(restored.buffer) == filled
        assert (restored.buffer.storage[:filled] == data.buffer.storage[:filled]).all()
        assert torch.equal(restored._acting_generator.get_state(), data._acting_generator.get_state())
        assert torch.equal(restored.buffer.sample()["observation"], data.buffer.sample()["observation"])
    third = OnlineDataModule("Pendulum-v1", frames_per_batch=5, init_random_frames=20, batch_size=8, buffer_size=500)
    third.trainer = FakeTrainer(global_rank=2, world_size=3, state=SimpleNamespace(fn="fit"),
                                 ckpt_path=str(tmp_path / "ckpts" / "last.ckpt"))
    third.load_state_dict(ranks[0][1])
    assert third._pending_buffer_state is None and third._frames_origin == ranks[0][1]["frames"]


def test_buffer_smaller_than_batch_is_rejected():
    with pytest.raises(ConfigError, match="buffer_size"):
        OnlineDataModule("Pendulum-v1", batch_size=64, buffer_size=32)


def test_nstep_rows_of_online_episodes_enter_the_buffer_when_the_episode_ends():
    """``n_step 3`` with episodes of 12 steps: collected rows wait until their episode ends, then enter as n-step rows
    whose rewards are the episode's next rewards (compared with one-step rows collected alongside)."""
    data = _data_with_collector(n_step=3, max_episode_steps=12)
    for _ in range(3):  # 15 frames: one finished episode and 3 rows of the next
        data.collect()
    assert data.frames == 15 and len(data.buffer) == 12
    rows = data.buffer.storage[:12]
    assert rows["steps_to_next_obs"].tolist() == [3] * 10 + [2, 1]
    rewards = rows["next", "reward"].reshape(-1)
    torch.testing.assert_close(rows["nstep_rewards"][:10], torch.stack([rewards[t:t + 3] for t in range(10)]))
    torch.testing.assert_close(rows["next", "observation"][:9], rows["observation"][3:])  # s_{t+3}
    assert sum(len(part) for part in data._open_episodes[0]) == 3
