"""Learning against a real env: a short Pendulum-v1 run clearly beats the uniform random policy."""

from __future__ import annotations

import torch

from arsq_lightning.cli import build_cli

from helpers import QUICKSTART, use_tmp_mlflow

SHORT_RUN = ["--trainer.max_steps", "3000", "--trainer.val_check_interval", "3000",
             "--trainer.log_every_n_steps", "500", "--trainer.enable_progress_bar", "false",
             "--data.init_random_frames", "500", "--data.batch_size", "128",
             "--model.head.init_args.hidden_dims", "[64,64]", "--model.optimizer.init_args.lr", "0.001"]


def random_policy_returns(data, episodes: int) -> torch.Tensor:
    """Returns of uniformly random actions on the same evaluation episodes (same reset seeds)."""
    env = data.make_env(data.hparams.eval_seed)
    returns = []
    for episode in range(episodes):
        env.set_seed(data.hparams.eval_seed + episode)
        returns.append(env.rollout(10_000, break_when_any_done=True)["next", "reward"].sum())
    return torch.stack(returns)


def test_short_pendulum_run_beats_random_policy(monkeypatch, tmp_path):
    use_tmp_mlflow(monkeypatch, tmp_path)
    cli = build_cli(["fit", "--config", str(QUICKSTART), *SHORT_RUN])
    learned = cli.trainer.callback_metrics["eval/return_mean"].item()
    random = random_policy_returns(cli.datamodule, cli.datamodule.hparams.eval_episodes).mean().item()
    print(f"learned {learned:.0f}, random {random:.0f}")
    assert random < -900, f"random policy unexpectedly good: {random:.0f}"
    assert learned > random + 500, f"learned {learned:.0f} vs random {random:.0f}"
