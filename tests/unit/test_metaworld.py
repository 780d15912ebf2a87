"""Meta-World: env construction and specs, sparse success reward and termination, seeded resets, offscreen pixels,
scripted-expert demos (arsq-demos) and their loading into the demo buffer of an ``arsq fit`` run."""

from __future__ import annotations

import sys

import h5py
import numpy as np
import pytest
import torch
from torchrl.envs.utils import check_env_specs

from arsq_lightning import make_env, read_d4rl_hdf5
from arsq_lightning.cli import build_cli
from arsq_lightning.data.datasets import check_against_env
from arsq_lightning.envs.core import env_spec_of
from arsq_lightning.tools import make_demos

from helpers import REPO, TINY, only_run, use_tmp_mlflow

REACH = "metaworld:reach-v3"
CONFIG = REPO / "configs" / "metaworld" / "reach-v3.yaml"
REACH_SUCCESS_DISTANCE = 0.05  # Meta-World reach-v3: success when the gripper centre is within 5 cm of the goal


def _expert_episode(env, seed: int, noise: float = 0.0, distances: list | None = None):
    """One reach-v3 episode of the scripted expert; ``distances`` receives the gripper-goal distance after each step
    (read from the simulator, not from the env's reward)."""
    env.set_seed(seed)
    expert = make_demos.NoisyExpert("reach-v3", env, noise, 0.0, np.random.default_rng(seed))
    sim = env.base_env.sim

    def act(td):
        if distances is not None:
            distances.append(float(np.linalg.norm(sim.tcp_center - sim._target_pos)))
        return expert(td)

    episode = env.rollout(env.base_env.max_episode_steps, act, break_when_any_done=True)
    if distances is not None:
        distances[:] = distances[1:] + [float(np.linalg.norm(sim.tcp_center - sim._target_pos))]
    return episode


def test_state_env_spec_matches_a_real_step():
    spec = env_spec_of(REACH, max_episode_steps=20)
    env = make_env(REACH, seed=0, max_episode_steps=20)
    check_env_specs(env)
    rollout = env.rollout(25, break_when_any_done=False)  # crosses one time limit
    assert rollout["observation"].shape == (25, spec.obs_dim) and spec.observation_shapes is None
    assert spec.action_low == [-1.0] * 4 and spec.action_high == [1.0] * 4
    assert rollout["action"].abs().max() <= 1.0
    truncated = rollout["next", "truncated"].reshape(-1)
    assert truncated.nonzero().reshape(-1).tolist() == [19]  # the 20th step ends the episode by time limit
    assert not rollout["next", "terminated"].any() and float(rollout["next", "reward"].sum()) == 0.0
    env.close()


def test_sparse_reward_is_one_exactly_on_success_and_ends_the_episode():
    env = make_env(REACH, seed=0, max_episode_steps=200)
    lengths = []
    for seed in (0, 1):
        distance: list[float] = []
        episode = _expert_episode(env, seed, distances=distance)
        reward = episode["next", "reward"].reshape(-1)
        lengths.append(len(reward))
        assert reward[-1] == 1.0 and torch.all(reward[:-1] == 0.0) and len(reward) < 200
        assert distance[-1] <= REACH_SUCCESS_DISTANCE and min(distance[:-1]) > REACH_SUCCESS_DISTANCE
        assert episode["next", "terminated"][-1].item() and not episode["next", "truncated"].any()
        assert episode["next", "success"].reshape(-1).tolist() == [False] * (len(reward) - 1) + [True]
    env.close()


def test_dense_reward_is_shaped_and_success_ends_the_episode_only_when_asked():
    sparse = make_env(REACH, seed=0, max_episode_steps=200)
    success_step = _expert_episode(sparse, 0).numel()  # the step on which the expert succeeds (seed 0)
    dense = make_env(REACH, seed=0, max_episode_steps=200, reward="dense")
    shaped = _expert_episode(dense, 0)  # the default: success does not end a dense episode
    assert shaped.numel() == 200 and not shaped["next", "terminated"].any() and shaped["next", "truncated"][-1]
    first_success = int(shaped["next", "success"].reshape(-1).float().argmax()) + 1
    assert first_success == success_step and 0.0 < float(shaped["next", "reward"][0]) < 10.0
    ending = make_env(REACH, seed=0, max_episode_steps=200, reward="dense", terminate_on_success=True)
    ended = _expert_episode(ending, 0)
    assert ended.numel() == success_step and ended["next", "terminated"][-1].item()
    torch.testing.assert_close(ended["next", "reward"], shaped["next", "reward"][:success_step])
    for env in (sparse, dense, ending):
        env.close()


