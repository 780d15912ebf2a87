"""Replay buffers kept beside the checkpoints instead of inside them, one folder per rank.

``<checkpoint dir>/buffers/update-<N>/rank-<k>/`` holds what rank ``k`` had at update ``N``: for each buffer ``name``
its filled rows as a memory-mapped TensorDict (``<name>/``, TorchRL's on-disk layout), and ``state.pt`` with each
buffer's row count, write cursor and sampling RNG plus the rank's own extra state (its acting RNG); a buffer of pixel
rows keeps its frames once (``<name>-frames/``, the rows hold frame ids: :mod:`arsq_lightning.data.frames`).
``COMPLETE`` is written last: a folder without it (a kill during the save) is never read. A checkpoint stores only
the folder's path relative to its own directory, so a moved run folder still resumes; its ``.ckpt`` stays small (the
weights and the optimiser), whatever the buffers weigh.

Every rank writes its own folder under the checkpoint callback's directory while Lightning gathers the checkpoint's
state (on every rank); rank 0 then writes the ``.ckpt`` (linking the folder beside it if it goes elsewhere:
:func:`place_beside`) and removes the folders no checkpoint of the directory refers to (:func:`prune`).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
from tensordict import TensorDict
from torchrl.data import TensorDictReplayBuffer

from arsq_lightning.data.frames import FRAME_IDS, FrameStackStorage, with_stacks
from arsq_lightning.errors import require

COMPLETE = "COMPLETE"
FRAMES = "-frames"  # beside a buffer of pixel rows: its frames, each once (arsq_lightning.data.frames)
FOLDER = re.compile(r"update-(\d+)")


def folder_name(update: int) -> str:
    """The folder, relative to the checkpoint directory, of the buffers saved at ``update``."""
    return os.path.join("buffers", f"update-{update}")


def rank_folder(checkpoint: str | os.PathLike, buffer_folder: str, rank: int) -> Path:
    """Rank ``rank``'s folder of the buffers a checkpoint names (``buffer_folder``, relative to the checkpoint)."""
    return Path(os.path.dirname(os.path.abspath(checkpoint)), buffer_folder, f"rank-{rank}")


def save(buffers: dict[str, TensorDictReplayBuffer], folder: Path, extra: dict) -> None:
    """Write ``buffers`` (name -> buffer) and ``extra`` into ``folder``, ``COMPLETE`` last; nothing if it is there
    already (``last.ckpt`` and the step's own checkpoint are saved at the same update)."""
    if (folder / COMPLETE).exists():
        return
    if folder.exists():
        shutil.rmtree(folder)  # a save interrupted earlier
    folder.mkdir(parents=True)
    state = {"extra": extra, "buffers": {}}
    for name, buffer in buffers.items():
        filled = len(buffer)
        state["buffers"][name] = {"length": filled, "writer": buffer._writer.state_dict(),
                                  "rng": buffer._rng.get_state()}
        if filled and isinstance(buffer.storage, FrameStackStorage):  # rows with frame ids, and the frames once
            rows, frames = buffer.storage.packed()
            rows.memmap(folder / name, num_threads=0)
            TensorDict({"frames": frames}, [frames.shape[0]]).memmap(folder / f"{name}{FRAMES}", num_threads=0)
            state["buffers"][name]["frame_stack"] = buffer.storage.frame_stack
        elif filled:  # copy_existing: rows of a memory-mapped storage (data.buffer_dir) are copied, not moved
            buffer.storage[:filled].memmap(folder / name, copy_existing=True, num_threads=0)
    torch.save(state, folder / "state.pt")
    (folder / COMPLETE).touch()


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE).is_file()


def _state(folder: Path) -> dict:
    require(is_complete(folder), f"the checkpoint's replay buffers are missing or incomplete: {folder}")
    return torch.load(folder / "state.pt", weights_only=False)


def read_rows(folder: Path, name: str) -> TensorDict:
    """Buffer ``name``'s filled rows ``[n]`` as saved in ``folder`` (in memory; pixel stacks rebuilt from the
    frames)."""
    saved = _state(folder)["buffers"].get(name)
    require(saved is not None, f"no buffer {name!r} in {folder}")
    if not saved["length"]:
        return TensorDict(batch_size=[0])
    rows = _rows(folder, name)
    if "frame_stack" not in saved:
        return rows
    frames = _frames(folder, name)
    return with_stacks(rows, frames[rows[FRAME_IDS]], saved["frame_stack"])


def _rows(folder: Path, name: str) -> TensorDict:
    return TensorDict.load_memmap(folder / name).clone()


def _frames(folder: Path, name: str) -> torch.Tensor:
    return TensorDict.load_memmap(folder / f"{name}{FRAMES}")["frames"].clone()


def load(buffers: dict[str, TensorDictReplayBuffer], folder: Path) -> dict:
    """Refill ``buffers`` (emptied first) from ``folder``; returns the ``extra`` state saved with them."""
    state = _state(folder)
    for name, buffer in buffers.items():
        saved = state["buffers"].get(name)
        if saved is None:
            continue
        buffer.empty()
        packed = "frame_stack" in saved and isinstance(buffer.storage, FrameStackStorage)
        if saved["length"] and packed and saved["length"] <= buffer.storage.max_size:
            buffer.storage.load_packed(_rows(folder, name), _frames(folder, name))
        elif saved["length"]:
            buffer.extend(read_rows(folder, name))
        buffer._writer.load_state_dict(saved["writer"])
        buffer._rng.set_state(saved["rng"])
    return state["extra"]


def place_beside(checkpoint: dict, directory: str) -> None:
    """Make the buffer folders ``checkpoint`` names exist under ``directory`` too (a checkpoint saved outside the
    folder its buffers were written to, e.g. ``trainer.save_checkpoint(elsewhere)``): hard links where the filesystem
    allows, else copies; only complete rank folders."""
    for state in checkpoint.values():  # the data module's state, under its class name
        if not (isinstance(state, dict) and "buffer_folder" in state):
            continue
        source, target = Path(state["buffer_root"], state["buffer_folder"]), Path(directory, state["buffer_folder"])
        if source.resolve() == target.resolve() or not source.is_dir():
            continue
        for rank in source.iterdir():
            if is_complete(rank) and not is_complete(target / rank.name):
                shutil.rmtree(target / rank.name, ignore_errors=True)
                shutil.copytree(rank, target / rank.name, copy_function=_link_or_copy)


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(source, target)


def prune(directory: str | os.PathLike) -> None:
    """Remove the buffer folders of ``directory`` that no ``*.ckpt`` there refers to, except those newer than every
    checkpoint (a save still under way on another rank)."""
    root = Path(directory) / "buffers"
    if not root.is_dir():
        return
    kept = set()
    for path in Path(directory).glob("*.ckpt"):
        try:
            kept.add(int(torch.load(path, map_location="cpu", mmap=True, weights_only=False)["global_step"]))
        except Exception:  # noqa: BLE001 - an unreadable file refers to nothing
            continue
    newest = max(kept, default=-1)
    for folder in root.iterdir():
        match = FOLDER.fullmatch(folder.name)
        if match and int(match.group(1)) not in kept and int(match.group(1)) < newest:
            shutil.rmtree(folder, ignore_errors=True)
