"""Training episodes that can be rebuilt, so that a resumed run continues the episode it stopped in.

No env's state can be saved in general (TorchRL's collectors start a new trajectory when they are restored). Instead
the training env is seeded once per episode: :class:`EpisodeSeeds` seeds the base env before every reset from the
run's seed and the episode's index. An unfinished episode is then fully described by its index and the actions taken
in it so far (:class:`EpisodeRecord`); :func:`replay_episode` resets with that index and steps through the actions,
which rebuilds the env's internal state (physics, time limit, frame stacks) for any deterministic env, and checks the
result against the state saved with the record.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.envs import TransformedEnv
from torchrl.envs.transforms import Transform
from torchrl.envs.utils import step_mdp

from arsq_lightning.keys import ACTION


def episode_seed(seed: int, episode: int) -> int:
    """The reset seed of episode ``episode`` (0-based) of a run seeded ``seed``."""
    return int(np.random.SeedSequence([seed, episode]).generate_state(1)[0])


def sub_env_seed(seed: int, env: int) -> int:
    """The seed of env ``env`` of envs stepped side by side by a run seeded ``seed``: ``seed`` itself for env 0 (so
    that one env is seeded as before there were several), a spawned, independent seed for the others."""
    if env == 0:
        return seed
    return int(np.random.SeedSequence(seed, spawn_key=(env,)).generate_state(1)[0])


class EpisodeSeeds(Transform):
    """Seeds the base env with :func:`episode_seed` ``(seed, episodes)`` before each reset and counts the resets.

    ``episodes`` is the number of resets so far: the episode under way has index ``episodes - 1``.
    """

    def __init__(self, seed: int):
        super().__init__()
        self.seed, self.episodes = seed, 0

    def _reset_env_preprocess(self, tensordict: TensorDictBase | None) -> TensorDictBase | None:
        self.parent.base_env.set_seed(episode_seed(self.seed, self.episodes))
        self.episodes += 1
        return tensordict

    def _reset(self, tensordict: TensorDictBase, tensordict_reset: TensorDictBase) -> TensorDictBase:
        return tensordict_reset


@dataclass
class EpisodeRecord:
    """An unfinished training episode: its ``index``, its ``actions`` ``[T, D]`` so far and the env's output after the
    last of them (``state``: the collector's carrier as a nested dict of tensors)."""

    index: int
    actions: torch.Tensor
    state: dict

    def to_dict(self) -> dict:
        return {"index": self.index, "actions": self.actions, "state": self.state}

    @classmethod
    def from_dict(cls, saved: dict) -> EpisodeRecord:
        return cls(int(saved["index"]), saved["actions"], saved["state"])


def replay_episode(env: TransformedEnv, seeds: EpisodeSeeds, record: EpisodeRecord) -> TensorDictBase | None:
    """Reset ``env`` (whose transforms end with ``seeds``) into episode ``record.index`` and take its actions.

    Returns the env's output after the last action (what a collector carries into its next step), or ``None`` when
    it differs from ``record.state`` (an env that is not deterministic given its seed and actions). Either way
    ``seeds`` counts on from the recorded episode.
    """
    seeds.episodes = record.index
    with torch.no_grad():
        carrier = env.reset()
        for action in record.actions:
            carrier.set(ACTION, action)
            carrier = step_mdp(env.step(carrier))
    saved = TensorDict(record.state, batch_size=carrier.batch_size)
    shared = set(saved.keys(True, True)) & set(carrier.keys(True, True))  # the policy may add keys of its own
    observed = set(env.observation_spec.keys(True, True))
    if observed <= shared and all(torch.equal(carrier[key], saved[key]) for key in shared):
        return carrier
    return None