def test_seeded_resets_are_reproducible_and_seeds_differ():
    env = make_env(REACH, seed=3, max_episode_steps=50)
    first = [env.reset()["observation"] for _ in range(2)]
    env.set_seed(3)
    again = [env.reset()["observation"] for _ in range(2)]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0][-3:], first[1][-3:])  # a new goal at every reset
    other = make_env(REACH, seed=4, max_episode_steps=50)
    assert not torch.equal(other.reset()["observation"][-3:], first[0][-3:])
    env.close()
    other.close()


@pytest.fixture(scope="module")
def pixel_rollout():
    cameras = ["corner", "corner2", "corner3", "gripperPOV"]
    env = make_env(REACH, seed=0, max_episode_steps=20, observation="pixels", cameras=cameras, image_size=64,
                   include_state=True)
    check_env_specs(env)
    rollout = env.rollout(3)
    env.close()
    return cameras, rollout


def test_pixels_have_the_configured_size_and_are_not_black(pixel_rollout):
    cameras, rollout = pixel_rollout
    spec = env_spec_of(REACH, observation="pixels", cameras=cameras, image_size=64, include_state=True)
    assert spec.observation_shapes == {"pixels": [4, 3, 64, 64], "proprio": [4], "state": [39]}
    pixels = rollout["next", "observation", "pixels"]
    assert pixels.shape == (3, 4, 3, 64, 64) and pixels.dtype == torch.uint8
    frames = pixels.float()
    assert torch.all(frames.mean(dim=(2, 3, 4)) > 30)  # every view of every step is lit
    assert torch.all(frames.std(dim=(2, 3, 4)) > 10)  # and shows structure, not a constant colour
    obs = rollout["next", "observation"]
    torch.testing.assert_close(obs["proprio"], obs["state"][:, :4])


def test_corner_cameras_are_upright(pixel_rollout):
    """The corner cameras see the plain background above the table: the top of an upright frame varies less."""
    _, rollout = pixel_rollout
    gray = rollout["next", "observation", "pixels"][-1, :3].float().mean(1)  # corner, corner2, corner3: [3, H, W]
    quarter = gray.shape[1] // 4
    top, bottom = gray[:, :quarter].flatten(1).std(-1), gray[:, -quarter:].flatten(1).std(-1)
    assert torch.all(top < bottom), (top, bottom)


def test_fast_rendering_shows_the_same_scene():
    frames = []
    for fast in (True, False):
        env = make_env(REACH, seed=0, max_episode_steps=10, observation="pixels", cameras=["corner2"], image_size=64,
                       fast_render=fast)
        frames.append(env.reset()["observation", "pixels"].float())
        env.close()
    assert (frames[0] - frames[1]).abs().mean() < 25  # shadows / anti-aliasing differ, the picture does not


def test_make_demos_writes_a_readable_file_of_successful_expert_episodes(tmp_path):
    out = tmp_path / "reach.hdf5"
    meta = make_demos.main(["--task", "reach-v3", "--episodes", "3", "--max-episode-steps", "150",
                            "--out", str(out)])
    assert meta["success_rate"] == 1.0 and meta["episodes"] == 3
    data = read_d4rl_hdf5(out)
    assert float(data["next", "reward"].sum()) == 3.0 and int(data["next", "terminated"].sum()) == 3
    assert torch.equal(data["next", "reward"].bool(), data["next", "terminated"])
    within = ~data["next", "done"][:-1].reshape(-1)  # consecutive rows of one episode chain up
    torch.testing.assert_close(data["next", "observation"][:-1][within], data["observation"][1:][within])
    with h5py.File(out, "r") as f:
        assert f["metadata/source"][()].decode().startswith("Meta-World scripted expert (metaworld.policies)")
        assert list(f["metadata/returns"][()]) == [1.0, 1.0, 1.0]


def test_action_noise_changes_the_actions():
    env = make_env(REACH, seed=0, max_episode_steps=150)
    clean, noisy = _expert_episode(env, 7), _expert_episode(env, 7, noise=0.5)
    torch.testing.assert_close(clean["observation"][0], noisy["observation"][0])  # same task instance
    assert (clean["action"][0] - noisy["action"][0]).abs().max() > 1e-3
    assert noisy["action"].abs().max() <= 1.0
    env.close()


