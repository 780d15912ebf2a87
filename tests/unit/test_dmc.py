"""DeepMind Control Suite through TorchRL: state and pixel envs, action repeat, time limits, a tiny pixel fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchrl.envs.utils import check_env_specs

import arsq_lightning.envs.dmc  # noqa: F401 (sets MUJOCO_GL=egl before dm_control is imported below)
from arsq_lightning.cli import build_cli
from arsq_lightning.envs.core import env_spec_of, make_env
from arsq_lightning.errors import ConfigError
from arsq_lightning.nets.encoders import DrQEncoder

from helpers import REPO, use_tmp_mlflow

PIXELS = REPO / "configs" / "dmc" / "cheetah_run_pixels.yaml"


def _dm_env(env):
    """The dm_control environment inside a state env built by ``make_env``."""
    return env.base_env._env


def test_state_env_is_the_flat_dm_control_observation():
    spec = env_spec_of("dmc:walker-walk")
    env = make_env("dmc:walker-walk", seed=4)
    check_env_specs(env)
    td = env.reset()
    dm = _dm_env(env)
    reference = dm.task.get_observation(dm.physics)  # walker: orientations [14], height (a scalar), velocity [9]
    flat = np.concatenate([np.asarray(v, dtype=np.float32).ravel() for v in reference.values()])  # key order kept
    assert spec.obs_dim == flat.size == 24 and spec.action_low == [-1.0] * 6
    np.testing.assert_allclose(td["observation"].numpy(), flat, rtol=1e-6)


def test_action_repeat_sums_rewards_and_time_limit_counts_agent_steps():
    from dm_control import suite

    env = make_env("dmc:cartpole-swingup", seed=7, action_repeat=3, max_episode_steps=4)
    actions = torch.rand(6, 1) * 2 - 1
    td = env.reset()
    reference = suite.load("cartpole", "swingup", task_kwargs={"random": 0})
    reference.reset()
    with reference.physics.reset_context():  # the same start state as the env under test
        reference.physics.set_state(_dm_env(env).physics.get_state())
    rewards, truncated = [], []
    for action in actions[:4]:
        td["action"] = action
        td = env.step(td)
        rewards.append(td["next", "reward"].item())
        truncated.append(td["next", "truncated"].item())
        td = env.step_mdp(td)
    assert truncated == [False, False, False, True]
    expected = [sum(reference.step(action.double().numpy()).reward for _ in range(3)) for action in actions[:4]]
    np.testing.assert_allclose(rewards, expected, rtol=1e-5)
    assert min(expected) > 0 and len(set(expected)) == 4  # the comparison is not between zeros or constants


def test_pixel_env_renders_real_frames():
    env = make_env("dmc:cheetah-run", seed=0, observation="pixels", image_size=32, frame_stack=2)
    check_env_specs(env)
    rollout = env.rollout(5)
    pixels = rollout["observation", "pixels"]
    assert pixels.shape == (5, 1, 6, 32, 32) and pixels.dtype == torch.uint8
    frame = pixels[-1, 0, 3:].float()
    assert frame.mean() > 20 and frame.std() > 5  # not black, not flat
    assert not torch.equal(rollout["next", "observation", "pixels"][-1], pixels[0])  # frames change as it moves
    spec = env_spec_of("dmc:cheetah-run", observation="pixels", image_size=32, frame_stack=2)
    assert spec.observation_shapes == {"pixels": list(pixels.shape[1:])}


def test_quadruped_uses_camera_2_and_bad_settings_fail_in_one_line():
    assert env_spec_of("dmc:quadruped-run", observation="pixels").observation_shapes["pixels"] == [1, 3, 84, 84]
    for kwargs, message in [({}, None), ({"observation": "depth"}, "dmc observation must be one of"),
                            ({"image_size": 4}, "image_size must be >= 8"), ({"action_repeat": 0}, "action_repeat")]:
        if message is None:
            with pytest.raises(ConfigError, match="unknown DeepMind Control task dmc:cheetah-fly"):
                env_spec_of("dmc:cheetah-fly")
            with pytest.raises(ConfigError, match="dmc ids look like"):
                env_spec_of("dmc:cheetah")
        else:
            with pytest.raises(ConfigError, match=message):
                env_spec_of("dmc:cheetah-run", **kwargs)


@pytest.mark.e2e  # a whole run through the CLI: outside the fast unit selection
@pytest.mark.parametrize("config", [PIXELS, PIXELS.with_name("cheetah_run_pixels_cqn.yaml")], ids=["arsq", "cqn"])
def test_tiny_pixel_fit_through_the_cli(config, monkeypatch, tmp_path):
    """The shipped pixel configs (ARSQ and CQN) with tiny sizes: collector, uint8 buffer, pixel encoder, updates,
    evaluation."""
    use_tmp_mlflow(monkeypatch, tmp_path)
    cli = build_cli(["fit", "--config", str(config), "--trainer.max_steps", "12", "--trainer.val_check_interval", "12",
                     "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "4",
                     "--data.init_random_frames", "24", "--data.learning_starts", "24", "--data.batch_size", "8",
                     "--data.eval_episodes", "1", "--data.max_episode_steps", "10",
                     "--data.env_kwargs", '{"observation": "pixels", "image_size": 40, "frame_stack": 2, '
                                          '"action_repeat": 2}',
                     "--model.encoder.init_args.channels", "[4, 4]", "--model.encoder.init_args.strides", "[2, 2]",
                     "--model.encoder.init_args.feature_dim", "8", "--model.head.init_args.hidden_dims", "[16]"])
    model, data = cli.model, cli.datamodule
    assert isinstance(model.critic.encoder, DrQEncoder)
    assert cli.trainer.global_step == 12 and data.frames >= 24 + 2 * 12 - 2  # utd 0.5: two frames per update
    stored = data.buffer.storage[:len(data.buffer)]
    assert stored["observation", "pixels"].shape[1:] == (1, 6, 40, 40)
    assert stored["observation", "pixels"].dtype == torch.uint8
    assert cli.trainer.callback_metrics["eval/episodes"].item() == 1
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
