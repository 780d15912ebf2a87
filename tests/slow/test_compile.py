"""``compile_act=True`` (torch.compile of the acting loop) chooses exactly the actions of the eager loop."""

from __future__ import annotations

import torch

from arsq_lightning import ARSQCritic, AutoregressiveHead, CoarseToFineDiscretizer, FlattenEncoder


def test_compiled_acting_matches_eager():
    disc = CoarseToFineDiscretizer([-1.0, 0.0], [1.0, 3.0], levels=2, bins=3)
    head = AutoregressiveHead(5, 2, 2, 3, hidden_dims=(16, 16), out_gain=1.0)
    eager = ARSQCritic(FlattenEncoder(5), disc, head, soft_alpha=0.2)
    compiled = ARSQCritic(FlattenEncoder(5), disc, head, soft_alpha=0.2, compile_act=True)
    obs = torch.randn(4, 5)
    assert torch.equal(compiled.act(obs, deterministic=True), eager.act(obs, deterministic=True))
    samples = []
    for critic in (eager, compiled):
        generator = torch.Generator().manual_seed(7)
        samples.append(torch.stack([critic.act(obs, deterministic=False, generator=generator) for _ in range(5)]))
    assert torch.equal(samples[0], samples[1])
    assert not torch.equal(samples[0][0], samples[0][1])  # the samples do vary


def test_compiled_critic_copies_and_pickles_with_its_own_weights():
    import copy
    import pickle

    disc = CoarseToFineDiscretizer([-1.0], [1.0], levels=2, bins=3)
    critic = ARSQCritic(FlattenEncoder(3), disc, AutoregressiveHead(3, 1, 2, 3, hidden_dims=(8,), out_gain=1.0),
                        soft_alpha=0.2, compile_act=True)
    clone = copy.deepcopy(critic)
    with torch.no_grad():
        for p in clone.head.parameters():
            p.add_(torch.randn_like(p))  # (negating would not do: tanh is odd and the biases are 0)
    obs = torch.randn(64, 3)
    assert not torch.equal(clone.act(obs, deterministic=True), critic.act(obs, deterministic=True))
    restored = pickle.loads(pickle.dumps(critic))
    assert torch.equal(restored.act(obs, deterministic=True), critic.act(obs, deterministic=True))