def test_make_demos_pixels_round_trip(tmp_path):
    out = tmp_path / "reach_pixels.hdf5"
    kwargs = dict(observation="pixels", cameras=["corner2"], image_size=32, frame_stack=2)
    make_demos.main(["--task", "reach-v3", "--episodes", "1", "--max-episode-steps", "150", "--observation",
                     "pixels", "--cameras", "corner2", "--image-size", "32", "--frame-stack", "2", "--out", str(out)])
    with h5py.File(out, "r") as f:
        rows = len(f["actions"])
        assert f["observations/pixels"].shape == (rows, 1, 6, 32, 32) and f["observations/pixels"].dtype == np.uint8
    data = check_against_env(read_d4rl_hdf5(out), env_spec_of(REACH, **kwargs), str(out))
    assert data.numel() == rows and data["next", "terminated"][-1].item()  # terminal row kept, nothing dropped
    pixels = data["observation", "pixels"]
    assert pixels.dtype == torch.uint8 and pixels.float().std() > 10
    assert torch.equal(pixels[1:, :, :3], pixels[:-1, :, 3:])  # a stack's newest frame is the next stack's oldest
    torch.testing.assert_close(data["next", "observation", "proprio"][:-1], data["observation", "proprio"][1:])


@pytest.mark.e2e  # a whole run through the CLI: outside the fast unit selection
def test_fit_loads_the_demos_into_the_demo_buffer(monkeypatch, tmp_path):
    demos = tmp_path / "demos.hdf5"
    make_demos.main(["--task", "reach-v3", "--episodes", "2", "--noise", "0.2", "--max-episode-steps", "150",
                     "--out", str(demos)])
    use_tmp_mlflow(monkeypatch, tmp_path)
    cli = build_cli(["fit", "--config", str(CONFIG), *TINY, "--data.dataset", str(demos)])
    data = cli.datamodule
    file_rows = read_d4rl_hdf5(demos)
    assert cli.trainer.global_step == 30 and data.frames > 0
    assert len(data.demo_buffer) == file_rows.numel()  # the whole file is the demo window
    stored = data.demo_buffer.storage[:len(data.demo_buffer)]
    assert stored["demo"].all()
    assert sorted(map(tuple, stored["observation"].tolist())) == sorted(map(tuple, file_rows["observation"].tolist()))
    metrics = cli.trainer.callback_metrics
    assert metrics["eval/episodes"].item() == 2  # sparse success reward: the success rate is the mean return
    assert metrics["eval/success_rate"].item() == metrics["eval/return_mean"].item()


def test_missing_dataset_hint_is_a_valid_make_demos_command():
    from arsq_lightning.envs.metaworld import missing_dataset_hint

    hint = missing_dataset_hint("reach-v3", "demos/r.hdf5", observation="pixels", cameras=["corner2"], image_size=64,
                                frame_stack=3, max_episode_steps=150)
    words = hint.split()
    assert words[:4] == ["make", "it", "with:", "arsq-demos"]
    args = make_demos.parse_args(words[4:])
    assert (args.task, args.out, args.observation, args.cameras) == ("reach-v3", "demos/r.hdf5", "pixels", ["corner2"])
    assert (args.image_size, args.frame_stack, args.max_episode_steps) == (64, 3, 150)


def test_missing_demos_file_says_how_to_make_it(monkeypatch, tmp_path, capsys):
    """A Meta-World config whose demo file does not exist fails with one line naming the make_demos command."""
    from arsq_lightning.cli import main

    use_tmp_mlflow(monkeypatch, tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIG), "--data.dataset", "demos/none.hdf5"])
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("arsq: error:")]
    assert len(err) == 1 and "no such file" in err[0]
    assert "arsq-demos --task reach-v3" in err[0] and "--out demos/none.hdf5" in err[0]


