"""A slow, straightforward reference of ARSQ's math (docs/algorithm.md §2-§3), one position at a time.

It reads the weights of an :class:`~arsq_lightning.algos.arsq.head.AutoregressiveHead` (member ``k * num_chunks + c`` is
critic ``k``'s advantage MLP for chunk ``c``) but computes everything itself: intervals by explicit zoom-in in
float64, one MLP call per (critic, position), logsumexp normalisation, and loops over positions and bins in the
loss. The tests compare the fused implementation to it; ``arsq-bench`` times it.
"""

from __future__ import annotations

import torch
from torch import Tensor


def mlp(layers: list[tuple[Tensor, Tensor]], x: Tensor, activation) -> Tensor:
    """Plain MLP: every ``(weight [in, out], bias [out])`` but the last is followed by ``activation``."""
    for i, (w, b) in enumerate(layers):
        x = x @ w + b
        if i < len(layers) - 1:
            x = activation(x)
    return x


def advantage_mlp(head, critic: int, position: int) -> list[tuple[Tensor, Tensor]]:
    """Critic ``critic``'s MLP for ``position``: hidden layers plus the output slice of its slot ``[H, K]``."""
    chunk, slot = divmod(position, head.chunk)
    e = critic * head.num_chunks + chunk
    layers = [(layer.weight[e], layer.bias[e, 0]) for layer in head.adv_trunk.layers]
    return layers + [(head.adv_weight[e, slot], head.adv_bias[e, slot])]


def value_mlp(head, critic: int) -> list[tuple[Tensor, Tensor]]:
    layers = [(layer.weight[critic], layer.bias[critic, 0]) for layer in head.value_trunk.layers]
    return layers + [(head.value_out.weight[critic], head.value_out.bias[critic, 0])]


def unit_codes(disc, action: Tensor) -> Tensor:
    """Codes ``[B, L, D]`` by repeated zoom-in on ``[-1, 1]`` (§2.2), in float64."""
    u = ((action.double() - disc.low.double()) / (disc.high.double() - disc.low.double()) * 2 - 1).clamp(-1, 1)
    lo, hi = torch.full_like(u, -1.0), torch.ones_like(u)
    codes = []
    for _ in range(disc.levels):
        w = (hi - lo) / disc.bins
        k = torch.floor((u - lo) / w + 1e-9).clamp(0, disc.bins - 1)
        codes.append(k.long())
        lo = lo + k * w
        hi = lo + w
    return torch.stack(codes, dim=-2)


def position_inputs(disc, codes: Tensor) -> list[Tensor]:
    """Conditioning vectors ``m_i [B, D]`` for every position, by zooming in one position at a time."""
    batch = codes.shape[0]
    lo = torch.full((batch, disc.action_dim), -1.0, dtype=torch.float64)
    hi = torch.ones_like(lo)
    out = []
    for lvl in range(disc.levels):
        for d in range(disc.action_dim):
            out.append(((lo + hi) / 2).float())
            w = (hi[:, d] - lo[:, d]) / disc.bins
            lo[:, d] = lo[:, d] + codes[:, lvl, d].double() * w
            hi[:, d] = lo[:, d] + w
    return out


