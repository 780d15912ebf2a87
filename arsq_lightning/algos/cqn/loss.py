"""The CQN baseline's loss: per-(level, dim) C51 cross-entropy with double-Q targets, plus the demo-only
first-order-stochastic-dominance (FOSD) and margin terms (docs/algorithm.md §6.4, §4.4).

With ``atoms = 1`` (non-distributional head) the TD term is the squared error to ``r + gamma * Q̄(s', a'*)`` and the
FOSD term is undefined (its weight must be 0).
"""

from __future__ import annotations

import torch
from tensordict import TensorDictBase
from torch import Tensor

from arsq_lightning.algos.base import (
    Loss,
    bootstrap_discount,
    c51_projection,
    dominance_shortfall,
    outside_support,
    td_reward,
)
from arsq_lightning.algos.cqn.critic import CQNCritic, at_bins
from arsq_lightning.errors import require
from arsq_lightning.keys import ACTION, DEMO, NEXT_OBSERVATION, OBSERVATION


def fosd_penalty(logits: Tensor, codes: Tensor, valid: Tensor | None = None) -> Tensor:
    """Per-sample FOSD term ``[B]``: ``mean_{l,d,b} sum_atoms max(F_a - F_b, 0)`` over atom CDFs (§6.4).

    Args:
        logits: ``[B, L, D, K, A]`` atom logits along the data action's path.
        codes: ``[B, L, D]`` data bins ``a``.
        valid: ``[L, D, K]`` bins that exist (per-dim grids); the mean runs over these only.
    """
    return _mean_over_bins(dominance_shortfall(logits, codes), valid)


def margin_penalty(q: Tensor, codes: Tensor, margin: float, valid: Tensor | None = None) -> Tensor:
    """Per-sample margin term ``[B]``: ``mean_{l,d,b} max(m - (Q_a - Q_b), 0)``, ``q [B, L, D, K]`` (§6.4)."""
    data = q.gather(-1, codes.unsqueeze(-1))  # [B, L, D, 1]
    return _mean_over_bins((margin - (data - q)).clamp(min=0), valid)


def _mean_over_bins(terms: Tensor, valid: Tensor | None) -> Tensor:
    """``[B, L, D, K] -> [B]``: the mean over (level, dim, bin), over existing bins only when ``valid`` is given."""
    if valid is None:
        return terms.mean(dim=(1, 2, 3))
    return (terms * valid).sum(dim=(1, 2, 3)) / valid.sum()


