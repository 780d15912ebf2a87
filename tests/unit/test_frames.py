"""Pixel replay that keeps each frame once: rows read back exactly as written, each distinct frame held once and
released with the last row that holds it, the data modules use it for pixel observations."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from torchrl.collectors import Collector
from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer

from arsq_lightning.data import buffer_files
from arsq_lightning.data.frames import FramePool, FrameStackStorage, join_stack, split_stack
from arsq_lightning.data.online import TRANSITION_KEYS, OnlineDataModule
from arsq_lightning.envs.core import make_env, stack_frames

PIXEL_KWARGS = {"observation": "pixels", "image_size": 24}


def _stream(steps: int, k: int, *, seed: int, views: int = 2, lookahead: int = 1, start: int = 0) -> TensorDict:
    """Rows of one episode with random frames ``[V, 3, 6, 6]``: obs stack ``k`` frames ending at ``t`` (the first
    frame repeated before the episode's start), next stack ending at ``t + lookahead`` (n-step rows)."""
    g = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (steps + lookahead, views, 3, 6, 6), generator=g, dtype=torch.uint8)
    stacks = stack_frames(frames, k, pixels=True)  # [T + lookahead, V, 3k, 6, 6]
    proprio = torch.randn(steps + lookahead, 4, generator=g)
    return TensorDict({"observation": {"pixels": stacks[:steps], "proprio": proprio[:steps]},
                       "action": torch.randn(steps, 2, generator=g),
                       "next": {"observation": {"pixels": stacks[lookahead:], "proprio": proprio[lookahead:]},
                                "reward": torch.randn(steps, 1, generator=g),
                                "done": torch.zeros(steps, 1, dtype=torch.bool)}}, [steps])


def _distinct_frames(rows: TensorDict, k: int) -> int:
    """Independent count: distinct frames over all stacks of ``rows``, compared as bytes."""
    frames = torch.cat([split_stack(rows["observation", "pixels"], k), split_stack(rows["next", "observation",
                                                                                          "pixels"], k)], dim=1)
    return len({bytes(frame.contiguous().numpy()) for frame in frames.flatten(0, 1)})


def _pair(capacity: int, k: int, batch_size: int = 8):
    plain = TensorDictReplayBuffer(storage=LazyTensorStorage(capacity), batch_size=batch_size,
                                   generator=torch.Generator().manual_seed(5))
    framed = TensorDictReplayBuffer(storage=FrameStackStorage(capacity, frame_stack=k), batch_size=batch_size,
                                    generator=torch.Generator().manual_seed(5))
    return plain, framed


