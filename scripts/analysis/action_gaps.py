"""How strongly a trained critic prefers one bin over the next, against its TD errors (docs/benchmark.md, sixth round).

    python scripts/analysis/action_gaps.py CHECKPOINT [--online-rows 4000] [--rows 3000]

Reads a checkpoint of an offline-to-online run and its replay buffers (beside it, or inside an older ``.ckpt``) and
reports, on up to ``--rows`` random rows of three sets (the online rows: the last ``--online-rows`` of the RL buffer;
the dataset's other rows; the demo buffer):

* ``y``: the mean TD target, ``r + gamma * (1 - terminated) * value of s'`` as the loss computes it;
* ``delta``: the TD error ``y - Q(s, a)``, mean and mean absolute;
* ``gap``: the median difference between the best and the second-best bin at each decision, given the data action's
  earlier choices: ARSQ's soft advantages (minimum over the critics, as acting uses them) at each of its positions,
  CQN's expected bin values at each (level, dim);
* ``off-greedy``: the share of decisions where the data's bin is not the greedy one.

``gap / |y|`` compares the two methods on one scale whatever the reward's units.
"""

from __future__ import annotations

import argparse

import torch
from tensordict import TensorDict

from arsq_lightning.algos.arsq.critic import ARSQCritic
from arsq_lightning.algos.cqn.critic import at_bins
from arsq_lightning.data import buffer_files
from arsq_lightning.keys import ACTION, NEXT_OBSERVATION, NEXT_REWARD, NEXT_TERMINATED, OBSERVATION
from arsq_lightning.module import ARSQModule


def buffers(path: str) -> dict[str, TensorDict]:
    """The checkpoint's replay buffers by name (``replay``, ``demo``)."""
    saved = torch.load(path, map_location="cpu", weights_only=False)
    state = next(v for v in saved.values() if isinstance(v, dict) and ("buffers" in v or "buffer_folder" in v))
    if "buffers" in state:  # checkpoints written before the buffers moved beside them
        return {name: TensorDict(b["data"], batch_size=[b["length"]]) for name, b in state["buffers"].items()}
    folder = buffer_files.rank_folder(path, state["buffer_folder"], 0)
    return {name: buffer_files.read_rows(folder, name) for name in ("replay", "demo")}


@torch.no_grad()
def arsq_numbers(critic: ARSQCritic, gamma: float, rows: TensorDict) -> tuple[torch.Tensor, ...]:
    """TD targets ``[B]``, TD errors ``[B]`` (mean over critics), gaps and off-greedy flags ``[B, N]``."""
    q, adv, codes = critic.evaluate(rows[OBSERVATION], rows[ACTION])  # [C, B], [C, B, N, K], [B, N]
    not_terminal = 1.0 - rows[NEXT_TERMINATED].reshape(-1).float()
    y = rows[NEXT_REWARD].reshape(-1) + gamma * not_terminal * critic.target_value(rows[NEXT_OBSERVATION])
    acting = adv.min(0).values
    top = acting.topk(2, -1).values
    return y, y - q.mean(0), top[..., 0] - top[..., 1], acting.argmax(-1) != codes


@torch.no_grad()
def cqn_numbers(critic, gamma: float, rows: TensorDict) -> tuple[torch.Tensor, ...]:
    """TD targets and errors (expected values) ``[B, L, D]``, gaps and off-greedy flags ``[B, L, D]``."""
    logits, codes = critic.evaluate(rows[OBSERVATION], rows[ACTION])  # [B, L, D, K, A], [B, L, D]
    values = critic.head.expected_q(logits)  # [B, L, D, K]
    not_terminal = 1.0 - rows[NEXT_TERMINATED].reshape(-1).float()
    next_probs = critic.target_logits(rows[NEXT_OBSERVATION]).softmax(-1)
    y = rows[NEXT_REWARD].reshape(-1, 1, 1) + gamma * not_terminal.view(-1, 1, 1) * (
        next_probs * critic.head.support).sum(-1)
    data = critic.head.expected_q(at_bins(logits, codes))
    top = values.topk(2, -1).values
    return y, y - data, top[..., 0] - top[..., 1], values.argmax(-1) != codes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--online-rows", type=int, default=4000, help="the RL buffer's last rows that are online")
    parser.add_argument("--rows", type=int, default=3000, help="random rows per set")
    args = parser.parse_args()
    torch.set_num_threads(1)
    module = ARSQModule.load_from_checkpoint(args.checkpoint, map_location="cpu")
    numbers = arsq_numbers if isinstance(module.critic, ARSQCritic) else cqn_numbers
    saved, generator = buffers(args.checkpoint), torch.Generator().manual_seed(0)
    sets = {"online": saved["replay"][-args.online_rows:], "dataset, not demo": saved["replay"][:-args.online_rows],
            "demo": saved["demo"]}
    print(f"{type(module.critic).__name__}: {args.checkpoint}")
    for name, rows in sets.items():
        rows = rows[torch.randperm(rows.shape[0], generator=generator)[:args.rows]]
        y, delta, gap, off = numbers(module.critic, module.loss_fn.gamma, rows)
        print(f"  {name:18s} rows {rows.shape[0]:5d}  y {y.mean():8.2f}  delta {delta.mean():+8.3f}  "
              f"|delta| {delta.abs().mean():7.3f}  gap {gap.median():8.4f}  gap/|y| {gap.median() / y.abs().mean():.1e}"
              f"  off-greedy {off.float().mean():.2f}")


if __name__ == "__main__":
    main()
