"""RLBench adapter without the simulator: install message, action bounds, configs, the TorchRL wrapper against a
stand-in task object, and the demo reader on a synthetic folder in the dataset generator's layout.

None of this runs CoppeliaSim: the stand-in task and the synthetic demo folder only check this project's side
(specs, episode logic, conversion), not RLBench's behaviour.
"""

from __future__ import annotations

import importlib.util
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchrl.envs import Compose, RewardSum, StepCounter, TransformedEnv
from torchrl.envs.utils import check_env_specs

from arsq_lightning.cli import ArsqCLI, build_cli, main
from arsq_lightning.data.datasets import read_d4rl_hdf5, write_d4rl_hdf5
from arsq_lightning.data.rlbench_demos import load_episode, read_rlbench_demos
from arsq_lightning.data.rlbench_demos import main as convert_main
from arsq_lightning.envs.core import env_spec_of, frame_stack_transforms, make_env
from arsq_lightning.envs.rlbench import (
    CAMERAS,
    EPISODE_LENGTHS,
    RLBenchEnv,
    default_action_bounds,
    demo_action_bounds,
    from_unit,
    resolve_action_bounds,
    rlbench_env_spec,
    to_unit,
)
from arsq_lightning.errors import ConfigError

from helpers import REPO, config_args, use_tmp_mlflow

RLBENCH = REPO / "configs" / "rlbench"
RLBENCH_CONFIGS = sorted(config for config in RLBENCH.glob("*.yaml") if config.name != "base.yaml")
PAPER_TASKS = {  # §5.2: the 20 CQN tasks plus reach_target and slide_block_to_target
    "take_lid_off_saucepan", "open_drawer", "stack_wine", "toilet_seat_up", "open_microwave", "open_oven",
    "take_plate_off_colored_dish_rack", "turn_tap", "put_money_in_safe", "phone_on_base", "put_books_on_bookshelf",
    "sweep_to_dustpan", "pick_up_cup", "open_door", "meat_on_grill", "basketball_in_hoop", "lamp_on", "press_switch",
    "put_rubbish_in_bin", "insert_usb_in_computer", "reach_target", "slide_block_to_target"}
no_rlbench = pytest.mark.skipif(importlib.util.find_spec("rlbench") is not None, reason="RLBench is installed")


# --- missing simulator ----------------------------------------------------------------------------------------------
@no_rlbench
def test_missing_rlbench_fails_with_what_to_install():
    for build in (lambda: make_env("rlbench:open_drawer"), lambda: env_spec_of("rlbench:open_drawer")):
        with pytest.raises(ConfigError) as info:
            build()
        message = str(info.value)
        assert "\n" not in message and "CoppeliaSim 4.1" in message and "pip install rlbench" in message