def test_split_and_join_stack_are_inverse_and_oldest_first():
    frames = torch.arange(3).view(3, 1, 1, 1, 1).expand(3, 2, 3, 2, 2).to(torch.uint8)  # frame t has value t
    stacked = join_stack(frames)
    assert stacked.shape == (2, 9, 2, 2) and stacked[0, :, 0, 0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert torch.equal(split_stack(stacked, 3), frames)


@pytest.mark.parametrize("k, lookahead", [(1, 1), (3, 1), (4, 3)])
def test_rows_read_back_as_written_through_wraparound_and_interleaved_episodes(k, lookahead):
    """Three episodes written interleaved in pieces (as parallel envs store them), n-step-like rows, a storage
    that wraps around twice: contents and sampled batches equal a plain storage's; the pool holds exactly the
    distinct frames of the rows still stored."""
    plain, framed = _pair(capacity=40, k=k)
    episodes = [_stream(45, k, seed=s, lookahead=lookahead) for s in range(3)]
    for start in range(0, 45, 5):
        for episode in episodes:
            piece = episode[start:start + 5]
            plain.extend(piece.clone())
            framed.extend(piece.clone())
            stored = framed.storage[:len(framed)]
            assert (stored == plain.storage[:len(plain)]).all()
            assert len(framed.storage.pool) == _distinct_frames(stored, k)
    for _ in range(3):
        assert (framed.sample() == plain.sample()).all()
    one = framed.storage[7]  # a single row (int index)
    assert torch.equal(one["next", "observation", "pixels"], plain.storage[7]["next", "observation", "pixels"])


def test_a_row_costs_about_one_frame_and_empty_releases_everything():
    k = 3
    _, framed = _pair(capacity=1000, k=k)
    framed.extend(torch.cat([_stream(100, k, seed=seed) for seed in range(4)]))  # one write of 400 rows
    pool = framed.storage.pool
    assert len(pool) == 4 * 101  # per episode: its 100 steps' frames and the frame after the last
    row = _stream(1, k, seed=0)[0]
    row_bytes = sum(v.numel() * v.element_size() for v in row.values(include_nested=True, leaves_only=True)) + 8
    frame_bytes = 2 * 3 * 6 * 6  # two views
    compact_row = row_bytes - 2 * k * frame_bytes + 2 * k * 8  # the stacks become 2k int64 frame ids
    assert framed.storage.bytes_held() == 400 * compact_row + 404 * frame_bytes
    framed.empty()
    assert len(framed) == 0 and len(pool) == 0
    framed.extend(_stream(10, k, seed=9))
    assert len(pool) == 11 and (framed.storage[:10].exclude("index") == _stream(10, k, seed=9)).all()


def test_storage_state_dict_keeps_rows_and_frames():
    k = 2
    _, framed = _pair(capacity=30, k=k)
    for seed in range(2):
        framed.extend(_stream(20, k, seed=seed))  # wraps around: 40 rows into 30
    state = framed.storage.state_dict()
    assert state["frames"].shape[0] == len(framed.storage.pool) < 30 * 2 * k
    other = FrameStackStorage(30, frame_stack=k)
    other.load_state_dict(state)
    assert len(other) == 30 and (other[:30] == framed.storage[:30]).all()
    assert len(other.pool) == len(framed.storage.pool)
    empty = FrameStackStorage(30, frame_stack=k)
    assert empty.state_dict() == {"length": 0}


def test_equal_frames_in_different_episodes_are_stored_once_and_freed_with_the_last_row():
    pool = FramePool(chunk=4)
    frames = torch.randint(0, 256, (6, 1, 3, 2, 2), dtype=torch.uint8)
    slots = pool.add(torch.cat([frames, frames[:2]]))
    assert len(pool) == 6 and slots[6:].tolist() == slots[:2].tolist() and len(pool.chunks) == 2
    assert torch.equal(pool.gather(slots.view(2, 4)).flatten(0, 1), torch.cat([frames, frames[:2]]))
    pool.release(slots[:2])
    assert len(pool) == 6  # still held by the last two references
    pool.release(slots[6:])
    assert len(pool) == 4 and len(pool.free) == 2 + 2  # two freed slots join the second chunk's two unused ones
    again = pool.add(frames[5:])
    assert again.tolist() == [slots[5].item()]  # an equal frame still held is found, not stored again


def test_fingerprint_collisions_are_resolved_by_comparing_frames(monkeypatch):
    pool = FramePool(chunk=8)
    monkeypatch.setattr(pool, "_fingerprint", lambda frames: torch.zeros(frames.shape[0], dtype=torch.int64))
    frames = torch.randint(0, 256, (5, 1, 3, 2, 2), dtype=torch.uint8)
    slots = pool.add(torch.cat([frames, frames]))
    assert len(pool) == 5 and slots[:5].tolist() == slots[5:].tolist()
    assert torch.equal(pool.gather(slots), torch.cat([frames, frames]))


def test_collected_pixel_rows_keep_one_frame_per_step_and_survive_a_buffer_save(tmp_path):
    """Real CatFrames stacks from a DMC pixel env across automatic resets: the data module's buffer stores them
    with one frame per step, and the buffer files bring back the same rows."""
    kwargs = {**PIXEL_KWARGS, "frame_stack": 3}
    env = make_env("dmc:cheetah-run", seed=0, max_episode_steps=6, **kwargs)
    collector = Collector(env, None, frames_per_batch=20, total_frames=20)
    batch = next(iter(collector)).reshape(-1).select(*TRANSITION_KEYS)
    collector.shutdown()
    data = OnlineDataModule("dmc:cheetah-run", env_kwargs=kwargs, max_episode_steps=6, buffer_size=100, batch_size=4)
    data.setup("fit")
    data.build_buffers()
    assert isinstance(data.buffer.storage, FrameStackStorage)
    data.buffer.extend(batch.clone())
    stored = data.buffer.storage[:20]
    assert (stored.exclude("index") == batch).all()
    episodes = int(batch["next", "done"].sum()) + (0 if batch["next", "done"][-1] else 1)  # 4 episodes of 6, 5, ...
    assert len(data.buffer.storage.pool) == _distinct_frames(batch, 3) <= 20 + episodes
    folder = tmp_path / "rank-0"
    buffer_files.save({"replay": data.buffer}, folder, {})
    on_disk = TensorDict.load_memmap(folder / "replay")
    assert "pixels" not in on_disk["observation"].keys() and on_disk["frame_ids"].shape == (20, 6)
    assert TensorDict.load_memmap(folder / "replay-frames")["frames"].shape == (len(data.buffer.storage.pool), 1, 3,
                                                                                24, 24)
    assert (buffer_files.read_rows(folder, "replay") == stored).all()
    restored = data._make_buffer(100, 4)
    buffer_files.load({"replay": restored}, folder)
    assert (restored.storage[:20] == stored).all() and len(restored.storage.pool) == len(data.buffer.storage.pool)
    assert (restored.sample() == data.buffer.sample()).all()
    plain = TensorDictReplayBuffer(storage=LazyTensorStorage(100), batch_size=4, generator=torch.Generator())
    buffer_files.load({"replay": plain}, folder)
    assert (plain.storage[:20] == stored).all()
    for buffer in (restored, data.buffer, plain):  # writing on after the restore: frames shared and released alike
        for _ in range(5):
            buffer.extend(batch.clone())
    assert (restored.storage[:100] == data.buffer.storage[:100]).all()
    assert (restored.storage[:100] == plain.storage[:100]).all()
    assert len(restored.storage.pool) == len(data.buffer.storage.pool) == _distinct_frames(batch, 3)


def test_vector_observations_keep_the_plain_storage():
    data = OnlineDataModule("Pendulum-v1", buffer_size=100, batch_size=4)
    data.setup("fit")
    data.build_buffers()
    assert type(data.buffer.storage) is LazyTensorStorage


def test_buffer_dir_keeps_buffers_in_memory_mapped_files(tmp_path):
    """``data.buffer_dir``: vector rows in TorchRL's memmap storage, pixel frames in memory-mapped chunk files; the
    rows read back as a RAM buffer's."""
    from torchrl.data import LazyMemmapStorage

    from arsq_lightning.errors import ConfigError

    vector = OnlineDataModule("Pendulum-v1", buffer_size=50, batch_size=4, buffer_dir=str(tmp_path / "buffers"))
    vector.setup("fit")
    vector.build_buffers()
    assert isinstance(vector.buffer.storage, LazyMemmapStorage)
    rows = TensorDict({"observation": torch.randn(10, 3), "action": torch.randn(10, 1)}, [10])
    vector.buffer.extend(rows.clone())
    assert (vector.buffer.storage[:10].exclude("index") == rows).all()
    assert list((tmp_path / "buffers").glob("arsq-buffer-*/observation.memmap"))

    kwargs = {**PIXEL_KWARGS, "frame_stack": 3}
    pixel = OnlineDataModule("dmc:cheetah-run", env_kwargs=kwargs, buffer_size=60, batch_size=4,
                             buffer_dir=str(tmp_path / "buffers"))
    pixel.setup("fit")
    pixel.build_buffers()
    plain = TensorDictReplayBuffer(storage=LazyTensorStorage(60), batch_size=4)
    for seed in range(3):
        episode = _stream(25, 3, seed=seed, views=1)  # the storage keeps whatever frames it is given
        pixel.buffer.extend(episode.clone())
        plain.extend(episode.clone())
    assert (pixel.buffer.storage[:60] == plain.storage[:60]).all()
    chunk = next((tmp_path / "buffers").glob("arsq-buffer-*/chunk-0.bin"))
    assert chunk.stat().st_size == pixel.buffer.storage.pool.chunk * 3 * 6 * 6

    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="data.buffer_dir: cannot create"):
        OnlineDataModule("Pendulum-v1", buffer_dir=str(tmp_path / "file" / "sub"))
