"""AutoregressiveHead + ARSQCritic against docs/algorithm.md §3.1 (soft decomposition), §3.2 (qchunk heads),
§2.3 (level-major causality) and §3.4 (acting)."""

from __future__ import annotations

import itertools

import pytest
import torch

from arsq_lightning.algos.arsq.critic import ARSQCritic, soft_advantages
from arsq_lightning.algos.arsq.head import AutoregressiveHead
from arsq_lightning.discretizers import CoarseToFineDiscretizer
from arsq_lightning.errors import ConfigError
from arsq_lightning.nets.encoders import FlattenEncoder, MLPEncoder
from arsq_lightning.nets.layers import EnsembleMLP
from arsq_lightning.tools import reference

OBS_DIM = 4


def jitter_(module: torch.nn.Module, scale: float = 0.3) -> torch.nn.Module:
    """Add noise to every parameter, so biases are non-zero and twins/chunks/targets all differ."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


def make_critic(action_dim: int = 2, levels: int = 2, bins: int = 3, *, qchunk: int = -1, num_critics: int = 2,
                soft_alpha: float = 0.1, act_alpha: float | None = None, act_network: str = "online",
                bounds: tuple[list[float], list[float]] | None = None, out_gain: float = 1.0, encoder: str = "flat",
                hidden: tuple[int, ...] = (16, 16), jitter: bool = True, layer_norm: bool = False) -> ARSQCritic:
    """A tiny critic with random weights; the output layers use ``out_gain`` 1.0 so logits are not tiny."""
    low, high = bounds if bounds is not None else ([-1.0] * action_dim, [1.0] * action_dim)
    disc = CoarseToFineDiscretizer(low, high, levels=levels, bins=bins)
    head = AutoregressiveHead(OBS_DIM if encoder == "flat" else 8, action_dim, levels, bins, hidden_dims=hidden,
                              qchunk=qchunk, num_critics=num_critics, out_gain=out_gain, layer_norm=layer_norm)
    if jitter:
        jitter_(head)
    enc = FlattenEncoder(OBS_DIM) if encoder == "flat" else MLPEncoder(OBS_DIM, hidden_dims=(8,))
    return ARSQCritic(enc, disc, head, soft_alpha=soft_alpha, act_alpha=act_alpha, act_network=act_network)


def all_joint_codes(critic: ARSQCritic) -> torch.Tensor:
    """Every joint discrete action as codes ``[B^N, L, D]`` (position i = l*D + d is flat index i)."""
    disc = critic.discretizer
    combos = torch.tensor(list(itertools.product(range(disc.bins), repeat=disc.num_positions)))
    return combos.view(-1, disc.levels, disc.action_dim)


def random_actions(critic: ARSQCritic, batch: int) -> torch.Tensor:
    disc = critic.discretizer
    return disc.low + torch.rand(batch, disc.action_dim) * (disc.high - disc.low)


def flat_to_codes(flat: torch.Tensor, critic: ARSQCritic) -> torch.Tensor:
    return flat.view(flat.shape[0], critic.discretizer.levels, critic.discretizer.action_dim)


# --- §3.1 soft decomposition -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("action_dim,levels,bins", [(2, 1, 3), (1, 2, 3), (2, 2, 2)])
@pytest.mark.parametrize("alpha", [0.1, 0.5])
def test_soft_value_is_logsumexp_over_every_joint_action(action_dim, levels, bins, alpha):
    """§3.1: alpha*logsumexp_a(Q(s,a)/alpha) == V(s) for each critic, enumerating all B^N joint actions, and
    prod_i exp(A_i/alpha) = exp((Q - V)/alpha) = softmax(Q/alpha), which sums to 1; every A_i <= 0 and Q <= V."""
    critic = make_critic(action_dim, levels, bins, soft_alpha=alpha,
                         bounds=([0.0] * action_dim, [3.0] * action_dim))
    codes = all_joint_codes(critic)
    actions = critic.discretizer.decode(codes)
    assert torch.equal(critic.discretizer.encode(actions), codes)  # enumeration really covers every joint action
    obs_batch = torch.randn(3, OBS_DIM)
    values = critic.head.value(obs_batch)  # [C, S]
    spread = []
    for s, obs in enumerate(obs_batch):
        with torch.no_grad():
            q, adv, flat = critic.evaluate(obs.expand(codes.shape[0], -1), actions)  # q [C, M]
        v = values[:, s].detach()
        assert q.shape == (2, bins ** (levels * action_dim))
        torch.testing.assert_close(alpha * torch.logsumexp(q / alpha, dim=-1), v, atol=1e-5, rtol=1e-5)
        joint = torch.exp((q - v[:, None]) / alpha)
        per_position = torch.exp(adv.gather(-1, flat[None, ..., None].expand(2, -1, -1, 1)).squeeze(-1) / alpha)
        torch.testing.assert_close(per_position.prod(-1), joint, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(joint, torch.softmax(q / alpha, dim=-1), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(joint.sum(-1), torch.ones(2), atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.exp(adv / alpha).sum(-1), torch.ones(adv.shape[:-1]))
        assert bool((adv <= 1e-6).all())
        assert bool((q <= v[:, None] + 1e-5).all())
        spread.append(bool(((joint > 1e-3).sum(-1) >= 2).any()))
    assert any(spread)  # several joint actions carry mass somewhere: the check is not trivial


def test_soft_advantages_normalise_each_position():
    """§3.1: A = z - alpha*logsumexp(z/alpha) gives sum_b exp(A[b]/alpha) = 1 and keeps the differences of z."""
    z = torch.randn(3, 5, 7, dtype=torch.float64) * 4
    for alpha in (0.01, 0.3, 2.0):
        a = soft_advantages(z, alpha)
        torch.testing.assert_close(torch.exp(a / alpha).sum(-1), torch.ones(3, 5, dtype=torch.float64))
        torch.testing.assert_close(a - a[..., :1], z - z[..., :1])


# --- §3.2 evaluate against the per-position reference ----------------------------------------------------------------

@pytest.mark.parametrize("qchunk", [-1, 1, 2, 3, 6])
@pytest.mark.parametrize("num_critics", [1, 2])
def test_evaluate_matches_reference(qchunk, num_critics):
    """§3.2/§3.3 step 2: fused evaluate == one MLP call per (critic, position) on explicit zoom-in conditioning."""
    critic = make_critic(2, 3, 4, qchunk=qchunk, num_critics=num_critics, bounds=([0.0, -2.0], [3.0, 0.5]))
    obs, action = torch.randn(7, OBS_DIM), random_actions(critic, 7)
    q, adv, codes = critic.evaluate(obs, action)
    q_ref, adv_ref, codes_ref = reference.q_values(critic, obs, action)
    assert q.shape == (num_critics, 7) and adv.shape == (num_critics, 7, 6, 4) and codes.shape == (7, 6)
    assert torch.equal(codes, codes_ref)
    torch.testing.assert_close(adv, adv_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q, q_ref, atol=1e-5, rtol=1e-5)


def test_evaluate_matches_reference_with_learned_encoder():
    critic = make_critic(3, 2, 5, qchunk=2, encoder="mlp")
    obs, action = torch.randn(5, OBS_DIM), random_actions(critic, 5)
    q, adv, _ = critic.evaluate(obs, action)
    q_ref, adv_ref, _ = reference.q_values(critic, obs, action)
    torch.testing.assert_close(adv, adv_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q, q_ref, atol=1e-5, rtol=1e-5)


def test_qchunk_members_are_independent_networks():
    """§3.2: with qchunk = 1 each position has its own MLP: perturbing one member changes only that position."""
    critic = make_critic(2, 2, 3, qchunk=1)
    head = critic.head
    obs, codes = torch.randn(4, OBS_DIM), torch.randint(0, 3, (4, 2, 2))
    cond = critic.discretizer.conditioning(codes)
    before = head.advantage_logits(obs, cond).detach()
    with torch.no_grad():
        head.adv_trunk.layers[0].weight[1 * head.num_chunks + 2].add_(1.0)  # critic 1, position 2
    after = head.advantage_logits(obs, cond).detach()
    changed = (after - before).abs().amax(-1) > 1e-6  # [C, B, N]
    assert bool(changed[1, :, 2].all())
    changed[1, :, 2] = False
    assert not bool(changed.any())


# --- §2.3 auto-regressive causality ---------------------------------------------------------------------------------

@pytest.mark.parametrize("action_dim,levels,bins,qchunk", [(2, 2, 3, -1), (3, 2, 4, 1), (2, 3, 3, 2)])
def test_position_logits_depend_only_on_earlier_positions(action_dim, levels, bins, qchunk):
    """§2.3: logits of position i depend on the codes of positions j < i only (level-major i = l*D + d): changing
    position j's code leaves positions <= j unchanged and changes every later position."""
    critic = make_critic(action_dim, levels, bins, qchunk=qchunk)
    disc, head = critic.discretizer, critic.head
    n = disc.num_positions
    obs = torch.randn(5, OBS_DIM)
    flat = torch.randint(0, bins, (5, n))
    base = head.advantage_logits(obs, disc.conditioning(flat_to_codes(flat, critic))).detach()
    for j in range(n):
        changed_flat = flat.clone()
        changed_flat[:, j] = (changed_flat[:, j] + 1) % bins
        logits = head.advantage_logits(obs, disc.conditioning(flat_to_codes(changed_flat, critic))).detach()
        torch.testing.assert_close(logits[:, :, : j + 1], base[:, :, : j + 1], atol=1e-6, rtol=0)
        if j + 1 < n:
            differs = (logits[:, :, j + 1:] - base[:, :, j + 1:]).abs().amax(-1) > 1e-6  # [C, B, later]
            assert bool(differs.all()), f"changing position {j} should change every later position"


