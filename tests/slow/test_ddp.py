"""DDP on 2 CPU processes (gloo): ranks collect different data, yet parameters and targets stay identical."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from helpers import QUICKSTART, REPO, TINY, only_run


def test_ddp_two_cpu_ranks_keep_identical_parameters(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri,
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "arsq_lightning.cli", "fit", "--config", str(QUICKSTART), *TINY,
               "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
               "--trainer.callbacks+=ddp_probe.DumpRankState", f"--trainer.callbacks.out_dir={tmp_path}/dump"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [torch.load(tmp_path / "dump" / f"rank{r}.pt") for r in (0, 1)]
    assert all(r["world_size"] == 2 and r["updates"] == 30 for r in ranks)
    assert not torch.equal(ranks[0]["observations"], ranks[1]["observations"]), "ranks must use their own env seed"
    assert torch.equal(ranks[0]["online"], ranks[1]["online"]), "gradients were not all-reduced"
    assert torch.equal(ranks[0]["target"], ranks[1]["target"]), "target networks diverged across ranks"
    assert not torch.equal(ranks[0]["online"], ranks[0]["target"])
    _, run = only_run(uri)  # only rank 0 logs: a single MLflow run, with the evaluation
    assert "eval/return_mean" in run.data.metrics

    # a resume gives each rank back its own buffer (saved beside the checkpoint by each rank), no new warm-up
    checkpoint = next(tmp_path.rglob("last.ckpt"))
    resume = [*command[:-1], f"--trainer.callbacks.out_dir={tmp_path}/resumed", "--trainer.max_steps", "35",
              "--ckpt_path", str(checkpoint)]
    result = subprocess.run(resume, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    for rank in (0, 1):
        restored = torch.load(tmp_path / "resumed" / f"start-rank{rank}.pt")
        assert torch.equal(restored["buffer"], ranks[rank]["buffer"]), f"rank {rank} lost its buffer"
        assert restored["frames_origin"] == 0
