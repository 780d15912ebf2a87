"""Grouped auto-regressive heads: ``groups = D`` is ARSQ's factorisation, ``groups = 1`` is independent across the
dims of a level (CQN's), and any grouping keeps the soft decomposition and causality (docs/algorithm.md §2.3, §3.1)."""

from __future__ import annotations

import itertools

import pytest
import torch

from arsq_lightning.algos.arsq.critic import ARSQCritic, soft_advantages
from arsq_lightning.algos.arsq.head import AutoregressiveHead, dim_groups
from arsq_lightning.discretizers import CoarseToFineDiscretizer
from arsq_lightning.errors import ConfigError
from arsq_lightning.nets.encoders import FlattenEncoder

OBS = 4


def make(action_dim: int, levels: int, bins: int, groups, alpha: float = 0.3, seed: int = 0) -> ARSQCritic:
    torch.manual_seed(seed)
    head = AutoregressiveHead(OBS, action_dim, levels, bins, hidden_dims=(16,), out_gain=1.0, groups=groups)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.3 * torch.randn_like(p))
    disc = CoarseToFineDiscretizer([-1.0] * action_dim, [1.0] * action_dim, levels=levels, bins=bins)
    return ARSQCritic(FlattenEncoder(OBS), disc, head, soft_alpha=alpha)


def joint_policy(critic: ARSQCritic, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every joint action's codes ``[J, L, D]`` and ``softmax(Q / alpha)`` of the first critic ``[J]`` for one obs."""
    disc = critic.discretizer
    combos = torch.tensor(list(itertools.product(range(disc.bins), repeat=disc.num_positions)))
    codes = combos.view(-1, disc.levels, disc.action_dim)
    q, _, _ = critic.evaluate(obs.expand(codes.shape[0], -1), disc.decode(codes))
    return codes, torch.softmax(q[0] / critic.soft_alpha, dim=0).detach()


def test_group_options_are_normalised():
    assert dim_groups(3, -1) == [[0], [1], [2]]
    assert dim_groups(3, 1) == [[0, 1, 2]]
    assert dim_groups(5, 2) == [[0, 1, 2], [3, 4]]
    assert dim_groups(3, [[2], [0, 1]]) == [[2], [0, 1]]
    for bad in (0, 4, [[0], [0, 1, 2]], [[0, 1]], [[0, 1, 2], []]):
        with pytest.raises(ConfigError):
            dim_groups(3, bad)


def test_groups_equal_dims_reproduces_the_autoregressive_head():
    """Same weights, ``groups = D`` vs the default: identical teacher-forced Q and identical greedy actions."""
    default, grouped = make(3, 2, 3, -1), make(3, 2, 3, 3)
    grouped.load_state_dict(default.state_dict())
    obs, action = torch.randn(16, OBS), torch.rand(16, 3) * 2 - 1
    torch.testing.assert_close(grouped.evaluate(obs, action)[0], default.evaluate(obs, action)[0])
    assert torch.equal(grouped.act(obs, deterministic=True), default.act(obs, deterministic=True))


@pytest.mark.parametrize("groups", [-1, 1, [[1], [0, 2]]])
def test_soft_value_is_logsumexp_for_any_grouping(groups):
    """§3.1 holds for every grouping: alpha * logsumexp_a Q / alpha == V and the joint policy sums to 1."""
    critic = make(3, 1, 3, groups)
    obs = torch.randn(1, OBS)
    disc = critic.discretizer
    codes = torch.tensor(list(itertools.product(range(3), repeat=3))).view(-1, 1, 3)
    q, _, _ = critic.evaluate(obs.expand(codes.shape[0], -1), disc.decode(codes))
    value = critic.head.value(obs)[:, 0]
    torch.testing.assert_close(critic.soft_alpha * torch.logsumexp(q / critic.soft_alpha, dim=1), value.detach(),
                               atol=1e-5, rtol=1e-5)


def test_one_group_makes_the_dims_of_a_level_independent():
    """``groups = 1``: the joint policy of a level is the product of its per-dim marginals (CQN's factorisation);
    with ``groups = D`` it is not (the second dim depends on the first)."""
    obs = torch.randn(1, OBS)
    codes, joint = joint_policy(make(2, 1, 4, 1), obs)
    table = joint.view(4, 4)  # [bin of dim 0, bin of dim 1]
    product = table.sum(1, keepdim=True) * table.sum(0, keepdim=True)
    torch.testing.assert_close(table, product, atol=1e-6, rtol=1e-5)
    _, joint_ar = joint_policy(make(2, 1, 4, -1), obs)
    table_ar = joint_ar.view(4, 4)
    product_ar = table_ar.sum(1, keepdim=True) * table_ar.sum(0, keepdim=True)
    assert float((table_ar - product_ar).abs().max()) > 1e-3


@pytest.mark.parametrize("groups", [1, [[2], [0, 1]], -1])
def test_logits_depend_only_on_earlier_groups(groups):
    """Position (l, d) sees the codes of earlier levels and of earlier groups of level l, nothing else."""
    critic = make(3, 2, 3, groups)
    disc, head = critic.discretizer, critic.head
    order = head.order if head.order is not None else torch.arange(3)
    obs = torch.randn(5, OBS)
    codes = torch.randint(0, 3, (5, 2, 3))
    base = head.advantage_logits(obs, disc.conditioning(codes, head.order)).detach()
    for lvl, dim in itertools.product(range(2), range(3)):
        changed = codes.clone()
        changed[:, lvl, dim] = (changed[:, lvl, dim] + 1) % 3
        logits = head.advantage_logits(obs, disc.conditioning(changed, head.order)).detach()
        for lvl2, dim2 in itertools.product(range(2), range(3)):
            sees = lvl2 > lvl or (lvl2 == lvl and bool(order[dim] < order[dim2]))
            diff = float((logits[:, :, lvl2 * 3 + dim2] - base[:, :, lvl2 * 3 + dim2]).abs().max())
            assert (diff > 1e-6) == sees, f"position ({lvl2},{dim2}) after changing ({lvl},{dim})"


@pytest.mark.parametrize("groups", [1, [[2], [0, 1]]])
def test_greedy_action_is_the_argmax_at_every_position_of_its_own_path(groups):
    """Acting decides a whole group from one conditioning; the result agrees with the teacher-forced logits."""
    critic = make(3, 2, 4, groups)
    obs = torch.randn(32, OBS)
    codes = critic.discretizer.encode(critic.act(obs, deterministic=True))
    logits = critic.head.advantage_logits(obs, critic.discretizer.conditioning(codes, critic.head.order))
    scores = soft_advantages(logits, critic.act_alpha).amin(0)  # [B, N, K]
    assert torch.equal(scores.argmax(-1), codes.flatten(-2))
