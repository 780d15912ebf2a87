"""ARSQ's training loss: soft Bellman regression plus the demo-only conservative term (docs/algorithm.md §3.3).

``y = r + gamma^m * (1 - terminated) * min_k V̄_k(s')`` with ``m = 1``, or the rows' ``steps_to_next_obs`` for n-step
rows (truncation is not termination: only TorchRL's ``("next", "terminated")`` stops bootstrapping),
``L_TD = sum_k mean_b (Q_k - y)^2``. The conservative term pushes the data bin's advantage above the others on
demo-flagged samples, in the ``cql`` or ``margin`` form. With a distributional critic (§3.7) the TD term is the
cross-entropy of every prefix's return distribution to the C51 target, and the conservative term acts on the bins'
expected returns.
"""

from __future__ import annotations

from typing import Literal

import torch
from tensordict import TensorDictBase
from torch import Tensor

from arsq_lightning.algos.arsq.critic import ARSQCritic, scores_of_bins
from arsq_lightning.algos.base import (
    Loss,
    bootstrap_discount,
    c51_projection,
    dominance_shortfall,
    expected_value,
    outside_support,
    td_reward,
)
from arsq_lightning.errors import require
from arsq_lightning.keys import ACTION, DEMO, NEXT_OBSERVATION, OBSERVATION

Conservative = Literal["none", "cql", "margin"]
DemoReduction = Literal["demo_mean", "batch_mean", "sum_all"]


def conservative_penalty(adv: Tensor, codes: Tensor, demo: Tensor, *, variant: Conservative,
                         temperature: float, clip_min: float, clip_max: float, reduction: DemoReduction,
                         valid: Tensor | None = None) -> Tensor:
    """Per-critic conservative term (§3.3 step 5).

    Args:
        adv: soft advantages ``[C, B, N, K]`` (a distributional critic's bin scores).
        codes: dataset bins ``[B, N]``.
        demo: demo flags ``[B]`` (bool or 0/1).
        variant: ``cql`` (soft max over the other bins) or ``margin`` (mean over the other bins).
        temperature: ``cql_temp``.
        clip_min, clip_max: clip of each per-position difference (``clip_min = -m`` is a hinge with margin ``m``).
        reduction: how samples are reduced: ``demo_mean`` (sum over demos / number of demos; correct, default),
            ``batch_mean`` (sum over demos / batch size; official RLBench), ``sum_all`` (sum over the whole batch,
            demo or not; the official D4RL ``margin`` broadcasting bug, §8.5).
        valid: ``[N, K]`` bins that exist (per-dim grids): missing bins are not "other bins", and a position with
            no other bin adds nothing.

    Returns:
        ``[C]``; zero when the batch holds no demo.
    """
    data = adv.gather(-1, codes.unsqueeze(0).unsqueeze(-1).expand(adv.shape[0], -1, -1, 1))  # [C, B, N, 1]
    others = torch.ones_like(adv, dtype=torch.bool).scatter(-1, codes.unsqueeze(0).unsqueeze(-1).expand_as(data), False)
    count = torch.full(adv.shape[-2:-1], adv.shape[-1] - 1.0, dtype=adv.dtype, device=adv.device)  # others per position
    if valid is not None:
        others, count = others & valid, valid.sum(-1).to(adv.dtype) - 1.0
    if variant == "cql":
        soft_max = temperature * torch.logsumexp((adv / temperature).masked_fill(~others, float("-inf")), dim=-1)
        per_position = (soft_max - data.squeeze(-1)).clamp(clip_min, clip_max)  # [C, B, N]
        per_sample = torch.where(count > 0, per_position, 0.0).sum(-1)  # [C, B]
    else:
        diff = torch.where(others, (adv - data).clamp(clip_min, clip_max), 0.0)
        per_sample = (diff.sum(-1) / count.clamp(min=1.0)).sum(-1)
    return reduce_over_demos(per_sample, demo, reduction)


def reduce_over_demos(per_sample: Tensor, demo: Tensor, reduction: DemoReduction) -> Tensor:
    """``[C, B] -> [C]``: a demo-only term's per-sample values reduced as :func:`conservative_penalty` says."""
    demo = demo.to(per_sample.dtype).reshape(-1)
    any_demo = (demo.sum() > 0).to(per_sample.dtype)
    if reduction == "sum_all":
        return per_sample.sum(-1) * any_demo
    if reduction == "batch_mean":
        return (per_sample * demo).sum(-1) / demo.numel()
    return (per_sample * demo).sum(-1) / demo.sum().clamp(min=1.0)


def fosd_penalty(bin_logits: Tensor, codes: Tensor, valid: Tensor | None = None) -> Tensor:
    """Per-critic, per-sample first-order-stochastic-dominance term ``[C, B]`` of a distributional critic:
    ``mean_{i, k} sum_atoms max(F_data - F_k, 0)``, the atom CDFs of the data bin and of each bin ``k`` at position
    ``i`` after the data's earlier bins (CQN's FOSD term, docs/algorithm.md §3.7), over the bins that exist.

    Args:
        bin_logits: ``[C, B, N, K, A]`` atom logits.
        codes: ``[B, N]`` data bins.
        valid: ``[N, K]`` bins that exist (per-dim grids; ``None``: all).
    """
    excess = dominance_shortfall(bin_logits, codes.expand(bin_logits.shape[0], -1, -1))  # [C, B, N, K]
    if valid is None:
        return excess.mean((-2, -1))
    return (excess * valid).sum((-2, -1)) / valid.sum()


