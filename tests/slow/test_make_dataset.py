"""arsq-dataset (arsq_lightning/tools/make_dataset.py) end to end on tiny settings: train -> replay / rollouts
-> mix, files readable and labelled."""

from __future__ import annotations

import h5py

from arsq_lightning import read_d4rl_hdf5, read_minari
from arsq_lightning.tools import make_dataset

from helpers import use_tmp_mlflow


def test_train_replay_rollouts_random_mix(monkeypatch, tmp_path):
    use_tmp_mlflow(monkeypatch, tmp_path)
    run = tmp_path / "gen"
    make_dataset.main(["train", "--env", "Hopper-v5", "--steps", "30", "--eval-every", "30", "--hidden", "[16]",
                       "--batch-size", "16", "--random-frames", "60", "--out", str(run)])
    ckpt = str(run / "last.ckpt")
    make_dataset.main(["replay", "--checkpoint", ckpt, "--out", str(tmp_path / "mr.hdf5"),
                       "--minari-id", "test/hopper/mr-v0", "--minari-root", str(tmp_path / "minari")])
    make_dataset.main(["rollouts", "--checkpoint", ckpt, "--transitions", "50", "--out", str(tmp_path / "m.hdf5")])
    make_dataset.main(["random", "--env", "Hopper-v5", "--transitions", "40", "--out", str(tmp_path / "r.hdf5")])
    make_dataset.main(["mix", "--inputs", str(tmp_path / "m.hdf5"), str(tmp_path / "r.hdf5"), "--kind",
                       "medium-random", "--out", str(tmp_path / "mix.hdf5")])
    replay = read_d4rl_hdf5(tmp_path / "mr.hdf5")
    # the first update needs the 60 warm-up frames, each later one a frame more, in collection order (nothing is
    # collected ahead of an update)
    assert replay.numel() >= 60 + 30 - 1
    assert read_minari("test/hopper/mr-v0", root=tmp_path / "minari").numel() == replay.numel()
    assert read_d4rl_hdf5(tmp_path / "m.hdf5").numel() == 50
    assert read_d4rl_hdf5(tmp_path / "mix.hdf5").numel() == 90
    for name, kind in (("mr", "medium-replay"), ("m", "medium"), ("r", "random"), ("mix", "medium-random")):
        with h5py.File(tmp_path / f"{name}.hdf5", "r") as f:
            assert "not D4RL" in f["metadata/source"][()].decode()
            assert f["metadata/kind"][()].decode() == kind
            assert f["metadata/env_id"][()].decode() == "Hopper-v5"
    with h5py.File(tmp_path / "mr.hdf5", "r") as f:
        assert "policy_return" in f["metadata"] and "policy_normalized_score" in f["metadata"]