def test_layer_norm_ensemble_equals_each_member_as_a_torch_mlp():
    """Every member of a LayerNorm ensemble computes ``tanh(LayerNorm(Linear(x)))`` per layer with its own weights
    and norm parameters, as the same layers built from ``torch.nn`` do."""
    torch.manual_seed(0)
    ensemble = jitter_(EnsembleMLP(3, 5, (7, 4), "tanh", layer_norm=True))
    x = torch.randn(3, 6, 5)
    for member in range(3):
        layers = []
        for index, linear in enumerate(ensemble.layers):
            width_in, width_out = linear.weight.shape[1:]
            torch_linear, norm = torch.nn.Linear(width_in, width_out), torch.nn.LayerNorm(width_out)
            with torch.no_grad():
                torch_linear.weight.copy_(linear.weight[member].T)
                torch_linear.bias.copy_(linear.bias[member, 0])
                norm.weight.copy_(ensemble.norm_weights[index][member, 0])
                norm.bias.copy_(ensemble.norm_biases[index][member, 0])
            layers += [torch_linear, norm, torch.nn.Tanh()]
        expected = torch.nn.Sequential(*layers)(x[member])
        torch.testing.assert_close(ensemble(x)[member], expected, atol=1e-5, rtol=1e-5)


# --- §3.4 acting ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("qchunk,layer_norm", [(-1, False), (1, False), (3, False), (-1, True), (3, True)])
def test_position_logits_equal_teacher_forced_slots(qchunk, layer_norm):
    """§3.2: the acting path (one position per call) reads the same slot as the batched teacher-forced call."""
    critic = make_critic(3, 2, 5, qchunk=qchunk, bounds=([0.0, -1.0, -3.0], [3.0, 1.0, 1.0]), layer_norm=layer_norm)
    obs = torch.randn(6, OBS_DIM)
    action = critic.act(obs, deterministic=True)
    codes = critic.discretizer.encode(action)
    cond = critic.discretizer.conditioning(codes)
    for head in (critic.head, critic.target_head):
        batched = head.advantage_logits(obs, cond).detach()
        for i in range(critic.discretizer.num_positions):
            single = head.position_logits(obs, cond[:, i], i).detach()
            torch.testing.assert_close(single, batched[:, :, i], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("act_network", ["online", "target"])
@pytest.mark.parametrize("qchunk", [-1, 2])
def test_deterministic_action_is_argmax_of_min_over_twins(act_network, qchunk):
    """§3.4: at every position the chosen bin is argmax_b min_k normalise_{alpha_a}(z_k)[b] of the acting networks
    (online or target), along the path of bins already chosen."""
    critic = make_critic(2, 2, 5, qchunk=qchunk, soft_alpha=0.05, act_alpha=0.5, act_network=act_network,
                         bounds=([0.0, -2.0], [3.0, 0.5]))
    jitter_(critic.target_head, 0.5)  # the target differs from the online head
    obs = torch.randn(32, OBS_DIM)
    action = critic.act(obs, deterministic=True)
    assert action.shape == (32, 2)
    codes = critic.discretizer.encode(action)
    flat = codes.flatten(-2)
    use_target = act_network == "target"
    ref = reference.acting_logits(critic, obs, codes, target=use_target)  # [B, N, K]
    assert torch.equal(ref.argmax(-1), flat)
    # the same numbers as the fused teacher-forced path normalised with act_alpha
    head = critic.target_head if use_target else critic.head
    fused = soft_advantages(head.advantage_logits(obs, critic.discretizer.conditioning(codes)), 0.5).min(0).values
    torch.testing.assert_close(fused.detach(), ref.detach(), atol=1e-5, rtol=1e-5)
    # and the choice of network matters here, so the test can tell them apart
    other = reference.acting_logits(critic, obs, codes, target=not use_target)
    assert not torch.equal(other.argmax(-1), flat)


def test_deterministic_ties_pick_the_first_bin():
    """§3.4: with zero output layers every logit ties, and argmax takes the first bin: all codes 0."""
    critic = make_critic(2, 2, 4, out_gain=0.0, jitter=False)
    action = critic.act(torch.randn(3, OBS_DIM), deterministic=True)
    assert bool((critic.discretizer.encode(action) == 0).all())


def test_stochastic_acting_is_reproducible_with_a_generator():
    critic = make_critic(2, 2, 5, soft_alpha=0.1, act_alpha=1.0)
    obs = torch.randn(200, OBS_DIM)
    first = critic.act(obs, deterministic=False, generator=torch.Generator().manual_seed(7))
    again = critic.act(obs, deterministic=False, generator=torch.Generator().manual_seed(7))
    other = critic.act(obs, deterministic=False, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_double_q_value_is_the_target_q_of_the_online_greedy_action():
    """``double_q_value``: ``min_k Q̄_k(s, a*)`` with ``a*`` the online networks' argmax, checked against the
    per-position reference evaluated on a critic whose online head holds the target weights; never above the soft
    value ``min_k V̄_k(s)``."""
    critic = make_critic(2, 2, 3, soft_alpha=0.3)
    jitter_(critic.target_head)  # target weights differ from the online ones
    obs = torch.randn(7, OBS_DIM)
    greedy = make_critic(2, 2, 3, soft_alpha=0.3, jitter=False)
    greedy.load_state_dict(critic.state_dict())
    greedy.act_network = "online"
    a_star = greedy.act(obs, deterministic=True)
    target_as_online = make_critic(2, 2, 3, soft_alpha=0.3, jitter=False)
    target_as_online.load_state_dict(critic.state_dict())
    target_as_online.head.load_state_dict(critic.target_head.state_dict())
    expected = reference.q_values(target_as_online, obs, a_star)[0].min(0).values
    value = critic.double_q_value(obs)
    torch.testing.assert_close(value, expected.to(value.dtype), atol=1e-5, rtol=1e-5)
    assert bool((value <= critic.target_value(obs) + 1e-6).all())


def test_gaussian_exploration_is_the_greedy_action_plus_noise_snapped_to_the_grid():
    """``exploration_std > 0``: exploring acts greedily, then adds N(0, std^2) in the unit box and re-quantises."""
    critic = make_critic(2, 2, 5, soft_alpha=0.1, act_alpha=1.0)
    critic.exploration_std = 0.3
    disc = critic.discretizer
    obs = torch.randn(300, OBS_DIM)
    greedy = critic.act(obs, deterministic=True)
    explored = critic.act(obs, deterministic=False, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(300, 2, generator=torch.Generator().manual_seed(3)) * 0.3
    expected_unit = (disc.to_unit(greedy) + noise).clamp(-1 + 1e-6, 1 - 1e-6)
    torch.testing.assert_close(explored, disc.decode(disc.encode(disc.from_unit(expected_unit))))
    torch.testing.assert_close(disc.decode(disc.encode(explored)), explored)  # on the finest grid
    moved = (disc.to_unit(explored) - disc.to_unit(greedy)).abs()
    assert 0.05 < float(moved.mean()) < 0.5  # about the noise's mean absolute size, 0.3 * sqrt(2 / pi) = 0.24
    critic.exploration_std = 1e-9
    assert torch.equal(critic.act(obs, deterministic=False, generator=torch.Generator().manual_seed(3)), greedy)


def test_stochastic_acting_samples_softmax_of_min_over_twins():
    """§3.4: training rollouts sample Categorical(logits = min_k A_k / alpha_a) at each position, conditioned on
    the bins sampled before; checked on empirical frequencies of positions 0 and 1 (act_alpha != soft_alpha)."""
    act_alpha = 1.5
    critic = make_critic(2, 1, 5, soft_alpha=0.05, act_alpha=act_alpha, bounds=([0.0, -2.0], [3.0, 0.5]))
    samples = 4000
    obs = torch.randn(1, OBS_DIM).expand(samples, -1)
    action = critic.act(obs, deterministic=False, generator=torch.Generator().manual_seed(0))
    codes = critic.discretizer.encode(action)  # [S, 1, 2]
    ref = reference.acting_logits(critic, obs[:1], codes[:1]).detach()  # position 0 does not depend on codes
    expected0 = torch.softmax(ref[0, 0] / act_alpha, -1)
    assert float(expected0.max()) < 0.8 and float(expected0.min()) > 0.01  # a non-degenerate distribution
    freq0 = torch.bincount(codes[:, 0, 0], minlength=5).float() / samples
    assert float((freq0 - expected0).abs().max()) < 0.03
    # position 1 given the most frequent first bin
    top = int(freq0.argmax())
    given = codes[codes[:, 0, 0] == top]
    cond_codes = torch.tensor([[[top, 0]]])
    expected1 = torch.softmax(reference.acting_logits(critic, obs[:1], cond_codes).detach()[0, 1] / act_alpha, -1)
    freq1 = torch.bincount(given[:, 0, 1], minlength=5).float() / given.shape[0]
    assert float((freq1 - expected1).abs().max()) < 0.05


@pytest.mark.parametrize("deterministic", [True, False])
def test_actions_lie_within_bounds_on_the_grid(deterministic):
    """§2.1: acted values are midpoints of the finest grid, inside the (asymmetric) bounds; shape [B, D]."""
    bounds = ([0.0, -2.0, -0.5], [3.0, 0.5, 0.5])
    critic = make_critic(3, 2, 4, soft_alpha=0.5, bounds=bounds)
    action = critic.act(torch.randn(64, OBS_DIM), deterministic=deterministic, generator=torch.Generator())
    assert action.shape == (64, 3)
    low, high = torch.tensor(bounds[0]), torch.tensor(bounds[1])
    assert bool((action > low).all() and (action < high).all())
    cells = (critic.discretizer.to_unit(action.double()) + 1) / 2 * 16 - 0.5  # j for a = -1 + (2j+1)/B^L
    torch.testing.assert_close(cells, cells.round(), atol=1e-4, rtol=0)


# --- configuration ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("qchunk", [4, 5, 0, -2, 12])
def test_head_rejects_qchunk_not_dividing_positions(qchunk):
    with pytest.raises(ConfigError):
        AutoregressiveHead(OBS_DIM, 2, 3, 4, hidden_dims=(8,), qchunk=qchunk)  # N = 6


@pytest.mark.parametrize("kwargs", [{"soft_alpha": 0.0}, {"soft_alpha": -0.1}, {"act_alpha": 0.0},
                                    {"act_alpha": -1.0}, {"act_network": "behaviour"}, {"act_network": "default"}])
def test_critic_rejects_bad_configuration(kwargs):
    disc = CoarseToFineDiscretizer([-1.0], [1.0], levels=2, bins=3)
    head = AutoregressiveHead(OBS_DIM, 1, 2, 3, hidden_dims=(8,))
    with pytest.raises(ConfigError):
        ARSQCritic(FlattenEncoder(OBS_DIM), disc, head, **kwargs)


def test_act_alpha_defaults_to_soft_alpha():
    disc = CoarseToFineDiscretizer([-1.0], [1.0], levels=2, bins=3)
    critic = ARSQCritic(FlattenEncoder(OBS_DIM), disc, AutoregressiveHead(OBS_DIM, 1, 2, 3, hidden_dims=(8,)),
                        soft_alpha=0.3)
    assert critic.act_alpha == 0.3


# --- mean-normalised advantages (advantages="mean") --------------------------------------------------------------

def _mean_critic(num_critics: int, act_network: str = "online") -> ARSQCritic:
    critic = make_critic(2, 2, 3, num_critics=num_critics, soft_alpha=0.3, act_network=act_network)
    critic.advantages = "mean"
    jitter_(critic.target_head)  # target weights differ from the online ones
    return critic


def test_mean_advantages_average_zero_over_bins_and_add_up_to_q():
    critic = _mean_critic(2)
    obs, action = torch.randn(9, OBS_DIM), random_actions(critic, 9)
    q, adv, codes = critic.evaluate(obs, action)
    torch.testing.assert_close(adv.mean(-1), torch.zeros_like(adv[..., 0]), atol=1e-6, rtol=0)
    at_data = adv.gather(-1, codes.unsqueeze(0).unsqueeze(-1).expand(adv.shape[0], -1, -1, 1)).squeeze(-1)
    torch.testing.assert_close(q, critic.head.value(obs) + at_data.sum(-1), atol=1e-6, rtol=1e-6)
    soft = make_critic(2, 2, 3, soft_alpha=0.3, jitter=False)
    soft.load_state_dict(critic.state_dict())
    assert not torch.allclose(soft.evaluate(obs, action)[0], q)  # the normalisation changes Q


def test_mean_target_value_is_the_target_q_at_the_target_networks_greedy_action():
    """With one critic every normalisation has the same argmax, so the greedy action of a soft critic holding the
    target weights is the one the mean target must bootstrap from; its value is no soft value."""
    critic = _mean_critic(1)
    obs = torch.randn(11, OBS_DIM)
    acting = make_critic(2, 2, 3, num_critics=1, soft_alpha=0.3, jitter=False)
    acting.load_state_dict(critic.state_dict())
    acting.head.load_state_dict(critic.target_head.state_dict())
    greedy = acting.act(obs, deterministic=True)
    expected = critic.evaluate(obs, greedy, target=True)[0].min(0).values
    torch.testing.assert_close(critic.target_value(obs), expected, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(critic.target_value(obs), critic.target_head.value(obs).min(0).values)


def test_mean_greedy_action_maximises_the_min_over_twins_of_mean_advantages():
    critic = _mean_critic(2, act_network="target")
    obs = torch.randn(16, OBS_DIM)
    codes = critic.discretizer.encode(critic.act(obs, deterministic=True))
    logits = critic.target_head.advantage_logits(obs, critic.discretizer.conditioning(codes))  # teacher forced
    scores = (logits - logits.mean(-1, keepdim=True)).min(0).values  # [B, N, K]
    assert torch.equal(scores.argmax(-1), codes.flatten(-2))
