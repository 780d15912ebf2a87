"""The ``arsq`` command line: configs instantiate, fit logs to MLflow, checkpoints evaluate, bad input fails cleanly."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from matplotlib import image

import arsq_lightning
from arsq_lightning import ARSQModule, AutoregressiveHead, CQNCritic, CQNHead, CQNLoss, OnlineDataModule
from arsq_lightning.callbacks import UpdatesProgressBar
from arsq_lightning.cli import build_cli, main

from helpers import (
    QUICKSTART,
    REPO,
    RUNNABLE_CONFIGS,
    TINY,
    config_args,
    only_run,
    use_tmp_mlflow,
    write_random_dataset,
)


def assert_fails_with_one_line(args: list[str], message: str, capsys) -> None:
    """``arsq args`` exits with status 2 and exactly one ``arsq: error:`` line holding ``message``, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    first = [line for line in err.splitlines() if line.startswith("arsq: error:")]
    assert len(first) == 1 and message in first[0] and "Traceback" not in err, err

@pytest.mark.parametrize("config", RUNNABLE_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_instantiates(config, monkeypatch, tmp_path):
    use_tmp_mlflow(monkeypatch, tmp_path)
    extra, init = [], {}
    for path in config_args(config)[1::2]:  # the data settings of the base, then of the overlay
        init.update(yaml.safe_load(Path(path).read_text())["data"]["init_args"])
    if "dataset" in init:  # point the dataset at a small file from the right env
        steps = 40 if "pixels" in config.name else 120
        path = write_random_dataset(init["env_id"], tmp_path / "data.hdf5", steps=steps,
                                    env_kwargs=init.get("env_kwargs"))
        extra = ["--data.dataset", str(path)]
    cli = build_cli([*config_args(config), *extra], run=False)
    assert isinstance(cli.model, ARSQModule) and isinstance(cli.datamodule, OnlineDataModule)
    spec, disc = cli.datamodule.env_spec, cli.model.critic.discretizer
    assert disc.action_dim == spec.action_dim  # sizes linked from the env, not typed in YAML
    assert torch.equal(disc.low, torch.tensor(spec.action_low, dtype=torch.float32))
    head = cli.model.critic.head
    if isinstance(head, CQNHead):  # the CQN baseline
        assert isinstance(cli.model.critic, CQNCritic) and isinstance(cli.model.loss_fn, CQNLoss)
        assert (head.action_dim, head.levels, head.bins) == (spec.action_dim, disc.levels, disc.bins)
    else:
        assert isinstance(head, AutoregressiveHead)
        assert head.num_positions == disc.levels * spec.action_dim


def test_hopper_config_trains_a_few_updates(monkeypatch, tmp_path):
    """The multi-dimensional MuJoCo config runs end to end (collector, updates, evaluation) with tiny sizes."""
    use_tmp_mlflow(monkeypatch, tmp_path)
    cli = build_cli(["fit", "--config", str(REPO / "configs" / "hopper.yaml"), *TINY,
                     "--model.critic.init_args.compile_act", "false"])
    assert cli.trainer.global_step == 30 and cli.datamodule.env_spec.action_dim == 3
    assert cli.trainer.callback_metrics["eval/episodes"].item() == 2


def test_help_lists_pluggable_parts(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--model.discretizer", "--model.head", "--model.encoder", "--model.loss", "--data"):
        assert option in text
    for data_class in ("OnlineDataModule", "OfflineToOnlineDataModule"):
        with pytest.raises(SystemExit):
            main(["fit", "--data.help", data_class])
        assert "--data.utd_ratio" in capsys.readouterr().out


@pytest.mark.parametrize("steps", [30, 25], ids=["ends-on-eval", "final-eval-after-fit"])
def test_fit_logs_eval_metrics_and_checkpoint_then_validate_reproduces_them(steps, monkeypatch, tmp_path, capsys):
    uri = use_tmp_mlflow(monkeypatch, tmp_path)
    cli = build_cli(["fit", "--config", str(QUICKSTART), *TINY, "--trainer.max_steps", str(steps)])
    assert cli.trainer.global_step == steps
    assert cli.model.last_eval_step == steps  # the final weights were evaluated
    assert cli.datamodule.frames >= 40 + steps  # warm-up frames plus one frame per update (utd 1)
    client, run = only_run(uri)
    for key in ("eval/return_mean", "eval/return_std", "eval/episode_length", "train/loss", "train/env_frames",
                "train/grad_updates", "time/fps", "time/updates_per_s"):
        assert key in run.data.metrics, key
    assert run.data.metrics["eval/episodes"] == 2
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI's training view
    # training metrics are computed and logged on Lightning's logging steps only (log_every_n_steps 5 in TINY)
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == steps // 5
    assert run.info.run_name.startswith("quickstart-s0-")  # <config>-s<seed>-<time>, not MLflow's seeded name
    assert run.data.params["critic/init_args/soft_alpha"] == "0.01"
    assert run.data.params["seed_everything"] == "0" and run.data.params["trainer/max_steps"] == str(steps)
    tags = run.data.tags
    assert (tags["arsq.algorithm"], tags["arsq.env_id"], tags["arsq.command"]) == ("ARSQ", "Pendulum-v1", "fit")
    assert tags["arsq.config"] == str(QUICKSTART) and tags["arsq.version"] == arsq_lightning.__version__
    assert len(tags["git.commit"]) == 40 and tags["git.dirty"] in ("true", "false")  # the tests run in a checkout
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "checkpoints", "learning_curve.png"} <= artifacts
    curve = client.download_artifacts(run.info.run_id, "learning_curve.png", str(tmp_path))
    assert image.imread(curve).shape[1] > 300  # a real PNG
    stored = [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints") if not a.is_dir]  # not buffers/
    assert "checkpoints/last.ckpt" in stored
    # each checkpoint is stored once: written into the run's artifacts, no copy anywhere else
    assert cli.trainer.checkpoint_callback.dirpath == os.path.join(run.info.artifact_uri, "checkpoints")
    assert sorted(p.name for p in tmp_path.rglob("*.ckpt")) == sorted(os.path.basename(path) for path in stored)
    out = capsys.readouterr().out
    assert "final eval return" in out and run.info.run_id in out
    best = max(m.value for m in client.get_metric_history(run.info.run_id, "eval/return_mean"))
    assert f"best eval return: {best:.1f}" in out
    ckpt = cli.trainer.checkpoint_callback.last_model_path
    assert f"{steps} updates, {cli.datamodule.frames} env frames" in out and f"checkpoint: {ckpt}" in out

    ckpt = cli.trainer.checkpoint_callback.last_model_path
    final_return = run.data.metrics["eval/return_mean"]
    validate = build_cli(["validate", "--config", str(QUICKSTART), *TINY, "--ckpt_path", ckpt])
    assert validate.trainer.callback_metrics["eval/return_mean"].item() == pytest.approx(final_return, rel=1e-6)
    test = build_cli(["test", "--config", str(QUICKSTART), *TINY, "--ckpt_path", ckpt])
    assert test.trainer.callback_metrics["test/return_mean"].item() == pytest.approx(final_return, rel=1e-6)
    evaluations = client.search_runs([run.info.experiment_id], "tags.`arsq.command` != 'fit'")
    assert sorted(r.data.tags["arsq.command"] for r in evaluations) == ["test", "validate"]
    assert all(r.data.tags["arsq.ckpt_path"] == ckpt for r in evaluations)  # which checkpoint they evaluated
    assert all(r.data.tags["arsq.source_run"] == run.info.run_id for r in evaluations)  # and which run wrote it


def test_progress_bar_redraws_every_update_on_a_terminal_and_every_100_into_a_log(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    assert UpdatesProgressBar().refresh_rate == 1
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a file or a pipe: one line per redraw
    assert UpdatesProgressBar().refresh_rate == UpdatesProgressBar.LOG_REFRESH_RATE == 100
    assert UpdatesProgressBar(refresh_rate=7).refresh_rate == 7


def test_progress_bar_counts_updates_and_shows_frames_loss_and_evaluation(monkeypatch, tmp_path):
    use_tmp_mlflow(monkeypatch, tmp_path)
    cli = build_cli(["fit", "--config", str(QUICKSTART), *TINY, "--trainer.enable_progress_bar", "true"])
    bar = cli.trainer.progress_bar_callback
    assert isinstance(bar, UpdatesProgressBar)  # replaces Lightning's default (Rich here), which counts epochs
    assert bar.train_progress_bar.desc.startswith("updates") and bar.train_progress_bar.total == 30
    assert bar.train_progress_bar.n == 30
    fields = bar.get_metrics(cli.trainer, cli.model)
    assert "v_num" not in fields and {"loss", "frames", "train_return", "eval/return"} <= set(fields)
    assert fields["frames"] == cli.datamodule.frames


def test_checkpoint_reload_gives_identical_deterministic_actions(monkeypatch, tmp_path):
    use_tmp_mlflow(monkeypatch, tmp_path)
    cli = build_cli(["fit", "--config", str(QUICKSTART), *TINY])
    reloaded = ARSQModule.load_from_checkpoint(cli.trainer.checkpoint_callback.last_model_path)
    obs = torch.randn(64, 3) * 3
    trained = cli.model.act(obs, deterministic=True)
    assert torch.equal(reloaded.act(obs, deterministic=True), trained)
    fresh = build_cli(["--config", str(QUICKSTART), *TINY], run=False).model
    assert not torch.equal(fresh.act(obs, deterministic=True), trained)  # the comparison can fail


def test_resume_restores_counters_and_replay_buffer(monkeypatch, tmp_path):
    use_tmp_mlflow(monkeypatch, tmp_path)
    first = build_cli(["fit", "--config", str(QUICKSTART), *TINY])
    saved_frames, saved_len = first.datamodule.frames, len(first.datamodule.buffer)
    ckpt = first.trainer.checkpoint_callback.last_model_path
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = build_cli(["fit", "--config", str(QUICKSTART), *TINY, "--trainer.max_steps", "45", "--ckpt_path",
                             ckpt])
    # the checkpoint's settings enter the config without objects that cannot be written back (its env spec)
    assert not [w for w in caught if "Unable to serialize" in str(w.message)]
    data = resumed.datamodule
    assert resumed.trainer.global_step == 45 and data.updates_done >= 45
    # counting goes on from the checkpoint: the restored buffer plus at least one new frame per new update
    assert data.frames >= saved_frames + 15 and len(data.buffer) >= saved_len + 15


@pytest.mark.parametrize("override, message", [
    (["--data.env_id", "NoSuchEnv-v0"], "unknown env id 'NoSuchEnv-v0'"),
    (["--model.head.init_args.qchunk", "2"], "qchunk=2 must be -1 or divide N"),
    (["--model.discretizer.init_args.levels", "0"], "levels must be >= 1"),
    (["--model.discretizer.init_args.bins", "1"], "bins must be >= 2"),
    (["--model.critic.init_args.soft_alpha", "0"], "soft_alpha must be positive"),
    (["--model.critic.init_args.act_alpha", "-1"], "act_alpha must be positive"),
    (["--model.no_such_key", "1"], "no_such_key"),
    (["--data.utd_ratio", "0"], "utd_ratio must be positive"),
    (["--model.head.init_args.activation", "sigmoidz"], "unknown activation 'sigmoidz'"),
    (["--model.head.init_args.groups", "3"], "head groups must be -1 or in 1..1"),
    # parts that do not fit together
    (["--model.discretizer", "arsq_lightning.QuantileDiscretizer"], "has none: use a dataset data module"),
    (["--model.loss", "arsq_lightning.CQNLoss"], "CQNLoss trains a CQNCritic"),
    (["--model.head", "arsq_lightning.CQNHead"], "got CQNHead: set model.critic to arsq_lightning.CQNCritic"),
])
def test_bad_settings_fail_with_one_line(override, message, monkeypatch, tmp_path, capsys):
    use_tmp_mlflow(monkeypatch, tmp_path)
    assert_fails_with_one_line(["fit", "--config", str(QUICKSTART), *TINY, *override], message, capsys)


def test_bad_yaml_key_fails_with_one_line(monkeypatch, tmp_path, capsys):
    use_tmp_mlflow(monkeypatch, tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  soft_alpah: 0.1\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(QUICKSTART), "--config", str(bad)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "soft_alpah" in err.splitlines()[0]


@pytest.mark.parametrize("override,message", [
    (["--trainer.max_steps", "-5"], "trainer.max_steps must be >= 1"),
    (["--trainer.val_check_interval", "0"], "trainer.val_check_interval must be >= 1 update"),
    (["--model.optimizer.init_args.lr", "-0.1"], "model.optimizer: Invalid learning rate: -0.1"),
])
def test_bad_budgets_and_optimiser_settings_fail_with_one_line(override, message, monkeypatch, tmp_path, capsys):
    use_tmp_mlflow(monkeypatch, tmp_path)
    fresh = tmp_path / "fresh" / "mlflow.db"
    fresh.parent.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{fresh}")
    assert_fails_with_one_line(["fit", "--config", str(QUICKSTART), *TINY, *override], message, capsys)
    assert not fresh.exists()  # caught before the store is set up (seconds): no store, so no FAILED run either


@pytest.mark.parametrize("kind,message", [("missing", "no such file"), ("truncated", "not a complete checkpoint"),
                                          ("other", "not a Lightning checkpoint")])
def test_bad_checkpoint_paths_fail_with_one_line(kind, message, monkeypatch, tmp_path, capsys):
    use_tmp_mlflow(monkeypatch, tmp_path)
    path = tmp_path / "model.ckpt"
    if kind != "missing":
        torch.save({"weights": torch.zeros(1000)}, path)
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[:2000])
    assert_fails_with_one_line(["fit", "--config", str(QUICKSTART), *TINY, "--ckpt_path", str(path)], message, capsys)


@pytest.mark.parametrize("where,message", [
    ("root_dir", "trainer.default_root_dir: cannot write to"),
    ("sqlite", "MLflow store sqlite:///"),
    ("http", "MLflow tracking server http://127.0.0.1:9 does not answer"),
    ("silent", "does not answer (timed out)"),
])
def test_unusable_output_places_fail_within_seconds_with_one_line(where, message, monkeypatch, tmp_path, capsys):
    use_tmp_mlflow(monkeypatch, tmp_path)
    silent = socket.create_server(("127.0.0.1", 0))  # accepts connections (the kernel's backlog), never replies
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    override = {"root_dir": ["--trainer.default_root_dir", str(blocker / "runs")]}.get(where, [])
    if where == "sqlite":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{blocker}/mlflow.db")
    if where == "http":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # the discard port: nothing listens
    if where == "silent":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{silent.getsockname()[1]}")
    start = time.monotonic()
    with silent:
        assert_fails_with_one_line(["fit", "--config", str(QUICKSTART), *TINY, *override], message, capsys)
    assert time.monotonic() - start < 60


def test_system_metrics_are_logged_when_asked(monkeypatch, tmp_path):
    uri = use_tmp_mlflow(monkeypatch, tmp_path)
    build_cli(["fit", "--config", str(QUICKSTART), *TINY, "--trainer.logger.init_args.system_metrics", "true",
               "--trainer.logger.init_args.system_metrics_interval", "0.05"])
    client, run = only_run(uri)
    assert run.data.metrics["system/cpu_utilization_percentage"] >= 0
    assert run.data.metrics["system/system_memory_usage_megabytes"] > 0
    assert run.info.status == "FINISHED"  # the monitor stopped with the run
    build_cli(["fit", "--config", str(QUICKSTART), *TINY])
    default = [r for r in client.search_runs([run.info.experiment_id]) if r.info.run_id != run.info.run_id]
    assert not any(key.startswith("system/") for key in default[0].data.metrics)  # off by default


def test_runs_started_together_in_a_fresh_folder_share_one_store(tmp_path):
    """Three runs started at once create the SQLite store and the experiment without racing (they used to crash
    with 'table experiments already exists'), each under its own name."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    args = ["fit", "--config", str(QUICKSTART), *TINY, "--trainer.max_steps", "5", "--trainer.val_check_interval", "5"]
    runs = [subprocess.Popen([sys.executable, "-m", "arsq_lightning.cli", *args, "--seed_everything", str(seed)],
                             cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for seed in (0, 0, 1)]
    errors = [run.communicate(timeout=300)[1] for run in runs]
    assert [run.returncode for run in runs] == [0, 0, 0], errors
    client = mlflow.tracking.MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("arsq")
    names = [run.info.run_name for run in client.search_runs([experiment.experiment_id])]
    assert len(set(names)) == 3  # the two seed-0 runs, started in the same second, have different names
    assert sorted(name.split("-")[1] for name in names) == ["s0", "s0", "s1"]


def test_fit_output_has_no_library_chatter(tmp_path):
    """What `arsq fit` prints is about the run: no cloud-logger advertisement, no TorchRL INFO lines, no notes on
    callbacks overridden or checkpoint defaults from the validate that follows the last update."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    env.pop("RL_LOGGING_LEVEL", None)
    args = ["fit", "--config", str(QUICKSTART), *TINY, "--trainer.max_steps", "7", "--trainer.val_check_interval", "5"]
    result = subprocess.run([sys.executable, "-m", "arsq_lightning.cli", *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "final eval return" in result.stdout  # the validate after the last update ran
    output = result.stdout + result.stderr
    for chatter in ("litlogger", "override existing callbacks", "`weights_only` was not set", "[torchrl][INFO]",
                    "LeafSpec"):
        assert chatter not in output, chatter


def test_a_resume_with_other_model_settings_or_another_env_fails_with_one_line(monkeypatch, tmp_path, capsys):
    """Lightning would silently train the checkpoint's model settings; a checkpoint of other sizes would end in a
    size-mismatch traceback. Both are one line naming what differs; budget changes stay allowed (previous test)."""
    use_tmp_mlflow(monkeypatch, tmp_path)
    ckpt = build_cli(["fit", "--config", str(QUICKSTART), *TINY]).trainer.checkpoint_callback.last_model_path
    cases = [(["--model.discretizer.init_args.levels", "2"], "model.discretizer.init_args.levels (3 there, 2 here)"),
             (["--data.env_id", "MountainCarContinuous-v0"], "its networks do not fit this config's env")]
    for override, message in cases:
        assert_fails_with_one_line(["fit", "--config", str(QUICKSTART), *TINY, *override, "--ckpt_path", ckpt],
                                   message, capsys)


def test_predict_is_not_offered(capsys):
    """Lightning's ``predict`` needs a ``forward`` the module does not have: the CLI does not list or accept it."""
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "predict" not in out and "arsq: train value-based continuous-control agents" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--config", str(QUICKSTART)])
    assert exit_info.value.code == 2 and "Traceback" not in capsys.readouterr().err


def test_seed_everything_seeds_the_data_module_unless_data_seed_is_given(monkeypatch, tmp_path):
    use_tmp_mlflow(monkeypatch, tmp_path)
    args = ["fit", "--config", str(QUICKSTART), *TINY, "--trainer.max_steps", "5", "--trainer.val_check_interval", "5"]
    assert build_cli([*args, "--seed_everything", "3"]).datamodule.base_seed == 3
    assert build_cli([*args, "--seed_everything", "3", "--data.seed", "5"]).datamodule.base_seed == 5


@pytest.mark.parametrize("tool", ["make_demos", "make_dataset", "compare", "benchmark", "bench"])
def test_every_tool_runs_from_an_empty_directory(tool, tmp_path):
    """The tools are modules of the package (entry points ``arsq-demos`` ...), so they need no checkout."""
    result = subprocess.run([sys.executable, "-m", f"arsq_lightning.tools.{tool}", "--help"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage:")


def test_the_trainer_options_left_out_of_the_parser_are_fixed(monkeypatch, tmp_path):
    """Epoch-based options are not offered; the trainer gets the values an update-counted run needs."""
    from arsq_lightning.cli import TRAINER_FIXED

    use_tmp_mlflow(monkeypatch, tmp_path)
    trainer = build_cli(["--config", str(QUICKSTART), *TINY], run=False).trainer
    assert trainer.num_sanity_val_steps == TRAINER_FIXED["num_sanity_val_steps"] == 0
    assert trainer.check_val_every_n_epoch is None and trainer.accumulate_grad_batches == 1
    assert trainer.val_check_interval == 15 and trainer.max_steps == 30


def test_checkpoint_every_n_updates_is_written_between_evaluations(monkeypatch, tmp_path):
    """``--checkpoint.every_n_train_steps 4`` with evaluations every 15 updates: the newest step checkpoint is the
    one of update 28 (the last multiple of 4 of 30), written although no evaluation came after update 15."""
    use_tmp_mlflow(monkeypatch, tmp_path)
    cli = build_cli(["fit", "--config", str(QUICKSTART), *TINY, "--checkpoint.every_n_train_steps", "4"])
    folder = Path(cli.trainer.checkpoint_callback.dirpath)
    steps = sorted(torch.load(path, weights_only=False)["global_step"] for path in folder.glob("epoch=*.ckpt"))
    assert steps[-1] == 28