class ARSQLoss(Loss):
    """Soft Bellman + conservative loss of one batch.

    Args:
        gamma: discount.
        td_weight: ``lambda_TD`` (``bellman_loss_coef``).
        conservative: ``none``, ``cql`` or ``margin``; applied only to samples with ``demo`` true.
        conservative_weight: ``lambda_c`` (``cql_min_q_weight``).
        clip_min: lower clip of each per-position difference (``cql_clip_diff_min``; ``-m`` is a hinge with margin
            ``m``).
        clip_max: upper clip (``cql_clip_diff_max``).
        cql_temperature: ``cql_temp`` of the ``cql`` variant.
        demo_reduction: see :func:`conservative_penalty`.
        demo_key: batch key of the demo flag; a batch without it has no demos.
        target_bounds: ``(low, high)``: TD targets are clamped to this range (``None``: not clamped). With rewards
            normalised to unit values (``data.reward_scale auto``) true values stay within about ``[-2, 2]``, and the
            bound stops soft-max backups from inflating values beyond what any policy can reach.
        bootstrap: the value of the next state in the TD target: ``soft_value`` (ARSQ, §3.3) ``min_k V̄_k(s')``, or
            ``double_q`` ``min_k Q̄_k(s', a*)`` with ``a*`` the online networks' greedy action (double Q-learning).
            With a distributional critic, ``soft_value`` bootstraps the target networks' distribution at their own
            greedy action, ``double_q`` at the online networks' (as CQN).
        fosd_weight: weight of the first-order-stochastic-dominance term on demo samples (distributional critics
            only; :func:`fosd_penalty`, CQN's ``bc_fosd``), reduced over samples as the conservative term.
        prefix_targets: distributional critics only. ``False``: every prefix of the data action is fitted to the
            projection of the whole next action's distribution; ``True``: prefix ``i`` to the projection of the target
            networks' prefix ``i`` along the next state's greedy action (each of CQN's levels bootstraps from the same
            level at the next state), so coarse decisions do not bootstrap from the maximum over the finer positions.

    The batch is a TensorDict in TorchRL's layout: ``observation``, ``action``, ``("next", "observation")``,
    ``("next", "reward")``, ``("next", "terminated")`` and optionally ``demo``.
    """

    critic_type = ARSQCritic

    def __init__(self, *, gamma: float = 0.99, td_weight: float = 1.0, conservative: Conservative = "none",
                 conservative_weight: float = 0.0, clip_min: float = -1.0, clip_max: float = 1e7,
                 cql_temperature: float = 1.0, demo_reduction: DemoReduction = "demo_mean", demo_key: str = DEMO,
                 target_bounds: tuple[float, float] | None = None,
                 bootstrap: Literal["soft_value", "double_q"] = "soft_value", fosd_weight: float = 0.0,
                 prefix_targets: bool = False):
        require(0.0 <= gamma <= 1.0, f"gamma must lie in [0, 1], got {gamma}")
        require(cql_temperature > 0, f"cql_temperature must be positive, got {cql_temperature}")
        require(clip_min <= clip_max, f"clip_min ({clip_min}) must not exceed clip_max ({clip_max})")
        require(conservative in ("none", "cql", "margin"), f"unknown conservative variant {conservative!r}")
        require(demo_reduction in ("demo_mean", "batch_mean", "sum_all"), f"unknown demo_reduction {demo_reduction!r}")
        self.gamma, self.td_weight, self.conservative = gamma, td_weight, conservative
        self.conservative_weight, self.clip_min, self.clip_max = conservative_weight, clip_min, clip_max
        self.cql_temperature, self.demo_reduction, self.demo_key = cql_temperature, demo_reduction, demo_key
        require(target_bounds is None or (len(target_bounds) == 2 and target_bounds[0] < target_bounds[1]),
                f"target_bounds must be [low, high] with low < high, got {target_bounds}")
        self.target_bounds = None if target_bounds is None else (float(target_bounds[0]), float(target_bounds[1]))
        require(bootstrap in ("soft_value", "double_q"), f"bootstrap must be soft_value or double_q, got {bootstrap!r}")
        self.bootstrap = bootstrap
        require(fosd_weight >= 0, f"fosd_weight must be >= 0, got {fosd_weight}")
        self.fosd_weight, self.prefix_targets = fosd_weight, prefix_targets

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"ARSQLoss({settings})"

    def __call__(self, critic: ARSQCritic, batch: TensorDictBase) -> dict[str, Tensor]:
        """Returns the terms ``loss_td`` and ``loss_conservative`` (to minimise, summed; with ``fosd_weight``
        also ``loss_fosd``) and detached diagnostics ``q``, ``target`` and, with ``target_bounds`` or a distributional
        critic, ``target_clipped`` (the share of targets the bounds or the support clip)."""
        require(self.fosd_weight == 0 or critic.advantages == "distributional",
                "model.loss fosd_weight needs a distributional critic (model.critic advantages distributional)")
        require(not self.prefix_targets or critic.advantages == "distributional",
                "model.loss prefix_targets needs a distributional critic (model.critic advantages distributional)")
        if critic.advantages == "distributional":
            q, adv, codes, target, loss_td, extra = self._distributional_td(critic, batch)
        else:
            q, adv, codes, target, loss_td, extra = self._scalar_td(critic, batch)
        loss_conservative = torch.zeros((), device=q.device)
        if self.conservative != "none" and self.demo_key in batch.keys():
            penalty = conservative_penalty(adv, codes, batch[self.demo_key], variant=self.conservative,
                                           temperature=self.cql_temperature, clip_min=self.clip_min,
                                           clip_max=self.clip_max, reduction=self.demo_reduction,
                                           valid=critic.bin_mask())
            loss_conservative = self.conservative_weight * penalty.sum()
        return {"loss_td": loss_td, "loss_conservative": loss_conservative, "q": q.detach().mean(),
                "target": target.mean(), **extra}

    def _scalar_td(self, critic: ARSQCritic, batch: TensorDictBase) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor,
                                                                               dict]:
        """``q [C, B]``, advantages ``[C, B, N, K]``, codes ``[B, N]``, targets ``[B]``, the TD term, diagnostics."""
        q, adv, codes = critic.evaluate(batch[OBSERVATION], batch[ACTION])
        reward = td_reward(batch, self.gamma, q.dtype)  # [B]
        discount = bootstrap_discount(batch, self.gamma, q.dtype)  # [B]: gamma^steps (1 - terminated)
        next_obs = batch[NEXT_OBSERVATION]
        double_q = self.bootstrap == "double_q"
        next_value = critic.double_q_value(next_obs) if double_q else critic.target_value(next_obs)
        target = reward + discount * next_value
        extra = {}
        if self.target_bounds is not None:
            low, high = self.target_bounds
            extra["target_clipped"] = ((target < low) | (target > high)).to(q.dtype).mean()
            target = target.clamp(low, high)
        return q, adv, codes, target, self.td_weight * (q - target).pow(2).mean(-1).sum(), extra

    def _distributional_td(self, critic: ARSQCritic, batch: TensorDictBase) -> tuple[Tensor, Tensor, Tensor, Tensor,
                                                                                       Tensor, dict]:
        """As :meth:`_scalar_td` with bin scores for advantages: the TD term is the cross-entropy of every prefix's
        return distribution ``[C, B, N, A]`` to the C51 projection of ``r + discount * Z̄(s', ā)`` (with
        ``prefix_targets``, of the same prefix of ``ā``), summed over the critics, averaged over rows and positions;
        with ``fosd_weight`` the extras also hold ``loss_fosd``."""
        require(self.target_bounds is None, "model.loss target_bounds does not apply to a distributional critic "
                "(its head's support bounds the values)")
        prefixes, bins, codes = critic.evaluate_bin_distributions(batch[OBSERVATION], batch[ACTION])
        support = critic.head.support
        scores = scores_of_bins(bins, support, critic.bin_mask())  # [C, B, N, K]
        reward = td_reward(batch, self.gamma, prefixes.dtype)  # [B]
        discount = bootstrap_discount(batch, self.gamma, prefixes.dtype)
        next_probs = critic.target_distribution(batch[NEXT_OBSERVATION], online_choice=self.bootstrap == "double_q",
                                                per_prefix=self.prefix_targets)  # [B, A] or [B, N, A]
        if not self.prefix_targets:
            next_probs = next_probs.unsqueeze(1)  # one target for every prefix
        target_mean = reward.unsqueeze(1) + discount.unsqueeze(1) * (next_probs * support).sum(-1)  # [B, N or 1]
        projected = c51_projection(next_probs, reward, discount, support)  # [B, N or 1, A]
        cross_entropy = -(projected * prefixes.log_softmax(-1)).sum(-1)  # [C, B, N]
        q = expected_value(prefixes[:, :, -1], support)  # [C, B]
        loss_td = self.td_weight * cross_entropy.mean((1, 2)).sum()
        extra = {"target_clipped": outside_support(target_mean, support)}
        if self.fosd_weight:
            extra["loss_fosd"] = self._fosd_term(critic, bins, codes, batch)
        return q, scores, codes, target_mean[:, -1], loss_td, extra

    def _fosd_term(self, critic: ARSQCritic, bins: Tensor, codes: Tensor, batch: TensorDictBase) -> Tensor:
        """``fosd_weight`` times :func:`fosd_penalty` over the demo rows, summed over the critics (0 without demos)."""
        if self.demo_key not in batch.keys():
            return torch.zeros((), device=bins.device)
        fosd = fosd_penalty(bins, codes, critic.bin_mask())  # [C, B]
        return self.fosd_weight * reduce_over_demos(fosd, batch[self.demo_key], self.demo_reduction).sum()
