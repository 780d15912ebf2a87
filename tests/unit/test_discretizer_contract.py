"""The contract every discretizer meets (docs/algorithm.md §2): uniform, per-dimension and data-adaptive (quantile)
grids alike, plus what is special about each (per-dim grids = independent 1-D grids; quantile bins hold equal data
mass)."""

from __future__ import annotations

import itertools

import pytest
import torch

from arsq_lightning.discretizers import CoarseToFineDiscretizer, QuantileDiscretizer
from arsq_lightning.errors import ConfigError

LOW, HIGH = [-1.0, 0.0, -3.0], [1.0, 2.0, 1.0]


def skewed_actions(n: int = 4000, seed: int = 0) -> torch.Tensor:
    """Data crowded in one corner of the box ``[LOW, HIGH]``: Beta(2, 8)-shaped per dim."""
    torch.manual_seed(seed)
    unit = torch.distributions.Beta(2.0, 8.0).sample((n, 3))
    return torch.tensor(LOW) + unit * (torch.tensor(HIGH) - torch.tensor(LOW))


def uniform(levels: int, bins: int):
    return CoarseToFineDiscretizer(LOW, HIGH, levels=levels, bins=bins)


def quantile(levels: int, bins: int):
    disc = QuantileDiscretizer(LOW, HIGH, levels=levels, bins=bins, knots=32, uniform_mix=0.05)
    disc.fit(skewed_actions())
    return disc


def quantile_unfitted(levels: int, bins: int):
    return QuantileDiscretizer(LOW, HIGH, levels=levels, bins=bins)


def per_dim(levels: int, bins: int):
    """Each dim its own grid (``levels``, ``bins`` are ignored): 5 bins x 1 level, 2 x 3, 3 x 2."""
    return CoarseToFineDiscretizer(LOW, HIGH, levels=[1, 3, 2], bins=[5, 2, 3])


FACTORIES = [uniform, quantile, quantile_unfitted, per_dim]


def all_codes(disc) -> torch.Tensor:
    """Every code sequence of each dim, dim by dim in increasing order: ``[J, L, D]`` (dims padded by repeating)."""
    per_dim_codes = []
    for d in range(disc.action_dim):
        ranges = [range(int(b)) for b in disc.bins_table[:, d].tolist()]
        per_dim_codes.append(torch.tensor(list(itertools.product(*ranges))))  # [J_d, L]
    longest = max(c.shape[0] for c in per_dim_codes)
    padded = [torch.cat([c, c[-1:].expand(longest - c.shape[0], -1)]) for c in per_dim_codes]
    return torch.stack(padded, dim=-1)
SIZES = [(1, 5), (2, 3), (3, 2)]


def random_actions(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.tensor(LOW) + torch.rand(n, 3, generator=g) * (torch.tensor(HIGH) - torch.tensor(LOW))


@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("levels,bins", SIZES)
def test_every_code_decodes_inside_bounds_and_reencodes_to_itself(factory, levels, bins):
    """Codes -> action -> codes is the identity on every code combination of one dim (and all dims at once)."""
    disc = factory(levels, bins)
    codes = all_codes(disc)
    action = disc.decode(codes)
    assert action.shape == (codes.shape[0], 3)
    assert bool((action > torch.tensor(LOW)).all() and (action < torch.tensor(HIGH)).all())
    assert torch.equal(disc.encode(action), codes)
    for d in range(3):
        cells = int(disc.bins_table[:, d].prod())
        strictly = action[:cells, d].diff() > 0
        assert bool(strictly.all()), "decode is strictly increasing in the code's (mixed-radix) value"


@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("levels,bins", SIZES)
def test_encode_is_monotone_and_decode_stays_in_the_same_cell(factory, levels, bins):
    disc = factory(levels, bins)
    action = random_actions(500)
    codes = disc.encode(action)
    assert codes.dtype == torch.long and codes.shape == (500, disc.levels, 3)
    assert bool((codes >= 0).all() and (codes < disc.bins_table.long()).all())
    assert torch.equal(disc.encode(disc.decode(codes)), codes)
    index = (disc.prefix(codes)[:, -1]).long()  # finest cell per dim
    order = action.argsort(0)
    assert bool((index.gather(0, order).diff(dim=0) >= 0).all()), "larger actions never get smaller cells"


@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__)
def test_bounds_and_outside_values_map_to_edge_bins(factory):
    disc = factory(2, 5)
    edge = disc.encode(torch.tensor([LOW, HIGH, [-9.0, -9.0, -9.0], [9.0, 9.0, 9.0]]))
    top = disc.bins_table.long() - 1
    assert bool((edge[0] == 0).all() and (edge[2] == 0).all())
    assert torch.equal(edge[1], top) and torch.equal(edge[3], top)


