"""Per-episode seeding of the training env, and rebuilding an unfinished episode from its index and actions."""

from __future__ import annotations

import torch
from torchrl.envs.utils import step_mdp

from arsq_lightning.envs.core import make_env
from arsq_lightning.envs.episodes import EpisodeRecord, EpisodeSeeds, replay_episode
from arsq_lightning.keys import ACTION, OBSERVATION


def _seeded_env(seed: int = 5):
    env, seeds = make_env("Pendulum-v1"), EpisodeSeeds(seed)
    env.append_transform(seeds)
    return env, seeds


def _play(env, steps: int, generator: torch.Generator):
    """Reset, take ``steps`` random actions; returns the actions ``[steps, 1]`` and the env's last output."""
    carrier, actions = env.reset(), []
    for _ in range(steps):
        action = torch.rand(1, generator=generator) * 4 - 2
        carrier.set(ACTION, action)
        carrier = step_mdp(env.step(carrier))
        actions.append(action)
    return torch.stack(actions), carrier


def test_each_episode_has_its_own_seed_and_the_same_index_the_same_start():
    env, seeds = _seeded_env()
    starts = [env.reset()[OBSERVATION] for _ in range(3)]
    assert seeds.episodes == 3
    assert not torch.equal(starts[0], starts[1]) and not torch.equal(starts[1], starts[2])
    again, _ = _seeded_env()
    assert torch.equal(again.reset()[OBSERVATION], starts[0])
    other, _ = _seeded_env(seed=6)
    assert not torch.equal(other.reset()[OBSERVATION], starts[0])


def test_replaying_an_episode_rebuilds_the_env_mid_episode():
    env, seeds = _seeded_env()
    generator = torch.Generator().manual_seed(0)
    _play(env, 4, generator)  # episode 0
    actions, carrier = _play(env, 7, generator)  # episode 1, unfinished
    record = EpisodeRecord(seeds.episodes - 1, actions, carrier.to_dict())
    later_action = torch.tensor([0.5])
    expected = env.step(carrier.set(ACTION, later_action))[("next", OBSERVATION)]

    fresh, fresh_seeds = _seeded_env()
    fresh.reset()  # as a new collector does
    rebuilt = replay_episode(fresh, fresh_seeds, record)
    assert rebuilt is not None and fresh_seeds.episodes == 2
    assert torch.equal(fresh.step(rebuilt.set(ACTION, later_action))[("next", OBSERVATION)], expected)


def test_a_replay_that_does_not_match_the_saved_state_is_refused():
    env, seeds = _seeded_env()
    actions, carrier = _play(env, 3, torch.Generator().manual_seed(1))
    state = carrier.to_dict()
    state[OBSERVATION] = state[OBSERVATION] + 1e-6
    fresh, fresh_seeds = _seeded_env()
    assert replay_episode(fresh, fresh_seeds, EpisodeRecord(0, actions, state)) is None
    assert fresh_seeds.episodes == 1  # counts on from the recorded episode either way
