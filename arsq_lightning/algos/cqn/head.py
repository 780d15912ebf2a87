"""CQN's coarse-to-fine critic network: one network shared by all levels, dueling, C51 (docs/algorithm.md §6.2, §4.4).

At level ``l`` the network reads ``(features, m, onehot(l))`` where ``m [B, D]`` holds every dim's interval midpoint
after ``l`` levels (zeros at level 0), and returns per-dim, per-bin atom logits. All dims of a level are decided
independently given ``m`` (the ``groups = 1`` factorisation of
:class:`~arsq_lightning.algos.arsq.head.AutoregressiveHead`).

Shapes: ``F`` feature dim, ``D`` action dims, ``L`` levels, ``K`` bins, ``A`` atoms (1: plain Q values).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from arsq_lightning.algos.base import Head, expected_value
from arsq_lightning.errors import require
from arsq_lightning.nets.layers import fp32_linear


def _stream(feature_dim: int, action_dim: int, levels: int, trunk_dim: int,
            hidden_dims: Sequence[int]) -> nn.ModuleDict:
    """One dueling stream: its own trunk ``Linear(F -> trunk_dim) + LayerNorm + tanh`` and MLP with LayerNorm + SiLU."""
    trunk = nn.Sequential(nn.Linear(feature_dim, trunk_dim, bias=False), nn.LayerNorm(trunk_dim), nn.Tanh())
    layers: list[nn.Module] = []
    for width_in, width_out in zip([trunk_dim + action_dim + levels, *hidden_dims[:-1]], hidden_dims):
        layers += [nn.Linear(width_in, width_out, bias=False), nn.LayerNorm(width_out), nn.SiLU()]
    return nn.ModuleDict({"trunk": trunk, "mlp": nn.Sequential(*layers)})


class CQNHead(Head):
    """CQN's critic: value and advantage streams, ``logits[d, b] = V[d] + A[d, b] - mean_b A[d, b]`` per atom.

    Args:
        feature_dim: ``F``.
        action_dim: ``D``.
        levels: ``L``.
        bins: ``K``.
        atoms: C51 atoms ``A``; ``1`` makes the outputs plain Q values (the non-distributional variant).
        v_min: lower end of the value distribution's support (official D4RL port 0, RLBench -2, DMC 0).
        v_max: upper end of the support (official D4RL port 4000, RLBench 2, DMC 200).
        trunk_dim: width of each stream's feature trunk (official 64).
        hidden_dims: stream MLP widths (official two layers of 512).
    """

    def __init__(self, feature_dim: int, action_dim: int, levels: int, bins: int, *, atoms: int = 51,
                 v_min: float = 0.0, v_max: float = 200.0, trunk_dim: int = 64,
                 hidden_dims: Sequence[int] = (512, 512)):
        super().__init__()
        require(atoms >= 1, f"head atoms must be >= 1, got {atoms}")
        require(atoms == 1 or v_max > v_min, f"head v_max ({v_max}) must exceed v_min ({v_min})")
        require(len(hidden_dims) >= 1, "hidden_dims needs at least one layer")
        self.action_dim, self.levels, self.bins, self.atoms = action_dim, levels, bins, atoms
        self.value_stream = _stream(feature_dim, action_dim, levels, trunk_dim, hidden_dims)
        self.adv_stream = _stream(feature_dim, action_dim, levels, trunk_dim, hidden_dims)
        self.value_out = nn.Linear(hidden_dims[-1], action_dim * atoms)
        self.adv_out = nn.Linear(hidden_dims[-1], action_dim * bins * atoms)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.orthogonal_(module.weight)
        for out in (self.value_out, self.adv_out):  # zero-initialised heads (§6.2)
            nn.init.zeros_(out.weight)
            nn.init.zeros_(out.bias)
        self.register_buffer("support", torch.linspace(v_min, v_max, atoms) if atoms > 1 else torch.zeros(1))

    def level_logits(self, features: Tensor, cond: Tensor, level: int | Tensor) -> Tensor:
        """Atom logits of one level: ``[B, F], [B, D] -> [B, D, K, A]``; ``level`` an int or ``[B]`` longs."""
        batch = features.shape[0]
        level = torch.full((batch,), level, device=features.device) if isinstance(level, int) else level
        onehot = nn.functional.one_hot(level, self.levels).to(features.dtype)
        value = self._run(self.value_stream, features, cond, onehot)
        adv = self._run(self.adv_stream, features, cond, onehot)
        value = fp32_linear(self.value_out, value).view(batch, self.action_dim, 1, self.atoms)  # fp32 under autocast
        adv = fp32_linear(self.adv_out, adv).view(batch, self.action_dim, self.bins, self.atoms)
        return value + adv - adv.mean(-2, keepdim=True)

    @staticmethod
    def _run(stream: nn.ModuleDict, features: Tensor, cond: Tensor, onehot: Tensor) -> Tensor:
        return stream["mlp"](torch.cat([stream["trunk"](features), cond, onehot], dim=-1))

    def all_logits(self, features: Tensor, cond: Tensor) -> Tensor:
        """Atom logits of every level at once (teacher forcing): ``[B, F], [B, L, D] -> [B, L, D, K, A]``."""
        batch, levels = features.shape[0], self.levels
        level = torch.arange(levels, device=features.device).repeat(batch)
        flat = self.level_logits(features.repeat_interleave(levels, 0), cond.reshape(batch * levels, -1), level)
        return flat.view(batch, levels, *flat.shape[1:])

    def expected_q(self, logits: Tensor) -> Tensor:
        """``[..., A] -> [...]``: the distribution's mean ``sum softmax(logits) * z`` (the logit itself if
        ``A = 1``)."""
        if self.atoms == 1:
            return logits.squeeze(-1)
        return expected_value(logits, self.support)
