"""ARSQ with a distributional value (``advantages: distributional``): prefix distributions, bin scores, greedy
decoding, the C51 target and the loss, against the slow reference and a loop-by-loop re-derivation."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict

from arsq_lightning.algos.arsq.critic import ARSQCritic
from arsq_lightning.algos.arsq.head import AutoregressiveHead
from arsq_lightning.algos.arsq.loss import ARSQLoss
from arsq_lightning.discretizers import CoarseToFineDiscretizer
from arsq_lightning.errors import ConfigError
from arsq_lightning.nets.encoders import FlattenEncoder
from arsq_lightning.tools import reference

OBS = 4
ATOMS = 7


def make_critic(*, num_critics: int = 2, qchunk: int = -1, act_network: str = "online", action_dim: int = 2,
                levels: int = 2, bins: int = 3, disc: CoarseToFineDiscretizer | None = None,
                groups: int | list[list[int]] = -1, center_atoms: bool = True) -> ARSQCritic:
    """A tiny distributional critic with random weights (output gain 1 so the distributions are far from uniform);
    the target head differs from the online one."""
    disc = disc or CoarseToFineDiscretizer([-1.0] * action_dim, [1.0] * action_dim, levels=levels, bins=bins)
    head = AutoregressiveHead(OBS, disc.action_dim, disc.levels, disc.bins, hidden_dims=(16, 16), qchunk=qchunk,
                              num_critics=num_critics, out_gain=1.0, atoms=ATOMS, v_min=-3.0, v_max=9.0,
                              groups=groups)
    critic = ARSQCritic(FlattenEncoder(OBS), disc, head, soft_alpha=0.1, act_network=act_network,
                        advantages="distributional", center_atoms=center_atoms)
    with torch.no_grad():
        for p in critic.target_head.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return critic


def random_actions(critic: ARSQCritic, batch: int) -> torch.Tensor:
    disc = critic.discretizer
    return disc.low + torch.rand(batch, disc.action_dim) * (disc.high - disc.low)


@pytest.mark.parametrize("num_critics, center_atoms", [(1, True), (2, True), (2, False)])
@pytest.mark.parametrize("qchunk", [-1, 1])
def test_prefix_distributions_and_scores_match_reference(num_critics, qchunk, center_atoms):
    torch.manual_seed(0)
    critic = make_critic(num_critics=num_critics, qchunk=qchunk, center_atoms=center_atoms)
    obs, action = torch.randn(6, OBS), random_actions(critic, 6)
    prefixes, scores, codes = critic.evaluate_distributions(obs, action)
    ref_prefixes, ref_scores, ref_bins = reference.distributions(critic, obs, action)
    # logits are defined up to a constant per distribution: compare log-probabilities
    torch.testing.assert_close(prefixes.log_softmax(-1), ref_prefixes.log_softmax(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores, ref_scores, atol=1e-5, rtol=1e-5)
    q, evaluated_scores, _ = critic.evaluate(obs, action)
    expected_q = (ref_prefixes[:, :, -1].softmax(-1) * critic.head.support).sum(-1)
    torch.testing.assert_close(q, expected_q, atol=1e-5, rtol=1e-5)
    assert torch.equal(evaluated_scores, scores)
    _, bins, _ = critic.evaluate_bin_distributions(obs, action)
    torch.testing.assert_close(bins.softmax(-1), ref_bins, atol=1e-5, rtol=1e-5)


def test_advantages_are_mean_normalised_over_bins():
    """Shifting one position's atom logits by the same vector for every bin changes nothing: only the bins'
    differences from their mean enter the distributions."""
    torch.manual_seed(1)
    critic = make_critic()
    obs, action = torch.randn(5, OBS), random_actions(critic, 5)
    before = critic.evaluate_distributions(obs, action)
    with torch.no_grad():  # the output bias of slot 0 (position 0): [K * A], bins-major
        critic.head.adv_bias[:, 0] += torch.randn(ATOMS).repeat(critic.head.bins)
    after = critic.evaluate_distributions(obs, action)
    torch.testing.assert_close(after[0], before[0])
    torch.testing.assert_close(after[1], before[1])


@pytest.mark.parametrize("act_network", ["online", "target"])
def test_greedy_decode_maximises_the_min_over_twins_of_the_scores(act_network):
    torch.manual_seed(2)
    critic = make_critic(act_network=act_network)
    obs = torch.randn(32, OBS)
    action = critic.act(obs, deterministic=True)
    _, scores, _ = reference.distributions(critic, obs, action, target=act_network == "target")  # teacher forced
    codes = critic.discretizer.encode(action).flatten(-2)
    assert torch.equal(scores.min(0).values.argmax(-1), codes)


@pytest.mark.parametrize("groups, center_atoms", [(1, True), ([[2], [0, 1]], True), ([[2], [0, 1]], False)])
def test_grouped_decode_scores_each_dim_after_the_ones_decided_before_it(groups, center_atoms):
    """Dims decided in groups (and out of index order): the decode adds each chosen bin to the prefix before scoring
    the next dim, as teacher forcing does in decision order, so the greedy codes are the argmax of the teacher-forced
    min-over-twins scores, and the decoded distribution is the last prefix (the whole action)."""
    torch.manual_seed(6)
    critic = make_critic(action_dim=3, groups=groups, center_atoms=center_atoms)
    obs = torch.randn(48, OBS)
    action, logits = critic._decode_features(critic.head, critic.encoder(obs), None, with_logits=True)
    prefixes, scores, codes = critic.evaluate_distributions(obs, action)
    assert torch.equal(scores.amin(0).argmax(-1), codes)
    torch.testing.assert_close(prefixes.log_softmax(-1), logits.log_softmax(-1), atol=1e-5, rtol=1e-5)
    whole = critic.head.value(obs).float() + sum(
        critic._atom_advantages(critic.head.advantage_logits(
            obs, critic.discretizer.conditioning(critic.discretizer.encode(action), critic.head.order)).float(),
            None)[:, torch.arange(48), i, codes[:, i]] for i in range(codes.shape[1]))
    torch.testing.assert_close(prefixes[:, :, -1], whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("online_choice", [False, True])
def test_target_distribution_is_the_lower_target_critics_distribution_at_the_chosen_greedy_action(online_choice):
    """Without ``online_choice`` the target networks choose the next action, with it the online ones (double Q);
    the target networks' distribution at that action, from the twin whose expected return is lower, is returned."""
    torch.manual_seed(3)
    critic = make_critic(act_network="online")
    obs = torch.randn(16, OBS)
    probs = critic.target_distribution(obs, online_choice=online_choice)
    greedy = critic._decode_features(critic.head if online_choice else critic.target_head, critic.encoder(obs), None)
    final = reference.distributions(critic, obs, greedy, target=True)[0][:, :, -1].softmax(-1)  # [C, B, A]
    means = (final * critic.head.support).sum(-1)
    expected = final[means.argmin(0), torch.arange(16)]
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=1e-5)
    assert not torch.equal(means[0], means[1])  # the twins differ, so the choice is tested
    other = critic._decode_features(critic.target_head if online_choice else critic.head, critic.encoder(obs), None)
    assert not torch.equal(greedy, other)  # the online and target networks choose differently somewhere


