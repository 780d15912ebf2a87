"""Replay storage that keeps each pixel frame once and stacks frames again when rows are read.

A row's ``("observation", "pixels")`` ``[V, k * C, H, W]`` (``k`` frames stacked on the channel axis, oldest first,
as ``CatFrames`` stacks them) and its ``("next", "observation", "pixels")`` are replaced on writing by
``frame_ids [2k]`` (int64): slots of a pool of single frames ``[V, C, H, W]``. A frame equal, byte for byte, to one
already in the pool is not stored again. Consecutive rows of an episode share ``k - 1`` frames of their stacks, a
row's next stack shares ``k - 1`` with its own, and the reset stack is ``k`` copies of one frame, so a row costs
about one frame instead of ``2k``. Frames are reference-counted: one leaves the pool when the last row holding it
is overwritten. Reading gives back the rows exactly as written.

Shapes: ``V`` views, ``C`` channels per frame, ``k`` the frame stack.
"""

from __future__ import annotations

import os

import torch
from tensordict import TensorDict, TensorDictBase, is_tensor_collection
from torch import Tensor
from torchrl.data import LazyTensorStorage

from arsq_lightning.errors import require
from arsq_lightning.keys import NEXT_OBSERVATION, OBSERVATION, PIXELS

FRAME_IDS = "frame_ids"
OBS_PIXELS = (OBSERVATION, PIXELS)
NEXT_PIXELS = (*NEXT_OBSERVATION, PIXELS)