def q_values(critic_module, obs: Tensor, action: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Reference of :meth:`ARSQCritic.evaluate`: ``q [C, B]``, advantages ``[C, B, N, K]``, codes ``[B, N]``."""
    head, disc, alpha = critic_module.head, critic_module.discretizer, critic_module.soft_alpha
    act = head.adv_trunk.act
    feats = critic_module.encoder(obs)
    codes = unit_codes(disc, action)
    flat = codes.reshape(codes.shape[0], -1)
    inputs = position_inputs(disc, codes)
    qs, advs = [], []
    for k in range(head.num_critics):
        q = mlp(value_mlp(head, k), feats, act).squeeze(-1)
        per_pos = []
        for i, m in enumerate(inputs):
            z = mlp(advantage_mlp(head, k, i), torch.cat([feats, m], -1), act)
            a = z - alpha * torch.logsumexp(z / alpha, -1, keepdim=True)
            per_pos.append(a)
            q = q + a[torch.arange(a.shape[0]), flat[:, i]]
        qs.append(q)
        advs.append(torch.stack(per_pos, 1))
    return torch.stack(qs), torch.stack(advs), flat


def loss(critic_module, batch, *, gamma: float, td_weight: float, conservative: str, weight: float,
         clip_min: float, clip_max: float, temperature: float, reduction: str) -> Tensor:
    """Reference of :class:`ARSQLoss` (§3.3), looping over critics, samples' positions and bins."""
    head = critic_module.target_head
    q, adv, codes = q_values(critic_module, batch["observation"], batch["action"])
    with torch.no_grad():
        feats = critic_module.encoder(batch["next", "observation"])
        v_next = torch.stack([mlp(value_mlp(head, k), feats, head.value_trunk.act).squeeze(-1)
                              for k in range(head.num_critics)]).min(0).values
    reward = batch["next", "reward"].reshape(-1)
    done = batch["next", "terminated"].reshape(-1).float()
    y = reward + gamma * (1 - done) * v_next
    total = torch.zeros(())
    demo = batch.get("demo", torch.zeros(q.shape[1], dtype=torch.bool)).reshape(-1).float()
    for k in range(q.shape[0]):
        total = total + td_weight * ((q[k] - y) ** 2).mean()
        if conservative == "none" or demo.sum() == 0:
            continue
        per_sample = []
        for b in range(q.shape[1]):
            s = torch.zeros(())
            for i in range(codes.shape[1]):
                c = int(codes[b, i])
                others = [j for j in range(adv.shape[-1]) if j != c]
                a = adv[k, b, i]
                if conservative == "cql":
                    o = temperature * torch.logsumexp(a[others] / temperature, 0)
                    s = s + (o - a[c]).clamp(clip_min, clip_max)
                else:
                    s = s + sum((a[j] - a[c]).clamp(clip_min, clip_max) for j in others) / len(others)
            per_sample.append(s)
        d = torch.stack(per_sample)
        if reduction == "demo_mean":
            c_k = (d * demo).sum() / demo.sum()
        elif reduction == "batch_mean":
            c_k = (d * demo).sum() / len(d)
        else:
            c_k = d.sum()
        total = total + weight * c_k
    return total


def acting_logits(critic_module, obs: Tensor, codes: Tensor, *, target: bool = False) -> Tensor:
    """Per-position ``min_k`` of the ``act_alpha``-normalised logits along a given code path: ``[B, N, K]``."""
    head = critic_module.target_head if target else critic_module.head
    alpha = critic_module.act_alpha
    feats = critic_module.encoder(obs)
    out = []
    for i, m in enumerate(position_inputs(critic_module.discretizer, codes)):
        per_critic = []
        for k in range(head.num_critics):
            z = mlp(advantage_mlp(head, k, i), torch.cat([feats, m], -1), head.adv_trunk.act)
            per_critic.append(z - alpha * torch.logsumexp(z / alpha, -1, keepdim=True))
        out.append(torch.stack(per_critic).min(0).values)
    return torch.stack(out, 1)


def distributions(critic_module, obs: Tensor, action: Tensor, *,
                  target: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Reference of :meth:`ARSQCritic.evaluate_distributions` (``advantages: distributional``, uniform grids):
    one (critic, position) at a time, mean-normalised atom logits (raw ones without ``center_atoms``) added to a
    running prefix.

    Returns:
        prefix atom logits ``[C, B, N, A]`` after each position, bin scores ``[C, B, N, K]`` (each bin's expected
        return on the support, given the data's earlier bins) and those bins' return distributions
        ``[C, B, N, K, A]`` (probabilities).
    """
    head = critic_module.target_head if target else critic_module.head
    act, support, bins = head.adv_trunk.act, head.support, head.bins
    feats = critic_module.encoder(obs)
    codes = unit_codes(critic_module.discretizer, action)
    flat = codes.reshape(codes.shape[0], -1)
    rows = torch.arange(flat.shape[0])
    prefixes, scores, bin_probs = [], [], []
    for k in range(head.num_critics):
        prefix = mlp(value_mlp(head, k), feats, head.value_trunk.act)  # [B, A]
        per_prefix, per_scores, per_bins = [], [], []
        for i, m in enumerate(position_inputs(critic_module.discretizer, codes)):
            z = mlp(advantage_mlp(head, k, i), torch.cat([feats, m], -1), act).view(-1, bins, support.numel())
            a = z - z.mean(1, keepdim=True) if critic_module.center_atoms else z
            probs = torch.stack([torch.softmax(prefix + a[:, b], -1) for b in range(bins)], 1)  # [B, K, A]
            per_bins.append(probs)
            per_scores.append((probs * support).sum(-1))
            prefix = prefix + a[rows, flat[:, i]]
            per_prefix.append(prefix)
        prefixes.append(torch.stack(per_prefix, 1))
        scores.append(torch.stack(per_scores, 1))
        bin_probs.append(torch.stack(per_bins, 1))
    return torch.stack(prefixes), torch.stack(scores), torch.stack(bin_probs)