@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("levels,bins", SIZES)
def test_zoom_in_in_unit_space_ends_at_decode(factory, levels, bins):
    """Zooming into ``[-1, 1]`` with each level's bin, then ``from_unit`` of the final midpoint, is ``decode``."""
    disc = factory(levels, bins)
    codes = disc.encode(random_actions(64, seed=3))
    low, high = torch.full((64, 3), -1.0, dtype=torch.float64), torch.ones(64, 3, dtype=torch.float64)
    for lvl in range(disc.levels):
        low, high = disc.zoom_in(low, high, codes[:, lvl], lvl)
    torch.testing.assert_close(disc.from_unit(((low + high) / 2).float()), disc.decode(codes), atol=1e-5, rtol=0)


@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__)
def test_unit_maps_are_inverse_and_monotone(factory):
    disc = factory(2, 3)
    action = random_actions(300, seed=5).double()
    unit = disc.to_unit(action)
    assert bool((unit >= -1).all() and (unit <= 1).all())
    torch.testing.assert_close(disc.from_unit(unit), action, atol=1e-9, rtol=0)
    order = action.argsort(0)
    assert bool((unit.gather(0, order).diff(dim=0) >= 0).all())


def test_quantile_bins_hold_equal_data_mass():
    """Without the uniform mix every top-level bin holds ~1/K of the fitted data; the uniform grid does not."""
    data = skewed_actions(6000, seed=1)
    disc = QuantileDiscretizer(LOW, HIGH, levels=2, bins=5, knots=50, uniform_mix=0.0)
    disc.fit(data)
    held_out = skewed_actions(6000, seed=2)
    for d in range(3):
        share = torch.bincount(disc.encode(held_out)[:, 0, d], minlength=5).float() / 6000
        assert float((share - 0.2).abs().max()) < 0.03
        uniform_share = torch.bincount(uniform(2, 5).encode(held_out)[:, 0, d], minlength=5).float() / 6000
        assert float(uniform_share.max()) > 0.5  # the skewed data piles into the first uniform bin


def test_quantile_grid_is_finer_where_the_data_is_dense():
    disc = quantile(2, 5)
    points = disc.decode(torch.tensor(list(itertools.product(range(5), repeat=2))).unsqueeze(-1).expand(-1, -1, 3))
    gaps = points[:, 0].diff()  # dim 0: data crowded near LOW
    assert float(gaps[:5].mean()) < 0.5 * float(gaps[-5:].mean())


def test_unfitted_quantile_grid_equals_the_uniform_grid():
    action = random_actions(200)
    torch.testing.assert_close(quantile_unfitted(3, 5).decode(uniform(3, 5).encode(action)),
                               uniform(3, 5).decode(uniform(3, 5).encode(action)), atol=1e-6, rtol=0)
    assert torch.equal(quantile_unfitted(3, 5).encode(action), uniform(3, 5).encode(action))


def test_fitted_map_is_saved_in_the_state_dict():
    fitted = quantile(2, 5)
    fresh = QuantileDiscretizer(LOW, HIGH, levels=2, bins=5, knots=32, uniform_mix=0.05)
    fresh.load_state_dict(fitted.state_dict())
    assert bool(fresh.fitted)
    action = random_actions(100)
    assert torch.equal(fresh.encode(action), fitted.encode(action))


def test_fitting_repeated_values_without_mix_fails_with_one_line():
    disc = QuantileDiscretizer(LOW, HIGH, levels=1, bins=3, uniform_mix=0.0)
    data = torch.zeros(100, 3)  # every action is the same point
    with pytest.raises(ConfigError, match="uniform_mix"):
        disc.fit(data)
    QuantileDiscretizer(LOW, HIGH, levels=1, bins=3, uniform_mix=0.1).fit(data)  # the mix keeps knots apart


def test_per_dim_grid_is_each_dims_own_uniform_grid():
    """Dim d of a per-dim grid encodes and decodes exactly like a 1-D grid with d's levels and bins; the levels it
    does not have hold code 0."""
    mixed = per_dim(0, 0)
    action = random_actions(400, seed=7)
    codes, decoded = mixed.encode(action), mixed.decode(mixed.encode(action))
    for d, (levels, bins) in enumerate([(1, 5), (3, 2), (2, 3)]):
        alone = CoarseToFineDiscretizer([LOW[d]], [HIGH[d]], levels=levels, bins=bins)
        own = alone.encode(action[:, d:d + 1])  # [B, levels, 1]
        assert torch.equal(codes[:, :levels, d], own[..., 0])
        assert bool((codes[:, levels:, d] == 0).all())
        torch.testing.assert_close(decoded[:, d], alone.decode(own)[:, 0], atol=1e-6, rtol=0)
    assert mixed.bin_mask.shape == (3 * 3, 5) and int(mixed.bin_mask.sum()) == (5 + 2 + 3) + (1 + 2 + 3) + (1 + 2 + 1)


def test_per_dim_lists_must_match_the_action_dims():
    with pytest.raises(ConfigError, match="one value per action dim"):
        CoarseToFineDiscretizer(LOW, HIGH, levels=[1, 2], bins=3)
    with pytest.raises(ConfigError, match="bins must be >= 2"):
        CoarseToFineDiscretizer(LOW, HIGH, levels=2, bins=[3, 1, 3])
