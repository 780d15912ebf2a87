"""CoarseToFineDiscretizer against docs/algorithm.md §2 (coarse-to-fine grid, encoding, level-major conditioning)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from arsq_lightning.discretizers import CoarseToFineDiscretizer
from arsq_lightning.errors import ConfigError
from arsq_lightning.tools.reference import position_inputs, unit_codes


def unit_disc(action_dim: int = 1, *, levels: int, bins: int) -> CoarseToFineDiscretizer:
    """A discretizer on the unit box ``[-1, 1]^D`` (env space == unit space)."""
    return CoarseToFineDiscretizer([-1.0] * action_dim, [1.0] * action_dim, levels=levels, bins=bins)


def digits(index: torch.Tensor, levels: int, bins: int) -> torch.Tensor:
    """Base-``bins`` digits of non-negative integers, most significant first: ``[..., D] -> [..., L, D]``."""
    out = []
    rest = index.clone()
    for _ in range(levels):
        out.append(rest % bins)
        rest = torch.div(rest, bins, rounding_mode="floor")
    return torch.stack(out[::-1], dim=-2)


def code_index(codes: torch.Tensor, bins: int) -> torch.Tensor:
    """Inverse of :func:`digits`: ``[..., L, D] -> [..., D]``."""
    index = torch.zeros_like(codes[..., 0, :])
    for lvl in range(codes.shape[-2]):
        index = index * bins + codes[..., lvl, :]
    return index


def random_codes(batch: int, levels: int, action_dim: int, bins: int) -> torch.Tensor:
    return torch.randint(0, bins, (batch, levels, action_dim))


# --- §2.2 / §2.3 worked examples --------------------------------------------------------------------------------------

def test_table_examples_of_section_2_2():
    """§2.2 table, (L, B) = (3, 5): 0.3 -> (3, 1, 1) -> 0.304 and 0.0 -> (2, 2, 2) -> 0.0."""
    disc = unit_disc(levels=3, bins=5)
    codes = disc.encode(torch.tensor([[0.3], [0.0]]))
    assert codes.squeeze(-1).tolist() == [[3, 1, 1], [2, 2, 2]]
    torch.testing.assert_close(disc.decode(codes), torch.tensor([[0.304], [0.0]]), atol=1e-6, rtol=0)


def test_worked_example_of_section_2_3():
    """§2.3: D=2, L=2, B=5, a=(0.3, -0.5): codes, decoded (0.32, -0.48) and the four conditioning vectors m_i."""
    disc = unit_disc(2, levels=2, bins=5)
    codes = disc.encode(torch.tensor([[0.3, -0.5]]))
    assert codes.tolist() == [[[3, 1], [1, 1]]]  # [B, L, D]: dim 0 -> (3, 1), dim 1 -> (1, 1)
    torch.testing.assert_close(disc.decode(codes), torch.tensor([[0.32, -0.48]]), atol=1e-6, rtol=0)
    expected_m = torch.tensor([[[0.0, 0.0], [0.4, 0.0], [0.4, -0.4], [0.32, -0.4]]])
    torch.testing.assert_close(disc.conditioning(codes), expected_m, atol=1e-6, rtol=0)
    # the bins chosen at positions i = l * D + d, in level-major order
    assert codes.flatten(-2).tolist() == [[3, 1, 1, 1]]


def test_num_positions_is_levels_times_dims():
    assert CoarseToFineDiscretizer([0.0] * 3, [1.0] * 3, levels=2, bins=7).num_positions == 6


# --- round trip (property-based) --------------------------------------------------------------------------------------

@st.composite
def discretizer_setups(draw):
    levels = draw(st.integers(1, 4))
    bins = draw(st.integers(2, 9))
    action_dim = draw(st.integers(1, 4))
    low = draw(st.lists(st.floats(-10.0, 10.0, allow_nan=False), min_size=action_dim, max_size=action_dim))
    width = draw(st.lists(st.floats(0.05, 20.0, allow_nan=False), min_size=action_dim, max_size=action_dim))
    seed = draw(st.integers(0, 2**31 - 1))
    return levels, bins, low, [lo + w for lo, w in zip(low, width)], seed


@settings(max_examples=60, deadline=None)
@given(discretizer_setups())
@example((3, 5, [0.0], [3.0], 0))  # asymmetric bounds [0, 3]
@example((4, 9, [-1.0, 0.0, -10.0, 2.0], [1.0, 3.0, 10.0, 2.5], 1))
def test_round_trip_error_is_at_most_half_a_grid_step(setup):
    """§2.1/§2.2: decode(encode(a)) is within half the grid spacing, (high - low) / 2 / B^L, of any a in bounds."""
    levels, bins, low, high, seed = setup
    disc = CoarseToFineDiscretizer(low, high, levels=levels, bins=bins)
    gen = torch.Generator().manual_seed(seed)
    low_t, high_t = disc.low, disc.high
    action = low_t + torch.rand(64, disc.action_dim, generator=gen) * (high_t - low_t)
    action = torch.cat([action, low_t[None], high_t[None]])  # include both edges
    codes = disc.encode(action)
    assert codes.shape == (66, levels, disc.action_dim) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() <= bins - 1
    decoded = disc.decode(codes)
    half_step = (high_t - low_t) / 2 / bins**levels
    slack = 1e-5 * (high_t.abs() + low_t.abs() + 1)  # float32 rounding of decode/from_unit
    assert bool(((decoded - action).abs() <= half_step + slack).all())
    # decoded actions stay strictly inside the bounds
    assert bool((decoded > low_t).all() and (decoded < high_t).all())


@settings(max_examples=40, deadline=None)
@given(discretizer_setups())
def test_decode_is_on_grid_and_reencodes_to_same_codes(setup):
    """§2.1: executable values are -1 + (2j+1)/B^L in unit space; a decoded action re-encodes exactly (idempotence)."""
    levels, bins, low, high, seed = setup
    disc = CoarseToFineDiscretizer(low, high, levels=levels, bins=bins)
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, bins, (32, levels, disc.action_dim), generator=gen)
    decoded = disc.decode(codes)
    j = code_index(codes, bins).double()
    on_grid = -1.0 + (2.0 * j + 1.0) / bins**levels
    torch.testing.assert_close(disc.to_unit(decoded.double()), on_grid, atol=2e-5, rtol=0)
    assert torch.equal(disc.encode(decoded), codes)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(2, 9), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_codes_are_base_b_digits_of_the_unit_position(levels, bins, action_dim, seed):
    """§2.2: the codes are the base-B expansion of floor((u + 1) / 2 * B^L), most significant level first."""
    disc = unit_disc(action_dim, levels=levels, bins=bins)
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(64, action_dim, generator=gen, dtype=torch.float64) * 2 - 1
    index = torch.floor((u + 1) / 2 * bins**levels).long()
    assert torch.equal(disc.encode(u), digits(index, levels, bins))
    # and the explicit zoom-in of the reference agrees
    assert torch.equal(disc.encode(u), unit_codes(disc, u))


# --- edges, clipping, boundaries --------------------------------------------------------------------------------------

@pytest.mark.parametrize("levels,bins", [(1, 41), (2, 7), (3, 5), (4, 2)])
@pytest.mark.parametrize("bounds", [([-1.0, -1.0], [1.0, 1.0]), ([0.0, -2.0], [3.0, 0.5])])
def test_edges_map_to_edge_bins(levels, bins, bounds):
    """§2.2: a = high -> all codes B-1, decoding to 1 - 1/B^L in unit space; a = low -> all zeros."""
    low, high = bounds
    disc = CoarseToFineDiscretizer(low, high, levels=levels, bins=bins)
    top = disc.encode(disc.high[None])
    assert bool((top == bins - 1).all())
    top_unit = disc.to_unit(disc.decode(top).double())
    torch.testing.assert_close(top_unit, torch.full_like(top_unit, 1 - 1 / bins**levels), atol=1e-5, rtol=0)
    bottom = disc.encode(disc.low[None])
    assert bool((bottom == 0).all())
    bottom_unit = disc.to_unit(disc.decode(bottom).double())
    torch.testing.assert_close(bottom_unit, torch.full_like(bottom_unit, -1 + 1 / bins**levels), atol=1e-5, rtol=0)


def test_out_of_bounds_values_are_clipped_to_edge_bins():
    """§2.2: the clip sends values beyond the bounds to the edge bins (and the decode inside the bounds)."""
    disc = CoarseToFineDiscretizer([0.0, -2.0], [3.0, 0.5], levels=2, bins=5)
    action = torch.tensor([[3.5, 100.0], [-0.1, -1e6], [1e9, -2.0001]])
    codes = disc.encode(action)
    assert codes[0].tolist() == [[4, 4], [4, 4]]
    assert codes[1].tolist() == [[0, 0], [0, 0]]
    assert codes[2].tolist() == [[4, 0], [4, 0]]
    torch.testing.assert_close(disc.decode(codes[:1]), disc.decode(disc.encode(disc.high[None])))


def test_bin_boundary_goes_to_upper_bin_example():
    """§2.2: unit -0.6 = -1 + 2*1/5 is the boundary between bins 0 and 1 at level 0 (B=5): it goes to bin 1."""
    disc = unit_disc(levels=1, bins=5)
    boundary = torch.tensor([[-1.0 + 2.0 * 1 / 5]])  # float32, as a tensor of the pipeline would hold it
    assert disc.encode(boundary).item() == 1
    # the boundary as zoom_in computes it, in float32
    lo, _ = disc.zoom_in(torch.tensor([-1.0]), torch.tensor([1.0]), torch.tensor([1]))
    assert disc.encode(lo[None]).item() == 1


@pytest.mark.parametrize("levels,bins", [(1, 5), (2, 5), (3, 5), (2, 7), (4, 3), (1, 41)])
@pytest.mark.parametrize("bounds", [(-1.0, 1.0), (0.0, 3.0)])
def test_every_bin_boundary_goes_to_upper_bin(levels, bins, bounds):
    """§2.2: each boundary -1 + 2j/B^L of the finest grid (which includes every coarser boundary) encodes to cell j."""
    low, high = bounds
    disc = CoarseToFineDiscretizer([low], [high], levels=levels, bins=bins)
    j = torch.arange(1, bins**levels, dtype=torch.long)
    unit = -1.0 + 2.0 * j.double() / bins**levels
    action = (low + (unit + 1) / 2 * (high - low)).unsqueeze(-1)  # float64 env-space boundaries
    assert torch.equal(disc.encode(action), digits(j.unsqueeze(-1), levels, bins))
    # The same boundaries rounded to float32 (slightly below or above the exact value) still go to the upper cell.
    assert torch.equal(disc.encode(action.float()), digits(j.unsqueeze(-1), levels, bins))


# --- shapes -----------------------------------------------------------------------------------------------------------

def test_shapes_with_extra_leading_dims():
    """encode ``[..., D] -> [..., L, D]``, decode back to ``[..., D]``, conditioning ``[..., N, D]``."""
    disc = CoarseToFineDiscretizer([-1.0, 0.0, -3.0], [1.0, 3.0, 2.0], levels=2, bins=4)
    action = disc.from_unit(torch.rand(5, 2, 3, 3) * 2 - 1)
    codes = disc.encode(action)
    assert codes.shape == (5, 2, 3, 2, 3)
    assert disc.decode(codes).shape == (5, 2, 3, 3)
    assert disc.conditioning(codes).shape == (5, 2, 3, 6, 3)
    # leading dims are pure batch dims: same result as the flattened batch
    flat = disc.encode(action.reshape(-1, 3))
    assert torch.equal(codes.reshape(-1, 2, 3), flat)
    torch.testing.assert_close(disc.conditioning(codes).reshape(-1, 6, 3), disc.conditioning(flat))
    assert disc.encode(action[0, 0, 0]).shape == (2, 3)  # a single unbatched action


# --- conditioning and zoom-in -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("levels,bins,action_dim", [(1, 41, 3), (2, 5, 2), (3, 3, 3), (4, 2, 1), (2, 7, 4)])
def test_conditioning_matches_explicit_zoom_in(levels, bins, action_dim):
    """§2.3: m_i (level-major i = l*D + d) equals the interval midpoints after every earlier position, by zoom-in."""
    disc = CoarseToFineDiscretizer([-2.0] * action_dim, [5.0] * action_dim, levels=levels, bins=bins)
    codes = random_codes(16, levels, action_dim, bins)
    expected = torch.stack(position_inputs(disc, codes), dim=1)  # [B, N, D]
    got = disc.conditioning(codes)
    assert got.shape == (16, levels * action_dim, action_dim)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert bool((got[:, 0] == 0).all())  # m_0 = 0


@pytest.mark.parametrize("levels,bins,action_dim", [(1, 9, 2), (3, 5, 2), (4, 3, 3)])
def test_zoom_in_level_by_level_ends_at_decode(levels, bins, action_dim):
    """§2.1: zooming in with the codes from [-1, 1] ends on an interval of width 2/B^L whose midpoint is decode."""
    disc = unit_disc(action_dim, levels=levels, bins=bins)
    codes = random_codes(32, levels, action_dim, bins)
    lo = torch.full((32, action_dim), -1.0, dtype=torch.float64)
    hi = torch.ones_like(lo)
    for lvl in range(levels):
        lo, hi = disc.zoom_in(lo, hi, codes[:, lvl])
        assert bool((lo >= -1 - 1e-12).all() and (hi <= 1 + 1e-12).all())
    torch.testing.assert_close(hi - lo, torch.full_like(lo, 2 / bins**levels))
    torch.testing.assert_close(((lo + hi) / 2).float(), disc.decode(codes), atol=1e-6, rtol=0)


def test_zoom_in_single_step():
    """§2.1: picking bin k of [lo, hi] gives [lo + k w, lo + (k+1) w] with w = (hi - lo)/B."""
    disc = unit_disc(levels=1, bins=4)
    lo, hi = disc.zoom_in(torch.tensor([-1.0, 0.0]), torch.tensor([1.0, 0.5]), torch.tensor([3, 1]))
    torch.testing.assert_close(lo, torch.tensor([0.5, 0.125]))
    torch.testing.assert_close(hi, torch.tensor([1.0, 0.25]))


def test_env_space_affine_maps_are_inverse():
    disc = CoarseToFineDiscretizer([0.0, -2.0], [3.0, 0.5], levels=2, bins=5)
    action = torch.tensor([[0.0, -2.0], [3.0, 0.5], [1.5, -0.75]])
    unit = disc.to_unit(action)
    torch.testing.assert_close(unit, torch.tensor([[-1.0, -1.0], [1.0, 1.0], [0.0, 0.0]]))
    torch.testing.assert_close(disc.from_unit(unit), action)


# --- bad configuration ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("low,high,kwargs", [
    ([-1.0], [1.0], {"levels": 0}),
    ([-1.0], [1.0], {"levels": -2}),
    ([-1.0], [1.0], {"bins": 1}),
    ([-1.0], [1.0], {"bins": 0}),
    ([1.0], [1.0], {}),
    ([-1.0, 2.0], [1.0, 1.0], {}),
    ([-math.inf], [1.0], {}),
    ([-1.0], [math.inf], {}),
    ([math.nan], [1.0], {}),
    ([-1.0, -1.0], [1.0], {}),
    ([], [], {}),
])
def test_bad_configuration_raises_config_error(low, high, kwargs):
    with pytest.raises(ConfigError):
        CoarseToFineDiscretizer(low, high, **kwargs)


def test_all_code_combinations_decode_to_distinct_grid_points():
    """§2.1: the B^L codes of a dimension map one-to-one onto the grid."""
    disc = unit_disc(levels=2, bins=3)
    codes = torch.tensor(list(itertools.product(range(3), repeat=2))).unsqueeze(-1)  # [9, L, 1]
    decoded = disc.decode(codes).squeeze(-1)
    expected = -1 + (2 * torch.arange(9, dtype=torch.float32) + 1) / 9
    torch.testing.assert_close(decoded, expected)
