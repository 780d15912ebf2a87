"""SIGTERM / SIGINT during ``arsq fit``: the update in progress finishes, ``last.ckpt`` is written, the MLflow run is
KILLED, the resume command is printed, the exit status is 128 + the signal, and the printed command resumes."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time

import mlflow
import pytest
import torch

from helpers import QUICKSTART

ARGS = ["fit", "--config", str(QUICKSTART), "--trainer.max_steps", "100000", "--trainer.val_check_interval", "50000",
        "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "5", "--data.init_random_frames", "40",
        "--data.batch_size", "16", "--data.eval_episodes", "1", "--data.max_episode_steps", "30",
        "--model.head.init_args.hidden_dims", "[16]"]


def _start(tmp_path, args: list[str]) -> tuple[subprocess.Popen, str]:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    process = subprocess.Popen([sys.executable, "-m", "arsq_lightning.cli", *args], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return process, uri


def _wait_for_updates(uri: str, process: subprocess.Popen, timeout: float = 180.0) -> None:
    """Until the run has logged training losses (so updates are under way)."""
    client, deadline = mlflow.tracking.MlflowClient(uri), time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
            if runs and len(client.get_metric_history(runs[0].info.run_id, "train/loss")) >= 2:
                return
        except Exception:  # noqa: BLE001 - the store may not exist yet
            pass
        time.sleep(0.5)
    raise AssertionError(f"no training updates seen; stderr: {process.stderr.read() if process.poll() else ''}")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_after_the_update_with_a_checkpoint_and_the_printed_command_resumes(signum, tmp_path):
    process, uri = _start(tmp_path, ARGS)
    _wait_for_updates(uri, process)
    process.send_signal(signum)
    _, err = process.communicate(timeout=180)
    assert process.returncode == 128 + signum, err
    resume = [line for line in err.splitlines() if line.startswith("arsq: resume with: ")]
    assert len(resume) == 1 and "Traceback" not in err, err
    command = shlex.split(resume[0].removeprefix("arsq: resume with: "))
    checkpoint = command[command.index("--ckpt_path") + 1]
    saved = torch.load(tmp_path / checkpoint if not os.path.isabs(checkpoint) else checkpoint, weights_only=False)
    assert saved["global_step"] > 0
    client = mlflow.tracking.MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "KILLED"
    # the printed command, with a budget that ends soon after the checkpoint, finishes the run
    resumed = subprocess.run([sys.executable, "-m", "arsq_lightning.cli", *command[1:], "--trainer.max_steps",
                              str(saved["global_step"] + 5)], cwd=tmp_path, capture_output=True, text=True,
                             env={**os.environ, "MLFLOW_TRACKING_URI": uri}, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "final eval return" in resumed.stdout
    folder = os.path.dirname(checkpoint if os.path.isabs(checkpoint) else tmp_path / checkpoint)
    assert not [name for name in os.listdir(folder) if name.startswith("last-v")]  # the resume wrote last.ckpt again
