"""Atomic local checkpoints (a half-written file is never visible under the checkpoint's name), and a checked read.

Lightning's default writer goes through an fsspec transaction whose temporary file lives in ``TMPDIR``; when that is on
another filesystem the final move is a copy, and a kill during it leaves a truncated ``last.ckpt``. Here the
checkpoint is written to a temporary file in the target directory, flushed to disk (``fsync``) and renamed over the
target (``os.replace``, atomic within one filesystem). Remote paths (``s3://`` ...) keep Lightning's writer.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from arsq_lightning.data import buffer_files
from arsq_lightning.errors import ConfigError, require


class AtomicCheckpointIO(TorchCheckpointIO):
    """:class:`TorchCheckpointIO` whose local writes are atomic (see module doc)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = str(path)
        if "://" in path and not path.startswith("file://"):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = path.removeprefix("file://")
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        buffer_files.place_beside(checkpoint, directory)
        handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(handle, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
        except BaseException:
            if os.path.exists(temporary):
                os.remove(temporary)
            raise
        buffer_files.prune(directory)

    def remove_checkpoint(self, path) -> None:
        """Lightning's removal, then the buffer folders no remaining checkpoint refers to."""
        super().remove_checkpoint(path)
        path = str(path)
        if "://" not in path or path.startswith("file://"):
            buffer_files.prune(os.path.dirname(os.path.abspath(path.removeprefix("file://"))))


def check_checkpoint(path: str, needs_buffers: bool = False) -> dict:
    """One line, before anything starts, for a ``--ckpt_path`` that is missing, truncated or not a checkpoint, or
    (``needs_buffers``: a resume) whose replay buffers beside it are gone; returns the checkpoint (tensors
    memory-mapped)."""
    require(os.path.isfile(path), f"--ckpt_path {path}: no such file")
    require(zipfile.is_zipfile(path), f"--ckpt_path {path}: not a complete checkpoint file (truncated, or not saved "
            "by torch.save)")
    try:
        saved = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same one-line error
        raise ConfigError(f"--ckpt_path {path}: cannot be read as a checkpoint ({err})") from None
    keys = set(saved) if isinstance(saved, dict) else {type(saved).__name__}
    require({"state_dict", "global_step"} <= keys, f"--ckpt_path {path}: not a Lightning checkpoint of this project "
            f"(it holds {sorted(keys)[:5]})")
    for state in saved.values():  # the data module's state, under its class name
        if needs_buffers and isinstance(state, dict) and "buffer_folder" in state:
            folder = buffer_files.rank_folder(path, state["buffer_folder"], 0)
            require(buffer_files.is_complete(folder), f"--ckpt_path {path}: its replay buffers are missing or "
                    f"incomplete ({folder}); the buffers folder beside a checkpoint moves with it")
    return saved