@no_rlbench
def test_cli_reports_the_install_message_in_one_line(monkeypatch, tmp_path, capsys):
    use_tmp_mlflow(monkeypatch, tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *config_args(RLBENCH / "reach_target.yaml")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.splitlines()[0].startswith("arsq: error: RLBench is not installed")


# --- actions --------------------------------------------------------------------------------------------------------
def test_demo_action_bounds_widen_min_max_by_20_percent_with_fixed_gripper_stats():
    rng = np.random.default_rng(0)
    actions = np.column_stack([rng.uniform(-0.15, 0.1, (50, 7)), rng.integers(0, 2, 50)])
    actions[:, 0] = rng.uniform(0.02, 0.05, 50)  # an all-positive joint: its lower bound shrinks towards 0
    low, high = demo_action_bounds(actions)
    for d in range(7):
        lo, hi = actions[:, d].min(), actions[:, d].max()
        assert low[d] == pytest.approx(lo - 0.2 * abs(lo)) and high[d] == pytest.approx(hi + 0.2 * abs(hi))
    assert low[0] == pytest.approx(0.8 * actions[:, 0].min())
    assert (low[7], high[7]) == (0.0, pytest.approx(1.2))  # stats fixed at [0, 1], then widened like the rest
    unit = to_unit(actions, low, high)
    assert unit[:, :7].min() > -1 and unit[:, :7].max() < 1  # every demo joint delta lies strictly inside the box
    assert set(np.round(unit[:, 7], 6)) == {-1.0, round(2 / 1.2 - 1, 6)}  # gripper closed -> -1, open -> 2/3
    np.testing.assert_allclose(from_unit(unit, low, high), actions, atol=1e-12)
    np.testing.assert_allclose(from_unit(np.array([-1.0] * 8), low, high), low)
    np.testing.assert_allclose(from_unit(np.array([1.0] * 8), low, high), high)


def test_action_bounds_from_demo_file_explicit_or_default(tmp_path):
    actions = torch.tensor([[0.1] * 7 + [1.0], [-0.05] * 7 + [0.0]])
    data = {"observation": torch.zeros(2, 3), "action": actions,
            "next": {"observation": torch.zeros(2, 3), "reward": torch.zeros(2, 1),
                     "terminated": torch.tensor([[False], [True]]), "truncated": torch.zeros(2, 1, dtype=torch.bool)}}
    from tensordict import TensorDict

    write_d4rl_hdf5(tmp_path / "demos.hdf5", TensorDict(data, [2]))
    low, high = resolve_action_bounds(demo_dataset=str(tmp_path / "demos.hdf5"))
    assert low[:7] == pytest.approx([-0.06] * 7) and high[:7] == pytest.approx([0.12] * 7)
    assert resolve_action_bounds() == default_action_bounds()
    assert default_action_bounds()[0][:7] == pytest.approx([-0.24] * 7)
    assert resolve_action_bounds([-1.0] * 8, [1.0] * 8) == ([-1.0] * 8, [1.0] * 8)
    with pytest.raises(ConfigError, match="8 dims"):
        resolve_action_bounds([-1.0] * 7, [1.0] * 7)
    with pytest.raises(ConfigError, match="no such HDF5 file"):
        resolve_action_bounds(demo_dataset=str(tmp_path / "missing.hdf5"))


# --- configs --------------------------------------------------------------------------------------------------------
def test_one_config_per_paper_task_with_the_papers_episode_length():
    assert {p.stem for p in RLBENCH_CONFIGS} == PAPER_TASKS == set(EPISODE_LENGTHS)
    assert EPISODE_LENGTHS["reach_target"] == 50 and EPISODE_LENGTHS["open_oven"] == 225
    assert EPISODE_LENGTHS["phone_on_base"] == 175 and EPISODE_LENGTHS["turn_tap"] == 125


@pytest.fixture(scope="module")
def cli_parser():
    """The ``arsq`` parser (built by ``build_cli`` with instantiation switched off, since RLBench is not installed)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ArsqCLI, "instantiate_classes", lambda self: None)
        patch.setenv("MLFLOW_TRACKING_URI", "sqlite:///unused.db")  # nothing is instantiated, nothing is written
        return build_cli(config_args(RLBENCH_CONFIGS[0]), run=False).parser


@pytest.mark.parametrize("config", RLBENCH_CONFIGS, ids=lambda p: p.stem)
def test_rlbench_config_parses_with_the_section_5_5_settings(config, cli_parser):
    """The CLI's parser accepts every key and resolves the interpolation (without building the env)."""
    cfg = cli_parser.parse_args(config_args(config))
    model, data = cfg.model, cfg.data.init_args
    assert data.env_id == f"rlbench:{config.stem}" and data.max_episode_steps == EPISODE_LENGTHS[config.stem]
    assert data.env_kwargs == {"image_size": 84, "frame_stack": 8, "demo_dataset": data.dataset}
    assert (data.batch_size, data.demo_fraction, data.relabel, data.utd_ratio) == (512, 0.5, True, 1.0)
    assert model.discretizer.init_args.levels == 3 and model.discretizer.init_args.bins == 5
    critic = model.critic.init_args
    assert model.critic.class_path.endswith("ARSQCritic")
    assert critic.soft_alpha == 0.001 and critic.act_alpha is None and critic.act_network == "target"
    assert model.tau == 0.02 and model.encoder.class_path.endswith("MultiViewCNNEncoder")
    loss = model.loss.init_args
    assert (loss.td_weight, loss.conservative, loss.conservative_weight, loss.clip_min) == (0.1, "margin", 1.0, -0.01)
    assert model.optimizer.class_path == "torch.optim.AdamW"
    assert model.optimizer.init_args.lr == 5e-5 and model.optimizer.init_args.weight_decay == 0.1
    assert cfg.trainer.max_steps == 30000 and cfg.trainer.val_check_interval == 2500


# --- the TorchRL wrapper against a stand-in task (not RLBench) ------------------------------------------------------
class _StandInTask:
    """Mimics ``TaskEnvironment.reset/step`` with RLBench-shaped observations; succeeds at ``success_at``."""

    def __init__(self, size: int, success_at: int | None):
        self.size, self.success_at, self.t, self.actions = size, success_at, 0, []

    def _obs(self):
        fields = {f"{c}_rgb": np.full((self.size, self.size, 3), 10 * self.t + v, dtype=np.uint8)
                  for v, c in enumerate(CAMERAS)}
        return types.SimpleNamespace(joint_positions=np.full(7, 0.1 * self.t), gripper_open=1.0, **fields)

    def reset(self):
        self.t = 0
        return ["description"], self._obs()

    def step(self, action):
        self.actions.append(action)
        self.t += 1
        success = self.success_at is not None and self.t == self.success_at
        return self._obs(), float(success), success


@pytest.mark.parametrize("success_at, steps, end", [(3, 3, "terminated"), (None, 5, "truncated")])
def test_wrapper_specs_and_episode_ends_against_a_stand_in_task(success_at, steps, end):
    low, high = default_action_bounds()
    task = _StandInTask(8, success_at)
    env = TransformedEnv(RLBenchEnv(task, episode_length=5, image_size=8, action_low=low, action_high=high),
                         Compose(StepCounter(), RewardSum(), *frame_stack_transforms(["pixels", "proprio"], 2)))
    check_env_specs(env)
    rollout = env.rollout(20)
    assert rollout.numel() == steps and rollout["next", end][-1].item() and rollout["next", "done"].sum() == 1
    assert rollout["next", "reward"].sum().item() == (1.0 if end == "terminated" else 0.0)
    pixels = rollout["next", "observation", "pixels"]
    assert pixels.shape == (steps, 4, 6, 8, 8) and pixels.dtype == torch.uint8
    assert pixels[0, 2, 0, 0, 0] == 2 and pixels[0, 2, 3, 0, 0] == 12  # view 2: frame 0 then frame 1 (newest last)
    assert rollout["next", "observation", "proprio"].shape == (steps, 16)
    assert all(a.dtype == np.float32 and a.shape == (8,) for a in task.actions)
    spec = rlbench_env_spec(image_size=8, action_low=low, action_high=high)
    assert spec.observation_shapes == {"pixels": [4, 3, 8, 8], "proprio": [8]} and spec.success_reward


# --- demo reader on a synthetic folder in the dataset generator's layout --------------------------------------------
class _FakeObservation:  # pickled under RLBench's module path, then removed before reading
    pass


class _FakeDemo:
    pass


def _write_episode(folder: Path, joints: np.ndarray, gripper: list[float], commanded: np.ndarray | None, size: int,
                   monkeypatch) -> None:
    rlbench = types.ModuleType("rlbench")
    observation_module, demo_module = types.ModuleType("rlbench.backend.observation"), types.ModuleType("rlbench.demo")
    _FakeObservation.__module__, _FakeObservation.__qualname__ = "rlbench.backend.observation", "Observation"
    _FakeDemo.__module__, _FakeDemo.__qualname__ = "rlbench.demo", "Demo"
    observation_module.Observation, demo_module.Demo = _FakeObservation, _FakeDemo
    for name, module in (("rlbench", rlbench), ("rlbench.backend", types.ModuleType("rlbench.backend")),
                         ("rlbench.backend.observation", observation_module), ("rlbench.demo", demo_module)):
        monkeypatch.setitem(sys.modules, name, module)
    steps = []
    for t in range(len(joints)):
        obs = _FakeObservation()
        obs.joint_positions, obs.gripper_open, obs.front_rgb = joints[t], gripper[t], None
        obs.misc = {} if commanded is None else {"joint_position_action": np.append(commanded[t], gripper[t])}
        steps.append(obs)
    demo = _FakeDemo()
    demo._observations, demo.random_seed = steps, None
    folder.mkdir(parents=True)
    with open(folder / "low_dim_obs.pkl", "wb") as f:
        pickle.dump(demo, f)
    for v, camera in enumerate(CAMERAS):
        (folder / f"{camera}_rgb").mkdir()
        for t in range(len(joints)):
            image = Image.fromarray(np.full((size, size, 3), 40 * t + v, dtype=np.uint8))
            image.save(folder / f"{camera}_rgb" / f"{t}.png")
    for name in ("rlbench.backend.observation", "rlbench.demo", "rlbench.backend", "rlbench"):
        monkeypatch.delitem(sys.modules, name)  # the reader must not need RLBench


def test_demo_reader_on_a_synthetic_generator_layout(tmp_path, monkeypatch):
    """Synthetic layout test: folders and pickles shaped like RLBench's generator output, not real RLBench data."""
    root, episodes = tmp_path / "rlbench_data", tmp_path / "rlbench_data" / "open_drawer" / "variation0" / "episodes"
    joints = np.cumsum(np.full((4, 7), 0.05), axis=0).astype(np.float32)
    commanded = joints + 0.01  # the controller's target is recorded in misc["joint_position_action"]
    _write_episode(episodes / "episode0", joints, [1.0, 1.0, 0.0, 0.0], commanded, 12, monkeypatch)
    _write_episode(episodes / "episode1", joints, [1.0, 0.0, 0.0, 1.0], None, 12, monkeypatch)
    jumpy = joints.copy()
    jumpy[2] += 0.5  # a joint delta above 0.2: the demo is skipped
    _write_episode(episodes / "episode2", jumpy, [1.0] * 4, None, 12, monkeypatch)
    assert "rlbench" not in sys.modules

    episode = load_episode(episodes / "episode0", image_size=12)
    np.testing.assert_allclose(episode["actions"][:, :7], commanded[1:] - joints[:-1], atol=1e-6)
    assert episode["actions"][:, 7].tolist() == [1.0, 0.0, 0.0]
    np.testing.assert_allclose(load_episode(episodes / "episode1")["actions"][:, :7], joints[1:] - joints[:-1],
                               atol=1e-6)
    assert episode["pixels"].shape == (4, 4, 3, 12, 12) and episode["pixels"][2, 3, 0, 0, 0] == 83

    data, skipped = read_rlbench_demos(root, "open_drawer", image_size=6, frame_stack=2)
    assert skipped == 1 and data.numel() == 6 and data["episode"].tolist() == [0, 0, 0, 1, 1, 1]
    assert data["observation", "pixels"].shape == (6, 4, 6, 6, 6)  # resized to 6x6, 2 frames x 3 channels
    assert data["next", "reward"].reshape(-1).tolist() == [0, 0, 1, 0, 0, 1]
    assert data["next", "terminated"].reshape(-1).tolist() == [False, False, True] * 2
    first = data["observation", "pixels"][0, 1]
    assert (first[0] == 1).all() and (first[3] == 1).all()  # step 0, view 1: first frame repeated
    assert (data["next", "observation", "pixels"][0, 1, 3] == 41).all()  # next obs: newest frame is step 1
    assert data["observation", "proprio"].shape == (6, 16)

    out = tmp_path / "demos" / "open_drawer.hdf5"
    convert_main([str(root), "open_drawer", str(out), "--frame-stack", "2", "--image-size", "6"])
    back = read_d4rl_hdf5(out)
    assert torch.equal(back["observation", "pixels"], data["observation", "pixels"])
    assert torch.equal(back["action"], data["action"]) and back["next", "terminated"].sum() == 2
