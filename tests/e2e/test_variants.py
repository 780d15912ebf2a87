"""The comparison variants end to end through the CLI: the CQN baseline, the grouped head and the data-adaptive
discretizer plug into the same module, data and loop by config alone."""

from __future__ import annotations

import torch

from arsq_lightning import ARSQModule, CQNCritic, QuantileDiscretizer
from arsq_lightning.cli import build_cli

from helpers import REPO, TINY, only_run, use_tmp_mlflow, write_random_dataset

COMPARE = REPO / "configs" / "compare"


def test_cqn_trains_and_evaluates_through_the_cli(monkeypatch, tmp_path):
    uri = use_tmp_mlflow(monkeypatch, tmp_path)
    cli = build_cli(["fit", "--config", str(COMPARE / "reacher_cqn.yaml"), *TINY])
    assert isinstance(cli.model.critic, CQNCritic) and cli.trainer.global_step == 30
    client, run = only_run(uri)
    for key in ("train/loss_td", "train/loss_fosd", "train/loss_margin", "eval/return_mean"):
        assert key in run.data.metrics
    reloaded = ARSQModule.load_from_checkpoint(cli.trainer.checkpoint_callback.last_model_path)
    assert isinstance(reloaded.critic, CQNCritic)
    for saved, trained in zip(reloaded.critic.head.parameters(), cli.model.critic.head.parameters()):
        assert torch.equal(saved, trained)


def test_grouped_head_trains_through_the_cli(monkeypatch, tmp_path):
    use_tmp_mlflow(monkeypatch, tmp_path)
    cli = build_cli(["fit", "--config", str(COMPARE / "reacher_grouped.yaml"), *TINY])
    assert cli.model.critic.head.groups == [[0, 1]] and cli.trainer.global_step == 30


def test_quantile_discretizer_is_fitted_to_the_dataset_once_and_resumed(monkeypatch, tmp_path):
    use_tmp_mlflow(monkeypatch, tmp_path)
    data = write_random_dataset("Reacher-v5", tmp_path / "data.hdf5", steps=200)
    args = ["fit", "--config", str(COMPARE / "reacher_mr_quantile.yaml"), *TINY, "--data.dataset", str(data),
            "--data.pretrain_steps", "10"]
    first = build_cli(args)
    disc = first.model.critic.discretizer
    assert isinstance(disc, QuantileDiscretizer) and bool(disc.fitted)
    expected = QuantileDiscretizer(disc.low, disc.high, levels=3, bins=5, knots=64, uniform_mix=0.1)
    expected.fit(first.datamodule.action_samples())
    torch.testing.assert_close(disc.edges, expected.edges)
    uniform = QuantileDiscretizer(disc.low, disc.high, levels=3, bins=5, knots=64, uniform_mix=0.1).edges
    assert not torch.allclose(disc.edges, uniform)
    ckpt = first.trainer.checkpoint_callback.last_model_path
    # other data would fit other edges: the resumed run must take the checkpoint's, not refit (changing a model
    # setting such as uniform_mix is refused on resume, so the data is what changes here)
    other = write_random_dataset("Reacher-v5", tmp_path / "other.hdf5", steps=120)
    refit = QuantileDiscretizer(disc.low, disc.high, levels=3, bins=5, knots=64, uniform_mix=0.1)
    resumed = build_cli([*args, "--trainer.max_steps", "40", "--ckpt_path", ckpt, "--data.dataset", str(other)])
    refit.fit(resumed.datamodule.action_samples())
    assert not torch.allclose(refit.edges, disc.edges)  # a refit would have moved them
    assert torch.equal(resumed.model.critic.discretizer.edges, disc.edges)


def test_per_dim_grids_train_with_both_critics(monkeypatch, tmp_path):
    """``levels`` / ``bins`` lists give each action dim its own grid, for ARSQ and CQN alike."""
    use_tmp_mlflow(monkeypatch, tmp_path)
    grid = ["--model.discretizer.init_args.levels", "[3, 2]", "--model.discretizer.init_args.bins", "[5, 3]"]
    for config in ("reacher_arsq.yaml", "reacher_cqn.yaml"):
        cli = build_cli(["fit", "--config", str(COMPARE / config), *TINY, "--trainer.max_steps", "20", *grid])
        disc = cli.model.critic.discretizer
        assert disc.bins_table.long().tolist() == [[5, 3], [5, 3], [5, 1]] and cli.trainer.global_step == 20
        action = cli.model.act(torch.randn(64, 10), deterministic=False)
        assert torch.equal(disc.decode(disc.encode(action)), action)