def test_without_metaworld_installed_envs_and_make_demos_fail_with_one_line(monkeypatch, tmp_path, capsys):
    """``import metaworld...`` failing (the extra not installed) gives one line naming the extra, no traceback."""
    from arsq_lightning.errors import ConfigError

    monkeypatch.setitem(sys.modules, "metaworld.env_dict", None)  # None in sys.modules: the import raises
    with pytest.raises(ConfigError, match=r"pip install 'arsq-lightning\[metaworld\]'"):
        make_env("metaworld:reach-v3")
    assert make_demos.cli(["--task", "reach-v3", "--episodes", "1", "--out", str(tmp_path / "d.hdf5")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["arsq-demos: error: metaworld: envs need Meta-World: pip install 'arsq-lightning[metaworld]'"]
    assert not (tmp_path / "d.hdf5").exists()


def test_make_demos_mixes_noise_levels_and_random_episodes(tmp_path):
    """A mixed-quality file: the noise levels share the expert episodes, the random ones are spread evenly, the dense
    reward does not end episodes on success, and the metadata and ``infos/success`` agree with the rows."""
    out = tmp_path / "mixed.hdf5"
    meta = make_demos.main(["--task", "reach-v3", "--episodes", "6", "--random-episodes", "2", "--noise", "0.1", "0.5",
                            "--reward", "dense", "--max-episode-steps", "100", "--out", str(out)])
    assert meta["episode_noise"].tolist() == [0.1, 0.5, -1.0, 0.1, 0.5, -1.0]
    data = read_d4rl_hdf5(out)
    assert not data["next", "terminated"].any() and data.numel() == 6 * 100 and data["next", "truncated"].sum() == 6
    with h5py.File(out, "r") as f:
        success = torch.as_tensor(f["infos/success"][()])
        returns, episode_success = f["metadata/returns"][()], f["metadata/episode_success"][()]
        assert len(success) == 6 * 100
        assert episode_success.tolist() == success.view(6, 100).any(1).tolist()
        assert f["metadata/random_mean_return"][()] == pytest.approx(returns[[2, 5]].mean())
        assert f["metadata/data_success_rate"][()] == pytest.approx(episode_success.mean())
    assert episode_success[[0, 1]].all() and returns[[0, 1]].min() > returns[[2, 5]].max()  # expert beats random


class _ScriptedCritic(torch.nn.Module):
    """Stands in for a critic when acting: the task's scripted expert (``expert``) or a zero action."""

    def __init__(self, expert: bool):
        super().__init__()
        from metaworld.policies import ENV_POLICY_MAP

        self.discretizer = torch.nn.Module()
        self.discretizer.register_buffer("low", torch.zeros(4))
        self.policy = ENV_POLICY_MAP["reach-v3"]() if expert else None

    def act(self, obs, *, deterministic: bool, generator=None):
        if self.policy is None:
            return torch.zeros(obs.shape[0], 4)
        return torch.stack([torch.as_tensor(self.policy.get_action(o.numpy()), dtype=torch.float32).clamp(-1, 1)
                            for o in obs])


def test_evaluation_reports_success_with_the_dense_reward(tmp_path):
    """With the dense reward success neither ends the episode nor equals the return, and the evaluation still reports
    it: 1 for the scripted expert, 0 for a policy that never moves."""
    from arsq_lightning import OnlineDataModule

    data = OnlineDataModule(REACH, env_kwargs={"reward": "dense"}, max_episode_steps=60, eval_episodes=2)
    assert not data.env_spec.success_reward
    expert_return, length, expert_success = data.evaluate_episode(_ScriptedCritic(expert=True), 0)
    still_return, still_length, still_success = data.evaluate_episode(_ScriptedCritic(expert=False), 0)
    assert (expert_success, still_success) == (1.0, 0.0)
    assert length == still_length == 60 and expert_return > still_return > 0  # dense: no termination on success
    data.teardown("fit")


@pytest.mark.e2e  # a whole run through the CLI: outside the fast unit selection
def test_dense_reward_fit_logs_the_success_rate(monkeypatch, tmp_path):
    demos = tmp_path / "dense.hdf5"
    make_demos.main(["--task", "reach-v3", "--episodes", "2", "--noise", "0.2", "--reward", "dense",
                     "--max-episode-steps", "30", "--out", str(demos)])
    uri = use_tmp_mlflow(monkeypatch, tmp_path)
    cli = build_cli(["fit", "--config", str(REPO / "configs" / "metaworld" / "from_dataset.yaml"), *TINY,
                     "--data.dataset", str(demos), "--data.pretrain_steps", "10"])
    client, run = only_run(uri)
    history = client.get_metric_history(run.info.run_id, "eval/success_rate")
    assert len(history) >= 2 and all(0.0 <= m.value <= 1.0 for m in history)
    assert cli.trainer.callback_metrics["eval/return_mean"].item() > 1.0  # dense returns, not successes
    scale = cli.datamodule.reward_scale  # the recipe's reward_scale max_reward: 1 / the file's largest |reward|
    largest = float(read_d4rl_hdf5(demos)["next", "reward"].abs().max())
    assert scale == pytest.approx(1 / largest) and float(run.data.params["data/reward_scale"]) == pytest.approx(scale)
    with h5py.File(demos, "r") as f:  # the file's own per-episode record: the two noisy expert episodes
        data_success = float(f["metadata/data_success_rate"][()])
        best = float(f["metadata/episode_success"][int(np.argmax(f["metadata/returns"][:]))])
    assert float(run.data.params["data/success_rate"]) == pytest.approx(data_success)
    assert float(run.data.params["data/demo_success_rate"]) == best  # the recipe's top 30%: the better episode
