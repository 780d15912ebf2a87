"""Evaluation videos: a rendering env's run logs MP4s of evaluation episode 0; an env that cannot render logs none."""

from __future__ import annotations

import imageio.v3 as iio
import numpy as np

from arsq_lightning.cli import build_cli

from helpers import QUICKSTART, TINY, only_run, use_tmp_mlflow


def test_a_metaworld_run_logs_an_evaluation_video_of_episode_zero(monkeypatch, tmp_path):
    uri = use_tmp_mlflow(monkeypatch, tmp_path)
    cli = build_cli(["fit", "--config", str(QUICKSTART), *TINY, "--data.env_id", "metaworld:reach-v3",
                     "--data.eval_episodes", "1", "--data.video_every", "1", "--data.video_size", "64"])
    client, run = only_run(uri)
    videos = sorted(a.path for a in client.list_artifacts(run.info.run_id, "videos"))
    assert videos == ["videos/eval-update-15.mp4", "videos/eval-update-30.mp4"]  # every evaluation (video_every 1)
    frames = iio.imread(client.download_artifacts(run.info.run_id, videos[-1], str(tmp_path)))
    length = int(run.data.metrics["eval/episode_length"])  # the one evaluation episode, which the video replays
    assert frames.shape == (length + 1, 64, 64, 3)  # the reset frame, then one per step
    assert np.abs(frames[-1].astype(int) - frames[0].astype(int)).mean() > 0.5  # the arm moved
    assert cli.trainer.global_step == 30


def test_an_env_that_cannot_render_logs_no_video_and_the_run_goes_on(monkeypatch, tmp_path, capsys):
    pygame = None
    try:
        import pygame  # noqa: F401 - Pendulum renders with pygame when it is installed
    except ImportError:
        pass
    uri = use_tmp_mlflow(monkeypatch, tmp_path)
    build_cli(["fit", "--config", str(QUICKSTART), *TINY, "--data.video_every", "1"])
    client, run = only_run(uri)
    videos = client.list_artifacts(run.info.run_id, "videos")
    if pygame is None:
        assert videos == [] and run.info.status == "FINISHED"
        out = capsys.readouterr()
        assert (out.out + out.err).count("arsq: no evaluation videos: Pendulum-v1 cannot render") == 1  # said once
    else:
        assert len(videos) == 2