def split_stack(pixels: Tensor, frame_stack: int) -> Tensor:
    """``[..., V, k * C, H, W] -> [..., k, V, C, H, W]``: a stack's frames, oldest first."""
    *lead, views, channels, height, width = pixels.shape
    require(channels % frame_stack == 0, f"pixels with {channels} channels are not a stack of {frame_stack} frames")
    frames = pixels.reshape(*lead, views, frame_stack, channels // frame_stack, height, width)
    return frames.movedim(-4, -5)


def join_stack(frames: Tensor) -> Tensor:
    """``[..., k, V, C, H, W] -> [..., V, k * C, H, W]`` (the inverse of :func:`split_stack`)."""
    *lead, stack, views, channels, height, width = frames.shape
    return frames.movedim(-5, -4).reshape(*lead, views, stack * channels, height, width)


def _positions(cursor, size: int) -> Tensor:
    """A storage write's cursor (int, slice, sequence or tensor of positions) as positions ``[n]``."""
    if isinstance(cursor, slice):
        return torch.arange(*cursor.indices(size))
    return torch.as_tensor(cursor, dtype=torch.int64).reshape(-1)


def with_stacks(rows: TensorDictBase, frames: Tensor, frame_stack: int) -> TensorDictBase:
    """``rows`` with ``frame_ids [..., 2k]`` given back their pixel stacks, from their frames ``[..., 2k, V, C, H,
    W]``."""
    out = rows.exclude(FRAME_IDS)
    out[OBS_PIXELS] = join_stack(frames[..., :frame_stack, :, :, :, :])
    out[NEXT_PIXELS] = join_stack(frames[..., frame_stack:, :, :, :, :])
    return out


class FramePool:
    """Single frames in chunks of ``chunk`` slots, with a reference count per slot and lookup by content.

    Args:
        chunk: slots per chunk; memory grows a chunk at a time, as frames are added.
        directory: where chunks live as memory-mapped files (``chunk-<i>.bin``); ``None``: in RAM.
    """

    def __init__(self, chunk: int = 1024, directory: str | None = None):
        require(chunk >= 1, f"chunk must be >= 1, got {chunk}")
        self.chunk, self.directory = chunk, directory
        self.chunks: list[Tensor] = []  # each [chunk, V, C, H, W]
        self.refs = torch.zeros(0, dtype=torch.int64)  # [slots]
        self.fingerprints = torch.zeros(0, dtype=torch.int64)  # [slots]
        self.by_fingerprint: dict[int, list[int]] = {}
        self.free: list[int] = []
        self._weights: Tensor | None = None

    def __len__(self) -> int:
        """Frames held (slots with a reference)."""
        return int((self.refs > 0).sum())

    @property
    def frame_bytes(self) -> int:
        return self.chunks[0][0].numel() * self.chunks[0].element_size() if self.chunks else 0

    def clear(self) -> None:
        self.__init__(self.chunk, self.directory)

    def add(self, frames: Tensor) -> Tensor:
        """Hold one more reference to each of ``frames [n, V, C, H, W]``; returns their slots ``[n]``."""
        prints = self._fingerprint(frames).tolist()
        slots = []
        for frame, key in zip(frames, prints, strict=True):
            slot = self._find(frame, key)
            if slot is None:
                slot = self._store(frame, key)
            slots.append(slot)
        slots = torch.tensor(slots, dtype=torch.int64)
        self.refs.index_add_(0, slots, torch.ones_like(slots))
        return slots

    def release(self, slots: Tensor) -> None:
        """Drop one reference to each of ``slots``; a slot left without one is freed."""
        if slots.numel() == 0:
            return
        slots = slots.reshape(-1)
        self.refs.index_add_(0, slots, torch.full_like(slots, -1))
        for slot in slots.unique().tolist():
            if self.refs[slot] == 0:
                self.by_fingerprint[int(self.fingerprints[slot])].remove(slot)
                self.free.append(slot)

    def gather(self, slots: Tensor) -> Tensor:
        """The frames ``[..., V, C, H, W]`` at ``slots [...]``."""
        flat = slots.reshape(-1)
        if len(self.chunks) == 1:
            out = self.chunks[0].index_select(0, flat)
        else:
            out = torch.empty(flat.numel(), *self.chunks[0].shape[1:], dtype=self.chunks[0].dtype)
            which = flat // self.chunk
            for index in which.unique().tolist():
                rows = (which == index).nonzero().squeeze(1)
                out.index_copy_(0, rows, self.chunks[index].index_select(0, flat[rows] - index * self.chunk))
        return out.view(*slots.shape, *out.shape[1:])

    def _find(self, frame: Tensor, key: int) -> int | None:
        for slot in self.by_fingerprint.get(key, ()):
            if torch.equal(self.chunks[slot // self.chunk][slot % self.chunk], frame):
                return slot
        return None

    def _store(self, frame: Tensor, key: int) -> int:
        if not self.free:
            self._grow(frame)
        slot = self.free.pop()
        self.chunks[slot // self.chunk][slot % self.chunk] = frame
        self.fingerprints[slot] = key
        self.by_fingerprint.setdefault(key, []).append(slot)
        return slot

    def _grow(self, frame: Tensor) -> None:
        start = len(self.chunks) * self.chunk
        if self.directory is None:
            chunk = torch.empty(self.chunk, *frame.shape, dtype=frame.dtype)
        else:  # a sparse file: disk is taken as frames are written
            path = os.path.join(self.directory, f"chunk-{len(self.chunks)}.bin")
            chunk = torch.from_file(path, shared=True, size=self.chunk * frame.numel(), dtype=frame.dtype)
            chunk = chunk.view(self.chunk, *frame.shape)
        self.chunks.append(chunk)
        self.refs = torch.cat([self.refs, torch.zeros(self.chunk, dtype=torch.int64)])
        self.fingerprints = torch.cat([self.fingerprints, torch.zeros(self.chunk, dtype=torch.int64)])
        self.free.extend(range(start + self.chunk - 1, start - 1, -1))  # popped lowest first

    def _fingerprint(self, frames: Tensor) -> Tensor:
        """A 64-bit hash ``[n]`` of each frame's bytes (equal frames, equal hashes; a match is checked in full)."""
        data = frames.reshape(frames.shape[0], -1).contiguous().view(torch.uint8)
        pad = -data.shape[1] % 8
        if pad:
            data = torch.nn.functional.pad(data, (0, pad))
        words = data.view(torch.int64)  # [n, bytes / 8]
        if self._weights is None or self._weights.numel() != words.shape[1]:
            generator = torch.Generator().manual_seed(0)
            self._weights = torch.randint(-(2**62), 2**62, (words.shape[1],), generator=generator) | 1
        return (words * self._weights).sum(-1)  # wraps around: a hash, not a number


class FrameStackStorage(LazyTensorStorage):
    """A ``LazyTensorStorage`` of transitions whose pixel stacks are kept as frames in a :class:`FramePool`.

    Rows without ``("observation", "pixels")`` are stored as they are.

    Args:
        max_size: rows.
        frame_stack: ``k``, the frames in each pixel stack.
        frame_dir: keep the frame pool in memory-mapped files in this folder (the rows, small, stay in RAM);
            ``None``: in RAM.
    """

    def __init__(self, max_size: int, frame_stack: int = 1, frame_dir: str | None = None):
        super().__init__(max_size)
        require(frame_stack >= 1, f"frame_stack must be >= 1, got {frame_stack}")
        self.frame_stack = frame_stack
        # one chunk holds a full storage's frames (about one per row, plus each episode's first); pages of a chunk
        # take memory only once written, and gathering from one chunk is a single copy
        self.pool = FramePool(chunk=max(256, max_size + max_size // 8), directory=frame_dir)

    def set(self, cursor, data, *, set_cursor: bool = True):
        if not (is_tensor_collection(data) and OBS_PIXELS in data.keys(True)):
            return super().set(cursor, data, set_cursor=set_cursor)
        index = _positions(cursor, self.max_size)
        if data.batch_dims == 0:
            data = data.unsqueeze(0)
        if index.unique().numel() < index.numel():  # a write longer than the storage: only the last ones stay
            last = {position: row for row, position in enumerate(index.tolist())}
            rows = torch.tensor(sorted(last.values()))
            index, data = index[rows], data[rows]
        held = index[index < len(self)] if self.initialized else index[:0]
        replaced = self._storage[held][FRAME_IDS] if held.numel() else None
        compact = data.exclude(OBS_PIXELS, NEXT_PIXELS)
        compact[FRAME_IDS] = self._add_frames(data)
        result = super().set(index, compact, set_cursor=set_cursor)
        if replaced is not None:
            self.pool.release(replaced)
        return result

    def get(self, index):
        rows = super().get(index)
        if not (is_tensor_collection(rows) and FRAME_IDS in rows.keys()):
            return rows
        return with_stacks(rows, self.pool.gather(rows[FRAME_IDS]), self.frame_stack)

    def packed(self) -> tuple[TensorDictBase, Tensor]:
        """The rows held, with ``frame_ids`` into the returned frames ``[m, V, C, H, W]`` (the distinct frames they
        hold, in slot order): what a checkpoint saves (:mod:`~arsq_lightning.data.buffer_files`)."""
        rows = super().get(slice(0, len(self))).clone()
        slots, ids = rows[FRAME_IDS].unique(return_inverse=True)  # sorted slots; ids index them
        rows[FRAME_IDS] = ids
        return rows, self.pool.gather(slots)

    def load_packed(self, rows: TensorDictBase, frames: Tensor) -> None:
        """Hold ``rows`` as rows ``0 .. n - 1`` (the storage emptied first), from :meth:`packed`'s output."""
        self._empty()
        slots = self.pool.add(frames)  # one reference each, for the moment
        held = slots[rows[FRAME_IDS]]
        self.pool.refs.index_add_(0, held.reshape(-1), torch.ones(held.numel(), dtype=torch.int64))
        self.pool.release(slots)
        super().set(torch.arange(rows.shape[0]), rows.exclude(FRAME_IDS).set(FRAME_IDS, held))

    def _empty(self):
        super()._empty()
        self.pool.clear()

    def state_dict(self) -> dict:
        """The rows and their frames, each once (TorchRL's own storage state would leave the frames out)."""
        if not self.initialized or len(self) == 0:
            return {"length": 0}
        rows, frames = self.packed()
        return {"length": len(self), "rows": rows.to_dict(), "frames": frames}

    def load_state_dict(self, state_dict: dict) -> None:
        self._empty()
        if state_dict["length"]:
            self.load_packed(TensorDict(state_dict["rows"], [state_dict["length"]]), state_dict["frames"])

    def _add_frames(self, data: TensorDictBase, rows_at_once: int = 256) -> Tensor:
        """Put the rows' frames ``[B, 2k, ...]`` into the pool, ``rows_at_once`` rows at a time (a whole dataset's
        frames are never copied at once); returns their slots ``[B, 2k]``."""
        require(NEXT_PIXELS in data.keys(True), "rows with pixel observations need ('next', 'observation', 'pixels')")
        slots = []
        for start in range(0, data.shape[0], rows_at_once):
            part = data[start:start + rows_at_once]
            frames = torch.cat([split_stack(part[OBS_PIXELS], self.frame_stack),
                                split_stack(part[NEXT_PIXELS], self.frame_stack)], dim=1)
            slots.append(self.pool.add(frames.flatten(0, 1)).view(frames.shape[0], -1))
        return torch.cat(slots)

    def bytes_held(self) -> int:
        """Bytes of the rows held: their compact entries plus the frames they refer to (not counting slack)."""
        if not self.initialized or len(self) == 0:
            return 0
        per_row = sum(t[0].numel() * t.element_size() for t in self._storage.values(True, True))
        return per_row * len(self) + len(self.pool) * self.pool.frame_bytes
