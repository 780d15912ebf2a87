"""Offline data: D4RL-layout HDF5 and Minari readers, validation errors, and the D4RL demo protocol
(docs/algorithm.md §4.1).

The files are small ones written here from real Hopper-v5 rollouts (uniform random actions: short episodes that end
in termination or in an 18-step time limit).
"""

from __future__ import annotations

import hashlib

import h5py
import numpy as np
import pytest
import torch
from tensordict import TensorDict

from arsq_lightning import ConfigError, env_spec_of, make_env
from arsq_lightning.data.d4rl import D4RL_REFERENCE_RETURNS, demo_window, normalized_score, split_demos
from arsq_lightning.data.datasets import check_against_env, read_d4rl_hdf5, read_minari, write_d4rl_hdf5


@pytest.fixture(scope="module")
def rollout() -> TensorDict:
    """~300 random Hopper-v5 transitions with episode ids, terminations and time-outs."""
    torch.manual_seed(0)
    env = make_env("Hopper-v5", seed=0, max_episode_steps=18)
    data = env.rollout(300, break_when_any_done=False).exclude("episode_reward", ("next", "episode_reward"))
    done = data["next", "done"].reshape(-1)
    data["episode"] = torch.cat([torch.zeros(1, dtype=torch.long), done[:-1].long().cumsum(0)])
    assert data["next", "terminated"].any() and (data["next", "truncated"] & ~data["next", "terminated"]).any()
    return data


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_d4rl_round_trip_with_extra_groups(rollout, tmp_path):
    path = tmp_path / "hopper.hdf5"
    write_d4rl_hdf5(path, rollout, metadata={"algorithm": "random", "policy_return": 12.5})
    with h5py.File(path, "a") as f:
        f["infos/qpos"] = np.zeros((rollout.numel(), 6))
    before = _digest(path)
    data = read_d4rl_hdf5(path)
    assert _digest(path) == before  # read-only
    assert data.numel() == rollout.numel()
    for key in ("observation", "action", ("next", "observation"), ("next", "reward"), ("next", "terminated")):
        torch.testing.assert_close(data[key], rollout[key].to(data[key].dtype))
    truncated_only = rollout["next", "truncated"] & ~rollout["next", "terminated"]
    assert torch.equal(data["next", "truncated"], truncated_only)
    assert torch.equal(data["episode"], rollout["episode"])


def test_d4rl_without_next_observations_derives_them_within_episodes(rollout, tmp_path):
    path = tmp_path / "no_next.hdf5"
    write_d4rl_hdf5(path, rollout)
    with h5py.File(path, "a") as f:
        del f["next_observations"]
    data = read_d4rl_hdf5(path)
    timeouts = (rollout["next", "truncated"] & ~rollout["next", "terminated"]).reshape(-1)
    keep = ~timeouts
    keep[-1] = bool(rollout["next", "terminated"][-1])  # the last row has no successor unless it is terminal
    assert data.numel() == int(keep.sum())
    kept = rollout[keep]
    inside = ~kept["next", "terminated"].reshape(-1)  # non-terminal rows: next obs is the true next obs
    torch.testing.assert_close(data["next", "observation"][inside], kept["next", "observation"][inside])
    torch.testing.assert_close(data["observation"], kept["observation"])


def _write_arrays(path, **overrides):
    n = 20
    arrays = {"observations": np.zeros((n, 11), np.float32), "actions": np.zeros((n, 3), np.float32),
              "rewards": np.ones(n, np.float32), "terminals": np.zeros(n, bool), "timeouts": np.zeros(n, bool)}
    arrays.update(overrides)
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            if value is not None:
                f[key] = value


@pytest.mark.parametrize("overrides, message", [
    ({"rewards": None}, "missing dataset(s) ['rewards']"),
    ({"actions": np.zeros((19, 3), np.float32)}, "different lengths"),
    ({"observations": np.full((20, 11), np.nan, np.float32)}, "'observations' contains NaN or inf (first at row 0)"),
    ({"actions": np.full((20, 3), np.inf, np.float32)}, "'actions' contains NaN or inf"),
    ({"rewards": np.ones((20, 2), np.float32)}, "'rewards' must hold one value per row"),
    ({"next_observations": np.zeros((20, 5), np.float32)}, "'next_observations' has shape (5,) per row"),
    ({"observations": np.zeros((0, 11), np.float32), "actions": np.zeros((0, 3), np.float32),
      "rewards": np.zeros(0, np.float32), "terminals": np.zeros(0, bool), "timeouts": np.zeros(0, bool)}, "empty"),
])
def test_bad_d4rl_files_fail_with_a_reason_and_stay_untouched(tmp_path, overrides, message):
    path = tmp_path / "bad.hdf5"
    _write_arrays(path, **overrides)
    before = _digest(path)
    with pytest.raises(ConfigError) as err:
        read_d4rl_hdf5(path)
    assert message in str(err.value) and str(path) in str(err.value)
    assert _digest(path) == before


