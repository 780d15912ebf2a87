"""The CQN baseline against docs/algorithm.md §6.2-§6.4: C51 projection, dueling head, level conditioning, greedy
acting with random tie-breaking, re-quantised Gaussian exploration, double-Q targets, FOSD and margin terms."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict

from arsq_lightning.algos.arsq.head import AutoregressiveHead
from arsq_lightning.algos.base import total_loss
from arsq_lightning.algos.cqn.critic import CQNCritic
from arsq_lightning.algos.cqn.head import CQNHead
from arsq_lightning.algos.cqn.loss import CQNLoss, c51_projection, fosd_penalty, margin_penalty
from arsq_lightning.discretizers import CoarseToFineDiscretizer
from arsq_lightning.errors import ConfigError
from arsq_lightning.nets.encoders import FlattenEncoder
from arsq_lightning.tools import reference

OBS = 4


def make(action_dim: int = 2, levels: int = 2, bins: int = 3, atoms: int = 11, jitter: float = 0.5,
         **kwargs) -> CQNCritic:
    torch.manual_seed(0)
    head = CQNHead(OBS, action_dim, levels, bins, atoms=atoms, v_min=-5.0, v_max=5.0, trunk_dim=8, hidden_dims=(16,))
    with torch.no_grad():
        for p in head.parameters():
            p.add_(jitter * torch.randn_like(p))
    disc = CoarseToFineDiscretizer([-1.0] * action_dim, [2.0] * action_dim, levels=levels, bins=bins)
    return CQNCritic(FlattenEncoder(OBS), disc, head, **kwargs)


def slow_projection(probs: torch.Tensor, reward: float, discount: float, support: torch.Tensor) -> torch.Tensor:
    """C51 projection one atom at a time, with the official integer fix (§6.4)."""
    atoms, v_min, v_max = support.numel(), float(support[0]), float(support[-1])
    delta = (v_max - v_min) / (atoms - 1)
    out = torch.zeros(atoms, dtype=torch.float64)
    for j in range(atoms):
        tz = min(max(reward + discount * float(support[j]), v_min), v_max)
        b = (tz - v_min) / delta
        lo, up = int(b // 1), int(-(-b // 1))
        if lo == up:  # b is an integer: keep all the mass at that atom
            if up > 0:
                lo -= 1
            elif lo < atoms - 1:
                up += 1
        out[lo] += float(probs[j]) * (up - b)
        out[up] += float(probs[j]) * (b - lo)
    return out


# --- C51 projection ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reward,discount", [(0.3, 0.99), (-7.0, 0.9), (9.0, 0.5), (0.0, 0.0), (2.0, 1.0),
                                             (1.0, 0.0), (0.37, 0.0)])
def test_projection_matches_the_slow_reference_and_keeps_mass(reward, discount):
    support = torch.linspace(-5.0, 5.0, 11)
    probs = torch.softmax(torch.randn(3, 11, dtype=torch.float64), -1)
    got = c51_projection(probs, torch.full((3,), reward, dtype=torch.float64),
                         torch.full((3,), discount, dtype=torch.float64), support.double())
    torch.testing.assert_close(got.sum(-1), torch.ones(3, dtype=torch.float64))
    for row in range(3):
        torch.testing.assert_close(got[row], slow_projection(probs[row], reward, discount, support))


def test_target_exactly_on_an_atom_keeps_its_mass_there():
    """r = 0, discount 1 maps every atom onto itself (b integer for every atom, including both ends)."""
    support = torch.linspace(-2.0, 2.0, 5)
    probs = torch.softmax(torch.randn(4, 2, 3, 5), -1)
    same = c51_projection(probs, torch.zeros(4), torch.ones(4), support)
    torch.testing.assert_close(same, probs)
    onto_atom = c51_projection(probs, torch.ones(4), torch.zeros(4), support)  # everything lands on atom z = 1
    torch.testing.assert_close(onto_atom, torch.zeros_like(probs).index_fill(-1, torch.tensor([3]), 1.0))


# --- head -------------------------------------------------------------------------------------------------------------

def test_zero_initialised_head_gives_uniform_atoms_and_ties_break_at_random():
    critic = make(jitter=0.0)
    obs = torch.randn(400, OBS)
    logits = critic.logits(obs, torch.zeros(400, 2, 2, dtype=torch.long))
    assert bool((logits == 0).all())
    codes = critic.discretizer.encode(critic.act(obs, deterministic=True, generator=torch.Generator().manual_seed(0)))
    share = torch.bincount(codes.flatten(), minlength=3).float() / codes.numel()
    assert float((share - 1 / 3).abs().max()) < 0.05, "tied Q values pick uniformly random bins"
    again = critic.act(obs, deterministic=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(critic.discretizer.decode(codes), again)


def test_dueling_logits_average_to_the_value_stream_over_bins():
    critic = make()
    obs, cond = torch.randn(6, OBS), torch.rand(6, 2) * 2 - 1
    head = critic.head
    logits = head.level_logits(obs, cond, 1)  # [B, D, K, A]
    onehot = torch.nn.functional.one_hot(torch.ones(6, dtype=torch.long), head.levels).float()
    value = head.value_out(head._run(head.value_stream, obs, cond, onehot)).view(6, 2, head.atoms)
    torch.testing.assert_close(logits.mean(-2), value, atol=1e-5, rtol=1e-5)


def test_all_levels_at_once_equal_one_level_at_a_time_on_explicit_zoom_in():
    """Teacher forcing reads level l with every dim's midpoint after l levels (the reference's zoom-in)."""
    critic = make(3, 3, 4)
    obs = torch.randn(5, OBS)
    codes = torch.randint(0, 4, (5, 3, 3))
    batched = critic.logits(obs, codes)
    inputs = reference.position_inputs(critic.discretizer, codes)  # per position (l, d), level-major
    for lvl in range(3):
        cond = inputs[lvl * 3]  # the first dim of level l sees every dim after l levels
        torch.testing.assert_close(batched[:, lvl], critic.head.level_logits(obs, cond, lvl), atol=1e-5, rtol=1e-5)


# --- acting -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("act_network", ["online", "target"])
def test_greedy_action_maximises_expected_q_per_dim_along_its_path(act_network):
    critic = make(3, 2, 5, act_network=act_network)
    with torch.no_grad():
        for p in critic.target_head.parameters():
            p.add_(0.5 * torch.randn_like(p))
    obs = torch.randn(64, OBS)
    codes = critic.discretizer.encode(critic.act(obs, deterministic=True))
    q = critic.head.expected_q(critic.logits(obs, codes, target=act_network == "target"))  # [B, L, D, K]
    assert torch.equal(q.argmax(-1), codes)
    other = critic.head.expected_q(critic.logits(obs, codes, target=act_network != "target"))
    assert not torch.equal(other.argmax(-1), codes)


def test_exploration_adds_gaussian_noise_then_requantises():
    critic = make(2, 3, 5, exploration_std=0.2)
    obs = torch.randn(1, OBS).expand(3000, -1)
    greedy = critic.act(obs[:1], deterministic=True)
    noisy = critic.act(obs, deterministic=False, generator=torch.Generator().manual_seed(0))
    disc = critic.discretizer
    assert torch.equal(disc.decode(disc.encode(noisy)), noisy), "explored actions lie on the grid"
    unit_gap = disc.to_unit(noisy) - disc.to_unit(greedy)
    assert float(unit_gap.std(0).min()) > 0.15 and float(unit_gap.std(0).max()) < 0.25
    assert float(unit_gap.mean(0).abs().max()) < 0.05
    still = make(2, 3, 5, exploration_std=0.0).act(obs[:5], deterministic=False)
    assert torch.equal(still, make(2, 3, 5).act(obs[:5], deterministic=True))


def test_cqn_critic_rejects_an_arsq_head():
    head = AutoregressiveHead(OBS, 2, 2, 3, hidden_dims=(8,))
    disc = CoarseToFineDiscretizer([-1.0, -1.0], [1.0, 1.0], levels=2, bins=3)
    with pytest.raises(ConfigError, match="CQNHead"):
        CQNCritic(FlattenEncoder(OBS), disc, head)


# --- loss -------------------------------------------------------------------------------------------------------------

def batch(critic: CQNCritic, size: int = 8, demo: list[bool] | None = None) -> TensorDict:
    g = torch.Generator().manual_seed(1)
    disc = critic.discretizer
    data = {"observation": torch.randn(size, OBS, generator=g),
            "action": disc.low + torch.rand(size, disc.action_dim, generator=g) * (disc.high - disc.low),
            "next": {"observation": torch.randn(size, OBS, generator=g),
                     "reward": torch.randn(size, 1, generator=g),
                     "terminated": torch.rand(size, 1, generator=g) < 0.3}}
    if demo is not None:
        data["demo"] = torch.tensor(demo)
    return TensorDict(data, batch_size=[size])


def test_fosd_and_margin_penalties_match_loops():
    torch.manual_seed(2)
    logits, codes = torch.randn(3, 2, 2, 4, 6), torch.randint(0, 4, (3, 2, 2))
    q = torch.randn(3, 2, 2, 4)
    probs = logits.softmax(-1)
    for b in range(3):
        fosd, margin, terms = 0.0, 0.0, 0
        for lvl in range(2):
            for d in range(2):
                a = int(codes[b, lvl, d])
                cdf_a = probs[b, lvl, d, a].cumsum(0)
                for other in range(4):
                    fosd += float((cdf_a - probs[b, lvl, d, other].cumsum(0)).clamp(min=0).sum())
                    margin += max(0.5 - float(q[b, lvl, d, a] - q[b, lvl, d, other]), 0.0)
                    terms += 1
        assert abs(float(fosd_penalty(logits, codes)[b]) - fosd / terms) < 1e-5
        assert abs(float(margin_penalty(q, codes, 0.5)[b]) - margin / terms) < 1e-5


def test_fosd_is_zero_when_the_data_bin_dominates():
    logits = torch.full((1, 1, 1, 3, 5), -30.0)
    logits[..., 0, -1] = 30.0  # data bin 0: all mass on the top atom
    logits[..., 1, 2] = 30.0
    logits[..., 2, 0] = 30.0
    assert float(fosd_penalty(logits, torch.zeros(1, 1, 1, dtype=torch.long))) < 1e-6
    assert float(fosd_penalty(logits, torch.full((1, 1, 1), 2, dtype=torch.long))) > 1.0


def perturb_target(critic: CQNCritic) -> CQNCritic:
    """Make the target head differ from the online one, so swapping their roles would change the numbers."""
    with torch.no_grad():
        for p in critic.target_head.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return critic


def test_td_loss_is_cross_entropy_to_the_projected_double_q_target():
    critic = perturb_target(make())
    data = batch(critic)
    loss = CQNLoss(gamma=0.9)
    out = loss(critic, data)
    with torch.no_grad():  # the target, built step by step
        best = critic.discretizer.encode(critic.act(data["next", "observation"], deterministic=True))
        target_logits = critic.logits(data["next", "observation"], best, target=True)
        chosen = target_logits.gather(-2, best[..., None, None].expand(*best.shape, 1, 11)).squeeze(-2)
        discount = 0.9 * (1 - data["next", "terminated"].float().reshape(-1))
        m = c51_projection(chosen.softmax(-1), data["next", "reward"].reshape(-1), discount, critic.head.support)
    codes = critic.discretizer.encode(data["action"])
    online = critic.logits(data["observation"], codes)
    data_logits = online.gather(-2, codes[..., None, None].expand(*codes.shape, 1, 11)).squeeze(-2)
    expected = -(m * data_logits.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(out["loss_td"], expected.detach(), atol=1e-5, rtol=1e-5)
    total_loss(out).backward()
    assert all(p.grad is None for p in critic.target_head.parameters())
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in critic.head.parameters())


def test_non_distributional_variant_regresses_q_on_the_double_q_target():
    critic = perturb_target(make(atoms=1))
    data = batch(critic)
    out = CQNLoss(gamma=0.9)(critic, data)
    with torch.no_grad():
        best = critic.discretizer.encode(critic.act(data["next", "observation"], deterministic=True))
        next_q = critic.head.expected_q(critic.logits(data["next", "observation"], best, target=True))
        next_q = next_q.gather(-1, best.unsqueeze(-1)).squeeze(-1)  # [B, L, D]
        not_done = 1 - data["next", "terminated"].float().reshape(-1, 1, 1)
        target = data["next", "reward"].reshape(-1, 1, 1) + 0.9 * not_done * next_q
    codes = critic.discretizer.encode(data["action"])
    q = critic.head.expected_q(critic.logits(data["observation"], codes)).gather(-1, codes.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out["loss_td"], (q - target).pow(2).mean().detach(), atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="atoms"):
        CQNLoss(fosd_weight=1.0)(critic, data)


def test_demo_terms_use_demo_samples_only():
    critic = make()
    loss = CQNLoss(fosd_weight=1.0, margin_weight=1.0, margin=0.5)
    mixed = batch(critic, demo=[True, False] * 4)
    out = loss(critic, mixed)
    demos_only = mixed[torch.tensor([True, False] * 4)]
    alone = loss(critic, demos_only)
    torch.testing.assert_close(out["loss_fosd"], alone["loss_fosd"])
    torch.testing.assert_close(out["loss_margin"], alone["loss_margin"])
    none = loss(critic, batch(critic, demo=[False] * 8))
    assert float(none["loss_fosd"]) == 0.0 and float(none["loss_margin"]) == 0.0


def test_targets_outside_the_support_are_counted():
    """``target_clipped`` is the share of (sample, level, dim) whose expected target ``r + discount * E[Z']`` lies
    outside ``[v_min, v_max]`` = [-5, 5] (checked here one entry at a time)."""
    critic = make()
    data = batch(critic)
    data["next", "reward"] = torch.tensor([-9.0, -5.5, -1.0, 0.0, 0.5, 4.0, 5.2, 30.0]).unsqueeze(-1)
    out = CQNLoss(gamma=0.9)(critic, data)
    with torch.no_grad():
        best = critic.greedy_codes(data["next", "observation"])
        next_q = critic.head.expected_q(critic.logits(data["next", "observation"], best, target=True))
        next_q = next_q.gather(-1, best.unsqueeze(-1)).squeeze(-1)  # [B, L, D]
    outside = 0
    for i in range(8):
        discount = 0.0 if data["next", "terminated"][i] else 0.9
        for value in next_q[i].flatten().tolist():
            outside += not -5.0 <= float(data["next", "reward"][i]) + discount * value <= 5.0
    assert 0 < outside < next_q.numel()
    assert float(out["target_clipped"]) == pytest.approx(outside / next_q.numel())
