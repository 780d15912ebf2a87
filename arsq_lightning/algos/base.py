"""The critic protocol every algorithm implements: what the LightningModule, the losses and the acting policy use.

A critic holds an ``encoder`` (observations -> features ``[B, F]``), a ``discretizer`` (the action grid) and a
``head`` with its frozen ``target_head`` copy (the encoder has no target copy). The module trains
:meth:`Critic.online_parameters`, calls :meth:`Critic.polyak` after every update and, without a configured loss,
uses :meth:`Critic.default_loss`; the actor calls :meth:`Critic.act`. Adding an algorithm is adding a folder under
``algos/`` with a critic of this kind, its head and its loss.
"""

from __future__ import annotations

import copy

import torch
from tensordict import TensorDictBase
from torch import Tensor, nn

from arsq_lightning.discretizers import Discretizer
from arsq_lightning.keys import NEXT_REWARD, NEXT_TERMINATED, NSTEP_REWARDS, STEPS_TO_NEXT


class Head(nn.Module):
    """An algorithm's value network(s) over the discretised actions, built as ``head(feature_dim, action_dim, levels,
    bins)``; the algorithm's critic reads it (ARSQ: :class:`AutoregressiveHead`, CQN: :class:`CQNHead`)."""


class Critic(nn.Module):
    """Encoder + discretizer + head, plus a target copy of the head.

    Args:
        encoder: ``obs [B, ...] -> features [B, F]``, with an ``out_dim`` attribute.
        discretizer: the action grid.
        head: the algorithm's value network(s).
    """

    def __init__(self, encoder: nn.Module, discretizer: Discretizer, head: Head):
        super().__init__()
        self.encoder, self.discretizer, self.head = encoder, discretizer, head
        self.target_head = copy.deepcopy(head).requires_grad_(False)

    def online_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimiser trains: encoder and online head (never the target copy)."""
        return [*self.encoder.parameters(), *self.head.parameters()]

    @torch.no_grad()
    def polyak(self, tau: float) -> None:
        """``target <- tau * online + (1 - tau) * target`` for every head parameter."""
        torch._foreach_lerp_(list(self.target_head.parameters()), list(self.head.parameters()), tau)

    def act(self, obs: Tensor, *, deterministic: bool, generator: torch.Generator | None = None) -> Tensor:
        """Env-space actions ``[B, D]`` for observations ``[B, ...]``: greedy, or exploring."""
        raise NotImplementedError

    def default_loss(self):
        """The loss this critic trains with when the config names none."""
        raise NotImplementedError


def td_reward(batch: TensorDictBase, gamma: float, dtype: torch.dtype) -> Tensor:
    """``[B]``: the reward part of a TD target, ``sum_j gamma^j r_{t+j}`` over an n-step row's ``nstep_rewards``
    (:mod:`arsq_lightning.data.nstep`), else the one-step ``("next", "reward")``."""
    if NSTEP_REWARDS not in batch.keys():
        return batch[NEXT_REWARD].reshape(-1).to(dtype)
    rewards = batch[NSTEP_REWARDS].to(dtype)  # [B, n]
    powers = torch.pow(gamma, torch.arange(rewards.shape[-1], device=rewards.device, dtype=dtype))
    return rewards @ powers


def bootstrap_discount(batch: TensorDictBase, gamma: float, dtype: torch.dtype) -> Tensor:
    """``[B]``: ``gamma^k * (1 - terminated)``, the weight of the next state's value in a TD target; ``k`` is an
    n-step row's ``steps_to_next_obs``, 1 where the batch has none."""
    not_terminal = 1.0 - batch[NEXT_TERMINATED].reshape(-1).to(dtype)
    if STEPS_TO_NEXT not in batch.keys():
        return gamma * not_terminal
    return torch.pow(gamma, batch[STEPS_TO_NEXT].reshape(-1).to(dtype)) * not_terminal


def expected_value(logits: Tensor, support: Tensor) -> Tensor:
    """Mean of the categorical distribution ``softmax(logits)`` on ``support``: ``[..., A] -> [...]``."""
    return (logits.softmax(-1) * support).sum(-1)


def dominance_shortfall(logits: Tensor, codes: Tensor) -> Tensor:
    """How far the data bin's return distribution is from first-order stochastically dominating each bin's:
    ``sum_atoms max(F_data - F_k, 0)`` over atom CDFs, ``logits [..., K, A]``, ``codes [...]`` -> ``[..., K]``
    (CQN's FOSD term before its mean, docs/algorithm.md §6.4)."""
    cdf = logits.softmax(-1).cumsum(-1)
    index = codes[..., None, None].expand(*codes.shape, 1, cdf.shape[-1])
    return (cdf.gather(-2, index) - cdf).clamp(min=0).sum(-1)


def outside_support(values: Tensor, support: Tensor) -> Tensor:
    """The share of ``values`` (any shape) below ``support[0]`` or above ``support[-1]``: what C51 clips."""
    return ((values < support[0]) | (values > support[-1])).to(values.dtype).mean()


def c51_projection(next_probs: Tensor, reward: Tensor, discount: Tensor, support: Tensor) -> Tensor:
    """Project ``r + discount * z`` with masses ``next_probs`` back onto ``support`` (C51).

    Args:
        next_probs: ``[B, ..., A]`` target distributions (each sums to 1).
        reward, discount: ``[B]`` (``discount`` already includes ``gamma`` and ``1 - terminated``).
        support: ``[A]`` evenly spaced atoms.

    Returns:
        ``[B, ..., A]``, each summing to 1. A shifted atom at ``b = j + f`` (``j`` integer, ``0 <= f < 1``) gives mass
        ``1 - f`` to atom ``j`` and ``f`` to atom ``j + 1``, so a target landing exactly on an atom keeps all its
        mass there.
    """
    atoms = support.numel()
    v_min, v_max = float(support[0]), float(support[-1])
    extra = (1,) * (next_probs.dim() - 2)
    shifted = (reward.view(-1, *extra, 1) + discount.view(-1, *extra, 1) * support).expand_as(next_probs)
    position = (shifted.clamp(v_min, v_max) - v_min) / (v_max - v_min) * (atoms - 1)
    lower = position.floor().clamp(max=atoms - 2)
    upper_share = position - lower  # in [0, 1]
    projected = torch.zeros_like(next_probs)
    projected.scatter_add_(-1, lower.long(), next_probs * (1.0 - upper_share))
    projected.scatter_add_(-1, lower.long() + 1, next_probs * upper_share)
    return projected


def total_loss(terms: dict[str, Tensor]) -> Tensor:
    """The sum of a loss output's ``loss_*`` terms: what the optimiser minimises (TorchRL's convention)."""
    return sum(value for name, value in terms.items() if name.startswith("loss_"))


class Loss:
    """A training loss: ``loss(critic, batch)`` returns its differentiable terms ``loss_<name>`` (the trainer
    minimises their sum, :func:`total_loss`) and detached diagnostics without the prefix, all logged as
    ``train/<name>``. ``critic_type`` is the critic class it trains (the module checks the pair at construction)."""

    critic_type: type[Critic] = Critic

    def __call__(self, critic: Critic, batch) -> dict[str, Tensor]:
        raise NotImplementedError