def test_file_without_timeouts_warns_and_ends_episodes_at_terminals(tmp_path):
    path = tmp_path / "v1.hdf5"
    _write_arrays(path, timeouts=None, terminals=np.arange(20) % 5 == 4)
    with pytest.warns(UserWarning, match="no 'timeouts'"):
        data = read_d4rl_hdf5(path)
    assert data["episode"].tolist() == [i // 5 for i in range(20)][:data.numel()]


def test_not_hdf5_and_missing_file(tmp_path):
    text = tmp_path / "notes.hdf5"
    text.write_text("not a dataset")
    with pytest.raises(ConfigError, match="not an HDF5 file"):
        read_d4rl_hdf5(text)
    with pytest.raises(ConfigError, match="no such file"):
        read_d4rl_hdf5(tmp_path / "absent.hdf5")


def test_dataset_is_checked_against_the_env(rollout):
    spec = env_spec_of("Hopper-v5")
    assert check_against_env(rollout, spec, "x") is rollout
    with pytest.raises(ConfigError, match="observations have 11 dims but the env's have 17"):
        check_against_env(rollout, env_spec_of("HalfCheetah-v5"), "x")
    with pytest.raises(ConfigError, match="actions have 3 dims but the env's have 1"):
        check_against_env(rollout.exclude("observation").update({"observation": torch.zeros(rollout.numel(), 3)}),
                          env_spec_of("Pendulum-v1"), "x")
    wide = rollout.clone()
    wide["action"] = wide["action"] * 3
    with pytest.warns(UserWarning, match="outside the env's bounds"):
        clipped = check_against_env(wide, spec, "x")
    assert clipped["action"].abs().max() <= 1.0 and wide["action"].abs().max() > 1.0  # the input is not modified


def test_minari_reader_matches_the_episodes(tmp_path, monkeypatch):
    minari = pytest.importorskip("minari")
    import gymnasium as gym
    from minari.data_collector import EpisodeBuffer

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    env = gym.make("Hopper-v5", max_episode_steps=25)
    episodes = []
    for seed in range(3):
        obs, _ = env.reset(seed=seed)
        env.action_space.seed(seed)
        steps = {"observations": [obs], "actions": [], "rewards": [], "terminations": [], "truncations": []}
        while True:
            action = env.action_space.sample()
            obs, reward, term, trunc, _ = env.step(action)
            for key, value in zip(steps, (obs, action, reward, term, trunc)):
                steps[key].append(value)
            if term or trunc:
                break
        episodes.append({k: np.array(v) for k, v in steps.items()})
    buffers = [EpisodeBuffer(**ep, infos={}) for ep in episodes]
    minari.create_dataset_from_buffers("test/hopper/random-v0", buffers, env=env, algorithm_name="random")
    data = read_minari("test/hopper/random-v0", root=tmp_path)
    assert data.numel() == sum(len(ep["actions"]) for ep in episodes)
    first = episodes[0]
    n = len(first["actions"])
    torch.testing.assert_close(data["observation"][:n], torch.as_tensor(first["observations"][:-1]).float())
    torch.testing.assert_close(data["next", "observation"][:n], torch.as_tensor(first["observations"][1:]).float())
    assert data["observation"].abs().sum() > 0  # not TorchRL 0.14.1's all-zero conversion
    assert int(data["next", "terminated"].sum()) == sum(int(ep["terminations"].any()) for ep in episodes)
    with pytest.raises(ConfigError, match="no-such"):
        read_minari("test/hopper/no-such-v0", root=tmp_path)


# --- the D4RL protocol ------------------------------------------------------------------------------------------------
def _episodes(returns_and_lengths) -> TensorDict:
    """Episodes with constant per-step reward, in file order; the last row of each terminates."""
    rows = []
    for episode, (ret, length) in enumerate(returns_and_lengths):
        for t in range(length):
            rows.append((episode, ret / length, t == length - 1))
    n = len(rows)
    return TensorDict({
        "observation": torch.arange(n, dtype=torch.float32).unsqueeze(-1), "action": torch.zeros(n, 1),
        "episode": torch.tensor([r[0] for r in rows]),
        "next": {"observation": torch.zeros(n, 1), "reward": torch.tensor([[r[1]] for r in rows]),
                 "terminated": torch.tensor([[r[2]] for r in rows]), "truncated": torch.zeros(n, 1, dtype=torch.bool),
                 "done": torch.tensor([[r[2]] for r in rows])}}, batch_size=[n])


def test_demo_window_by_hand():
    assert demo_window(10, 0.0, 100.0) == (0, 10)  # official default: everything
    assert demo_window(10, 100.0, 20.0) == (8, 10)  # p clamped to 90: rows [8, 10)
    assert demo_window(10, 50.0, 20.0) == (4, 6)
    assert demo_window(7, 0.0, 50.0) == (0, 3)  # floor(7 * 0.5) = 3
    with pytest.raises(ConfigError):
        demo_window(10, 50.0, 0.0)


def test_split_sorts_episodes_by_return_and_cuts_the_window():
    # episode 0: return 6 over 3 rows; 1: return 1 over 2 rows; 2: return 4 over 5 rows -> sorted 1, 2, 0
    data = _episodes([(6.0, 3), (1.0, 2), (4.0, 5)])
    split = split_demos(data, demo_percentile=100.0, demo_ratio=30.0, reward_scale=2.0, reward_bias=0.5)
    assert split.rl["episode"].tolist() == [1, 1, 2, 2, 2, 2, 2, 0, 0, 0]
    assert split.rl["observation"].reshape(-1).tolist() == [3, 4, 5, 6, 7, 8, 9, 0, 1, 2]  # rows move whole
    assert split.demo["episode"].tolist() == [0, 0, 0]  # window [7, 10): the best episode
    assert split.demo["demo"].all() and not split.rl["demo"].any()
    scaled = {0: 6 * 2 + 3 * 0.5, 1: 1 * 2 + 2 * 0.5, 2: 4 * 2 + 5 * 0.5}  # r * 2 + 0.5 per step
    assert split.max_episode_return == pytest.approx(scaled[0])
    assert split.mean_episode_return == pytest.approx(sum(scaled.values()) / 3)
    assert split.demo_mean_episode_return == pytest.approx(scaled[0])
    middle = split_demos(data, demo_percentile=50.0, demo_ratio=40.0)  # rows [3, 7): episode 2 only
    assert middle.demo["episode"].tolist() == [2, 2, 2, 2]
    assert middle.demo_mean_episode_return == pytest.approx(4.0)


def test_split_drops_time_out_transitions():
    data = _episodes([(2.0, 2), (3.0, 3)])
    data["next", "truncated"][1] = True  # the end of episode 0 is a time-out, not a termination
    data["next", "terminated"][1] = False
    split = split_demos(data)
    assert split.rl.numel() == 4 and not split.rl["next", "truncated"].any()
    kept = split_demos(data, drop_timeouts=False)
    assert kept.rl.numel() == 5


def test_success_flags_are_read_and_the_demo_windows_success_share_reported(tmp_path):
    """Four episodes of 5 rows ending by time-out, returns 5 / 10 / 15 / 20: the best fails, the second succeeds only
    at its last row (the time-out row the split drops), the third at a middle row, the worst never."""
    steps = np.repeat([1.0, 2.0, 3.0, 4.0], 5).astype(np.float32)
    success = np.zeros(20, bool)
    success[14] = True  # episode 2 (return 15): its last row
    success[7] = True  # episode 1 (return 10): a middle row
    _write_arrays(tmp_path / "flags.hdf5", rewards=steps, timeouts=np.arange(20) % 5 == 4,
                  next_observations=np.zeros((20, 11), np.float32))
    with h5py.File(tmp_path / "flags.hdf5", "a") as f:
        f["infos/success"] = success
    data = read_d4rl_hdf5(tmp_path / "flags.hdf5")
    assert data["next", "success"].reshape(-1).tolist() == success.tolist()
    split = split_demos(data, demo_percentile=100.0, demo_ratio=50.0)  # 16 rows kept, the top 8: episodes 3 and 2
    assert sorted(set(split.demo["episode"].tolist())) == [2, 3]
    assert split.success_rate == pytest.approx(2 / 4) and split.demo_success_rate == pytest.approx(1 / 2)
    wider = split_demos(data, demo_percentile=100.0, demo_ratio=75.0)  # the top 12 rows: episodes 1, 2, 3
    assert wider.demo_success_rate == pytest.approx(2 / 3)
    _write_arrays(tmp_path / "plain.hdf5")
    plain = read_d4rl_hdf5(tmp_path / "plain.hdf5")
    assert "success" not in plain["next"].keys()
    no_flags = split_demos(plain)
    assert no_flags.demo_success_rate is None and no_flags.success_rate is None


def test_normalized_score():
    for task, (low, high) in D4RL_REFERENCE_RETURNS.items():
        assert normalized_score(f"{task.capitalize()}-v5", low) == pytest.approx(0.0)
        assert normalized_score(f"{task}-medium-replay-v2", high) == pytest.approx(1.0)
    assert normalized_score("Hopper-v5", 1000.0) == pytest.approx((1000.0 + 20.272305) / (3234.3 + 20.272305))
    with pytest.raises(ConfigError, match="no D4RL reference"):
        normalized_score("Pendulum-v1", 0.0)
