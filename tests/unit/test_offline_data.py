"""OfflineToOnlineDataModule: exact mixing, buffer contents, the offline -> online phase switch in one fit,
rounds of trajectories, and relabelling (docs/algorithm.md §4.1-§4.2, §8.4)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from tensordict import TensorDict

from arsq_lightning import ARSQModule, ConfigError, OfflineToOnlineDataModule, read_d4rl_hdf5, write_d4rl_hdf5
from arsq_lightning.cli import build_cli
from arsq_lightning.data.d4rl import auto_reward_scale, max_reward_scale, returns_to_go

from helpers import REPO, TINY, config_args, use_tmp_mlflow, write_random_dataset

HOPPER_MR = REPO / "configs" / "d4rl" / "hopper_medium_replay.yaml"


@pytest.fixture(scope="module")
def hopper_file(tmp_path_factory):
    return write_random_dataset("Hopper-v5", tmp_path_factory.mktemp("data") / "hopper.hdf5", steps=300)


def _attach(data: OfflineToOnlineDataModule, rank: int = 0) -> OfflineToOnlineDataModule:
    data.trainer = SimpleNamespace(global_rank=rank, world_size=1, lightning_module=ARSQModule(data.env_spec),
                                   state=SimpleNamespace(fn="fit"), logger=None,
                                   checkpoint_callback=None, global_step=0, ckpt_path=None)
    data.setup("fit")
    return data


def test_every_batch_mixes_demo_and_rl_rows_exactly(hopper_file):
    data = _attach(OfflineToOnlineDataModule("Hopper-v5", dataset=str(hopper_file), batch_size=16,
                                             demo_fraction=0.25, demo_percentile=100.0, demo_ratio=30.0,
                                             buffer_size=1000, online=False))
    data.train_dataloader()
    demo_obs = {tuple(row.tolist()) for row in data.split.demo["observation"]}
    assert len(data.buffer) == data.split.rl.numel() and len(data.demo_buffer) == data.split.demo.numel()
    for _ in range(10):
        batch = data.next_batch()
        assert batch.shape == (16,) and int(batch["demo"].sum()) == 4 and batch["demo"][:4].all()
        assert all(tuple(row.tolist()) in demo_obs for row in batch["observation"][:4])
    assert data.frames == 0 and data.phase == "offline"  # never touched the env


def test_small_rl_buffer_keeps_the_highest_return_rows(hopper_file):
    data = _attach(OfflineToOnlineDataModule("Hopper-v5", dataset=str(hopper_file), batch_size=8, buffer_size=50,
                                             online=False))
    data.train_dataloader()
    kept = data.buffer.storage[:50]["observation"]
    assert torch.equal(kept, data.split.rl["observation"][-50:])


def test_dataset_must_match_the_env(hopper_file):
    with pytest.raises(ConfigError, match="observations have 11 dims but the env's have 17"):
        OfflineToOnlineDataModule("HalfCheetah-v5", dataset=str(hopper_file))
    with pytest.raises(ConfigError, match="data.dataset is empty"):
        OfflineToOnlineDataModule("Hopper-v5")
    with pytest.raises(ConfigError, match="reward_scale must be 'auto', 'max_reward' or a positive number, got -1.0"):
        OfflineToOnlineDataModule("Hopper-v5", dataset=str(hopper_file), reward_scale=-1.0)


class _Recorder(Callback):
    def __init__(self):
        self.frames: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.frames.append(trainer.datamodule.frames)


@pytest.mark.e2e  # a whole run through the CLI: outside the fast unit selection
def test_offline_then_online_in_one_fit(hopper_file, monkeypatch, tmp_path):
    use_tmp_mlflow(monkeypatch, tmp_path)
    cli = build_cli([*config_args(HOPPER_MR), *TINY, "--data.dataset", str(hopper_file),
                     "--data.pretrain_steps", "20", "--trainer.max_steps", "40", "--data.trajectories_per_round", "0",
                     "--model.critic.init_args.compile_act", "false"], run=False)
    recorder = _Recorder()
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    frames = recorder.frames
    assert len(frames) == 40 and cli.trainer.global_step == 40
    assert frames[:19] == [0] * 19  # offline: no env frame (one batch is prefetched, so step 20 may hold frames)
    assert frames[-1] >= 20 - 1 and all(b >= a for a, b in zip(frames, frames[1:]))  # one frame per online update
    assert cli.datamodule.phase == "online"
    assert "eval/normalized_score" in cli.trainer.callback_metrics


def test_updates_wait_for_whole_trajectories(hopper_file):
    data = _attach(OfflineToOnlineDataModule("Hopper-v5", dataset=str(hopper_file), batch_size=8, buffer_size=1000,
                                             trajectories_per_round=1, utd_ratio=2.0, max_episode_steps=10))
    data.train_dataloader()
    while data._episodes_in_round == 0 and data._round_frames == 0:
        assert data.updates_owed() <= 0
        data.collect()
    assert data.updates_owed() == 2 * data.frames  # utd 2 x all frames of the finished episode(s)


def _episode(length: int, reward: float, done_at_end: bool = True) -> TensorDict:
    done = torch.zeros(length, 1, dtype=torch.bool)
    done[-1] = done_at_end
    return TensorDict({"observation": torch.randn(length, 11), "action": torch.zeros(length, 3),
                       "next": {"observation": torch.randn(length, 11), "reward": torch.full((length, 1), reward),
                                "terminated": done.clone(), "truncated": torch.zeros(length, 1, dtype=torch.bool),
                                "done": done.clone()}}, batch_size=[length])


def test_relabelling_adds_only_episodes_that_reach_the_demo_mean_return(hopper_file):
    data = _attach(OfflineToOnlineDataModule("Hopper-v5", dataset=str(hopper_file), batch_size=8, buffer_size=1000,
                                             relabel=True, reward_scale=2.0))
    data.train_dataloader()
    threshold = data.split.demo_mean_episode_return
    demo_before, rl_before = len(data.demo_buffer), len(data.buffer)
    good_reward = threshold / 5 / 2 + 1.0  # 5 steps; stored rewards are scaled by 2
    bad_reward = threshold / 5 / 2 - 1.0
    first_half = _episode(3, good_reward, done_at_end=False)  # a good episode split over two collector batches
    data.store(torch.cat([_episode(4, bad_reward), first_half]).unsqueeze(0))  # [1 env, steps]
    assert len(data.demo_buffer) == demo_before  # the bad one finished below the threshold, the good one is open
    data.store(_episode(2, good_reward).unsqueeze(0))
    assert len(data.demo_buffer) == demo_before + 5 and data.relabelled_episodes == 1
    added = data.demo_buffer.storage[demo_before:demo_before + 5]
    assert added["demo"].all()
    torch.testing.assert_close(added["next", "reward"], torch.full((5, 1), good_reward * 2))
    assert len(data.buffer) == rl_before + 9 and not data.buffer.storage[rl_before:rl_before + 9]["demo"].any()


def test_with_nstep_rows_an_episode_enters_both_buffers_as_nstep_rows_when_it_ends(hopper_file):
    """``n_step 3``: the dataset's rows and a finished online episode's rows (RL buffer, and the demo buffer when it is
    relabelled) carry the next rewards of their episode; an unfinished episode's rows wait."""
    data = _attach(OfflineToOnlineDataModule("Hopper-v5", dataset=str(hopper_file), batch_size=8, buffer_size=1000,
                                             relabel=True, reward_scale=1.0, n_step=3))
    data.train_dataloader()
    assert data.buffer.storage[:len(data.buffer)]["nstep_rewards"].shape == (len(data.buffer), 3)
    demo_before, rl_before = len(data.demo_buffer), len(data.buffer)
    data.store(_episode(3, 1e6, done_at_end=False).unsqueeze(0))
    assert (len(data.buffer), len(data.demo_buffer)) == (rl_before, demo_before)
    data.store(_episode(2, 1e6).unsqueeze(0))
    for buffer, before in ((data.buffer, rl_before), (data.demo_buffer, demo_before)):
        added = buffer.storage[before:before + 5]
        assert len(buffer) == before + 5 and added["steps_to_next_obs"].tolist() == [3, 3, 3, 2, 1]
        torch.testing.assert_close(added["nstep_rewards"][3], torch.tensor([1e6, 1e6, 0.0]))
    assert data.demo_buffer.storage[demo_before:demo_before + 5]["demo"].all()


