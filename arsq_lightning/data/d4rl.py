"""The official D4RL data protocol of ARSQ: episodes sorted by return, a demo window, the two buffers' contents, and the
D4RL normalised score (docs/algorithm.md §4.1-§4.2).

:func:`split_demos` turns a TED TensorDict (from :mod:`arsq_lightning.data.datasets`) into the RL buffer's data
(the whole dataset) and the demo buffer's data (a window of transitions ordered by their episode's return), each with a
``demo`` flag, plus the statistics the online phase needs (e.g. the relabelling threshold).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from tensordict import TensorDict

from arsq_lightning.data.nstep import nstep_transitions
from arsq_lightning.errors import require
from arsq_lightning.keys import DEMO, EPISODE, NEXT_REWARD, NEXT_SUCCESS, NEXT_TERMINATED, NEXT_TRUNCATED

# D4RL's reference returns (random, expert) used by env.get_normalized_score, per MuJoCo task.
D4RL_REFERENCE_RETURNS: dict[str, tuple[float, float]] = {
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
    "ant": (-325.6, 3879.7),
}


def task_name(env_id: str) -> str:
    """``Hopper-v5`` / ``hopper-medium-v2`` -> ``hopper``."""
    return env_id.split("-")[0].split("/")[-1].lower()


def normalized_score(env_id: str, episode_return: float) -> float:
    """D4RL normalised score as a fraction: ``(return - random) / (expert - random)`` (x100 is the usual score)."""
    name = task_name(env_id)
    require(name in D4RL_REFERENCE_RETURNS, f"no D4RL reference returns for {env_id!r} "
                                            f"(known: {sorted(D4RL_REFERENCE_RETURNS)})")
    low, high = D4RL_REFERENCE_RETURNS[name]
    return (episode_return - low) / (high - low)


def episode_sums(data: TensorDict, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sums of per-row ``values`` ``[T]`` (float64) within each episode: the sorted unique episode ids ``[E]``, their
    sums ``[E]`` and each row's episode index into them ``[T]``."""
    ids, inverse = torch.unique(data[EPISODE], return_inverse=True)
    sums = torch.zeros(len(ids), dtype=torch.float64).index_add_(0, inverse, values.reshape(-1).double())
    return ids, sums, inverse


