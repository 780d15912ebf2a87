"""How far a trained critic's values are from the returns its greedy policy then gets (docs/benchmark.md, thirteenth
round).

    python scripts/analysis/value_error.py CHECKPOINT [--episodes 10] [--steps 50] [--dataset PATH]

Runs greedy episodes of an offline-to-online run (its own evaluation seeds, its env settings) and compares, over the
first ``--steps`` steps of each, the critic's value of the action taken with the discounted return that followed, in
training units (rewards scaled as for training), completed at the episode's end with the critic's own greedy value
there:

    error_t = Q(s_t, a_t) - (sum_{j=t}^{T-1} gamma^(j-t) r_j + gamma^(T-t) Q(s_T, greedy(s_T)))

The completion carries the critic's own error at ``s_T`` with weight ``gamma^(T-t)`` (at most 0.37 when
``T - t >= 100``), so a systematic error is understated by about that share. ARSQ's ``Q`` is the minimum over its
critics; CQN's, the mean over (level, dim) of its expected values at the action's bins (each is an estimate of the
same ``Q(s, a)``). Errors are also given as a share of the bound ``max |r| / (1 - gamma)`` over the dataset's rows,
so runs with differently scaled rewards compare.
"""

from __future__ import annotations

import argparse

import torch
from saved_run import action_value, load_run, value_bound
from torch import Tensor
from torchrl.envs.utils import ExplorationType, set_exploration_type

from arsq_lightning.data.offline import OfflineToOnlineDataModule
from arsq_lightning.keys import ACTION, NEXT_OBSERVATION, NEXT_REWARD, OBSERVATION
from arsq_lightning.policy import make_actor


def episode_errors(data: OfflineToOnlineDataModule, critic, episode: int, gamma: float) -> tuple[Tensor, Tensor]:
    """One greedy episode: ``Q(s_t, a_t)`` and the completed discounted return ``G_t``, each ``[T]``."""
    env = data.make_env(data.hparams.eval_seed)
    env.set_seed(data.hparams.eval_seed + episode)
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        rollout = env.rollout(data.hparams.eval_max_steps, make_actor(critic))
    env.close()
    q = action_value(critic, rollout[OBSERVATION], rollout[ACTION])
    last = rollout[NEXT_OBSERVATION][-1:]
    returns = torch.empty_like(q)
    following = action_value(critic, last, critic.act(last, deterministic=True))[0]
    rewards = rollout[NEXT_REWARD].reshape(-1) * data.reward_scale + data.hparams.reward_bias
    for t in range(len(q) - 1, -1, -1):
        following = rewards[t] + gamma * following
        returns[t] = following
    return q, returns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--steps", type=int, default=50, help="the first steps of each episode that are compared")
    parser.add_argument("--dataset", default=None, help="the dataset file, if not where the run read it")
    args = parser.parse_args()
    module, data = load_run(args.checkpoint, args.dataset)
    critic = module.critic
    gamma = module.loss_fn.gamma
    bound = value_bound(data, gamma)
    values, returns = [], []
    with torch.no_grad():
        for episode in range(args.episodes):
            q, g = episode_errors(data, critic, episode, gamma)
            values.append(q[:args.steps])
            returns.append(g[:args.steps])
    q, g = torch.cat(values), torch.cat(returns)
    error = q - g
    print(f"{type(critic).__name__}, {args.episodes} greedy episodes, first {args.steps} steps each; bound {bound:.1f}")
    print(f"Q(s, a) mean {q.mean():.2f}  return mean {g.mean():.2f}  error mean {error.mean():+.2f} "
          f"(median {error.median():+.2f}, share of the bound {error.mean() / bound:+.3f})")


if __name__ == "__main__":
    main()