@pytest.mark.parametrize("online_choice", [False, True])
def test_per_prefix_target_distributions_take_the_lower_critic_per_sample_and_prefix(online_choice):
    """``per_prefix``: every prefix of the chosen greedy action under the target networks, in decision order, each
    from the twin whose expected return for that prefix is lower; the last is the whole action's distribution."""
    torch.manual_seed(3)
    critic = make_critic(act_network="online", action_dim=3)
    obs = torch.randn(32, OBS)
    probs = critic.target_distribution(obs, online_choice=online_choice, per_prefix=True)  # [B, N, A]
    greedy = critic._decode_features(critic.head if online_choice else critic.target_head, critic.encoder(obs), None)
    every = reference.distributions(critic, obs, greedy, target=True)[0].softmax(-1)  # [C, B, N, A]
    means = (every * critic.head.support).sum(-1)  # [C, B, N]
    expected = torch.stack([torch.stack([every[int(means[:, b, i].argmin()), b, i] for i in range(means.shape[2])])
                            for b in range(32)])
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=1e-5)
    lower = means.argmin(0)  # [B, N]
    assert bool((lower != lower[:, -1:]).any())  # some prefix's lower twin is not the whole action's: tested
    torch.testing.assert_close(probs[:, -1], critic.target_distribution(obs, online_choice=online_choice))


def c51_by_loop(probs: torch.Tensor, reward: torch.Tensor, discount: torch.Tensor, support: torch.Tensor):
    """C51's projection one sample and atom at a time: ``[B, A] -> [B, A]``."""
    out = torch.zeros_like(probs)
    v_min, v_max, step = float(support[0]), float(support[-1]), float(support[1] - support[0])
    for b in range(probs.shape[0]):
        for j, z in enumerate(support.tolist()):
            position = (min(max(float(reward[b]) + float(discount[b]) * z, v_min), v_max) - v_min) / step
            low = min(int(position), support.numel() - 2)
            out[b, low] += probs[b, j] * (1 - (position - low))
            out[b, low + 1] += probs[b, j] * (position - low)
    return out


