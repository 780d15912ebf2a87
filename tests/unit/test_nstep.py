"""n-step transitions against a per-row Python reference, and the losses' use of their discount."""

import pytest
import torch
from tensordict import TensorDict

from arsq_lightning.algos.base import bootstrap_discount, td_reward
from arsq_lightning.data.nstep import nstep_transitions
from arsq_lightning.keys import (
    NEXT_DONE,
    NEXT_OBSERVATION,
    NEXT_REWARD,
    NEXT_TERMINATED,
    NSTEP_REWARDS,
    STEPS_TO_NEXT,
)


def _rows(episode_lengths, terminal_last):
    """One-step rows of consecutive episodes; an episode ends terminated or truncated (done either way)."""
    parts = []
    for e, (length, terminal) in enumerate(zip(episode_lengths, terminal_last)):
        obs = torch.randn(length + 1, 3)
        done = torch.zeros(length, 1, dtype=torch.bool)
        done[-1] = True
        parts.append(TensorDict({
            "observation": obs[:-1], "episode": torch.full((length,), e),
            "next": {"observation": obs[1:], "reward": torch.randn(length, 1), "done": done,
                     "terminated": done & terminal, "truncated": done & (not terminal)}}, [length]))
    return torch.cat(parts)


def _reference(rows, n, gamma, use_ids):
    """Per row: walk forward up to n steps, stop after an episode's last step (or where the id changes)."""
    out = []
    for t in range(rows.numel()):
        total, k = 0.0, 0
        while True:
            i = t + k
            total += gamma ** k * float(rows[NEXT_REWARD][i])
            k += 1
            ended = bool(rows[NEXT_DONE][i]) or i + 1 == rows.numel()
            if use_ids and not ended:
                ended = int(rows["episode"][i + 1]) != int(rows["episode"][t])
            if k == n or ended:
                break
        out.append((total, k, rows[NEXT_OBSERVATION][t + k - 1], bool(rows[NEXT_TERMINATED][t + k - 1])))
    return out


@pytest.mark.parametrize("n", [1, 2, 3, 7])
@pytest.mark.parametrize("use_ids", [False, True])
def test_nstep_matches_per_row_reference(n, use_ids):
    torch.manual_seed(n)
    rows = _rows([5, 1, 8, 3], [True, False, False, True])
    if use_ids:  # episodes told apart by their ids alone: a dataset whose time-out rows were dropped
        rows[NEXT_DONE] = torch.zeros_like(rows[NEXT_DONE])
        rows[NEXT_TERMINATED] = torch.zeros_like(rows[NEXT_TERMINATED])
        rows[("next", "truncated")] = torch.zeros_like(rows[NEXT_TERMINATED])
    out = nstep_transitions(rows, n, episode=rows["episode"] if use_ids else None)
    returns = td_reward(out, 0.9, torch.float32)
    discounts = bootstrap_discount(out, 0.9, torch.float32)
    assert out[NSTEP_REWARDS].shape == (rows.numel(), n)
    for t, (total, k, next_obs, terminated) in enumerate(_reference(rows, n, 0.9, use_ids)):
        assert float(returns[t]) == pytest.approx(total, rel=1e-5, abs=1e-6)
        assert float(discounts[t]) == pytest.approx(0.0 if terminated else 0.9 ** k, rel=1e-6)
        assert int(out[STEPS_TO_NEXT][t]) == k
        assert torch.equal(out[NEXT_OBSERVATION][t], next_obs)
        assert bool(out[NEXT_TERMINATED][t]) == terminated
    assert torch.equal(out["observation"], rows["observation"])  # the row's own step is kept
    assert torch.equal(out[NEXT_REWARD], rows[NEXT_REWARD])


def test_one_step_rows_keep_the_one_step_target():
    ends = {"terminated": torch.tensor([[False], [True]]), "reward": torch.tensor([[2.0], [3.0]])}
    batch = TensorDict({"next": ends}, [2])
    assert torch.equal(td_reward(batch, 0.9, torch.float32), torch.tensor([2.0, 3.0]))
    assert torch.allclose(bootstrap_discount(batch, 0.9, torch.float32), torch.tensor([0.9, 0.0]))
