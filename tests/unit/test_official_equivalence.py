"""ARSQCritic + ARSQLoss against an independent, slow re-derivation of the official ARSQ code (docs/algorithm.md §2-§3).

The official networks and losses were read (not copied) from ``mihir-chauhan/CQN-AS-Franka`` (the verbatim copy of the
ARSQ release): ``ARSQ-main/d4rl/arsq_d4rl/alg/sqar.py`` (``FCNetNaive``, ``NN_mlpc_qc.forward`` / ``infer``,
``SQAR._update_step``), ``ARSQ-main/rlbench/arsq_rlb/alg/sqar.py`` (``SQARAgent.update_critic``, the RLBench sample
reductions) and ``ARSQ-main/d4rl/arsq_d4rl/alg/cqn_utils.py`` (``encode_action``, ``zoom_in``). This file rebuilds
them slowly and plainly: per twin a V net and ``N / qchunk`` advantage nets made of ``nn.Linear`` + tanh, input
``concat(obs, m_i)``; per-position Python loops with explicit float32 zoom-in; the loss per twin, per sample and per
position, with each codebase's reduction of the conservative term written as the official tensors broadcast.

The official weights are then copied into the project's :class:`AutoregressiveHead` (twin ``k``'s advantage net ``c``
becomes ensemble member ``k * num_chunks + c``) and, on the same batch, the tests compare: codes, V, Q of the data
actions and soft advantages per twin; the TD target ``r + gamma (1 - terminated) min_k Vbar_k(s')`` and TD loss; the
``cql`` / ``margin`` conservative terms (D4RL: ``demo_mean`` / ``sum_all``; RLBench: ``batch_mean``) for several
clips; every parameter gradient of the total loss (mapped back to the official layout); and greedy actions of
``critic.act`` against the official ``infer`` with online and with target networks.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from tensordict import TensorDict
from torch import Tensor, nn

from arsq_lightning import (
    ARSQCritic,
    ARSQLoss,
    AutoregressiveHead,
    CoarseToFineDiscretizer,
    FlattenEncoder,
    conservative_penalty,
    total_loss,
)

OBS_DIM, LEVELS, HIDDEN = 5, 2, (16, 16)
LOGIT_SCALE = 1.5  # std of the random output layers, so that advantages spread over a few units and clips bite
CLIPS = [(-1.0, 1e7), (1.0, 1e7), (-0.01, 1e7)]
DEMO = [True, False, True, True, False, False, True, False, True, True, False, True]
TOL = dict(rtol=1e-5, atol=1e-6)


# --- official-style networks (FCNetNaive / NN_mlpc_qc layout) --------------------------------------------------------

class OfficialMLP(nn.Module):
    """``FCNetNaive``: hidden ``nn.Linear`` layers each followed by tanh, then a linear output layer."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        widths = [in_dim, *HIDDEN]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(widths[:-1], widths[1:]))
        self.output = nn.Linear(widths[-1], out_dim)
        with torch.no_grad():  # random (not the official near-zero) output layer, so logits differ visibly
            self.output.weight.normal_(0.0, LOGIT_SCALE)
            self.output.bias.normal_(0.0, 0.5)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.output(x)


