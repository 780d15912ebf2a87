"""The ARSQ critic: encoder + discretizer + twin soft-Q head + target copy (docs/algorithm.md §3).

``Q_k(s, a) = V_k(s) + sum_i A_k,i(s, a_<i, a_i)`` with ``A = z - alpha * logsumexp(z / alpha)`` over bins (§3.1),
so ``exp(A_i / alpha)`` is the policy's conditional at position ``i`` and ``V`` is the exact soft value.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from arsq_lightning.algos.base import Critic
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
    """

    def __init__(self, encoder: nn.Module, discretizer: Discretizer, head: nn.Module, *, soft_alpha: float = 0.01,
                 act_alpha: float | None = None, act_network: Literal["online", "target"] = "online",
                 compile_act: bool = False, exploration_std: float = 0.0,
                 advantages: Literal["soft", "mean"] = "soft"):
        act_alpha = soft_alpha if act_alpha is None else act_alpha
        require(soft_alpha > 0, f"soft_alpha must be positive, got {soft_alpha}")
        require(act_alpha > 0, f"act_alpha must be positive, got {act_alpha}")
        require(exploration_std >= 0, f"exploration_std must be >= 0, got {exploration_std}")
        require(act_network in ("online", "target"), f"act_network must be 'online' or 'target', got {act_network!r}")
        require(advantages in ("soft", "mean"), f"advantages must be 'soft' or 'mean', got {advantages!r}")
        require(hasattr(head, "advantage_logits"), "the ARSQ critic needs an auto-regressive head such as "
                f"AutoregressiveHead, got {type(head).__name__}: set model.critic to arsq_lightning.CQNCritic for CQN")
        super().__init__(encoder, discretizer, head)
        self.soft_alpha, self.act_alpha, self.act_network = soft_alpha, act_alpha, act_network
        self.compile_act, self.exploration_std, self.advantages = compile_act, exploration_std, advantages

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

    def _decode_features(self, head: nn.Module, features: Tensor, noise: Tensor | None) -> Tensor:
        disc = self.discretizer
        cache = head.acting_cache(features)
        prefix = torch.zeros(features.shape[0], disc.action_dim, dtype=torch.float64, device=features.device)
        cond = torch.zeros(features.shape[0], disc.action_dim, device=features.device)  # unit-space midpoints m_i
        for lvl in range(disc.levels):
            for group in head.groups:  # the dims of a group see the same conditioning (one dim each in ARSQ)
                choices = []
                for dim in group:
                    position = lvl * disc.action_dim + dim
                    logits = head.position_logits(features, cond, position, cache).float()
                    if not disc.uniform_grid:
                        logits = logits.masked_fill(~disc.bin_mask[position], float("-inf"))
                    # min_k of the act_alpha-normalised advantages, over act_alpha: the argmax is the greedy bin,
                    # and the argmax after adding Gumbel noise is a sample of softmax(scores).
                    if self.advantages == "soft":
                        scores = torch.log_softmax(logits / self.act_alpha, dim=-1).amin(0)  # [B, K]
                    else:
                        scores = (mean_advantages(logits) / self.act_alpha).amin(0)
                    choices.append((scores if noise is None else scores + noise[position]).argmax(-1))
                for dim, choice in zip(group, choices):
                    prefix[:, dim] = prefix[:, dim] * disc.bins_table[lvl, dim] + choice
                midpoints = disc.midpoint(prefix, lvl + 1)  # zoom in on the group's dims
                for dim in group:
                    cond[:, dim] = midpoints[:, dim]
        return disc.from_unit(cond)