class CQNLoss(Loss):
    """CQN's loss of one batch (TorchRL layout as :class:`~arsq_lightning.algos.arsq.loss.ARSQLoss`).

    Args:
        gamma: discount.
        critic_weight: ``critic_lambda`` on the TD term (official D4RL 1.0, RLBench 0.1).
        fosd_weight: weight of the FOSD term on demo samples (official ``bc_lambda``; the D4RL port applies its
            ``bc_fosd`` twice, so ``bc_fosd = 0.1`` there is ``fosd_weight = 0.01`` here).
        margin_weight: weight of the margin term on demo samples (``bc_lambda``).
        margin: ``bc_margin`` (D4RL 1.0, RLBench 0.01).
        demo_key: batch key of the demo flag; demo terms are demo-masked means (0 without demos).
    """

    critic_type = CQNCritic

    def __init__(self, *, gamma: float = 0.99, critic_weight: float = 1.0, fosd_weight: float = 0.0,
                 margin_weight: float = 0.0, margin: float = 1.0, demo_key: str = DEMO):
        require(0.0 <= gamma <= 1.0, f"gamma must lie in [0, 1], got {gamma}")
        require(min(critic_weight, fosd_weight, margin_weight) >= 0, "CQN loss weights must be >= 0")
        self.gamma, self.critic_weight, self.fosd_weight = gamma, critic_weight, fosd_weight
        self.margin_weight, self.margin, self.demo_key = margin_weight, margin, demo_key

    def __repr__(self) -> str:
        return f"CQNLoss({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"

    def __call__(self, critic: CQNCritic, batch: TensorDictBase) -> dict[str, Tensor]:
        """Returns the terms ``loss_td``, ``loss_fosd`` and ``loss_margin`` (to minimise, summed) and detached ``q``,
        ``target`` and ``target_clipped`` (the share of expected targets ``r + gamma * E[Z']`` outside the support:
        values the C51 projection clips, a sign that ``v_min`` / ``v_max`` do not fit the reward scale and gamma)."""
        head = critic.head
        require(head.atoms > 1 or self.fosd_weight == 0,
                "model.loss fosd_weight needs a distributional head (atoms > 1)")
        logits, codes = critic.evaluate(batch[OBSERVATION], batch[ACTION])  # [B, L, D, K, A], [B, L, D]
        data_logits = at_bins(logits, codes)  # [B, L, D, A]
        reward = td_reward(batch, self.gamma, logits.dtype)  # [B]
        discount = bootstrap_discount(batch, self.gamma, logits.dtype)  # [B]: gamma^steps (1 - terminated)
        target, clipped = self._target(critic, batch[NEXT_OBSERVATION], reward, discount)  # [B, L, D, A]
        if head.atoms == 1:
            per_position = (data_logits - target).pow(2).squeeze(-1)  # [B, L, D]
        else:
            per_position = -(target * data_logits.log_softmax(-1)).sum(-1)
        disc = critic.discretizer
        deciding = (disc.bins_table > 1).to(per_position.dtype)  # positions with a choice (per-dim grids: not all)
        loss_td = self.critic_weight * (per_position * deciding).sum() / (deciding.sum() * per_position.shape[0])
        q = head.expected_q(logits)  # [B, L, D, K]
        valid = None if disc.uniform_grid else disc.bin_mask.view(disc.levels, disc.action_dim, disc.bins)
        loss_fosd, loss_margin = self._demo_terms(logits, q, codes, batch, valid)
        q_data = head.expected_q(data_logits)
        target_q = target.squeeze(-1) if head.atoms == 1 else (target * head.support).sum(-1)
        return {"loss_td": loss_td, "loss_fosd": loss_fosd, "loss_margin": loss_margin, "q": q_data.detach().mean(),
                "target": target_q.mean(), "target_clipped": clipped}

    @torch.no_grad()
    def _target(self, critic: CQNCritic, next_obs, reward: Tensor, discount: Tensor) -> tuple[Tensor, Tensor]:
        """Double-Q target per (level, dim): online greedy ``a'*``, target head's distribution at ``a'*`` (§6.4);
        and the share of expected targets outside the support (0 without atoms)."""
        chosen = critic.target_logits(next_obs)  # [B, L, D, A]
        if critic.head.atoms == 1:
            return reward.view(-1, 1, 1, 1) + discount.view(-1, 1, 1, 1) * chosen, torch.zeros((), device=reward.device)
        support, probs = critic.head.support, chosen.softmax(-1)
        expected = reward.view(-1, 1, 1) + discount.view(-1, 1, 1) * (probs * support).sum(-1)
        return c51_projection(probs, reward, discount, support), outside_support(expected, support)

    def _demo_terms(self, logits: Tensor, q: Tensor, codes: Tensor, batch: TensorDictBase,
                    valid: Tensor | None) -> tuple[Tensor, Tensor]:
        zero = torch.zeros((), device=logits.device)
        if self.demo_key not in batch.keys() or (self.fosd_weight == 0 and self.margin_weight == 0):
            return zero, zero
        demo = batch[self.demo_key].reshape(-1).to(logits.dtype)
        count = demo.sum().clamp(min=1.0)
        fosd = (fosd_penalty(logits, codes, valid) * demo).sum() / count if self.fosd_weight else zero
        margin = (margin_penalty(q, codes, self.margin, valid) * demo).sum() / count if self.margin_weight else zero
        return self.fosd_weight * fosd, self.margin_weight * margin