def episode_returns(data: TensorDict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row episode return ``[T]`` and the sorted unique episode ids with their returns ``([E], [E])``."""
    _, totals, inverse = episode_sums(data, data[NEXT_REWARD])
    return totals[inverse], totals


def episode_successes(data: TensorDict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The sorted unique episode ids ``[E]`` and whether each episode reports success at some row ``[E]`` (bool);
    ``None`` for data without the env's success flags."""
    if NEXT_SUCCESS not in data.keys(True):
        return None
    ids, hits, _ = episode_sums(data, data[NEXT_SUCCESS])
    return ids, hits > 0


def returns_to_go(data: TensorDict, gamma: float) -> torch.Tensor:
    """Discounted return-to-go of every row ``[T]`` within its episode (rows of an episode in file order; the last row
    of an episode does not bootstrap, whatever ended it)."""
    rewards = data[NEXT_REWARD].reshape(-1).double().tolist()
    episodes = data[EPISODE].reshape(-1).tolist()
    out, running = [0.0] * len(rewards), 0.0
    for t in range(len(rewards) - 1, -1, -1):
        continues = t + 1 < len(rewards) and episodes[t + 1] == episodes[t]
        running = rewards[t] + (gamma * running if continues else 0.0)
        out[t] = running
    return torch.tensor(out, dtype=torch.float64)


REWARD_SCALE_RULES = ("auto", "max_reward")  # data.reward_scale's names; a number fixes the scale instead


def _inverse(largest: float, rule: str) -> float:
    """``1 / largest``; a dataset whose rewards are all zero has no scale and keeps 1, with a warning."""
    if largest == 0:
        warnings.warn(f"reward_scale {rule}: every reward in the dataset is zero, so rewards keep scale 1",
                      stacklevel=3)
        return 1.0
    return 1.0 / largest


def max_reward_scale(data: TensorDict) -> float:
    """``1 / max_t |r_t|``: the largest per-step reward becomes 1, as with a 0/1 success reward (for which the
    official RLBench temperature and margin were tuned). All-zero rewards keep scale 1, with a warning."""
    return _inverse(float(data[NEXT_REWARD].abs().max()), "max_reward")


def auto_reward_scale(data: TensorDict, gamma: float) -> float:
    """``1 / max_t |G_t|`` over the dataset's discounted returns-to-go: rewards times this give values of about unit
    size whatever the reward's units (a sparse 0/1 success reward keeps scale 1). A dataset whose rewards are all zero
    has no value scale: it keeps scale 1, with a warning."""
    return _inverse(float(returns_to_go(data, gamma).abs().max()), "auto")


def reward_scale_of(data: TensorDict, scale: float | str, gamma: float) -> float:
    """The reward scale ``data.reward_scale`` asks for: a rule of :data:`REWARD_SCALE_RULES` applied to ``data``
    (``gamma`` discounts ``auto``'s returns), or the number itself."""
    if scale == "auto":
        return auto_reward_scale(data, gamma)
    return max_reward_scale(data) if scale == "max_reward" else float(scale)


def demo_window(num_rows: int, percentile: float, ratio: float) -> tuple[int, int]:
    """Rows ``[start, stop)`` of the demo subset in return-sorted order (§4.1 step 3).

    The percentile ``p`` is clamped to ``[r/2, 100 - r/2]``; the window is
    ``[floor(N (p - r/2) / 100), floor(N (p + r/2) / 100))``.
    """
    require(0 < ratio <= 100, f"demo_ratio must lie in (0, 100], got {ratio}")
    p = min(max(percentile, ratio / 2), 100 - ratio / 2)
    return math.floor(num_rows * (p - ratio / 2) / 100), math.floor(num_rows * (p + ratio / 2) / 100)


@dataclass
class DemoSplit:
    """What :func:`split_demos` returns: RL-buffer and demo-buffer data (both with a ``demo`` flag) and statistics."""

    rl: TensorDict
    demo: TensorDict
    mean_episode_return: float  # whole dataset, after reward scaling
    max_episode_return: float
    demo_mean_episode_return: float  # episodes that have rows in the demo window: the relabelling threshold
    success_rate: float | None = None  # share of the episodes that report success at some row (None: no flags)
    demo_success_rate: float | None = None  # the same over the episodes that have rows in the demo window


def split_demos(data: TensorDict, *, demo_percentile: float = 0.0, demo_ratio: float = 100.0,
                reward_scale: float = 1.0, reward_bias: float = 0.0, drop_timeouts: bool = True,
                n_step: int = 1) -> DemoSplit:
    """The official preprocessing (§4.1): drop time-out transitions, scale rewards, sort episodes by return
    (ascending, stable), cut the demo window.

    Args:
        data: TED TensorDict ``[T]`` with an ``episode`` id per row.
        demo_percentile, demo_ratio: the window (official defaults 0 and 100: the whole dataset).
        reward_scale, reward_bias: ``r <- r * scale + bias``.
        drop_timeouts: drop transitions that end by time-out (the official code does).
        n_step: with ``n_step > 1`` the rows become n-step rows within their episodes
            (:func:`~arsq_lightning.data.nstep.nstep_transitions`).
    """
    successes = episode_successes(data)  # before time-outs are dropped: success may come at an episode's last row
    if drop_timeouts:
        data = data[~(data[NEXT_TRUNCATED].reshape(-1) & ~data[NEXT_TERMINATED].reshape(-1))]
    require(data.numel() > 0, "no transition left after dropping time-outs")
    data = data.clone()
    data[NEXT_REWARD] = data[NEXT_REWARD] * reward_scale + reward_bias
    per_row, totals = episode_returns(data)
    if n_step > 1:
        data = nstep_transitions(data, n_step, episode=data[EPISODE])
    episode_ids = torch.unique(data[EPISODE])  # sorted; totals[k] belongs to episode_ids[k]
    data = data[torch.argsort(per_row, stable=True)]  # episodes stay contiguous (equal returns keep file order)
    start, stop = demo_window(data.numel(), demo_percentile, demo_ratio)
    require(stop > start, f"the demo window [{start}, {stop}) is empty: raise demo_ratio")
    demo = data[start:stop].clone()
    demo[DEMO] = torch.ones(demo.numel(), dtype=torch.bool)
    data[DEMO] = torch.zeros(data.numel(), dtype=torch.bool)
    demo_ids = torch.unique(demo[EPISODE])
    in_window = torch.searchsorted(episode_ids, demo_ids)
    rates = {}
    if successes is not None:
        ids, success = successes
        rates = {"success_rate": float(success.float().mean()),
                 "demo_success_rate": float(success[torch.searchsorted(ids, demo_ids)].float().mean())}
    return DemoSplit(rl=data, demo=demo, mean_episode_return=float(totals.mean()),
                     max_episode_return=float(totals.max()),
                     demo_mean_episode_return=float(totals[in_window].mean()), **rates)