def make_batch(critic: ARSQCritic, size: int = 8) -> TensorDict:
    return TensorDict({"observation": torch.randn(size, OBS), "action": random_actions(critic, size),
                       "demo": torch.arange(size) % 3 == 0,
                       "next": {"observation": torch.randn(size, OBS), "reward": 2 * torch.rand(size, 1),
                                "terminated": (torch.arange(size) == 1).view(-1, 1)}}, batch_size=[size])


@pytest.mark.parametrize("reduction, bootstrap, prefix_targets, center_atoms", [
    ("demo_mean", "soft_value", False, True), ("batch_mean", "soft_value", False, True),
    ("demo_mean", "double_q", False, True), ("demo_mean", "soft_value", True, True),
    ("demo_mean", "double_q", True, True), ("demo_mean", "soft_value", False, False)])
def test_loss_matches_a_loop_rederivation(reduction, bootstrap, prefix_targets, center_atoms):
    torch.manual_seed(4)
    critic = make_critic(center_atoms=center_atoms)
    batch = make_batch(critic)
    gamma, clip_min, weight, fosd_weight = 0.9, -0.2, 0.7, 0.3
    loss = ARSQLoss(gamma=gamma, td_weight=0.5, conservative="margin", conservative_weight=weight, clip_min=clip_min,
                    demo_reduction=reduction, bootstrap=bootstrap, fosd_weight=fosd_weight,
                    prefix_targets=prefix_targets)
    out = loss(critic, batch)
    prefixes, scores, bin_probs = reference.distributions(critic, batch["observation"], batch["action"])
    reward = batch["next", "reward"].reshape(-1)
    discount = gamma * (~batch["next", "terminated"].reshape(-1)).float()
    next_probs = critic.target_distribution(batch["next", "observation"], online_choice=bootstrap == "double_q",
                                            per_prefix=True)  # [B, N, A]
    positions = prefixes.shape[2]
    # each prefix's own next-state prefix, or the whole next action's distribution for every prefix
    targets = [c51_by_loop(next_probs[:, i if prefix_targets else -1], reward, discount, critic.head.support)
               for i in range(positions)]
    td = sum(-(targets[i] * prefixes[k, :, i].log_softmax(-1)).sum(-1).mean()
             for k in range(2) for i in range(positions)) / positions
    torch.testing.assert_close(out["loss_td"], 0.5 * td, atol=1e-5, rtol=1e-5)
    codes = critic.discretizer.encode(batch["action"]).flatten(-2)
    demo = batch["demo"]
    margin = torch.zeros(())
    for k in range(2):
        per_row = [sum(sum((scores[k, b, i, j] - scores[k, b, i, codes[b, i]]).clamp(clip_min, 1e7)
                           for j in range(3) if j != codes[b, i]) / 2 for i in range(codes.shape[1]))
                   for b in range(codes.shape[0]) if demo[b]]
        margin = margin + sum(per_row) / (int(demo.sum()) if reduction == "demo_mean" else codes.shape[0])
    torch.testing.assert_close(out["loss_conservative"], weight * margin, atol=1e-5, rtol=1e-5)
    fosd = 0.0
    for k in range(2):  # first-order stochastic dominance: the data bin's CDF must lie below every other bin's
        cdf = bin_probs[k].cumsum(-1)  # [B, N, K, A]
        per_row = [sum(float((cdf[b, i, codes[b, i], a] - cdf[b, i, j, a]).clamp(min=0))
                       for i in range(codes.shape[1]) for j in range(3) for a in range(ATOMS)) / (codes.shape[1] * 3)
                   for b in range(codes.shape[0]) if demo[b]]
        fosd = fosd + sum(per_row) / (int(demo.sum()) if reduction == "demo_mean" else codes.shape[0])
    torch.testing.assert_close(out["loss_fosd"], torch.tensor(fosd_weight * fosd), atol=1e-5, rtol=1e-5)
    assert float(out["loss_fosd"]) > 0
    (out["loss_td"] + out["loss_conservative"] + out["loss_fosd"]).backward()
    assert all(p.grad is None for p in critic.target_head.parameters())
    assert critic.head.value_out.weight.grad.abs().sum() > 0 and critic.head.adv_weight.grad.abs().sum() > 0


