"""ARSQLoss against docs/algorithm.md §3.3 (soft Bellman regression, demo-only conservative term, Polyak update)."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict

from arsq_lightning.algos.arsq.critic import ARSQCritic
from arsq_lightning.algos.arsq.head import AutoregressiveHead
from arsq_lightning.algos.arsq.loss import ARSQLoss
from arsq_lightning.algos.base import total_loss
from arsq_lightning.discretizers import CoarseToFineDiscretizer
from arsq_lightning.errors import ConfigError
from arsq_lightning.nets.encoders import FlattenEncoder, MLPEncoder
from arsq_lightning.tools import reference

OBS_DIM = 4
CLIP_MIN, CLIP_MAX = -0.05, 0.2  # small enough that both ends of the clip are hit with out_gain 1.0 logits


def jitter_(module: torch.nn.Module, scale: float = 0.3) -> torch.nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


def make_critic(*, action_dim: int = 2, levels: int = 2, bins: int = 4, num_critics: int = 2, qchunk: int = -1,
                soft_alpha: float = 0.3, encoder: str = "flat") -> ARSQCritic:
    """A tiny critic whose target head differs from the online head (as after some training)."""
    disc = CoarseToFineDiscretizer([0.0] + [-1.0] * (action_dim - 1), [3.0] + [1.0] * (action_dim - 1),
                                   levels=levels, bins=bins)
    feat = OBS_DIM if encoder == "flat" else 8
    head = jitter_(AutoregressiveHead(feat, action_dim, levels, bins, hidden_dims=(16, 16), qchunk=qchunk,
                                      num_critics=num_critics, out_gain=1.0))
    enc = FlattenEncoder(OBS_DIM) if encoder == "flat" else MLPEncoder(OBS_DIM, hidden_dims=(8,))
    critic = ARSQCritic(enc, disc, head, soft_alpha=soft_alpha)
    jitter_(critic.target_head)
    return critic


def make_batch(critic: ARSQCritic, size: int = 8, *, demo: list[bool] | None = None,
               terminated: list[bool] | None = None, with_demo_key: bool = True) -> TensorDict:
    """A TorchRL-layout batch: observation, action, demo [B], next/{observation, reward [B,1], terminated [B,1]}."""
    disc = critic.discretizer
    demo = demo if demo is not None else [i % 3 != 2 for i in range(size)]
    terminated = terminated if terminated is not None else [i % 4 == 0 for i in range(size)]
    data = {
        "observation": torch.randn(size, OBS_DIM),
        "action": disc.low + torch.rand(size, disc.action_dim) * (disc.high - disc.low),
        "next": {
            "observation": torch.randn(size, OBS_DIM),
            "reward": torch.randn(size, 1),
            "terminated": torch.tensor(terminated).reshape(size, 1),
        },
    }
    if with_demo_key:
        data["demo"] = torch.tensor(demo)
    return TensorDict(data, batch_size=[size])


LOSS_KW = dict(gamma=0.9, td_weight=0.7, conservative_weight=1.3, clip_min=CLIP_MIN, clip_max=CLIP_MAX,
               cql_temperature=0.8)


def make_loss(conservative: str = "cql", demo_reduction: str = "demo_mean", **overrides) -> ARSQLoss:
    return ARSQLoss(**{**LOSS_KW, **overrides}, conservative=conservative, demo_reduction=demo_reduction)


def reference_loss(critic: ARSQCritic, batch: TensorDict, conservative: str, reduction: str, **overrides):
    kw = {**LOSS_KW, **overrides}
    return reference.loss(critic, batch, gamma=kw["gamma"], td_weight=kw["td_weight"], conservative=conservative,
                          weight=kw["conservative_weight"], clip_min=kw["clip_min"], clip_max=kw["clip_max"],
                          temperature=kw["cql_temperature"], reduction=reduction)


def leaves(batch: TensorDict) -> dict:
    return {k: v.clone() for k, v in batch.items(include_nested=True, leaves_only=True)}


# --- agreement with the reference -------------------------------------------------------------------------------------

@pytest.mark.parametrize("conservative", ["none", "cql", "margin"])
@pytest.mark.parametrize("reduction", ["demo_mean", "batch_mean", "sum_all"])
@pytest.mark.parametrize("num_critics", [1, 2])
@pytest.mark.parametrize("clip", [(CLIP_MIN, CLIP_MAX), (0.02, 0.3)], ids=["hinge", "positive_min"])
def test_loss_matches_reference(conservative, reduction, num_critics, clip):
    """§3.3 steps 3-6: sum_k lambda_TD mean (Q_k - y)^2 + lambda_c C_k, y = r + gamma (1 - term) min_k V̄_k(s'),
    for every conservative variant and sample reduction, with a clip that is active at both ends; a positive
    clip_min (like hmr's +1.0) must not leak into the data bin's own (zero) difference."""
    critic = make_critic(num_critics=num_critics)
    batch = make_batch(critic)
    clip_kw = {"clip_min": clip[0], "clip_max": clip[1]}
    out = make_loss(conservative, reduction, **clip_kw)(critic, batch)
    expected = reference_loss(critic, batch, conservative, reduction, **clip_kw)
    torch.testing.assert_close(total_loss(out), expected, atol=1e-5, rtol=1e-5)
    td_only = reference_loss(critic, batch, "none", reduction, **clip_kw)
    torch.testing.assert_close(out["loss_td"], td_only.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["loss_conservative"], (expected - td_only).detach(), atol=1e-5, rtol=1e-5)
    if conservative != "none":
        assert abs(float(out["loss_conservative"])) > 1e-4


@pytest.mark.parametrize("conservative", ["cql", "margin"])
def test_clip_is_active_at_both_ends(conservative):
    """The reference comparison above only tests the clip if some differences fall outside [clip_min, clip_max]."""
    critic = make_critic()
    batch = make_batch(critic)
    _, adv, codes = reference.q_values(critic, batch["observation"], batch["action"])
    data = adv.gather(-1, codes[None, ..., None].expand(adv.shape[0], -1, -1, 1))
    others = torch.ones_like(adv, dtype=torch.bool).scatter(-1, codes[None, ..., None].expand_as(data), False)
    if conservative == "cql":
        soft = 0.8 * torch.logsumexp((adv / 0.8).masked_fill(~others, float("-inf")), -1)
        diff = soft - data.squeeze(-1)
    else:
        diff = (adv - data)[others]
    assert bool((diff < CLIP_MIN).any()) and bool((diff > CLIP_MAX).any())
    assert bool(((diff > CLIP_MIN) & (diff < CLIP_MAX)).any())  # and some are left unclipped


@pytest.mark.parametrize("conservative", ["cql", "margin"])
@pytest.mark.parametrize("reduction", ["demo_mean", "batch_mean", "sum_all"])
def test_batch_without_demo_has_no_conservative_term(conservative, reduction):
    """§3.3 step 5: the conservative term is computed only if the batch holds at least one demo."""
    critic = make_critic()
    loss = make_loss(conservative, reduction)
    for batch in (make_batch(critic, demo=[False] * 8), make_batch(critic, with_demo_key=False)):
        out = loss(critic, batch)
        assert float(out["loss_conservative"]) == 0.0
        torch.testing.assert_close(total_loss(out), out["loss_td"])
        torch.testing.assert_close(total_loss(out), reference_loss(critic, batch, "none", reduction).detach(),
                                   atol=1e-5, rtol=1e-5)


def test_loss_matches_reference_with_qchunk_and_learned_encoder():
    critic = make_critic(action_dim=3, levels=2, bins=3, qchunk=2, encoder="mlp")
    batch = make_batch(critic, 6)
    out = make_loss("margin", "batch_mean")(critic, batch)
    torch.testing.assert_close(total_loss(out), reference_loss(critic, batch, "margin", "batch_mean"), atol=1e-5,
                               rtol=1e-5)


# --- bootstrapping ----------------------------------------------------------------------------------------------------

def test_terminated_next_observation_does_not_matter():
    """§3.3 step 3: (1 - terminated) masks the bootstrap, so s' of a terminated sample has no effect."""
    critic = make_critic()
    loss = make_loss("cql")
    batch = make_batch(critic, terminated=[True, False] * 4)
    base = total_loss(loss(critic, batch))
    moved = batch.clone()
    moved["next", "observation"][0] += 5.0  # terminated sample
    torch.testing.assert_close(total_loss(loss(critic, moved)), base, atol=1e-7, rtol=0)
    moved = batch.clone()
    moved["next", "observation"][1] += 5.0  # non-terminated sample
    assert abs(float(total_loss(loss(critic, moved)).detach() - base.detach())) > 1e-4


def test_truncation_is_ignored():
    """§3.3 / module docstring: truncation is not termination; ("next", "truncated") does not change the loss."""
    critic = make_critic()
    loss = make_loss("cql")
    batch = make_batch(critic, terminated=[True, False] * 4)
    base = total_loss(loss(critic, batch))
    truncated = batch.clone()
    truncated["next", "truncated"] = torch.ones(8, 1, dtype=torch.bool)
    truncated["next", "done"] = torch.ones(8, 1, dtype=torch.bool)
    torch.testing.assert_close(total_loss(loss(critic, truncated)), base, atol=0, rtol=0)


def test_target_uses_min_of_target_values():
    """§3.3 step 3: y = r + gamma (1 - term) min_k V̄_k(s'), with the target head (not the online one)."""
    critic = make_critic()
    batch = make_batch(critic, terminated=[False, True] * 4)
    out = make_loss("none")(critic, batch)
    with torch.no_grad():
        v_next = critic.target_head.value(batch["next", "observation"]).min(0).values
    term = batch["next", "terminated"].reshape(-1).float()
    y = batch["next", "reward"].reshape(-1) + 0.9 * (1 - term) * v_next
    torch.testing.assert_close(out["target"], y.mean())
    assert not out["target"].requires_grad


def test_double_q_bootstrap_uses_the_target_q_of_the_online_greedy_action():
    """``bootstrap="double_q"``: y = r + gamma (1 - term) min_k Q̄_k(s', a*), a* greedy under the online networks."""
    critic = make_critic()
    batch = make_batch(critic, terminated=[False, True] * 4)
    out = make_loss("none", bootstrap="double_q")(critic, batch)
    next_obs = batch["next", "observation"]
    a_star = critic._decode_with(critic.head, next_obs, None)
    with torch.no_grad():
        q_next = critic.evaluate(next_obs, a_star, target=True)[0].min(0).values
    term = batch["next", "terminated"].reshape(-1).float()
    y = batch["next", "reward"].reshape(-1) + 0.9 * (1 - term) * q_next
    torch.testing.assert_close(out["target"], y.mean())
    assert float(out["target"]) < float(make_loss("none")(critic, batch)["target"])  # below the soft-value target


# --- gradients and inputs ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("conservative", ["cql", "margin"])
def test_gradients_reach_only_online_parameters(conservative):
    """§3.3 steps 6-7: one backward pass trains encoder and online head; the target copy gets no gradient."""
    critic = make_critic(encoder="mlp")
    batch = make_batch(critic)
    before = leaves(batch)
    out = make_loss(conservative)(critic, batch)
    total_loss(out).backward()
    for name, p in critic.target_head.named_parameters():
        assert p.grad is None and not p.requires_grad, name
    for name, p in [*critic.head.named_parameters(), *critic.encoder.named_parameters()]:
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
        assert float(p.grad.abs().max()) > 0, name
    for key in ("loss_td", "loss_conservative"):  # the terms the trainer sums
        assert out[key].requires_grad, key
    for key in ("q", "target"):  # diagnostics
        assert not out[key].requires_grad, key
    after = leaves(batch)
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def test_online_parameters_exclude_target():
    critic = make_critic(encoder="mlp")
    ids = {id(p) for p in critic.online_parameters()}
    assert ids == {id(p) for p in [*critic.encoder.parameters(), *critic.head.parameters()]}
    assert not ids & {id(p) for p in critic.target_head.parameters()}


@pytest.mark.parametrize("tau", [0.0, 0.005, 0.3, 1.0])
def test_polyak_update(tau):
    """§3.3 step 7: target <- tau * online + (1 - tau) * target, for every head parameter; online unchanged."""
    critic = make_critic(qchunk=2)
    online = {n: p.detach().clone() for n, p in critic.head.named_parameters()}
    old_target = {n: p.detach().clone() for n, p in critic.target_head.named_parameters()}
    assert any(not torch.equal(online[n], old_target[n]) for n in online)
    critic.polyak(tau)
    for name, p in critic.target_head.named_parameters():
        torch.testing.assert_close(p, tau * online[name] + (1 - tau) * old_target[name], atol=1e-7, rtol=1e-6)
    for name, p in critic.head.named_parameters():
        assert torch.equal(p, online[name]), name


# --- demo masking -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("conservative", ["cql", "margin"])
def test_conservative_term_only_sees_demo_samples(conservative):
    """§3.3 step 5: with demo_mean (and batch_mean) only demo-flagged samples enter the conservative term; the
    official D4RL margin bug (sum_all) sums over the whole batch, so it does see the non-demo samples."""
    critic = make_critic()
    batch = make_batch(critic, demo=[True, False] * 4)
    moved = batch.clone()
    non_demo = ~batch["demo"]
    moved["action"][non_demo] = critic.discretizer.low + torch.rand(4, 2) * (critic.discretizer.high -
                                                                            critic.discretizer.low)
    assert not torch.equal(critic.discretizer.encode(moved["action"]), critic.discretizer.encode(batch["action"]))
    for reduction in ("demo_mean", "batch_mean"):
        loss = make_loss(conservative, reduction)
        torch.testing.assert_close(loss(critic, moved)["loss_conservative"],
                                   loss(critic, batch)["loss_conservative"], atol=1e-6, rtol=1e-6)
    loss = make_loss(conservative, "sum_all")
    assert abs(float(loss(critic, moved)["loss_conservative"] - loss(critic, batch)["loss_conservative"])) > 1e-4


def test_demo_reductions_relate_by_demo_count():
    """§3.3 step 5: batch_mean = demo_mean * (#demo / batch size)."""
    critic = make_critic()
    batch = make_batch(critic, demo=[True, False, False, True, False, False, False, True])
    demo_mean = make_loss("cql", "demo_mean")(critic, batch)["loss_conservative"]
    batch_mean = make_loss("cql", "batch_mean")(critic, batch)["loss_conservative"]
    torch.testing.assert_close(batch_mean, demo_mean * 3 / 8)


# --- configuration ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [{"gamma": 1.5}, {"gamma": -0.1}, {"cql_temperature": 0.0},
                                    {"clip_min": 1.0, "clip_max": 0.0}, {"conservative": "bc"},
                                    {"demo_reduction": "mean"}])
