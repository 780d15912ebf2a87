"""OnlineDataModule: update-to-data accounting, replay checkpoint contents, per-rank resume."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tensordict import TensorDict
from torchrl.data import LazyTensorStorage, ReplayBuffer

from arsq_lightning import ARSQModule, ConfigError, OnlineDataModule


class _FakeTrainer(SimpleNamespace):
    """Just what the data module reads from a Lightning trainer."""


def _data_with_collector(**kwargs) -> OnlineDataModule:
    data = OnlineDataModule("Pendulum-v1", frames_per_batch=5, init_random_frames=20, batch_size=8, buffer_size=500,
                            **kwargs)
    data.trainer = _FakeTrainer(global_rank=0, world_size=1, lightning_module=ARSQModule(data.env_spec),
                                state=SimpleNamespace(fn="fit"))
    data.setup("fit")
    data.train_dataloader()
    return data


def _data_after_updates(updates: int) -> OnlineDataModule:
    """A data module that has collected and served ``updates`` batches."""
    data = _data_with_collector()
    stream = iter(data.train_dataloader())
    for _ in range(updates):
        next(stream)
    return data


@pytest.mark.parametrize("utd", [1.0, 0.5, 2.0])
def test_updates_follow_the_update_to_data_ratio(utd):
    data = _data_with_collector(utd_ratio=utd)
    stream = iter(data.train_dataloader())
    for _ in range(40):
        batch = next(stream)
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


def test_other_ranks_do_not_take_rank_zero_buffer_on_resume():
    data = _data_after_updates(3)
    state = data.state_dict()

    rank1 = OnlineDataModule("Pendulum-v1", frames_per_batch=5, init_random_frames=20, batch_size=8, buffer_size=500)
    rank1.trainer = _FakeTrainer(global_rank=1, world_size=2, state=SimpleNamespace(fn="fit"))
    rank1.load_state_dict(state)
    assert rank1._pending_buffer_state is None
    assert rank1.frames == state["frames"] and rank1.updates_done == state["updates_done"]
    # a full batch in the buffer, but no frame collected by this rank since the resume: it owes no update yet
    rank1.buffer = ReplayBuffer(storage=LazyTensorStorage(500))
    rank1.buffer.extend(TensorDict({"observation": torch.zeros(8, 3)}, batch_size=[8]))
    assert rank1.updates_owed() == 0  # it warms up on its own data first


def test_buffer_smaller_than_batch_is_rejected():
    with pytest.raises(ConfigError, match="buffer_size"):
        OnlineDataModule("Pendulum-v1", batch_size=64, buffer_size=32)
