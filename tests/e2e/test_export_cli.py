"""``arsq export`` writes a checkpoint's policy that acts like the checkpoint's module."""

from __future__ import annotations

import pytest
import torch

from arsq_lightning import ARSQModule
from arsq_lightning.cli import main

from helpers import TINY, use_tmp_mlflow


def test_export_of_a_trained_checkpoint_matches_its_actions(monkeypatch, tmp_path, capsys):
    use_tmp_mlflow(monkeypatch, tmp_path)
    main(["fit", "--config", "quickstart", *TINY])  # found by name, from a folder that is not the repository
    (checkpoint,) = tmp_path.glob("mlruns/**/last.ckpt")  # the one copy, among the MLflow run's artifacts
    main(["export", "--ckpt_path", str(checkpoint), "--out", str(tmp_path / "out" / "policy.pt2")])
    assert "exported the greedy policy" in capsys.readouterr().out
    policy = torch.export.load(tmp_path / "out" / "policy.pt2").module()
    module = ARSQModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=False).eval()
    obs = torch.randn(256, 3) * 2
    assert torch.equal(policy(obs), module.act(obs, deterministic=True))


@pytest.mark.parametrize("make", ["missing", "not_a_checkpoint"])
def test_export_of_a_bad_checkpoint_fails_in_one_line(make, tmp_path, capsys):
    path = tmp_path / "x.ckpt"
    if make == "not_a_checkpoint":
        torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--ckpt_path", str(path)])
    err = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2 and err[0].startswith(f"arsq: error: --ckpt_path {path}") and len(err) == 2