def test_resume_restores_both_buffers_and_keeps_updating(hopper_file):
    kwargs = dict(dataset=str(hopper_file), batch_size=8, buffer_size=1000, relabel=True, max_episode_steps=10)
    data = _attach(OfflineToOnlineDataModule("Hopper-v5", pretrain_steps=3, **kwargs))
    data.train_dataloader()
    for _ in range(30):  # 3 offline updates, then online collection with updates
        data.next_batch()
    data.store(_episode(5, 1e6).unsqueeze(0))  # relabelled into the demo buffer
    state = data.state_dict()
    resumed = _attach(OfflineToOnlineDataModule("Hopper-v5", pretrain_steps=3, **kwargs))
    resumed.load_state_dict(state)
    resumed.train_dataloader()
    for name in ("buffer", "demo_buffer"):
        before, after = getattr(data, name), getattr(resumed, name)
        assert len(after) == len(before)
        assert torch.equal(after.storage[:len(after)]["observation"], before.storage[:len(before)]["observation"])
    assert resumed.frames == data.frames and resumed.updates_done == data.updates_done
    assert resumed.updates_owed() == data.updates_owed()  # no stall: the same updates are due as before saving


def test_cli_fails_fast_on_a_corrupt_dataset_and_leaves_it_untouched(monkeypatch, tmp_path, capsys):
    from arsq_lightning.cli import main

    use_tmp_mlflow(monkeypatch, tmp_path)
    corrupt = tmp_path / "corrupt.hdf5"
    corrupt.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 64)  # an HDF5 signature and nothing valid after it
    before = corrupt.read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *config_args(HOPPER_MR), "--data.dataset", str(corrupt)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(corrupt) in err.splitlines()[0]
    assert corrupt.read_bytes() == before