class OfficialTwin(nn.Module):
    """``NN_mlpc_qc``: a V net on ``obs`` and ``N / S`` advantage nets on ``(obs, m_i)`` with ``S`` slots of ``K``."""

    def __init__(self, action_dim: int, bins: int, qchunk: int):
        super().__init__()
        self.action_dim, self.bins, self.num_positions = action_dim, bins, LEVELS * action_dim
        self.slots = self.num_positions if qchunk == -1 else qchunk
        self.v_network = OfficialMLP(OBS_DIM, 1)
        self.q_networks = nn.ModuleList(OfficialMLP(OBS_DIM + action_dim, self.slots * bins)
                                        for _ in range(self.num_positions // self.slots))

    def value(self, obs: Tensor) -> Tensor:
        """``V(s)``: ``[B, obs] -> [B]``."""
        return self.v_network(obs).squeeze(-1)

    def position_logits(self, obs: Tensor, cond: Tensor, position: int) -> Tensor:
        """Raw logits of ``position``: slot ``i mod S`` of net ``i // S`` run on ``(obs, m_i)``, ``[B, K]``."""
        chunk, slot = divmod(position, self.slots)
        return self.q_networks[chunk](torch.cat([obs, cond], dim=-1)).view(-1, self.slots, self.bins)[:, slot]


def make_twins(action_dim: int, bins: int, qchunk: int, count: int = 2) -> list[OfficialTwin]:
    return [OfficialTwin(action_dim, bins, qchunk) for _ in range(count)]


def jittered(twins: list[OfficialTwin], scale: float = 0.3) -> list[OfficialTwin]:
    """Copies with every parameter perturbed: target networks that differ from the online ones."""
    out = copy.deepcopy(twins)
    with torch.no_grad():
        for p in (p for twin in out for p in twin.parameters()):
            p.add_(scale * torch.randn_like(p))
    return out


# --- official-style discretisation, forward pass and acting (float32, one position at a time) -----------------------

def unit_box(batch: int, action_dim: int) -> tuple[Tensor, Tensor]:
    return torch.full((batch, action_dim), -1.0), torch.ones(batch, action_dim)


def zoom(low: Tensor, high: Tensor, dim: int, choice: Tensor, bins: int) -> None:
    """Official ``zoom_in`` on dim ``dim`` in place: ``low += (high - low) / K * choice``, ``high = low + width``."""
    width = (high[:, dim] - low[:, dim]) / bins
    low[:, dim] = low[:, dim] + width * choice
    high[:, dim] = low[:, dim] + width


def official_encode(action: Tensor, bins: int) -> Tensor:
    """``encode_action``: per level ``floor((a - low) / width)`` clipped to the bins, then zoom in: ``[B, L, D]``."""
    low, high = unit_box(*action.shape)
    codes = []
    for _ in range(LEVELS):
        width = (high - low) / bins
        index = torch.floor((action - low) / width).clip(0, bins - 1)
        codes.append(index.long())
        low = torch.maximum(torch.clip(low + width * index, -1.0, 1.0), torch.tensor(-1.0))
        high = torch.minimum(low + width, torch.tensor(1.0))
    return torch.stack(codes, dim=-2)


def official_conditioning(codes: Tensor, bins: int) -> list[Tensor]:
    """Teacher-forced ``m_i`` (midpoints before position ``i = l * D + d`` is committed), one ``[B, D]`` per ``i``."""
    low, high = unit_box(codes.shape[0], codes.shape[-1])
    conds = []
    for lvl in range(LEVELS):
        for d in range(codes.shape[-1]):
            conds.append((low + high) / 2.0)
            zoom(low, high, d, codes[:, lvl, d].float(), bins)
    return conds


def normalise(logits: Tensor, alpha: float) -> Tensor:
    """Soft advantages ``z - alpha * logsumexp(z / alpha)`` over bins."""
    return logits - alpha * torch.logsumexp(logits / alpha, dim=-1, keepdim=True)


def official_forward(twin: OfficialTwin, obs: Tensor, codes: Tensor, alpha: float) -> tuple[Tensor, Tensor, Tensor]:
    """One twin on data actions: ``V [B]``, soft advantages ``[B, N, K]`` and ``Q = V + sum_i A_i[c_i]`` ``[B]``."""
    flat = codes.flatten(1)
    value, advs = twin.value(obs), []
    q = value
    for i, cond in enumerate(official_conditioning(codes, twin.bins)):
        adv = normalise(twin.position_logits(obs, cond, i), alpha)
        advs.append(adv)
        q = q + adv.gather(-1, flat[:, i:i + 1]).squeeze(-1)
    return value, torch.stack(advs, dim=1), q


@torch.no_grad()
def official_infer(twins: list[OfficialTwin], obs: Tensor, alpha: float, combine: Callable = torch.minimum) -> Tensor:
    """``infer(deterministic=True)``: per position combine the twins' normalised logits, argmax, zoom: ``[B, L, D]``."""
    action_dim, bins = twins[0].action_dim, twins[0].bins
    low, high = unit_box(obs.shape[0], action_dim)
    choices = []
    for lvl in range(LEVELS):
        for d in range(action_dim):
            cond = (low + high) / 2.0
            scores = None
            for twin in twins:
                adv = normalise(twin.position_logits(obs, cond, lvl * action_dim + d), alpha)
                scores = adv if scores is None else combine(scores, adv)
            choice = scores.max(-1)[1]
            choices.append(choice)
            zoom(low, high, d, choice.float(), bins)
    return torch.stack(choices, dim=1).view(-1, LEVELS, action_dim)


def official_decode(codes: Tensor, bins: int) -> Tensor:
    """``decode_action``: zoom in along the codes, return the final midpoints ``[B, D]``."""
    low, high = unit_box(codes.shape[0], codes.shape[-1])
    for lvl in range(LEVELS):
        for d in range(codes.shape[-1]):
            zoom(low, high, d, codes[:, lvl, d].float(), bins)
    return (low + high) / 2.0


# --- official-style loss (SQAR._update_step / SQARAgent.update_critic) ----------------------------------------------

@dataclass(frozen=True)
class Setting:
    """One official loss configuration: conservative variant, codebase (sample reduction), clip and weights."""

    variant: str  # "cql" or "margin"
    codebase: str  # "d4rl" or "rlbench"
    clip_min: float
    clip_max: float
    gamma: float = 0.9
    td_weight: float = 0.7  # bellman_loss_coef
    weight: float = 1.3  # cql_min_q_weight
    temperature: float = 0.8  # cql_temp
    soft_alpha: float = 0.3

    @property
    def reduction(self) -> str:
        """The project's name for this codebase's sample reduction (docs/algorithm.md §3.3 step 5, §8.5-8.6)."""
        if self.codebase == "rlbench":
            return "batch_mean"
        return "demo_mean" if self.variant == "cql" else "sum_all"


def official_raw_diffs(adv: Tensor, flat: Tensor, variant: str, temperature: float) -> Tensor:
    """Unclipped per-position differences of one twin, by loops over samples and positions.

    ``cql``: ``[B, N, 1]``, ``tau * logsumexp_{b != c}(A_b / tau) - A_c``; ``margin``: ``[B, N, K - 1]``,
    ``A_b - A_c`` for each other bin ``b`` in ascending order (the official ``nonzero`` order).
    """
    rows = []
    for b in range(adv.shape[0]):
        per_position = []
        for i in range(adv.shape[1]):
            data = int(flat[b, i])
            others = adv[b, i, [j for j in range(adv.shape[-1]) if j != data]]
            if variant == "cql":
                per_position.append((temperature * torch.logsumexp(others / temperature, 0) - adv[b, i, data]).view(1))
            else:
                per_position.append(others - adv[b, i, data])
        rows.append(torch.stack(per_position))
    return torch.stack(rows)


def official_conservative(raw: Tensor, demo: Tensor, s: Setting) -> Tensor:
    """Clip, sum over positions, then reduce the samples exactly as the official tensors broadcast."""
    demos = demo.float().view(-1, 1)  # batch['demos'].reshape(-1, 1)
    if demos.sum() == 0:  # both codebases skip the term
        return torch.zeros(())
    per_sample = raw.clamp(s.clip_min, s.clip_max).sum(1)  # [B, 1] (cql) or [B, K - 1] (margin)
    if s.codebase == "rlbench":
        return (per_sample * demos).mean()  # over the batch (and, for margin, the K - 1 other bins)
    if s.variant == "margin":
        per_sample = per_sample.mean(1)  # [B]: times demos [B, 1] it broadcasts to [B, B] (the §8.5 bug)
    return (per_sample * demos).sum() / demos.sum()


def official_loss(twins: list[OfficialTwin], targets: list[OfficialTwin], batch: TensorDict,
                  s: Setting) -> dict[str, Tensor]:
    """Everything the official update computes before ``backward``; per-twin entries are stacked ``[C, ...]``."""
    obs, bins = batch["observation"], twins[0].bins
    codes = official_encode(batch["action"], bins)
    with torch.no_grad():
        next_v = torch.stack([target.value(batch["next", "observation"]) for target in targets])
        not_done = 1.0 - batch["next", "terminated"].float().view(-1)
        y = batch["next", "reward"].view(-1) + not_done * s.gamma * next_v.min(0).values
    parts: dict[str, list[Tensor]] = {"v": [], "adv": [], "q": [], "td": [], "conservative": [], "raw": []}
    total = torch.zeros(())
    for twin in twins:
        v, adv, q = official_forward(twin, obs, codes, s.soft_alpha)
        raw = official_raw_diffs(adv, codes.flatten(1), s.variant, s.temperature)
        td, conservative = ((q - y) ** 2).mean(), official_conservative(raw, batch["demo"], s)
        total = total + s.td_weight * td + s.weight * conservative
        for key, value in zip(parts, (v, adv, q, td, conservative, raw)):
            parts[key].append(value)
    return {"codes": codes, "next_v": next_v, "target": y, "total": total,
            **{key: torch.stack(values) for key, values in parts.items()}}


# --- project side ------------------------------------------------------------------------------------------------

def official_to_project(twins: list[OfficialTwin], read: Callable[[Tensor], Tensor] = lambda p: p) -> dict[str, Tensor]:
    """The project head's state dict built from the twins (``read`` picks the parameter or its ``.grad``).

    ``nn.Linear`` weights ``[out, in]`` become ensemble weights ``[E, in, out]``; twin ``k``'s advantage net ``c`` is
    member ``k * num_chunks + c``; its output ``[S * K, H]`` (slot-major) becomes ``adv_weight[e] [S, H, K]``.
    """
    adv_nets = [net for twin in twins for net in twin.q_networks]
    slots, bins = twins[0].slots, twins[0].bins
    out = {}
    for j in range(len(HIDDEN)):
        for prefix, nets in (("value_trunk", [twin.v_network for twin in twins]), ("adv_trunk", adv_nets)):
            out[f"{prefix}.layers.{j}.weight"] = torch.stack([read(net.layers[j].weight).T for net in nets])
            out[f"{prefix}.layers.{j}.bias"] = torch.stack([read(net.layers[j].bias).view(1, -1) for net in nets])
    out["value_out.weight"] = torch.stack([read(twin.v_network.output.weight).T for twin in twins])
    out["value_out.bias"] = torch.stack([read(twin.v_network.output.bias).view(1, 1) for twin in twins])
    out["adv_weight"] = torch.stack([read(net.output.weight).view(slots, bins, -1).transpose(1, 2) for net in adv_nets])
    out["adv_bias"] = torch.stack([read(net.output.bias).view(slots, bins) for net in adv_nets])
    return out


def project_critic(twins: list[OfficialTwin], targets: list[OfficialTwin], *, soft_alpha: float = 0.3,
                   act_alpha: float | None = None, act_network: str = "online") -> ARSQCritic:
    """An ARSQCritic on ``[-1, 1]^D`` whose online and target heads hold the official networks' weights."""
    first = twins[0]
    qchunk = -1 if first.slots == first.num_positions else first.slots
    disc = CoarseToFineDiscretizer([-1.0] * first.action_dim, [1.0] * first.action_dim, levels=LEVELS, bins=first.bins)
    head = AutoregressiveHead(OBS_DIM, first.action_dim, LEVELS, first.bins, hidden_dims=HIDDEN, qchunk=qchunk,
                              num_critics=len(twins))
    head.load_state_dict(official_to_project(twins))  # strict: the mapping names every parameter exactly once
    critic = ARSQCritic(FlattenEncoder(OBS_DIM), disc, head, soft_alpha=soft_alpha, act_alpha=act_alpha,
                        act_network=act_network)
    critic.target_head.load_state_dict(official_to_project(targets))
    return critic


def project_loss(s: Setting) -> ARSQLoss:
    return ARSQLoss(gamma=s.gamma, td_weight=s.td_weight, conservative=s.variant, conservative_weight=s.weight,
                    clip_min=s.clip_min, clip_max=s.clip_max, cql_temperature=s.temperature,
                    demo_reduction=s.reduction)


def make_batch(action_dim: int, demo: list[bool] = DEMO) -> TensorDict:
    """A TorchRL-layout batch with actions in ``(-1, 1)``, some terminal rows and the given demo flags."""
    size = len(demo)
    return TensorDict({
        "observation": torch.randn(size, OBS_DIM),
        "action": torch.rand(size, action_dim) * 2.0 - 1.0,
        "demo": torch.tensor(demo),
        "next": {"observation": torch.randn(size, OBS_DIM), "reward": torch.randn(size, 1),
                 "terminated": torch.tensor([i % 4 == 1 for i in range(size)]).view(size, 1)},
    }, batch_size=[size])


def assert_grads_close(head: nn.Module, expected: dict[str, Tensor]) -> None:
    """Every head gradient equals the mapped official one, to rtol 1e-5 and an atol of 1e-6 times the tensor's
    largest entry (at least 1): summed float32 gradients reach a few hundred in the ``sum_all`` cases."""
    for name, param in head.named_parameters():
        atol = 1e-6 * max(1.0, float(expected[name].abs().max()))
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-5, atol=atol,
                                   msg=lambda m, n=name: f"grad {n}: {m}")


def setup(qchunk: int, action_dim: int, bins: int, **critic_kw) -> tuple[list, list, ARSQCritic]:
    """Official twins, perturbed official targets, and the project critic holding both."""
    twins = make_twins(action_dim, bins, qchunk)
    targets = jittered(twins)
    return twins, targets, project_critic(twins, targets, **critic_kw)


# --- tests ---------------------------------------------------------------------------------------------------------

SHAPES = [pytest.param(-1, 3, 4, id="qchunk-1_D3_K4"), pytest.param(1, 2, 5, id="qchunk1_D2_K5")]
MORE_SHAPES = SHAPES + [pytest.param(-1, 2, 3, id="qchunk-1_D2_K3"), pytest.param(1, 3, 3, id="qchunk1_D3_K3")]
SETTINGS = [pytest.param(Setting(variant, codebase, lo, hi), id=f"{codebase}-{variant}-clip{lo:g}")
            for variant, codebase in [("cql", "d4rl"), ("margin", "d4rl"), ("cql", "rlbench"), ("margin", "rlbench")]
            for lo, hi in CLIPS]


@pytest.mark.parametrize("qchunk,action_dim,bins", MORE_SHAPES)
@pytest.mark.parametrize("soft_alpha", [0.01, 0.3])
def test_values_and_soft_advantages_match_official(qchunk: int, action_dim: int, bins: int, soft_alpha: float):
    """Codes, V, soft advantages and Q of the data actions per twin; min over the twins' target V."""
    twins, targets, critic = setup(qchunk, action_dim, bins, soft_alpha=soft_alpha)
    batch = make_batch(action_dim)
    obs, codes = batch["observation"], official_encode(batch["action"], bins)
    with torch.no_grad():
        q, adv, flat = critic.evaluate(obs, batch["action"])
        expected = [official_forward(twin, obs, codes, soft_alpha) for twin in twins]
        next_v = torch.stack([target.value(batch["next", "observation"]) for target in targets])
        torch.testing.assert_close(critic.head.value(obs), torch.stack([v for v, _, _ in expected]), **TOL)
        torch.testing.assert_close(critic.target_value(batch["next", "observation"]), next_v.min(0).values, **TOL)
    assert torch.equal(flat, codes.flatten(1))
    torch.testing.assert_close(adv, torch.stack([a for _, a, _ in expected]), **TOL)
    torch.testing.assert_close(q, torch.stack([q_k for _, _, q_k in expected]), **TOL)
    assert ((next_v[0] < next_v[1]).any() and (next_v[0] > next_v[1]).any()), "min, max and one twin must differ"
    assert not torch.allclose(q[0], q[1], atol=1e-2), "the twins must differ"


@pytest.mark.parametrize("qchunk,action_dim,bins", SHAPES)
@pytest.mark.parametrize("setting", SETTINGS)
def test_loss_and_gradients_match_official(qchunk: int, action_dim: int, bins: int, setting: Setting):
    """TD target and loss, per-twin conservative term, total loss and every head gradient, on a mixed-demo batch."""
    twins, targets, critic = setup(qchunk, action_dim, bins, soft_alpha=setting.soft_alpha)
    batch = make_batch(action_dim)
    out = project_loss(setting)(critic, batch)
    total_loss(out).backward()
    ref = official_loss(twins, targets, batch, setting)
    ref["total"].backward()
    s = setting
    with torch.no_grad():
        q, adv, flat = critic.evaluate(batch["observation"], batch["action"])
        not_done = 1.0 - batch["next", "terminated"].float().view(-1)
        y = batch["next", "reward"].view(-1) + s.gamma * not_done * critic.target_value(batch["next", "observation"])
        penalty = conservative_penalty(adv, flat, batch["demo"], variant=s.variant, temperature=s.temperature,
                                       clip_min=s.clip_min, clip_max=s.clip_max, reduction=s.reduction)
    assert torch.equal(flat, ref["codes"].flatten(1))
    torch.testing.assert_close(q, ref["q"].detach(), **TOL)
    torch.testing.assert_close(y, ref["target"], **TOL)
    torch.testing.assert_close(out["target"], ref["target"].mean(), **TOL)
    torch.testing.assert_close((q - y).pow(2).mean(-1), ref["td"].detach(), **TOL)
    torch.testing.assert_close(out["loss_td"], s.td_weight * ref["td"].detach().sum(), **TOL)
    torch.testing.assert_close(penalty, ref["conservative"].detach(), **TOL)
    torch.testing.assert_close(out["loss_conservative"], s.weight * ref["conservative"].detach().sum(), **TOL)
    torch.testing.assert_close(total_loss(out).detach(), ref["total"].detach(), **TOL)
    assert_grads_close(critic.head, official_to_project(twins, read=lambda p: p.grad))
    raw = ref["raw"].detach()
    assert 0.0 < (raw < s.clip_min).float().mean() < 1.0, "the clip must bind on some positions and not on others"


@pytest.mark.parametrize("setting", [param for param in SETTINGS if param.values[0].clip_min == -0.01])
def test_batch_without_demos_has_no_conservative_term(setting: Setting):
    """Both codebases skip the conservative term when no row is a demo, even D4RL's unmasked ``margin`` sum."""
    twins, targets, critic = setup(-1, 2, 3, soft_alpha=setting.soft_alpha)
    batch = make_batch(2, demo=[False] * len(DEMO))
    out = project_loss(setting)(critic, batch)
    ref = official_loss(twins, targets, batch, setting)
    assert float(out["loss_conservative"]) == 0.0 and float(ref["conservative"].abs().sum()) == 0.0
    torch.testing.assert_close(total_loss(out).detach(), ref["total"].detach(), **TOL)
    unguarded = ref["raw"].detach().clamp(setting.clip_min, setting.clip_max).sum()
    assert float(unguarded.abs()) > 1e-3, "a sum over the batch without the any-demo guard would not be zero"


@pytest.mark.parametrize("qchunk,action_dim,bins", SHAPES)
@pytest.mark.parametrize("act_network", ["online", "target"])
@pytest.mark.parametrize("act_alpha", [0.05, 1.0])
def test_greedy_actions_match_official_infer(qchunk: int, action_dim: int, bins: int, act_network: str,
                                             act_alpha: float):
    """``act(deterministic=True)`` equals the official ``infer`` + ``decode_action`` on 64 states."""
    twins, targets, critic = setup(qchunk, action_dim, bins, act_alpha=act_alpha, act_network=act_network)
    obs = torch.randn(64, OBS_DIM)
    acting, other = (targets, twins) if act_network == "target" else (twins, targets)
    codes = official_infer(acting, obs, act_alpha)
    with torch.no_grad():
        action = critic.act(obs, deterministic=True)
    assert torch.equal(critic.discretizer.encode(action), codes)
    torch.testing.assert_close(action, official_decode(codes, bins), **TOL)
    # The comparison can tell apart the mistakes it guards against: max of the twins, the other network set.
    assert not torch.equal(official_infer(acting, obs, act_alpha, combine=torch.maximum), codes)
    assert not torch.equal(official_infer(other, obs, act_alpha), codes)
