"""Coarse-to-fine action discretisation (ALGORITHM.md §2).

Every action dimension is cut into ``bins`` intervals, the chosen interval into ``bins`` again, ``levels`` times.
After ``levels`` choices the executed value is the midpoint of the final interval, so each dimension lives on a
uniform grid of ``bins**levels`` points. Internally everything is done in the unit box ``[-1, 1]^D``; the env's
bounds are mapped affinely onto it (``to_unit`` / ``from_unit``).

Shape letters: ``B`` batch, ``L`` levels, ``D`` action dims, ``K`` bins, ``N = L * D`` auto-regressive positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from arsq_lightning.errors import require

# A value within a few rounding errors (of the input's dtype) below a bin boundary counts as on the boundary and goes
# to the upper bin, so boundaries that are not exactly representable (e.g. -0.6 in float32) encode as §2.2 says.
# Capped at a thousandth of the finest cell, so the round-trip error stays within 1.002 half grid steps.
_BOUNDARY_ULPS = 4
_MAX_TOLERANCE_CELLS = 1e-3


class Discretizer(nn.Module):
    """Interface shared by discretizers: continuous actions <-> integer codes ``[..., L, D]``.

    Subclasses set ``levels``, ``bins`` and ``action_dim`` and implement every method below; acting
    (:meth:`ARSQCritic.act <arsq_lightning.critic.ARSQCritic.act>`) zooms in through ``prefix * bins + bin`` and
    :meth:`midpoint`, and maps the final unit-space midpoints to the env with :meth:`from_unit`.
    """

    levels: int
    bins: int
    action_dim: int

    @property
    def num_positions(self) -> int:
        """``N = L * D``, the length of the auto-regressive sequence."""
        return self.levels * self.action_dim

    def encode(self, action: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def decode(self, codes: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def conditioning(self, codes: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def midpoint(self, prefix: Tensor, depth: Tensor | int) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def to_unit(self, action: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def from_unit(self, unit: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class CoarseToFineDiscretizer(Discretizer):
    """Uniform coarse-to-fine grid over a box action space (ALGORITHM.md §2.1-§2.3).

    Args:
        low: lower action bound, one value per dimension ``[D]``.
        high: upper action bound ``[D]``.

    Keyword Args:
        levels: ``L``, number of zoom-in levels (>= 1).
        bins: ``K``, bins per level (>= 2).

    Example:
        >>> disc = CoarseToFineDiscretizer([-1.0], [1.0], levels=3, bins=5)
        >>> disc.encode(torch.tensor([[0.3]])).squeeze(-1).tolist()
        [[3, 1, 1]]
        >>> round(disc.decode(disc.encode(torch.tensor([[0.3]]))).item(), 3)
        0.304
    """

    def __init__(self, low: Sequence[float] | Tensor, high: Sequence[float] | Tensor, *, levels: int = 3,
                 bins: int = 5):
        super().__init__()
        low_t = torch.as_tensor(low, dtype=torch.float32).reshape(-1)
        high_t = torch.as_tensor(high, dtype=torch.float32).reshape(-1)
        require(levels >= 1, f"discretizer levels must be >= 1, got {levels}")
        require(bins >= 2, f"discretizer bins must be >= 2, got {bins}")
        require(low_t.shape == high_t.shape and low_t.numel() > 0, "action low/high must be non-empty and equal length")
        require(bool(torch.isfinite(low_t).all() & torch.isfinite(high_t).all()), "action bounds must be finite")
        require(bool((high_t > low_t).all()),
                f"action high must exceed low, got low={low_t.tolist()} high={high_t.tolist()}")
        self.levels, self.bins, self.action_dim = levels, bins, low_t.numel()
        self.register_buffer("low", low_t)
        self.register_buffer("high", high_t)
        # Powers bins**l for l = 0..L, used for prefixes (float64: exact up to 2**53).
        self.register_buffer("powers", torch.tensor([float(bins) ** p for p in range(levels + 1)], dtype=torch.float64))
        # The midpoint after n levels of interval j is j * scale[n] + offset[n] (float64).
        self._scale = [2.0 / float(bins) ** n for n in range(levels + 1)]
        self._offset = [1.0 / float(bins) ** n - 1.0 for n in range(levels + 1)]
        self.register_buffer("mid_scale", torch.tensor(self._scale, dtype=torch.float64), persistent=False)
        self.register_buffer("mid_offset", torch.tensor(self._offset, dtype=torch.float64), persistent=False)
        # depth[l, d, d'] = how many levels of dim d' are decided before position (l, d) (level-major order, §2.3).
        lvl = torch.arange(levels).view(levels, 1, 1)
        earlier_dim = torch.ones(self.action_dim, self.action_dim).tril(-1).bool().unsqueeze(0)  # d' < d
        self.register_buffer("depth", (lvl + earlier_dim.long()).long())  # [L, D, D]

    # --- affine map between env bounds and the unit box ---------------------------------------------------------
    def to_unit(self, action: Tensor) -> Tensor:
        """Env-space action ``[..., D]`` -> ``[-1, 1]^D``."""
        return (action - self.low) / (self.high - self.low) * 2.0 - 1.0

    def from_unit(self, unit: Tensor) -> Tensor:
        """``[-1, 1]^D`` -> env-space action ``[..., D]``."""
        return self.low + (unit + 1.0) * 0.5 * (self.high - self.low)

    # --- codes ------------------------------------------------------------------------------------------------
    def encode(self, action: Tensor) -> Tensor:
        """Env-space action ``[..., D]`` -> codes ``[..., L, D]`` (long), the base-K digits of ``(u + 1) / 2``.

        Values outside the bounds are clipped to the edge bins; a value on a bin boundary goes to the upper bin.
        """
        unit = self.to_unit(action.to(torch.float64)).clamp(-1.0, 1.0)
        cells = self.powers[-1]
        eps = torch.finfo(action.dtype if action.is_floating_point() else torch.float32).eps
        tolerance = min(_BOUNDARY_ULPS * eps * float(cells), _MAX_TOLERANCE_CELLS)  # in finest cells
        index = torch.floor((unit + 1.0) * 0.5 * cells + tolerance).clamp(0, cells - 1)  # [..., D]
        place = self.powers[:-1].flip(0).unsqueeze(-1)  # [L, 1]: K**(L-1-l)
        digits = torch.div(index.unsqueeze(-2), place, rounding_mode="floor") % self.bins
        return digits.long()

    def decode(self, codes: Tensor) -> Tensor:
        """Codes ``[..., L, D]`` -> env-space action ``[..., D]`` (midpoint of the finest interval)."""
        prefix = self.prefix(codes)[..., -1, :]  # [..., D]
        depth = torch.full_like(prefix, self.levels, dtype=torch.long)
        return self.from_unit(self.midpoint(prefix, depth))

    def prefix(self, codes: Tensor) -> Tensor:
        """Codes ``[..., L, D]`` -> integer interval index after ``l`` levels, ``[..., L + 1, D]`` (float64)."""
        value = codes.to(torch.float64)
        steps = [torch.zeros_like(value[..., 0, :])]
        for lvl in range(self.levels):
            steps.append(steps[-1] * self.bins + value[..., lvl, :])
        return torch.stack(steps, dim=-2)

    def midpoint(self, prefix: Tensor, depth: Tensor | int) -> Tensor:
        """Unit-space midpoint of the interval with index ``prefix`` after ``depth`` levels (0 when depth is 0).

        Args:
            prefix: interval index, float64 or long, any shape.
            depth: number of levels decided: a long tensor of the same shape, or one int for all.

        Returns:
            float32 midpoints ``-1 + (2 * prefix + 1) / K**depth``, computed as ``prefix * scale + offset`` in float64
            (the same operations for a tensor or an int depth, so acting and training agree bit for bit).
        """
        if isinstance(depth, int):
            return (prefix.to(torch.float64) * self._scale[depth] + self._offset[depth]).float()
        return (prefix.to(torch.float64) * self.mid_scale[depth] + self.mid_offset[depth]).float()

    def conditioning(self, codes: Tensor) -> Tensor:
        """Codes ``[..., L, D]`` -> conditioning vectors ``[..., N, D]`` in level-major order (§2.3).

        Row ``i = l * D + d`` holds, for every dim ``d'``, the unit-space midpoint of ``d'``'s interval once all
        positions before ``i`` are decided (teacher forcing: the prefix comes from ``codes``).
        """
        prefixes = self.prefix(codes)  # [..., L + 1, D]
        depth = self.depth.reshape(self.num_positions, self.action_dim)  # [N, D]
        depth = depth.expand(*prefixes.shape[:-2], *depth.shape)
        return self.midpoint(torch.gather(prefixes, -2, depth), depth)

    def zoom_in(self, low: Tensor, high: Tensor, bin_index: Tensor) -> tuple[Tensor, Tensor]:
        """One zoom-in step on unit-space intervals (§2.1): pick bin ``bin_index`` of ``[low, high]``."""
        width = (high - low) / self.bins
        new_low = low + bin_index.to(low.dtype) * width
        return new_low, new_low + width

    def extra_repr(self) -> str:
        return f"levels={self.levels}, bins={self.bins}, action_dim={self.action_dim}"
