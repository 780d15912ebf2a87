"""AtomicCheckpointIO: a checkpoint file is either the old one or the complete new one, never a partial write, and no
temporary file is left behind, wherever TMPDIR points."""

from __future__ import annotations

import os

import pytest
import torch

from arsq_lightning.checkpoint_io import AtomicCheckpointIO


def test_save_writes_a_loadable_checkpoint_in_the_target_directory_only(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "elsewhere"))  # would be another filesystem on a real machine
    path = tmp_path / "ckpt" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"weights": torch.arange(5.0)}, path)
    assert torch.equal(torch.load(path)["weights"], torch.arange(5.0))
    assert os.listdir(path.parent) == ["last.ckpt"] and not (tmp_path / "elsewhere").exists()


def test_a_write_that_fails_midway_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, path)
    before = path.read_bytes()

    def partial_then_killed(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # e.g. the process is interrupted while writing

    monkeypatch.setattr(torch, "save", partial_then_killed)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["last.ckpt"]
