"""Per-dimension grids in the critics: bins that a dim does not have are never scored, chosen or penalised."""

from __future__ import annotations

import itertools

import torch
from tensordict import TensorDict

from arsq_lightning import ARSQCritic, ARSQLoss, AutoregressiveHead, CoarseToFineDiscretizer, CQNCritic, CQNHead
from arsq_lightning.nets.encoders import FlattenEncoder

OBS = 4


def grid() -> CoarseToFineDiscretizer:
    return CoarseToFineDiscretizer([-1.0, 0.0], [1.0, 2.0], levels=[2, 1], bins=[2, 3])  # K = 3, L = 2


def valid_joint_codes(disc) -> torch.Tensor:
    ranges = [range(int(b)) for b in disc.bins_table.flatten().tolist()]  # level-major positions
    return torch.tensor(list(itertools.product(*ranges))).view(-1, disc.levels, disc.action_dim)


def test_arsq_policy_puts_all_mass_on_existing_bins():
    """alpha * logsumexp of Q over the grid's *valid* joint actions is V: no probability is left on missing bins."""
    torch.manual_seed(0)
    disc = grid()
    head = AutoregressiveHead(OBS, 2, disc.levels, disc.bins, hidden_dims=(16,), out_gain=1.0)
    critic = ARSQCritic(FlattenEncoder(OBS), disc, head, soft_alpha=0.5)
    codes = valid_joint_codes(disc)
    assert codes.shape[0] == 2 * 2 * 3  # dim 0: 2 x 2 bins, dim 1: 3 bins
    obs = torch.randn(1, OBS)
    q, adv, _ = critic.evaluate(obs.expand(codes.shape[0], -1), disc.decode(codes))
    value = head.value(obs)[:, 0].detach()
    torch.testing.assert_close(0.5 * torch.logsumexp(q.detach() / 0.5, dim=1), value, atol=1e-5, rtol=1e-5)
    assert bool(torch.isinf(adv[..., ~disc.bin_mask]).all())
    samples = critic.act(obs.expand(2000, -1), deterministic=False, generator=torch.Generator().manual_seed(1))
    assert torch.equal(disc.decode(disc.encode(samples)), samples)


def test_arsq_conservative_term_ignores_missing_bins():
    """A margin penalty on a per-dim grid equals the one computed with the missing bins' advantages removed."""
    torch.manual_seed(0)
    disc = grid()
    head = AutoregressiveHead(OBS, 2, disc.levels, disc.bins, hidden_dims=(16,), out_gain=1.0)
    critic = ARSQCritic(FlattenEncoder(OBS), disc, head, soft_alpha=0.5)
    action = disc.decode(valid_joint_codes(disc))
    batch = TensorDict({"observation": torch.randn(12, OBS), "action": action, "demo": torch.ones(12, dtype=torch.bool),
                        "next": {"observation": torch.randn(12, OBS), "reward": torch.zeros(12, 1),
                                 "terminated": torch.zeros(12, 1, dtype=torch.bool)}}, batch_size=[12])
    loss = ARSQLoss(conservative="margin", conservative_weight=1.0, clip_min=-10.0)
    got = loss(critic, batch)["loss_conservative"]
    _, adv, codes = critic.evaluate(batch["observation"], action)
    expected = torch.zeros(())
    for position in range(disc.num_positions):
        valid = disc.bin_mask[position]
        if int(valid.sum()) < 2:
            continue  # a finished dim has no other bin
        a = adv[:, :, position][..., valid]  # [C, B, valid]
        data = a.gather(-1, codes[:, position].view(1, -1, 1).expand(2, -1, 1))
        expected = expected + ((a - data).clamp(-10.0, 1e7).sum(-1) / (int(valid.sum()) - 1)).mean(-1).sum()
    torch.testing.assert_close(got, expected.detach(), atol=1e-5, rtol=1e-5)


def test_cqn_ties_pick_uniformly_among_existing_bins():
    disc = grid()
    head = CQNHead(OBS, 2, disc.levels, disc.bins, atoms=5, v_min=-1.0, v_max=1.0, trunk_dim=8, hidden_dims=(16,))
    critic = CQNCritic(FlattenEncoder(OBS), disc, head)  # zero-initialised heads: every bin ties
    codes = critic.greedy_codes(torch.randn(3000, OBS), generator=torch.Generator().manual_seed(0))
    for lvl, d in itertools.product(range(disc.levels), range(2)):
        bins = int(disc.bins_table[lvl, d])
        share = torch.bincount(codes[:, lvl, d], minlength=3).float() / 3000
        assert float(share[bins:].sum()) == 0.0
        assert float((share[:bins] - 1 / bins).abs().max()) < 0.04
