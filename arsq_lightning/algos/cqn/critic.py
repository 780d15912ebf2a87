"""The CQN baseline's critic: encoder + discretizer + :class:`~arsq_lightning.algos.cqn.head.CQNHead` + target copy
(docs/algorithm.md §6.3, §6.4).

Acting goes level by level: expected Q per (dim, bin), an independent argmax per dim (a uniformly random bin where
the Q values of a dim are within ``tie_tolerance`` of each other, e.g. right after the zero init), then every dim zooms
in. Exploration adds Gaussian noise to the greedy action in unit space and re-quantises it onto the grid.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from arsq_lightning.algos.base import Critic
from arsq_lightning.algos.cqn.head import CQNHead
from arsq_lightning.discretizers import Discretizer, gaussian_exploration
from arsq_lightning.errors import require


def at_bins(values: Tensor, codes: Tensor) -> Tensor:
    """Each (level, dim)'s atoms at its bin: ``[B, L, D, K, A], [B, L, D] -> [B, L, D, A]``."""
    index = codes[..., None, None].expand(*codes.shape, 1, values.shape[-1])
    return values.gather(-2, index).squeeze(-2)


class CQNCritic(Critic):
    """Coarse-to-fine Q-network with a target copy of the head (the encoder has none, §6.4).

    Args:
        encoder: ``obs [B, ...] -> features [B, F]``.
        discretizer: the action grid.
        head: a :class:`CQNHead`.
        act_network: ``online`` (official D4RL port, DMC) or ``target`` (official RLBench) networks select actions.
        exploration_std: std of the Gaussian noise added in unit space when exploring (D4RL 0.1, RLBench 0.01).
        tie_tolerance: a dim whose ``max_b Q - min_b Q`` is below this picks a uniformly random bin (official 1e-4).
    """

    def __init__(self, encoder: nn.Module, discretizer: Discretizer, head: nn.Module, *,
                 act_network: Literal["online", "target"] = "online", exploration_std: float = 0.1,
                 tie_tolerance: float = 1e-4):
        require(isinstance(head, CQNHead), f"the CQN critic needs model.head CQNHead, got {type(head).__name__}")
        require(act_network in ("online", "target"), f"act_network must be 'online' or 'target', got {act_network!r}")
        require(exploration_std >= 0, f"exploration_std must be >= 0, got {exploration_std}")
        super().__init__(encoder, discretizer, head)
        self.act_network, self.exploration_std, self.tie_tolerance = act_network, exploration_std, tie_tolerance

    def default_loss(self):
        """CQN's loss with its default weights (:class:`~arsq_lightning.algos.cqn.loss.CQNLoss`)."""
        from arsq_lightning.algos.cqn.loss import CQNLoss  # the loss module imports this one

        return CQNLoss()

    def level_conditioning(self, codes: Tensor) -> Tensor:
        """Codes ``[B, L, D]`` -> midpoints of every dim before each level, ``[B, L, D]`` (zeros at level 0)."""
        prefixes = self.discretizer.prefix(codes)[..., :-1, :]  # [B, L, D]: interval index after l levels
        depth = torch.arange(self.discretizer.levels, device=codes.device).view(-1, 1).expand_as(prefixes[0])
        return self.discretizer.midpoint(prefixes, depth.expand_as(prefixes))

    def logits(self, features: Tensor, codes: Tensor, *, target: bool = False) -> Tensor:
        """Atom logits of every (level, dim, bin) along the path of ``codes`` ``[B, L, D]``: ``[B, L, D, K, A]``."""
        head = self.target_head if target else self.head
        return head.all_logits(features, self.level_conditioning(codes)).float()  # fp32 under bf16 autocast too

    def evaluate(self, obs: Tensor, action: Tensor) -> tuple[Tensor, Tensor]:
        """Atom logits of every (level, dim, bin) along the path of the data action ``[B, L, D, K, A]``, and the
        action's codes ``[B, L, D]``."""
        codes = self.discretizer.encode(action)
        return self.logits(self.encoder(obs), codes), codes

    @torch.no_grad()
    def target_logits(self, obs: Tensor) -> Tensor:
        """Double Q-learning's next-state distribution per (level, dim) ``[B, L, D, A]``: the target head's atom
        logits at the bins the online networks choose greedily (§6.4)."""
        features = self.encoder(obs)
        best = self.greedy_codes(features)
        return at_bins(self.logits(features, best, target=True), best)

    def greedy_codes(self, features: Tensor, *, target: bool = False,
                     generator: torch.Generator | None = None) -> Tensor:
        """The greedy action's codes ``[B, L, D]``, level by level with random tie-breaking (§6.3)."""
        disc, head = self.discretizer, self.target_head if target else self.head
        batch = features.shape[0]
        prefix = torch.zeros(batch, disc.action_dim, dtype=torch.float64, device=features.device)
        codes = []
        valid = disc.bin_mask.view(disc.levels, disc.action_dim, disc.bins)
        for lvl in range(disc.levels):
            q = head.expected_q(head.level_logits(features, disc.midpoint(prefix, lvl), lvl).float())  # [B, D, K]
            best = q.masked_fill(~valid[lvl], float("-inf"))  # missing bins never win
            spread = best.amax(-1) - q.masked_fill(~valid[lvl], float("inf")).amin(-1)
            choice = best.argmax(-1)
            tied = spread < self.tie_tolerance
            # a uniformly random valid bin; an exported policy (torch.export, no data-dependent branch) keeps argmax;
            # compiled code (compile_update) draws without asking first, which would be a host sync
            if not torch.compiler.is_exporting() and (torch.compiler.is_compiling() or bool(tied.any())):
                uniform = torch.rand(choice.shape, device=q.device, generator=generator)
                choice = torch.where(tied, (uniform * disc.bins_table[lvl]).long(), choice)
            codes.append(choice)
            prefix = prefix * disc.bins_table[lvl] + choice
        return torch.stack(codes, dim=-2)

    @torch.no_grad()
    def act(self, obs: Tensor, *, deterministic: bool, generator: torch.Generator | None = None) -> Tensor:
        """Env-space actions ``[B, D]``: the greedy grid action, plus re-quantised Gaussian noise when exploring."""
        disc = self.discretizer
        codes = self.greedy_codes(self.encoder(obs), target=self.act_network == "target", generator=generator)
        action = disc.decode(codes)
        if deterministic or self.exploration_std == 0:
            return action
        return gaussian_exploration(disc, action, self.exploration_std, generator)
