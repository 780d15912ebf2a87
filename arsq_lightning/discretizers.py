"""Coarse-to-fine action discretisation (docs/algorithm.md §2).

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


def _per_dim(name: str, value: int | Sequence[int], action_dim: int) -> list[int]:
    """One int per action dim from an int or a list (``ConfigError`` on a wrong length)."""
    if isinstance(value, int):
        return [value] * action_dim
    values = [int(v) for v in value]
    require(len(values) == action_dim, f"discretizer {name} {values} needs one value per action dim ({action_dim})")
    return values


def decision_depth(levels: int, order: Tensor) -> Tensor:
    """``depth[l, d, d']``: levels of dim ``d'`` decided before position ``(l, d)``, ``[L, D, D]`` long.

    ``order[d]`` is the rank of dim ``d``'s group within a level: ``d'`` is one level further than ``l`` when its group
    comes before ``d``'s (``order[d'] < order[d]``).
    """
    earlier = (order.view(1, -1) < order.view(-1, 1)).long()  # [D, D]: d' decided before d within a level
    return torch.arange(levels, device=order.device).view(levels, 1, 1) + earlier.unsqueeze(0)


class Discretizer(nn.Module):
    """Interface shared by discretizers: continuous actions <-> integer codes ``[..., L, D]``.

    Subclasses set ``levels``, ``bins`` and ``action_dim`` and implement every method below; acting
    (:meth:`ARSQCritic.act <arsq_lightning.algos.arsq.critic.ARSQCritic.act>`) zooms in through
    ``prefix * bins + bin`` and :meth:`midpoint`, and maps the final unit-space midpoints to the env with
    :meth:`from_unit`.
    """

    levels: int  # L (the most levels of any dim)
    bins: int  # K (the most bins of any dim and level)
    action_dim: int  # D
    bins_table: Tensor  # [L, D] bins of dim d at level l (1 once d's own levels are done)
    bin_mask: Tensor  # [N, K] the bins that exist at each position (level-major i = l * D + d)
    uniform_grid: bool  # every dim has L levels of K bins (bin_mask is all true)

    @property
    def num_positions(self) -> int:
        """``N = L * D``, the length of the auto-regressive sequence."""
        return self.levels * self.action_dim

    def needs_fit(self) -> bool:
        """Whether the grid still has to be fitted to dataset actions (:meth:`fit`) before training."""
        return False

    def fit(self, actions: Tensor) -> None:
        """Fit a data-adaptive grid to env actions ``[n, D]`` (fixed grids have nothing to fit)."""
        raise NotImplementedError(f"{type(self).__name__} has a fixed grid")

    def encode(self, action: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def decode(self, codes: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def conditioning(self, codes: Tensor, order: Tensor | None = None) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def midpoint(self, prefix: Tensor, depth: Tensor | int) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def to_unit(self, action: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def from_unit(self, unit: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


def gaussian_exploration(disc: Discretizer, action: Tensor, std: float,
                         generator: torch.Generator | None = None) -> Tensor:
    """Explore around env-space grid actions ``[B, D]``: add ``N(0, std^2)`` noise in the unit box (clamped inside
    it) and snap back to the finest grid (CQN's exploration, also an option of ARSQ's critic)."""
    unit = disc.to_unit(action)
    noise = torch.randn(unit.shape, device=unit.device, generator=generator) * std
    bound = 1.0 - 1e-6
    return disc.decode(disc.encode(disc.from_unit((unit + noise).clamp(-bound, bound))))


class CoarseToFineDiscretizer(Discretizer):
    """Coarse-to-fine grid over a box action space (docs/algorithm.md §2.1-§2.3).

    Every dim is cut into ``bins`` intervals ``levels`` times. Dims may differ: with per-dim ``levels`` / ``bins``
    the sequence has ``L = max(levels)`` levels of ``K = max(bins)`` slots; a dim with fewer bins leaves its extra
    slots invalid (:attr:`bin_mask`), and a dim with fewer levels is finished early (its later positions have one
    valid bin, 0, which does not zoom).

    Args:
        low: lower action bound, one value per dimension ``[D]``.
        high: upper action bound ``[D]``.
        levels: ``L``, number of zoom-in levels (>= 1), or one per dim.
        bins: ``K``, bins per level (>= 2), or one per dim.

    Example:
        >>> disc = CoarseToFineDiscretizer([-1.0], [1.0], levels=3, bins=5)
        >>> disc.encode(torch.tensor([[0.3]])).squeeze(-1).tolist()
        [[3, 1, 1]]
        >>> round(disc.decode(disc.encode(torch.tensor([[0.3]]))).item(), 3)
        0.304
    """

    def __init__(self, low: Sequence[float] | Tensor, high: Sequence[float] | Tensor, *,
                 levels: int | Sequence[int] = 3, bins: int | Sequence[int] = 5):
        super().__init__()
        low_t = torch.as_tensor(low, dtype=torch.float32).reshape(-1)
        high_t = torch.as_tensor(high, dtype=torch.float32).reshape(-1)
        require(low_t.shape == high_t.shape and low_t.numel() > 0, "action low/high must be non-empty and equal length")
        require(bool(torch.isfinite(low_t).all() & torch.isfinite(high_t).all()), "action bounds must be finite")
        require(bool((high_t > low_t).all()),
                f"action high must exceed low, got low={low_t.tolist()} high={high_t.tolist()}")
        self.action_dim = low_t.numel()
        per_levels, per_bins = _per_dim("levels", levels, self.action_dim), _per_dim("bins", bins, self.action_dim)
        require(min(per_levels) >= 1, f"discretizer levels must be >= 1, got {levels}")
        require(min(per_bins) >= 2, f"discretizer bins must be >= 2, got {bins}")
        self.levels, self.bins = max(per_levels), max(per_bins)
        self.register_buffer("low", low_t)
        self.register_buffer("high", high_t)
        # bins_table[l, d]: bins of dim d at level l (1 once d's own levels are done). Derived, so not persistent.
        table = torch.tensor([[b if lvl < n else 1 for n, b in zip(per_levels, per_bins)]
                              for lvl in range(self.levels)],
                             dtype=torch.float64)
        self.register_buffer("bins_table", table, persistent=False)  # [L, D]
        # count[n, d] = intervals of dim d after n levels; the midpoint of interval j is j * scale + offset (float64).
        count = torch.cat([torch.ones(1, self.action_dim, dtype=torch.float64), table.cumprod(0)])  # [L + 1, D]
        self.register_buffer("mid_scale", 2.0 / count, persistent=False)
        self.register_buffer("mid_offset", 1.0 / count - 1.0, persistent=False)
        # place[l, d] = product of d's bins after level l: the base of digit l in the finest cell index.
        place = torch.cat([table.flip(0).cumprod(0).flip(0)[1:], torch.ones(1, self.action_dim, dtype=torch.float64)])
        self.register_buffer("place", place, persistent=False)  # [L, D]
        valid = torch.arange(self.bins).view(1, 1, -1) < table.unsqueeze(-1)  # [L, D, K]
        self.register_buffer("bin_mask", valid.reshape(-1, self.bins), persistent=False)  # [N, K]
        self.uniform_grid = bool(valid.all())
        # depth[l, d, d'] = how many levels of dim d' are decided before position (l, d) (level-major order, §2.3).
        self.register_buffer("depth", decision_depth(self.levels, torch.arange(self.action_dim)))  # [L, D, D]

    # --- affine map between env bounds and the unit box ---------------------------------------------------------
    def to_unit(self, action: Tensor) -> Tensor:
        """Env-space action ``[..., D]`` -> ``[-1, 1]^D``."""
        return (action - self.low) / (self.high - self.low) * 2.0 - 1.0

    def from_unit(self, unit: Tensor) -> Tensor:
        """``[-1, 1]^D`` -> env-space action ``[..., D]``."""
        return self.low + (unit + 1.0) * 0.5 * (self.high - self.low)

    # --- codes ------------------------------------------------------------------------------------------------
    def encode(self, action: Tensor) -> Tensor:
        """Env-space action ``[..., D]`` -> codes ``[..., L, D]`` (long), the base-K digits of ``(u + 1) / 2``
        (mixed-radix digits when dims differ).

        Values outside the bounds are clipped to the edge bins; a value on a bin boundary goes to the upper bin.
        """
        unit = self.to_unit(action.to(torch.float64)).clamp(-1.0, 1.0)
        cells = self.place[0] * self.bins_table[0]  # [D] finest cells per dim
        eps = torch.finfo(action.dtype if action.is_floating_point() else torch.float32).eps
        tolerance = (_BOUNDARY_ULPS * eps * cells).clamp(max=_MAX_TOLERANCE_CELLS)  # in finest cells
        index = torch.minimum(torch.floor((unit + 1.0) * 0.5 * cells + tolerance).clamp(min=0), cells - 1)  # [..., D]
        digits = torch.div(index.unsqueeze(-2), self.place, rounding_mode="floor") % self.bins_table
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
            steps.append(steps[-1] * self.bins_table[lvl] + value[..., lvl, :])
        return torch.stack(steps, dim=-2)

    def midpoint(self, prefix: Tensor, depth: Tensor | int) -> Tensor:
        """Unit-space midpoint of the interval with index ``prefix`` after ``depth`` levels (0 when depth is 0).

        Args:
            prefix: interval index ``[..., D]`` (last axis: action dims), float64 or long.
            depth: number of levels decided: a long tensor of the same shape, or one int for all.

        Returns:
            float32 midpoints ``-1 + (2 * prefix + 1) / count``, ``count`` = the dim's intervals after ``depth``
            levels (``K**depth`` on a uniform grid), computed as ``prefix * scale + offset`` in float64 (the same
            numbers for a tensor or an int depth, so acting and training agree bit for bit).
        """
        if isinstance(depth, int):
            return (prefix.to(torch.float64) * self.mid_scale[depth] + self.mid_offset[depth]).float()
        dims = torch.arange(self.action_dim, device=depth.device).expand_as(depth)
        return (prefix.to(torch.float64) * self.mid_scale[depth, dims] + self.mid_offset[depth, dims]).float()

    def conditioning(self, codes: Tensor, order: Tensor | None = None) -> Tensor:
        """Codes ``[..., L, D]`` -> conditioning vectors ``[..., N, D]`` in level-major order (§2.3).

        Row ``i = l * D + d`` holds, for every dim ``d'``, the unit-space midpoint of ``d'``'s interval once all
        positions decided before ``i`` are decided (teacher forcing: the prefix comes from ``codes``).

        Args:
            codes: ``[..., L, D]``.
            order: ``[D]`` long, the rank of each dim's group within a level (dims of one group are decided
                together); ``None`` is ``arange(D)``, ARSQ's one-dim-at-a-time order. All zeros is CQN's order:
                every dim of level ``l`` sees the midpoints after ``l`` levels of all dims.
        """
        prefixes = self.prefix(codes)  # [..., L + 1, D]
        depth = self.depth if order is None else decision_depth(self.levels, order.to(self.depth.device))
        depth = depth.reshape(self.num_positions, self.action_dim)  # [N, D]
        depth = depth.expand(*prefixes.shape[:-2], *depth.shape)
        return self.midpoint(torch.gather(prefixes, -2, depth), depth)

    def zoom_in(self, low: Tensor, high: Tensor, bin_index: Tensor, level: int = 0) -> tuple[Tensor, Tensor]:
        """One zoom-in step at ``level`` on unit-space intervals ``[..., D]`` (§2.1): pick bin ``bin_index``."""
        width = (high - low) / self.bins_table[level].to(low.dtype)
        new_low = low + bin_index.to(low.dtype) * width
        return new_low, new_low + width

    def extra_repr(self) -> str:
        grid = "" if self.uniform_grid else f", bins_table={self.bins_table.long().tolist()}"
        return f"levels={self.levels}, bins={self.bins}, action_dim={self.action_dim}{grid}"


class QuantileDiscretizer(CoarseToFineDiscretizer):
    """Coarse-to-fine grid whose cells follow the data: equal-mass bins per dimension (data-adaptive discretisation).

    The uniform grid of :class:`CoarseToFineDiscretizer` is laid in a warped unit space: ``to_unit`` is the
    per-dimension empirical CDF of the fitted actions (piecewise linear through ``knots`` quantiles, mixed with the
    uniform map by ``uniform_mix`` so every knot interval keeps some width), so each top-level bin holds about the same
    share of the data and finer levels split the dense regions more finely in env units. Encode / decode / zoom-in /
    conditioning are inherited unchanged (they work in unit space); only the env <-> unit map differs.
    Until :meth:`fit` is called the map is the uniform one.

    Args:
        low: lower action bound ``[D]``.
        high: upper action bound ``[D]``.
        levels: as :class:`CoarseToFineDiscretizer`.
        bins: as :class:`CoarseToFineDiscretizer`.
        knots: quantile intervals per dimension (the CDF is linear inside each).
        uniform_mix: weight of the uniform map in ``[0, 1]`` (0: pure quantiles; must be > 0 if the data has atoms).
    """

    def __init__(self, low: Sequence[float] | Tensor, high: Sequence[float] | Tensor, *,
                 levels: int | Sequence[int] = 3, bins: int | Sequence[int] = 5, knots: int = 64,
                 uniform_mix: float = 0.1):
        super().__init__(low, high, levels=levels, bins=bins)
        require(knots >= 1, f"knots must be >= 1, got {knots}")
        require(0.0 <= uniform_mix <= 1.0, f"uniform_mix must lie in [0, 1], got {uniform_mix}")
        self.uniform_mix = uniform_mix
        levels = torch.linspace(0.0, 1.0, knots + 1, dtype=torch.float64)
        self.register_buffer("edges", self._uniform_edges(levels))  # [D, knots + 1] env action at unit -1 + 2 j / knots
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def _uniform_edges(self, levels: Tensor) -> Tensor:
        """The uniform map's knots ``[D, knots + 1]``: ``low + level * (high - low)`` for ``levels`` in ``[0, 1]``."""
        return self.low.double().unsqueeze(-1) + levels * (self.high - self.low).double().unsqueeze(-1)

    def needs_fit(self) -> bool:
        return not bool(self.fitted)

    @torch.no_grad()
    def fit(self, actions: Tensor) -> None:
        """Set the map from env actions ``[n, D]``: knot ``j`` of dim ``d`` = the ``j / knots`` quantile (mixed)."""
        require(actions.dim() == 2 and actions.shape[-1] == self.action_dim and actions.shape[0] > 0,
                f"fit needs actions [n, {self.action_dim}], got {list(actions.shape)}")
        clipped = torch.minimum(torch.maximum(actions.double(), self.low.double()), self.high.double())
        levels = torch.linspace(0.0, 1.0, self.edges.shape[-1], dtype=torch.float64, device=clipped.device)
        quantiles = torch.quantile(clipped, levels, dim=0).T  # [D, knots + 1]
        quantiles[:, 0], quantiles[:, -1] = self.low.double(), self.high.double()
        edges = (1.0 - self.uniform_mix) * quantiles + self.uniform_mix * self._uniform_edges(levels)
        require(bool((edges.diff(dim=-1) > 0).all()), "the fitted action quantiles repeat (atoms in the data): "
                "raise discretizer uniform_mix above 0")
        self.edges.copy_(edges.to(self.edges.device))
        self.fitted.fill_(True)

    def to_unit(self, action: Tensor) -> Tensor:
        """Env-space action ``[..., D]`` -> warped ``[-1, 1]^D`` (the mixed empirical CDF, scaled)."""
        knots = self.edges.shape[-1] - 1
        x = action.to(torch.float64).reshape(-1, self.action_dim).T.contiguous()  # [D, n]
        j = (torch.searchsorted(self.edges, x, right=True) - 1).clamp(0, knots - 1)  # interval index
        lo, hi = self.edges.gather(-1, j), self.edges.gather(-1, j + 1)
        unit = -1.0 + 2.0 * (j + (x - lo) / (hi - lo)) / knots
        out_dtype = torch.promote_types(action.dtype, torch.float32) if action.is_floating_point() else torch.float32
        return unit.T.reshape(action.shape).to(out_dtype)

    def from_unit(self, unit: Tensor) -> Tensor:
        """Warped ``[-1, 1]^D`` -> env-space action ``[..., D]`` (the inverse map)."""
        knots = self.edges.shape[-1] - 1
        s = ((unit.to(torch.float64).reshape(-1, self.action_dim).T + 1.0) * 0.5 * knots).contiguous()  # [D, n]
        j = s.floor().clamp(0, knots - 1).long()
        lo, hi = self.edges.gather(-1, j), self.edges.gather(-1, j + 1)
        return (lo + (s - j) * (hi - lo)).T.reshape(unit.shape).to(unit.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, knots={self.edges.shape[-1] - 1}, fitted={bool(self.fitted)}"
