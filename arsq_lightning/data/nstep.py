"""n-step rows: each transition also carries the rewards of the next steps of its episode and the observation after
them, so that the loss can regress on ``r_t + gamma r_{t+1} + ... + gamma^{k-1} r_{t+k-1} + gamma^k V(s_{t+k})``.

A row looks ``k = min(n, steps left in its episode)`` steps ahead: it stops early where its episode ends (terminated
or truncated) or where the next row belongs to another episode. The discount stays the loss's
(:func:`arsq_lightning.algos.base.td_reward`, :func:`~arsq_lightning.algos.base.bootstrap_discount`).
"""

from __future__ import annotations

import torch
from tensordict import TensorDictBase

from arsq_lightning.errors import require
from arsq_lightning.keys import (
    NEXT,
    NEXT_DONE,
    NEXT_REWARD,
    NSTEP_REWARDS,
    STEPS_TO_NEXT,
)


def nstep_transitions(rows: TensorDictBase, n: int, episode: torch.Tensor | None = None) -> TensorDictBase:
    """``rows`` ``[T]`` (one-step transitions, episodes contiguous and in time order) as ``n``-step rows.

    Args:
        rows: TorchRL-layout transitions ``[T]``; ``("next", "done")`` ends an episode.
        n: steps to look ahead (1 gives one-step rows with the two keys below).
        episode: ``[T]`` episode ids; a change of id also ends an episode (``None``: episodes end by their flags).

    Returns:
        a new TensorDict ``[T]``: ``next`` holds row ``t + k - 1``'s entries except ``("next", "reward")``, which stays
        the row's own reward; ``nstep_rewards`` ``[T, n]`` the rewards of steps ``t .. t + k - 1`` (zero after
        them); ``steps_to_next_obs`` ``k`` ``[T]`` (int64, TorchRL's name).
    """
    require(n >= 1, f"n-step needs n >= 1, got {n}")
    length = rows.numel()
    ends = rows[NEXT_DONE].reshape(-1).bool()
    ids = None if episode is None else episode.reshape(-1)
    reward = rows[NEXT_REWARD].reshape(length)
    t = torch.arange(length)
    rewards = torch.zeros(length, n, dtype=reward.dtype)
    last, alive = t.clone(), torch.ones(length, dtype=torch.bool)
    for j in range(n):
        index = (t + j).clamp(max=length - 1)
        ok = alive & (t + j < length)
        if ids is not None:
            ok &= ids[index] == ids
        rewards[:, j] = torch.where(ok, reward[index], 0.0)
        last = torch.where(ok, index, last)
        alive = ok & ~ends[index]
    out = rows.exclude(NEXT).clone()
    out[NEXT] = rows[NEXT][last]  # indexing copies
    out[NEXT_REWARD] = rows[NEXT_REWARD].clone()
    out[NSTEP_REWARDS] = rewards
    out[STEPS_TO_NEXT] = last - t + 1
    return out

