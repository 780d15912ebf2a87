"""Stop and resume gives the run that never stopped: weights, optimiser state, buffers, counters, evaluations."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient
from tensordict import TensorDict
from torchrl.data import LazyMemmapStorage

from arsq_lightning.cli import build_cli, main

from helpers import only_run, use_tmp_mlflow, write_random_dataset

UPDATES, PRETRAIN = 40, 20


def _config(tmp_path: Path) -> Path:
    """Offline pretraining on a small Pendulum file, then online collection with stochastic acting and a few random
    warm-up frames; an evaluation (and a checkpoint) every 10 updates."""
    dataset = write_random_dataset("Pendulum-v1", tmp_path / "pendulum.hdf5", steps=200, max_episode_steps=50)
    config = {
        "seed_everything": 3,
        "trainer": {"max_steps": UPDATES, "val_check_interval": 10, "log_every_n_steps": 5,
                    "enable_progress_bar": False},
        "model": {"head": {"class_path": "arsq_lightning.AutoregressiveHead", "init_args": {"hidden_dims": [16]}},
                  "critic": {"class_path": "arsq_lightning.ARSQCritic",
                             "init_args": {"soft_alpha": 0.05, "act_alpha": 0.05}}},
        "data": {"class_path": "arsq_lightning.OfflineToOnlineDataModule",
                 "init_args": {"env_id": "Pendulum-v1", "dataset": str(dataset), "pretrain_steps": PRETRAIN,
                               "init_random_frames": 4, "max_episode_steps": 30, "batch_size": 16,
                               "demo_percentile": 100.0, "demo_ratio": 50.0, "eval_episodes": 2}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _fit(config: Path, root: Path, *extra: str):
    return build_cli(["fit", "--config", str(config), "--trainer.default_root_dir", str(root), *extra])


def _eval_returns(cli) -> dict[int, float]:
    client = MlflowClient(cli.trainer.logger._tracking_uri)
    return {m.step: m.value for m in client.get_metric_history(cli.trainer.logger.run_id, "eval/return_mean")}


def _saved_episode(checkpoint: str) -> dict:
    """The training episode under way that a checkpoint recorded."""
    return torch.load(checkpoint, weights_only=False)["OfflineToOnlineDataModule"]["episodes"][0]


def _assert_same_state(resumed, straight) -> None:
    for name, value in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name
    saved, ours = straight.trainer.optimizers[0].state_dict(), resumed.trainer.optimizers[0].state_dict()
    for index, moments in saved["state"].items():
        for key, value in moments.items():
            assert torch.equal(ours["state"][index][key], value), (index, key)
    a, b = resumed.datamodule, straight.datamodule
    assert (a.frames, a.updates_done) == (b.frames, b.updates_done)
    for buffer in ("buffer", "demo_buffer"):
        mine, theirs = getattr(a, buffer), getattr(b, buffer)
        assert len(mine) == len(theirs)
        assert (mine.storage[:len(mine)] == theirs.storage[:len(theirs)]).all(), buffer


def test_resume_during_pretraining_continues_bit_identically_into_the_online_phase(monkeypatch, tmp_path):
    use_tmp_mlflow(monkeypatch, tmp_path)
    config = _config(tmp_path)
    straight = _fit(config, tmp_path / "straight")
    assert straight.datamodule.frames > 4  # the run went online, with random and policy frames
    first = _fit(config, tmp_path / "split", "--trainer.max_steps", "10")
    resumed = _fit(config, tmp_path / "split", "--ckpt_path", first.trainer.checkpoint_callback.last_model_path)
    assert resumed.trainer.global_step == UPDATES
    _assert_same_state(resumed, straight)
    straight_returns, resumed_returns = _eval_returns(straight), _eval_returns(resumed)
    assert resumed_returns == {step: straight_returns[step] for step in resumed_returns} and len(resumed_returns) >= 3


@pytest.mark.parametrize("memmap", [False, True], ids=["ram", "buffer_dir"])
def test_resume_mid_episode_continues_the_episode_bit_identically(monkeypatch, tmp_path, memmap):
    """A stop 5 frames into an online episode (of 30), between two evaluations: the resumed run replays the
    episode's actions from its seed and goes on as the run that never stopped, with no prefetched batch counted or
    lost. (The stopped run evaluates its final weights before its last checkpoint: that changes nothing either.)
    With ``data.buffer_dir`` the buffers live in memory-mapped files, with the same result."""
    use_tmp_mlflow(monkeypatch, tmp_path)
    config = _config(tmp_path)
    extra = ("--data.init_args.buffer_dir", str(tmp_path / "mm")) if memmap else ()
    straight = _fit(config, tmp_path / "straight", *extra)
    first = _fit(config, tmp_path / "split", *extra, "--trainer.max_steps", "25")
    saved = first.datamodule
    assert (saved.updates_done, saved.frames) == (25, 25 - PRETRAIN)  # one frame per online update, none ahead
    path = first.trainer.checkpoint_callback.last_model_path
    assert _saved_episode(path)["actions"].shape[0] == 25 - PRETRAIN  # mid-episode: 5 of its 30 steps taken
    resumed = _fit(config, tmp_path / "split", *extra, "--ckpt_path", path)
    assert resumed.datamodule.frames == UPDATES - PRETRAIN
    assert isinstance(resumed.datamodule.buffer.storage, LazyMemmapStorage) == memmap
    _assert_same_state(resumed, straight)
    straight_returns, resumed_returns = _eval_returns(straight), _eval_returns(resumed)
    shared = set(resumed_returns) & set(straight_returns)  # the stopped run's extra evaluation at 25 is its own
    assert {step: resumed_returns[step] for step in shared} == {step: straight_returns[step] for step in shared}
    assert len(shared) >= 2


def test_an_env_that_does_not_replay_its_episode_starts_the_next_one(monkeypatch, tmp_path):
    """If the replayed episode differs from the saved one (a non-deterministic env), the resumed run warns, starts
    the next episode and keeps every counter in step."""
    use_tmp_mlflow(monkeypatch, tmp_path)
    config = _config(tmp_path)
    first = _fit(config, tmp_path / "split", "--trainer.max_steps", "30")
    path = first.trainer.checkpoint_callback.last_model_path
    index = _saved_episode(path)["index"]
    monkeypatch.setattr("arsq_lightning.envs.episodes.episode_seed", lambda seed, episode: seed + episode + 12345)
    with pytest.warns(UserWarning, match=f"did not reproduce its unfinished episode {index}"):
        resumed = _fit(config, tmp_path / "split", "--trainer.max_steps", "32", "--ckpt_path", path)
    assert (resumed.datamodule.frames, resumed.datamodule.updates_done) == (32 - PRETRAIN, 32)
    assert _saved_episode(resumed.trainer.checkpoint_callback.last_model_path)["index"] == index + 1


SCHEDULE = ("--model.lr_scheduler.class_path", "torch.optim.lr_scheduler.MultiStepLR",
            "--model.lr_scheduler.init_args.milestones", "[30]", "--model.lr_scheduler.init_args.gamma", "0.1")


def test_resume_before_a_learning_rate_step_continues_bit_identically(monkeypatch, tmp_path):
    """A learning rate cut tenfold after update 30: a run stopped at 25 resumes with the schedule's state and
    ends as the run that never stopped, at the cut rate."""
    use_tmp_mlflow(monkeypatch, tmp_path)
    config = _config(tmp_path)
    straight = _fit(config, tmp_path / "straight", *SCHEDULE)
    assert straight.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(3e-5)
    client = MlflowClient(straight.trainer.logger._tracking_uri)
    logged = {m.step: m.value for m in client.get_metric_history(straight.trainer.logger.run_id, "train/lr")}
    assert logged[29] == pytest.approx(3e-4) and logged[34] == pytest.approx(3e-5)  # the rate of updates 30 and 35
    first = _fit(config, tmp_path / "split", *SCHEDULE, "--trainer.max_steps", "25")
    assert first.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(3e-4)
    resumed = _fit(config, tmp_path / "split", *SCHEDULE, "--ckpt_path",
                   first.trainer.checkpoint_callback.last_model_path)
    assert resumed.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(3e-5)
    _assert_same_state(resumed, straight)


NSTEP = ("--data.init_args.n_step", "3", "--data.init_args.max_episode_steps", "8")


def test_resume_mid_episode_with_nstep_rows_continues_bit_identically(monkeypatch, tmp_path):
    """With 3-step rows an online episode's rows enter the RL buffer when it ends (episodes of 8 steps here), so a
    checkpoint 5 steps into an episode holds those 5 rows: the resumed run finishes the episode with them and goes on
    as the run that never stopped."""
    use_tmp_mlflow(monkeypatch, tmp_path)
    config = _config(tmp_path)
    straight = _fit(config, tmp_path / "straight", *NSTEP)
    data = straight.datamodule
    online = data.buffer.storage[len(data.split.rl):len(data.buffer)]
    assert online.numel() == 16  # two finished episodes of the 20 online frames, n-step rows
    assert online["nstep_rewards"].shape == (16, 3) and online["steps_to_next_obs"].tolist() == ([3] * 6 + [2, 1]) * 2
    first = _fit(config, tmp_path / "split", *NSTEP, "--trainer.max_steps", "25")
    path = first.trainer.checkpoint_callback.last_model_path
    assert len(first.datamodule.buffer) == len(data.split.rl)  # the 5 online rows wait for their episode's end
    resumed = _fit(config, tmp_path / "split", *NSTEP, "--ckpt_path", path)
    _assert_same_state(resumed, straight)


def test_rows_of_an_episode_that_cannot_be_continued_enter_the_buffer_cut(monkeypatch, tmp_path):
    """A resume that cannot replay the unfinished episode keeps its rows: they enter the RL buffer as n-step rows of
    an episode cut where the checkpoint was taken."""
    use_tmp_mlflow(monkeypatch, tmp_path)
    config = _config(tmp_path)
    first = _fit(config, tmp_path / "split", *NSTEP, "--trainer.max_steps", "30")  # 10 online frames: 8 + 2
    stored = len(first.datamodule.buffer)
    monkeypatch.setattr("arsq_lightning.envs.episodes.episode_seed", lambda seed, episode: seed + episode + 12345)
    with pytest.warns(UserWarning, match="did not reproduce its unfinished episode"):
        resumed = _fit(config, tmp_path / "split", *NSTEP, "--trainer.max_steps", "32", "--ckpt_path",
                       first.trainer.checkpoint_callback.last_model_path)
    buffer = resumed.datamodule.buffer
    assert len(buffer) == stored + 2
    assert buffer.storage[stored:stored + 2]["steps_to_next_obs"].tolist() == [2, 1]


def test_resume_with_several_envs_continues_every_envs_episode_bit_identically(monkeypatch, tmp_path):
    """Two envs side by side, stopped 3 steps into each one's first online episode: each replays its own actions
    from its own seed and the resumed run goes on as the one that never stopped. A resume with another number of
    envs says so and starts new episodes."""
    use_tmp_mlflow(monkeypatch, tmp_path)
    config = _config(tmp_path)
    two = ("--data.init_args.num_envs", "2", "--data.init_args.frames_per_batch", "2")
    straight = _fit(config, tmp_path / "straight", *two)
    first = _fit(config, tmp_path / "split", *two, "--trainer.max_steps", "25")
    assert first.datamodule.frames == 6  # 3 collections of one step per env, one update per frame
    path = first.trainer.checkpoint_callback.last_model_path
    saved = torch.load(path, weights_only=False)["OfflineToOnlineDataModule"]["episodes"]
    assert [(e["index"], e["actions"].shape[0]) for e in saved] == [(0, 3), (0, 3)]
    assert not torch.equal(saved[0]["actions"], saved[1]["actions"])
    resumed = _fit(config, tmp_path / "split", *two, "--ckpt_path", path)
    assert resumed.trainer.global_step == UPDATES
    _assert_same_state(resumed, straight)
    straight_returns, resumed_returns = _eval_returns(straight), _eval_returns(resumed)
    shared = set(resumed_returns) & set(straight_returns)
    assert {step: resumed_returns[step] for step in shared} == {step: straight_returns[step] for step in shared}
    assert len(shared) >= 2
    with pytest.warns(UserWarning, match="collected with 2 envs, this one with data.num_envs 1"):
        single = _fit(config, tmp_path / "split", "--trainer.max_steps", str(UPDATES + 5),
                      "--ckpt_path", resumed.trainer.checkpoint_callback.last_model_path)
    assert (single.datamodule.frames, single.datamodule.updates_done) == (UPDATES - PRETRAIN + 5, UPDATES + 5)


def test_a_resume_continues_its_mlflow_run_without_duplicate_points(monkeypatch, tmp_path):
    """Resumed twice, once from a checkpoint older than what the run had logged since (as after a kill): one run,
    FINISHED, every metric step logged once, the changed budget recorded as a tag."""
    uri = use_tmp_mlflow(monkeypatch, tmp_path)
    config = _config(tmp_path)
    first = _fit(config, tmp_path / "run", "--trainer.max_steps", "10")
    older = tmp_path / "step10.ckpt"
    last = Path(first.trainer.checkpoint_callback.last_model_path)
    shutil.copyfile(last, older)  # a checkpoint is copied with its buffers folder
    shutil.copytree(last.parent / "buffers" / "update-10", tmp_path / "buffers" / "update-10")
    second = _fit(config, tmp_path / "run", "--trainer.max_steps", "20", "--ckpt_path", str(older))
    third = _fit(config, tmp_path / "run", "--trainer.max_steps", "30", "--ckpt_path", str(older))
    assert first.trainer.logger.run_id == second.trainer.logger.run_id == third.trainer.logger.run_id
    client, run = only_run(uri)
    assert run.info.status == "FINISHED"
    for key in ("train/loss", "eval/return_mean", "train/env_frames"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert len(steps) == len(set(steps)) and max(steps) == 29, key
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/return_mean")] == [9, 19, 29]
    assert run.data.params["trainer/max_steps"] == "10"
    assert run.data.tags["arsq.changed.trainer/max_steps"] == "10 -> 30"


def test_buffers_live_beside_the_checkpoint_one_folder_per_save_and_a_lost_folder_is_one_line(monkeypatch, tmp_path,
                                                                                                capsys):
    """The ``.ckpt`` holds no buffer rows (its size does not grow with the data); folders no checkpoint refers to
    are removed; resuming a checkpoint whose folder is gone fails with one line before anything starts."""
    use_tmp_mlflow(monkeypatch, tmp_path)
    config = _config(tmp_path)
    first = _fit(config, tmp_path / "run", "--trainer.max_steps", "30")
    directory = Path(first.trainer.checkpoint_callback.dirpath)
    saved = torch.load(directory / "last.ckpt", weights_only=False)
    state = saved[type(first.datamodule).__qualname__]
    assert state["buffer_folder"] == "buffers/update-30" and "buffers" not in state
    assert sorted(p.name for p in (directory / "buffers").iterdir()) == ["update-30"]  # 10 and 20 pruned
    rows = first.datamodule.buffer.storage[:len(first.datamodule.buffer)]
    on_disk = TensorDict.load_memmap(directory / "buffers" / "update-30" / "rank-0" / "replay")
    assert (on_disk == rows).all() and on_disk.batch_size == rows.batch_size
    shutil.rmtree(directory / "buffers")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--ckpt_path", str(directory / "last.ckpt")])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("arsq: error:")]
    assert len(errors) == 1 and "its replay buffers are missing" in errors[0], errors


def test_pixel_run_resumes_bit_identically_from_frames_kept_once(monkeypatch, tmp_path):
    """The shipped DMC pixel config, tiny, stopped mid-episode: its buffer is saved as frame ids plus each frame
    once, and the resumed run equals the one that never stopped (weights, buffer rows, evaluations)."""
    use_tmp_mlflow(monkeypatch, tmp_path)
    config = Path(__file__).parents[2] / "configs" / "dmc" / "cheetah_run_pixels.yaml"
    tiny = ["--trainer.val_check_interval", "6", "--trainer.enable_progress_bar", "false",
            "--data.init_random_frames", "16", "--data.learning_starts", "16", "--data.batch_size", "8",
            "--data.eval_episodes", "1", "--data.max_episode_steps", "10", "--seed_everything", "2",
            "--data.env_kwargs", '{"observation": "pixels", "image_size": 24, "frame_stack": 3, "action_repeat": 2}',
            "--model.encoder.init_args.channels", "[4, 4]", "--model.encoder.init_args.strides", "[2, 2]",
            "--model.encoder.init_args.feature_dim", "8", "--model.head.init_args.hidden_dims", "[16]"]
    straight = _fit(config, tmp_path / "straight", *tiny, "--trainer.max_steps", "18")
    first = _fit(config, tmp_path / "split", *tiny, "--trainer.max_steps", "9")
    path = first.trainer.checkpoint_callback.last_model_path
    folder = next(Path(path).parent.glob("buffers/update-9/rank-0"))
    assert (folder / "replay-frames").is_dir()
    resumed = _fit(config, tmp_path / "split", *tiny, "--trainer.max_steps", "18", "--ckpt_path", path)
    for name, value in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name
    a, b = resumed.datamodule.buffer, straight.datamodule.buffer
    assert len(a) == len(b) and (a.storage[:len(a)] == b.storage[:len(b)]).all()
    assert len(a.storage.pool) == len(b.storage.pool)
    after = [{step: value for step, value in _eval_returns(cli).items() if step > 9} for cli in (resumed, straight)]
    assert after[0] == after[1] and len(after[0]) == 2  # the evaluations after updates 12 and 18
