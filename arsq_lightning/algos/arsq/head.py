"""ARSQ's critic networks: soft value ``V(s)`` and auto-regressive advantage logits (docs/algorithm.md §3.2).

:class:`AutoregressiveHead` holds ``C`` critics (twins by default) and evaluates all of them, and all ``N = L * D``
positions, in one batched call. Position ``i`` is read from the output slot ``i mod qchunk`` of advantage MLP
``i // qchunk`` applied to ``(features, m_i)``; with the default ``qchunk = -1`` (= ``N``) one trunk with ``N``
output slots serves every position, with ``qchunk = 1`` each position has its own MLP.

With ``groups`` the dimensions of one level are split into groups decided together: every dim of a group sees the
same conditioning (the midpoints of the groups decided before it), so ``groups = D`` (default) is ARSQ's fully
auto-regressive order and ``groups = 1`` is CQN's factorisation, independent across the dims of a level.

Shapes: ``F`` feature dim, ``D`` action dims, ``N`` positions, ``K`` bins, ``C`` critics.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from arsq_lightning.algos.base import Head
from arsq_lightning.errors import require
from arsq_lightning.nets.layers import EnsembleLinear, EnsembleMLP, fp32_affine, orthogonal_


def dim_groups(action_dim: int, groups: int | Sequence[Sequence[int]]) -> list[list[int]]:
    """Normalise a ``groups`` option (see :class:`AutoregressiveHead`) to a list of dim lists in decision order."""
    if isinstance(groups, int):
        count = action_dim if groups == -1 else groups
        require(1 <= count <= action_dim, f"head groups must be -1 or in 1..{action_dim} (action dims), got {groups}")
        return [chunk.tolist() for chunk in torch.arange(action_dim).tensor_split(count)]
    result = [[int(d) for d in group] for group in groups]
    flat = sorted(d for group in result for d in group)
    require(flat == list(range(action_dim)) and all(result),
            f"head groups {result} must split the dims 0..{action_dim - 1} into non-empty groups, each dim once")
    return result


class AutoregressiveHead(Head):
    """Twin soft-Q critic networks over a level-major action sequence.

    Args:
        feature_dim: ``F``, encoder output size.
        action_dim: ``D``.
        levels: ``L``.
        bins: ``K``.
        hidden_dims: MLP widths (official D4RL: three layers of 512).
        activation: hidden activation (official D4RL: ``tanh``).
        qchunk: positions per advantage MLP; ``-1`` means all ``N`` (one shared trunk). Must divide ``N``.
        num_critics: ``C``; 2 gives the twin critics of §3.
        out_gain: orthogonal-init gain of the output layers (official: 0.01).
        groups: dims decided together within a level: ``-1`` (one group per dim, ARSQ), a number ``g`` of contiguous
            groups of near-equal size, or explicit groups ``[[0, 2], [1]]`` (a partition of the dims, in decision
            order).
        layer_norm: LayerNorm before every hidden activation of the value and advantage MLPs (the official networks
            have none; CQN's have it).
        atoms: ``A``; ``1`` (official) gives scalar values and advantage logits; ``> 1`` gives atom logits of a
            categorical return distribution on ``linspace(v_min, v_max, A)`` for the value and every (position, bin)
            (the critic's ``advantages: distributional``): outputs gain a trailing ``[A]`` axis.
        v_min: lower end of that support, in the units of the TD targets (after the data's reward scale).
        v_max: upper end of that support (e.g. ``max reward / (1 - gamma)``).
    """

    def __init__(self, feature_dim: int, action_dim: int, levels: int, bins: int, *,
                 hidden_dims: Sequence[int] = (512, 512, 512), activation: str = "tanh", qchunk: int = -1,
                 num_critics: int = 2, out_gain: float = 0.01, groups: int | Sequence[Sequence[int]] = -1,
                 layer_norm: bool = False, atoms: int = 1, v_min: float = 0.0, v_max: float = 100.0):
        super().__init__()
        require(atoms >= 1, f"head atoms must be >= 1, got {atoms}")
        require(atoms == 1 or v_max > v_min, f"head v_max ({v_max}) must exceed v_min ({v_min})")
        self.atoms = atoms
        self.register_buffer("support", torch.linspace(v_min, v_max, atoms) if atoms > 1 else torch.zeros(1),
                             persistent=False)
        self.groups = dim_groups(action_dim, groups)
        order = torch.empty(action_dim, dtype=torch.long)
        for rank, group in enumerate(self.groups):
            order[group] = rank
        # None keeps the plain one-dim-at-a-time order (no per-call depth table); else the rank of each dim's group.
        self.register_buffer("order", None if order.equal(torch.arange(action_dim)) else order, persistent=False)
        # None in the plain order; else the positions l * D + d in the order the groups decide them (level by level)
        decided = torch.tensor([lvl * action_dim + dim for lvl in range(levels)
                                for group in self.groups for dim in group])
        self.register_buffer("decision_order", None if self.order is None else decided, persistent=False)
        positions = levels * action_dim
        chunk = positions if qchunk == -1 else qchunk
        require(chunk >= 1 and positions % chunk == 0,
                f"qchunk={qchunk} must be -1 or divide N = levels * action_dim = {positions}")
        require(num_critics >= 1, f"num_critics must be >= 1, got {num_critics}")
        require(len(hidden_dims) >= 1, "hidden_dims needs at least one layer")
        self.action_dim, self.bins, self.num_critics = action_dim, bins, num_critics
        self.num_positions, self.chunk, self.num_chunks = positions, chunk, positions // chunk
        members = num_critics * self.num_chunks  # member e = critic * num_chunks + chunk
        self.value_trunk = EnsembleMLP(num_critics, feature_dim, hidden_dims, activation, layer_norm)
        self.value_out = EnsembleLinear(num_critics, hidden_dims[-1], atoms, gain=out_gain, fp32=True)
        self.adv_trunk = EnsembleMLP(members, feature_dim + action_dim, hidden_dims, activation, layer_norm)
        outputs = bins * atoms  # per slot: K logits, or K x A atom logits
        flat = orthogonal_(torch.empty(members, hidden_dims[-1], chunk * outputs), out_gain)  # one [H, S*K*A] each
        self.adv_weight = nn.Parameter(flat.view(members, -1, chunk, outputs).transpose(1, 2).contiguous())
        self.adv_bias = nn.Parameter(torch.zeros(members, chunk, outputs))  # [E, S, K*A]
        self.feature_dim = feature_dim

    def value(self, features: Tensor) -> Tensor:
        """Soft state values of every critic: ``[B, F] -> [C, B]`` (``[C, B, A]`` atom logits with atoms)."""
        x = features.unsqueeze(0).expand(self.num_critics, *features.shape)
        out = self.value_out(self.value_trunk(x))
        return out.squeeze(-1) if self.atoms == 1 else out

    def advantage_logits(self, features: Tensor, cond: Tensor) -> Tensor:
        """Raw logits of all positions at once (teacher forcing): ``[B, F], [B, N, D] -> [C, B, N, K]`` (``[C, B, N,
        K, A]`` with atoms).

        Rows are laid out slot-major (``[E, S * B, ...]``) so the output layer is one batched matmul over
        ``E * S`` (member, slot) pairs, each reading only its own slot's weights. The first layer is computed in two
        parts: the features' part once per sample and member (``[E, B, H]``), broadcast over the ``S`` slots, plus
        the conditioning part of every position.
        """
        batch, slots, width = features.shape[0], self.chunk, self.feature_dim
        first = self.adv_trunk.layers[0]
        members = first.weight.shape[0]  # E = C * num_chunks, member e = critic * num_chunks + chunk
        feature_part = torch.baddbmm(first.bias, features.expand(members, *features.shape), first.weight[:, :width])
        rows = cond.view(batch, self.num_chunks, slots, -1).permute(1, 2, 0, 3).reshape(self.num_chunks, slots * batch,
                                                                                         -1)
        cond_part = torch.bmm(rows.repeat(self.num_critics, 1, 1), first.weight[:, width:])  # [E, S * B, H]
        pre = (cond_part.view(members, slots, batch, -1) + feature_part.unsqueeze(1)).view(members, slots * batch, -1)
        h = self.adv_trunk.after_first_layer(pre)  # [E, S * B, H]
        outputs = self.bins * self.atoms
        out = fp32_affine(self.adv_bias.view(members * slots, 1, outputs), h.view(members * slots, batch, -1),
                          self.adv_weight.view(members * slots, -1, outputs))  # [E * S, B, K * A]
        out = out.view(self.num_critics, self.num_chunks, slots, batch, outputs).permute(0, 3, 1, 2, 4)
        return self._split_atoms(out.reshape(self.num_critics, batch, self.num_positions, outputs))

    def _split_atoms(self, out: Tensor) -> Tensor:
        """``[..., K * A] -> [..., K]`` (atoms 1) or ``[..., K, A]``."""
        return out if self.atoms == 1 else out.unflatten(-1, (self.bins, self.atoms))

    def acting_cache(self, features: Tensor) -> dict:
        """Per-call work shared by all positions when acting: the features' part of every first layer and the
        per-chunk weight views (so the position loop does no slicing)."""
        first = self.adv_trunk.layers[0]
        x = features.unsqueeze(0).expand(first.weight.shape[0], *features.shape)
        first_part = torch.baddbmm(first.bias, x, first.weight[:, : self.feature_dim])  # [E, B, H]
        chunks = []
        for c in range(self.num_chunks):
            members = slice(c, None, self.num_chunks)
            chunks.append({"members": members, "first": first_part[members],
                           "cond_weight": first.weight[members, self.feature_dim:],
                           "hidden": [(layer.bias[members], layer.weight[members])
                                      for layer in self.adv_trunk.layers[1:]],
                           "out": [(self.adv_bias[members, slot].unsqueeze(1), self.adv_weight[members, slot])
                                   for slot in range(self.chunk)]})
        return {"chunks": chunks}

    def position_logits(self, features: Tensor, cond: Tensor, position: int, cache: dict | None = None) -> Tensor:
        """Raw logits of one position (acting): ``[B, F], [B, D] -> [C, B, K]`` (``[C, B, K, A]`` with atoms).

        ``cache`` (from :meth:`acting_cache` on the same features) saves the per-call work.
        """
        cache = self.acting_cache(features) if cache is None else cache
        chunk_index, slot = divmod(position, self.chunk)
        weights = cache["chunks"][chunk_index]
        trunk, members = self.adv_trunk, weights["members"]
        x = trunk.activate(0, torch.baddbmm(weights["first"], cond.expand(self.num_critics, *cond.shape),
                                            weights["cond_weight"]), members)
        for index, (bias, weight) in enumerate(weights["hidden"], start=1):
            x = trunk.activate(index, torch.baddbmm(bias, x, weight), members)
        out_bias, out_weight = weights["out"][slot]
        return self._split_atoms(fp32_affine(out_bias, x, out_weight))
