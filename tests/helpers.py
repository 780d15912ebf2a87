"""Shared settings for the end-to-end tests: tiny runs of the shipped configs with MLflow in a temp dir."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
import torch
from tensordict import TensorDict

REPO = Path(__file__).resolve().parents[1]
# Every shipped run: a file, or an overlay on the base.yaml of its folder (configs/README.md).
CONFIGS = sorted(config for config in (REPO / "configs").glob("**/*.yaml") if config.name != "base.yaml")
# RLBench needs CoppeliaSim, which cannot be installed here: its configs are parsed (tests/test_rlbench.py), not built.
RUNNABLE_CONFIGS = [config for config in CONFIGS if "rlbench" not in config.parts]
QUICKSTART = REPO / "configs" / "quickstart.yaml"

# A few dozen updates on short episodes with a tiny network: exercises every hook in seconds.
TINY = ["--trainer.max_steps", "30", "--trainer.val_check_interval", "15", "--trainer.enable_progress_bar", "false",
        "--trainer.log_every_n_steps", "5", "--data.init_random_frames", "40", "--data.batch_size", "16",
        "--data.eval_episodes", "2", "--data.max_episode_steps", "30", "--model.head.init_args.hidden_dims", "[16]"]


def config_args(config: Path) -> list[str]:
    """The ``--config`` arguments that run ``config``: its folder's ``base.yaml`` first where there is one."""
    base = config.with_name("base.yaml")
    return ["--config", str(base), "--config", str(config)] if base.exists() else ["--config", str(config)]


@cache
def _store_template() -> Path:
    """A local MLflow store with its tables, made once per test session: MLflow's table migrations take seconds per
    fresh store. It holds no ``arsq`` experiment, so the CLI creates one in each test's folder (and its artifacts
    land there). Tests of store creation itself (the race of runs started together in a fresh folder) do not use
    it."""
    folder = Path(tempfile.mkdtemp(prefix="arsq-mlflow-template-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    mlflow.tracking.MlflowClient(f"sqlite:///{folder}/mlflow.db").search_experiments()  # creates the tables
    return folder / "mlflow.db"


def use_tmp_mlflow(monkeypatch, tmp_path: Path) -> str:
    """Run in ``tmp_path`` with MLflow's store there (a copy of an initialised empty store); returns the URI."""
    shutil.copyfile(_store_template(), tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def only_run(uri: str):
    """The single MLflow run of experiment ``arsq`` in ``uri``."""
    client = mlflow.tracking.MlflowClient(uri)
    experiment = client.get_experiment_by_name("arsq")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, f"expected one run, found {len(runs)}"
    return client, runs[0]


def write_random_dataset(env_id: str, path: Path, steps: int = 120, max_episode_steps: int = 18,
                         env_kwargs: dict | None = None) -> Path:
    """A small D4RL-layout file from uniformly random actions in a real env (episodes end by termination or
    time-out)."""
    import torch

    from arsq_lightning import make_env, write_d4rl_hdf5

    torch.manual_seed(0)
    env = make_env(env_id, seed=0, max_episode_steps=max_episode_steps, **(env_kwargs or {}))
    data = env.rollout(steps, break_when_any_done=False)
    write_d4rl_hdf5(path, data, metadata={"generator": "uniform random actions (tests)"})
    return path


def random_transitions(size: int, obs_dim: int, action_dim: int, *, terminal_rate: float = 0.2,
                       seed: int = 1) -> TensorDict:
    """A random training batch ``[size]`` in TorchRL layout (half of it flagged demo), actions in ``[-1, 1]``."""
    g = torch.Generator().manual_seed(seed)
    return TensorDict({"observation": torch.randn(size, obs_dim, generator=g),
                       "action": torch.rand(size, action_dim, generator=g) * 2 - 1,
                       "demo": torch.rand(size, generator=g) < 0.5,
                       "next": {"observation": torch.randn(size, obs_dim, generator=g),
                                "reward": torch.randn(size, 1, generator=g),
                                "terminated": torch.rand(size, 1, generator=g) < terminal_rate}}, batch_size=[size])


# The device parameter of tests that also run on a GPU: "cpu" always, "cuda" (marked ``gpu``) only where CUDA is.
CUDA = pytest.param("cuda", marks=[pytest.mark.gpu,
                                   pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])
DEVICES = ["cpu", CUDA]


class FakeTrainer(SimpleNamespace):
    """Just what a data module reads from a Lightning trainer (no checkpoint folder unless given: the buffers go
    into the checkpoint)."""

    checkpoint_callback = None
    global_step = 0
    ckpt_path = None
