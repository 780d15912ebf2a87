"""The ARSQ critic: encoder + discretizer + twin soft-Q head + target copy (docs/algorithm.md §3).

``Q_k(s, a) = V_k(s) + sum_i A_k,i(s, a_<i, a_i)`` with ``A = z - alpha * logsumexp(z / alpha)`` over bins (§3.1),
so ``exp(A_i / alpha)`` is the policy's conditional at position ``i`` and ``V`` is the exact soft value.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from arsq_lightning.algos.base import Critic, expected_value
from arsq_lightning.discretizers import Discretizer, gaussian_exploration
from arsq_lightning.errors import require

_COMPILED_DECODE = None


def _compiled_decode():
    """``torch.compile`` of :meth:`ARSQCritic._decode`, built on first use and shared by all critics.

    It removes most per-position overhead of acting (about 1.5x at batch 1 on CPU) for ~20 s of compilation per
    process and input shape. Kept outside the module so critics stay picklable and deep copies act with their own
    weights.
    """
    global _COMPILED_DECODE
    if _COMPILED_DECODE is None:
        _COMPILED_DECODE = torch.compile(ARSQCritic._decode, dynamic=False)
    return _COMPILED_DECODE


def soft_advantages(logits: Tensor, alpha: float) -> Tensor:
    """Normalise logits over the bin axis: ``z - alpha * logsumexp(z / alpha)``, so ``sum exp(A / alpha) = 1``."""
    return alpha * torch.log_softmax(logits / alpha, dim=-1)


def mean_advantages(logits: Tensor) -> Tensor:
    """Normalise logits over the bin axis by their mean over the bins that exist (``-inf`` marks a missing one)."""
    present = torch.isfinite(logits)
    mean = torch.where(present, logits, 0.0).sum(-1, keepdim=True) / present.sum(-1, keepdim=True)
    return logits - mean


def bin_scores(prefix: Tensor, adv: Tensor, support: Tensor, present: Tensor | None = None) -> Tensor:
    """Each bin's expected return after a prefix: ``E[softmax(prefix + A_b)]``, ``[..., A], [..., K, A] -> [..., K]``;
    ``-inf`` where ``present`` (``[K]`` or ``[N, K]``, matching the trailing axes; ``None``: all) marks no bin."""
    return scores_of_bins(prefix.unsqueeze(-2) + adv, support, present)


def scores_of_bins(bin_logits: Tensor, support: Tensor, present: Tensor | None = None) -> Tensor:
    """Bins' expected returns ``[..., K, A] -> [..., K]``, ``-inf`` where ``present`` marks no bin (as
    :func:`bin_scores`)."""
    scores = expected_value(bin_logits, support)
    return scores if present is None else scores.masked_fill(~present, float("-inf"))


class ARSQCritic(Critic):
    """Twin auto-regressive soft-Q critic with target networks.

    Args:
        encoder: ``obs [B, ...] -> features [B, F]``, with an ``out_dim`` attribute.
        discretizer: maps env actions to codes ``[B, L, D]`` and builds conditioning vectors.
        head: e.g. :class:`~arsq_lightning.algos.arsq.head.AutoregressiveHead`, with ``value`` / ``advantage_logits`` /
            ``position_logits``.
        soft_alpha: ``alpha_s``, temperature normalising advantages in training (> 0).
        act_alpha: ``alpha_a``, temperature when acting; ``None`` uses ``soft_alpha`` (as every official config).
        act_network: ``online`` (official D4RL) or ``target`` (official RLBench) networks select actions (§3.4).
        compile_act: run the acting loop through ``torch.compile`` (faster per call, slow first call).
        exploration_std: when exploring (``deterministic=False``), ``0`` (official) samples every position from
            ``softmax(A / act_alpha)``; ``> 0`` takes the greedy action plus Gaussian noise of this std in the unit
            box, snapped back to the grid (CQN's exploration).
        advantages: ``soft`` (official, §3.1): ``A = z - soft_alpha * logsumexp(z / soft_alpha)``, so ``V(s)`` is the
            soft value and the TD target is ``V̄(s')``. ``mean``: ``A = z - mean(z)`` (the dueling networks' mean
            normalisation, as CQN's head); ``V(s)`` is then no maximum, and the TD target is the target networks' Q
            at their own greedy action. With a small ``soft_alpha`` the soft normaliser pins the greedy bin's
            advantage at 0, so a TD error on a greedy action moves ``V(s)`` only; the mean lets it move the bin.
            ``distributional`` (needs a head with ``atoms > 1``): the same decomposition in the atom logits of a
            return distribution, ``logits(s, a_<=i) = V(s) + sum_{j<=i} A_j`` with mean-normalised ``A_j [A]``; every
            prefix's distribution is fitted to the C51 target (:class:`~arsq_lightning.algos.arsq.loss.ARSQLoss`), a
            bin's score is the expected return of its prefix distribution (docs/algorithm.md §3.7).
        center_atoms: ``distributional`` only. ``True``: each atom's advantage logits are centred over a position's
            bins (the mean normalisation above), so raising the data bin's logits lowers the other bins'; ``False``:
            the raw logits are added to the prefix, every bin's distribution is its own output (as CQN's per-bin
            outputs; a softmax ignores the constant the centring removes).
    """

    def __init__(self, encoder: nn.Module, discretizer: Discretizer, head: nn.Module, *, soft_alpha: float = 0.01,
                 act_alpha: float | None = None, act_network: Literal["online", "target"] = "online",
                 compile_act: bool = False, exploration_std: float = 0.0,
                 advantages: Literal["soft", "mean", "distributional"] = "soft", center_atoms: bool = True):
        act_alpha = soft_alpha if act_alpha is None else act_alpha
        require(soft_alpha > 0, f"soft_alpha must be positive, got {soft_alpha}")
        require(act_alpha > 0, f"act_alpha must be positive, got {act_alpha}")
        require(exploration_std >= 0, f"exploration_std must be >= 0, got {exploration_std}")
        require(act_network in ("online", "target"), f"act_network must be 'online' or 'target', got {act_network!r}")
        require(advantages in ("soft", "mean", "distributional"),
                f"advantages must be 'soft', 'mean' or 'distributional', got {advantages!r}")
        require(center_atoms or advantages == "distributional",
                "model.critic center_atoms false needs advantages distributional (soft and mean normalise by design)")
        require(hasattr(head, "advantage_logits"), "the ARSQ critic needs an auto-regressive head such as "
                f"AutoregressiveHead, got {type(head).__name__}: set model.critic to arsq_lightning.CQNCritic for CQN")
        require((advantages == "distributional") == (head.atoms > 1), f"model.critic advantages {advantages!r} with a "
                f"head of {head.atoms} atoms: 'distributional' needs model.head atoms > 1, the others atoms 1")
        super().__init__(encoder, discretizer, head)
        self.soft_alpha, self.act_alpha, self.act_network = soft_alpha, act_alpha, act_network
        self.compile_act, self.exploration_std, self.advantages = compile_act, exploration_std, advantages
        self.center_atoms = center_atoms

    def default_loss(self):
        """ARSQ's loss with its defaults (:class:`~arsq_lightning.algos.arsq.loss.ARSQLoss`: TD only)."""
        from arsq_lightning.algos.arsq.loss import ARSQLoss  # the loss module imports this one

        return ARSQLoss()

    def evaluate(self, obs: Tensor, action: Tensor, *, target: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """Q of dataset actions with teacher forcing, all positions in one call.

        Args:
            obs: ``[B, ...]`` observations.
            action: ``[B, D]`` env-space actions.
            target: evaluate with the target head (and the online encoder).

        Returns:
            ``q [C, B]``, soft advantages ``[C, B, N, K]`` and the action's codes ``[B, N]`` (level-major).
        """
        return self._evaluate_features(self.encoder(obs), action, self.target_head if target else self.head)

    def _evaluate_features(self, features: Tensor, action: Tensor, head: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`evaluate` from encoder features ``[B, F]``, with ``head``."""
        if self.advantages == "distributional":
            prefixes, scores, codes = self._distributions(features, action, head)
            return expected_value(prefixes[:, :, -1], head.support), scores, codes
        codes = self.discretizer.encode(action)  # [B, L, D]
        # fp32 from here on, also under bf16 autocast: the normaliser, Q and everything the loss builds on them
        logits = head.advantage_logits(features, self.discretizer.conditioning(codes, head.order)).float()
        if not self.discretizer.uniform_grid:  # dims with fewer bins or levels: their extra bins do not exist
            logits = logits.masked_fill(~self.discretizer.bin_mask, float("-inf"))
        adv = soft_advantages(logits, self.soft_alpha) if self.advantages == "soft" else mean_advantages(logits)
        flat_codes = codes.flatten(-2)  # position i = l * D + d
        index = flat_codes.unsqueeze(0).unsqueeze(-1).expand(adv.shape[0], -1, -1, 1)
        q = head.value(features).float() + adv.gather(-1, index).squeeze(-1).sum(-1)
        return q, adv, flat_codes

    def evaluate_distributions(self, obs: Tensor, action: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Return distributions of a dataset action's prefixes (``advantages: distributional``), teacher-forced.

        Args:
            obs: ``[B, ...]`` observations.
            action: ``[B, D]`` env-space actions.

        Returns:
            atom logits ``[C, B, N, A]`` of ``V + sum A_j`` over the positions decided so far, after each decision in
            decision order (level by level, group by group, a group's dims in its listed order; the last: the whole
            action), bin scores ``[C, B, N, K]`` by position ``i = l * D + d`` (each bin's expected return given the
            data's bins decided before it) and the codes ``[B, N]``.
        """
        return self._distributions(self.encoder(obs), action, self.head)

    def evaluate_bin_distributions(self, obs: Tensor, action: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """As :meth:`evaluate_distributions`, with every bin's atom logits ``[C, B, N, K, A]`` (the distribution after
        the data's bins decided before position ``i``, then bin ``k`` at ``i``) in place of their expected returns;
        bins a per-dim grid lacks hold the prefix's own logits."""
        return self._bin_distributions(self.encoder(obs), action, self.head)

    def _distributions(self, features: Tensor, action: Tensor, head: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
        prefixes, bins, codes = self._bin_distributions(features, action, head)
        return prefixes, scores_of_bins(bins, head.support, self.bin_mask()), codes

    def bin_mask(self) -> Tensor | None:
        """``[N, K]`` bins that exist (per-dim grids), ``None`` when every position has every bin."""
        return None if self.discretizer.uniform_grid else self.discretizer.bin_mask

    def _bin_distributions(self, features: Tensor, action: Tensor, head: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
        codes = self.discretizer.encode(action)  # [B, L, D]
        logits = head.advantage_logits(features, self.discretizer.conditioning(codes, head.order)).float()
        adv = self._atom_advantages(logits, self.bin_mask())  # [C, B, N, K, A]
        codes = codes.flatten(-2)  # [B, N], position i = l * D + d
        index = codes.view(1, *codes.shape, 1, 1).expand(adv.shape[0], -1, -1, 1, adv.shape[-1])
        value = head.value(features).float().unsqueeze(2)  # [C, B, 1, A]
        chosen = adv.gather(-2, index).squeeze(-2)  # [C, B, N, A]
        order = head.decision_order  # [N]: positions in decision order (None: index order)
        prefixes = value + (chosen if order is None else chosen[:, :, order]).cumsum(2)  # [C, B, N, A]
        before = torch.cat([value, prefixes[:, :, :-1]], dim=2)  # the prefix each decision starts from
        if order is not None:
            before = before[:, :, torch.argsort(order)]  # back to position order
        return prefixes, before.unsqueeze(-2) + adv, codes

    def _atom_advantages(self, logits: Tensor, present: Tensor | None) -> Tensor:
        """Mean-normalise atom logits ``[..., K, A]`` over the bins that exist (``center_atoms``; else leave them
        as they are): ``present`` (``[K]`` or ``[N, K]``, matching the logits' trailing axes; ``None``: all) marks
        them; missing bins get zeros (never chosen: their scores are ``-inf``)."""
        if present is None:
            return logits - logits.mean(-2, keepdim=True) if self.center_atoms else logits
        weight = present.unsqueeze(-1).to(logits.dtype)  # [..., K, 1]
        if not self.center_atoms:
            return logits * weight
        mean = (logits * weight).sum(-2, keepdim=True) / weight.sum(-2, keepdim=True)
        return (logits - mean) * weight

    @torch.no_grad()
    def target_distribution(self, obs: Tensor, *, online_choice: bool = False, per_prefix: bool = False) -> Tensor:
        """``[B, ...] -> [B, A]``: the target networks' return distribution at their own greedy action (or, with
        ``online_choice``, at the online networks' greedy action: double Q-learning, as CQN), from the critic whose
        expected value is lower, sample by sample (``advantages: distributional``). ``per_prefix``: ``[B, N, A]``,
        the target networks' distribution of every prefix of that action in decision order (the last: the whole
        action), the lower critic chosen per sample and prefix."""
        features = self.encoder(obs)
        if online_choice:
            greedy = self._decode_features(self.head, features, None)  # [B, D]
            logits = self._bin_distributions(features, greedy, self.target_head)[0]  # [C, B, N, A]
        else:
            logits = self._decode_features(self.target_head, features, None, with_logits=True)[1]  # [C, B, N, A]
        if not per_prefix:
            logits = logits[:, :, -1:]  # the whole action
        lowest = expected_value(logits, self.target_head.support).argmin(0)  # [B, N or 1]
        index = lowest.unsqueeze(0).unsqueeze(-1).expand(1, -1, -1, logits.shape[-1])
        probs = logits.gather(0, index).squeeze(0).softmax(-1)  # [B, N or 1, A]
        return probs if per_prefix else probs.squeeze(1)

    @torch.no_grad()
    def target_value(self, obs: Tensor) -> Tensor:
        """``min_k V̄_k(s)`` with the online encoder and the target head: ``[B, ...] -> [B]``; with ``mean``
        advantages ``min_k Q̄_k(s, ā)``, ``ā`` the target networks' greedy action."""
        features = self.encoder(obs)
        if self.advantages == "soft":
            return self.target_head.value(features).float().min(0).values
        greedy = self._decode_features(self.target_head, features, None)
        return self._evaluate_features(features, greedy, self.target_head)[0].min(0).values

    @torch.no_grad()
    def double_q_value(self, obs: Tensor) -> Tensor:
        """``min_k Q̄_k(s, a*)``, ``a*`` the online networks' greedy action (double Q-learning): ``[B, ...] -> [B]``.

        ``Q̄_k(s, a*) = V̄_k(s) + sum_i Ā_k,i(a*) <= V̄_k(s)``: the target networks' own greedy choice is not trusted,
        which removes the upward bias of taking a maximum over noisy advantages at every position."""
        features = self.encoder(obs)
        greedy = self._decode_features(self.head, features, None)
        return self._evaluate_features(features, greedy, self.target_head)[0].min(0).values

    @torch.no_grad()
    def act(self, obs: Tensor, *, deterministic: bool, generator: torch.Generator | None = None) -> Tensor:
        """Decode an action position by position (§3.4): ``[B, ...] -> [B, D]`` env-space actions.

        At each position the ``act_alpha``-normalised logits of the critics are combined by an element-wise
        minimum; ``deterministic`` takes the argmax (first index on ties), otherwise a bin is sampled from
        ``softmax(min / act_alpha)`` (by the Gumbel-max trick, with noise drawn from ``generator`` up front), or,
        with ``exploration_std > 0``, the argmax plus Gaussian noise.
        """
        if not deterministic and self.exploration_std > 0:
            greedy = (_compiled_decode() if self.compile_act else ARSQCritic._decode)(self, obs, None)
            return gaussian_exploration(self.discretizer, greedy, self.exploration_std, generator)
        noise = None
        if not deterministic:
            shape = (self.discretizer.num_positions, obs.shape[0], self.discretizer.bins)
            noise = -torch.empty(shape, device=obs.device).exponential_(generator=generator).log()  # Gumbel(0, 1)
        return (_compiled_decode() if self.compile_act else ARSQCritic._decode)(self, obs, noise)

    def _decode(self, obs: Tensor, noise: Tensor | None) -> Tensor:
        return self._decode_with(self.target_head if self.act_network == "target" else self.head, obs, noise)

    def _decode_with(self, head: nn.Module, obs: Tensor, noise: Tensor | None) -> Tensor:
        return self._decode_features(head, self.encoder(obs), noise)

    def _scalar_scores(self, logits: Tensor, present: Tensor | None) -> Tensor:
        """One position's acting scores ``[C, B, K] -> [B, K]``: ``min_k`` of the ``act_alpha``-normalised
        advantages (soft or mean), over ``act_alpha``; ``-inf`` on bins ``present [K]`` marks missing."""
        logits = logits if present is None else logits.masked_fill(~present, float("-inf"))
        if self.advantages == "soft":
            return torch.log_softmax(logits / self.act_alpha, dim=-1).amin(0)
        return (mean_advantages(logits) / self.act_alpha).amin(0)

    def _decode_features(self, head: nn.Module, features: Tensor, noise: Tensor | None, *,
                         with_logits: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """The decoded env-space actions ``[B, D]``; ``with_logits`` (distributional only) also returns the atom
        logits ``[C, B, N, A]`` of each critic's distribution after each decision of the decoded action, in
        decision order (the last: the whole action)."""
        disc = self.discretizer
        cache = head.acting_cache(features)
        prefix = torch.zeros(features.shape[0], disc.action_dim, dtype=torch.float64, device=features.device)
        cond = torch.zeros(features.shape[0], disc.action_dim, device=features.device)  # unit-space midpoints m_i
        distributional = self.advantages == "distributional"
        dist = head.value(features).float() if distributional else None  # [C, B, A]: the decided prefix's logits
        prefixes = []  # dist after each decision
        for lvl in range(disc.levels):
            for group in head.groups:  # the dims of a group see the same conditioning (one dim each in ARSQ)
                choices = []
                for dim in group:
                    position = lvl * disc.action_dim + dim
                    logits = head.position_logits(features, cond, position, cache).float()
                    present = None if disc.uniform_grid else disc.bin_mask[position]  # [K]
                    if distributional:
                        adv = self._atom_advantages(logits, present)  # [C, B, K, A]
                        scores = (bin_scores(dist, adv, head.support, present) / self.act_alpha).amin(0)
                    else:
                        scores = self._scalar_scores(logits, present)
                    # the argmax is the greedy bin, the argmax after adding Gumbel noise a sample of softmax(scores)
                    choice = (scores if noise is None else scores + noise[position]).argmax(-1)
                    choices.append(choice)
                    if distributional:  # the next dim of the group is scored after this one, as in teacher forcing
                        index = choice.view(1, -1, 1, 1).expand(adv.shape[0], -1, 1, adv.shape[-1])
                        dist = dist + adv.gather(-2, index).squeeze(-2)  # [C, B, A]
                        prefixes.append(dist)
                for dim, choice in zip(group, choices):
                    prefix[:, dim] = prefix[:, dim] * disc.bins_table[lvl, dim] + choice
                midpoints = disc.midpoint(prefix, lvl + 1)  # zoom in on the group's dims
                for dim in group:
                    cond[:, dim] = midpoints[:, dim]
        return (disc.from_unit(cond), torch.stack(prefixes, 2)) if with_logits else disc.from_unit(cond)