def test_loss_rejects_bad_configuration(kwargs):
    with pytest.raises(ConfigError):
        ARSQLoss(**kwargs)


def test_target_bounds_clamp_the_td_target():
    """With ``target_bounds`` the TD term regresses Q on ``clamp(r + gamma (1 - d) min_k V̄_k(s'), low, high)``,
    computed here per sample; ``target_clipped`` is the share of clamped targets."""
    torch.manual_seed(3)
    critic = make_critic()
    data = make_batch(critic, size=16)
    data["next", "reward"] = torch.linspace(-3.0, 3.0, 16).unsqueeze(-1)
    out = ARSQLoss(gamma=0.9, target_bounds=(-1.0, 1.5))(critic, data)
    with torch.no_grad():
        q, _, _ = critic.evaluate(data["observation"], data["action"])
        next_v = critic.target_head.value(critic.encoder(data["next", "observation"]))  # [C, B]
    expected_td, clipped = torch.zeros(()), 0
    for i in range(16):
        raw = float(data["next", "reward"][i]) + (0.0 if data["next", "terminated"][i] else 0.9) * float(
            next_v[:, i].min())
        clipped += not -1.0 <= raw <= 1.5
        expected_td += sum((q[k, i] - min(max(raw, -1.0), 1.5)) ** 2 for k in range(q.shape[0])) / 16
    assert 0 < clipped < 16
    torch.testing.assert_close(out["loss_td"], expected_td, rtol=1e-5, atol=1e-6)
    assert float(out["target_clipped"]) == clipped / 16
    unbounded = ARSQLoss(gamma=0.9)(critic, data)
    assert "target_clipped" not in unbounded and not torch.allclose(unbounded["loss_td"], out["loss_td"])
    with pytest.raises(ConfigError, match="target_bounds"):
        ARSQLoss(target_bounds=(1.0, -1.0))