def _fit_weights(config: Path, dataset: Path, *extra: str) -> dict[str, torch.Tensor]:
    cli = build_cli(["--config", str(config), *TINY, "--data.dataset", str(dataset), "--data.online", "false",
                     "--trainer.max_steps", "12", *extra], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return {k: v.clone() for k, v in cli.model.critic.state_dict().items()}


@pytest.mark.e2e  # a whole run through the CLI: outside the fast unit selection
@pytest.mark.parametrize("rule", ["auto", "max_reward"])
def test_rescaled_rewards_train_the_default_recipe_identically(rule, monkeypatch, tmp_path):
    """``reward_scale: auto`` divides rewards by the dataset's largest discounted return-to-go (``max_reward``: by
    the largest reward), so the same data with rewards x8 (a power of two: exact in floating point) trains
    bit-identical weights; a fixed scale does not."""
    from arsq_lightning.tools import make_demos

    dense = tmp_path / "dense.hdf5"
    make_demos.main(["--task", "reach-v3", "--episodes", "2", "--noise", "0.3", "--reward", "dense",
                     "--max-episode-steps", "40", "--out", str(dense)])
    data = read_d4rl_hdf5(dense)
    data["next", "reward"] = data["next", "reward"] * 8
    scaled = tmp_path / "dense_x8.hdf5"
    write_d4rl_hdf5(scaled, data)
    use_tmp_mlflow(monkeypatch, tmp_path)
    config = REPO / "configs" / "metaworld" / "from_dataset.yaml"
    first, second = (_fit_weights(config, path, "--data.reward_scale", rule) for path in (dense, scaled))
    assert all(torch.equal(first[k], second[k]) for k in first)
    fixed = _fit_weights(config, scaled, "--data.reward_scale", "1.0")
    assert not all(torch.equal(first[k], fixed[k]) for k in first)


def test_auto_reward_scale_is_one_over_the_largest_discounted_return():
    episodes = torch.tensor([0, 0, 0, 1, 1])
    rewards = torch.tensor([1.0, -2.0, 4.0, 3.0, 3.0])
    data = TensorDict({"episode": episodes, "next": {"reward": rewards.unsqueeze(-1)}}, batch_size=[5])
    expected = [1 - 0.5 * 2 + 0.25 * 4, -2 + 0.5 * 4, 4.0, 3 + 0.5 * 3, 3.0]
    assert returns_to_go(data, 0.5).tolist() == expected
    assert auto_reward_scale(data, 0.5) == 1 / 4.5
    silent = TensorDict({"episode": episodes, "next": {"reward": torch.zeros(5, 1)}}, batch_size=[5])
    with pytest.warns(UserWarning, match="every reward in the dataset is zero"):
        assert auto_reward_scale(silent, 0.5) == 1.0
    assert max_reward_scale(data) == 1 / 4.0
    with pytest.warns(UserWarning, match="every reward in the dataset is zero"):
        assert max_reward_scale(silent) == 1.0