@pytest.mark.parametrize("center_atoms", [True, False])
def test_per_dim_grid_never_scores_or_chooses_a_missing_bin(center_atoms):
    torch.manual_seed(5)
    disc = CoarseToFineDiscretizer([-1.0, 0.0], [1.0, 2.0], levels=[2, 1], bins=[2, 3])  # K = 3
    critic = make_critic(disc=disc, center_atoms=center_atoms)
    obs = torch.randn(64, OBS)
    action = critic.act(obs, deterministic=False, generator=torch.Generator().manual_seed(0))
    assert torch.equal(disc.decode(disc.encode(action)), action)  # on the grid
    prefixes, scores, _ = critic.evaluate_distributions(obs, action)
    assert bool(torch.isinf(scores[..., ~disc.bin_mask]).all())
    assert bool(torch.isfinite(scores[..., disc.bin_mask]).all())
    assert bool(torch.isfinite(prefixes).all())
    out = ARSQLoss(conservative="margin", conservative_weight=1.0, clip_min=-1.0, fosd_weight=1.0)(critic,
                                                                                                   make_batch(critic))
    assert all(bool(torch.isfinite(out[k])) for k in ("loss_td", "loss_conservative", "loss_fosd"))


def test_learns_a_contextual_bandit():
    """One-step episodes whose reward is 1 - |a - a*(s)| per dim (a* = the sign of an observation entry, scaled):
    a few hundred updates on random actions make the greedy action reach the best bin."""
    torch.manual_seed(6)
    disc = CoarseToFineDiscretizer([-1.0, -1.0], [1.0, 1.0], levels=2, bins=3)
    head = AutoregressiveHead(OBS, 2, 2, 3, hidden_dims=(64, 64), atoms=21, v_min=0.0, v_max=2.0, layer_norm=True)
    critic = ARSQCritic(FlattenEncoder(OBS), disc, head, soft_alpha=0.01, advantages="distributional")
    loss = ARSQLoss(gamma=0.99, td_weight=1.0)
    optimiser = torch.optim.Adam(critic.online_parameters(), lr=3e-3)

    def best(obs):  # the middle of an outer third of [-1, 1] per dim, chosen by the observation's sign
        return torch.where(obs[:, :2] > 0, 2.0 / 3.0, -2.0 / 3.0)

    for _ in range(300):
        obs = torch.randn(128, OBS)
        action = torch.rand(128, 2) * 2 - 1
        reward = 1 - (action - best(obs)).abs().mean(-1, keepdim=True)
        batch = TensorDict({"observation": obs, "action": action,
                            "next": {"observation": obs, "reward": reward,
                                     "terminated": torch.ones(128, 1, dtype=torch.bool)}}, batch_size=[128])
        out = loss(critic, batch)
        optimiser.zero_grad()
        out["loss_td"].backward()
        optimiser.step()
    obs = torch.randn(256, OBS)
    error = (critic.act(obs, deterministic=True) - best(obs)).abs()
    assert float(error.mean()) < 0.15  # the grid's step at level 2 is 2/9; random actions are off by 0.9 on average


def test_uncentred_atoms_need_distributional_advantages():
    disc = CoarseToFineDiscretizer([-1.0], [1.0], levels=2, bins=3)
    with pytest.raises(ConfigError, match="center_atoms false needs advantages distributional"):
        ARSQCritic(FlattenEncoder(OBS), disc, AutoregressiveHead(OBS, 1, 2, 3, hidden_dims=(8,)), advantages="mean",
                   center_atoms=False)


@pytest.mark.parametrize("advantages, atoms", [("distributional", 1), ("mean", ATOMS), ("soft", ATOMS)])
def test_the_critic_and_head_must_agree_on_atoms(advantages, atoms):
    disc = CoarseToFineDiscretizer([-1.0], [1.0], levels=2, bins=3)
    head = AutoregressiveHead(OBS, 1, 2, 3, hidden_dims=(8,), atoms=atoms)
    with pytest.raises(ConfigError, match="atoms"):
        ARSQCritic(FlattenEncoder(OBS), disc, head, advantages=advantages)


def test_scalar_only_loss_options_are_refused():
    torch.manual_seed(7)
    critic = make_critic()
    with pytest.raises(ConfigError, match="distributional"):
        ARSQLoss(target_bounds=(0.0, 1.0))(critic, make_batch(critic))


@pytest.mark.parametrize("option", [{"fosd_weight": 1.0}, {"prefix_targets": True}])
def test_distributional_only_loss_options_are_refused_with_scalar_values(option):
    disc = CoarseToFineDiscretizer([-1.0], [1.0], levels=2, bins=3)
    critic = ARSQCritic(FlattenEncoder(OBS), disc, AutoregressiveHead(OBS, 1, 2, 3, hidden_dims=(8,)))
    with pytest.raises(ConfigError, match=f"{next(iter(option))} needs a distributional critic"):
        ARSQLoss(**option)(critic, make_batch(critic))


def test_exported_policy_acts_as_the_critic():
    from arsq_lightning.export import export_policy

    torch.manual_seed(8)
    critic = make_critic(act_network="target")
    obs = torch.randn(5, OBS)
    assert torch.equal(export_policy(critic, OBS).module()(obs), critic.act(obs, deterministic=True))
