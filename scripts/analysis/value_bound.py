"""How far a trained ARSQ critic's values go past what any return can reach (docs/benchmark.md, twelfth round).

    python scripts/analysis/value_bound.py CHECKPOINT [--dataset PATH]

Rebuilds the run's dataset rows from the data module settings saved in an offline-to-online checkpoint (the file can
be given again with ``--dataset`` if it moved) and reports, over every row of the RL buffer's dataset part, the critic's
``Q(s, a)`` (minimum over the critics) and the target networks' value of ``s'``: mean, maximum and the share above the
bound ``max |r| / (1 - gamma)``, with ``r`` the rewards as scaled for training (so 1 / (1 - gamma) with
``reward_scale: max_reward``). No policy's discounted return exceeds the bound; values above it are overestimates.
"""

from __future__ import annotations

import argparse

import torch
from saved_run import action_value, load_run, value_bound

from arsq_lightning.algos.arsq.critic import ARSQCritic
from arsq_lightning.keys import ACTION, NEXT_OBSERVATION, OBSERVATION


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--dataset", default=None, help="the dataset file, if not where the run read it")
    args = parser.parse_args()
    module, data = load_run(args.checkpoint, args.dataset)
    critic = module.critic
    if not isinstance(critic, ARSQCritic):
        raise SystemExit("value_bound.py reads ARSQ checkpoints")
    rows = data.split.rl
    bound = value_bound(data, module.loss_fn.gamma)
    with torch.no_grad():
        q = torch.cat([action_value(critic, part[OBSERVATION], part[ACTION]) for part in rows.split(2048)])
        next_value = torch.cat([critic.target_value(part[NEXT_OBSERVATION]) for part in rows.split(2048)])
    for name, values in (("Q(s, a)", q), ("target V(s')", next_value)):
        print(f"{name:13s} mean {values.mean():7.1f}  max {values.max():7.1f}  "
              f"share above the bound {bound:.0f}: {(values > bound).float().mean():.3f}")


if __name__ == "__main__":
    main()
