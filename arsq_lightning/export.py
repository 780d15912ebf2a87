"""``arsq export``: a checkpoint's deterministic policy as a self-contained ``torch.export`` program.

The program holds the encoder, the critic networks and the whole decode (ARSQ's position-by-position loop or CQN's
coarse-to-fine argmax), so it runs without this package: ``torch.export.load(path).module()(obs)`` maps observations
``[B, obs_dim]`` (any ``B``) to env-space actions ``[B, action_dim]``, the actions evaluation takes. One exception:
where all of a CQN level's bins tie exactly, the module picks a random bin (as the official CQN) and the program the
first one.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from torch import Tensor, nn

from arsq_lightning.algos.arsq.critic import ARSQCritic
from arsq_lightning.algos.base import Critic
from arsq_lightning.checkpoint_io import check_checkpoint
from arsq_lightning.errors import ConfigError
from arsq_lightning.module import ARSQModule
from arsq_lightning.nets.augment import augmentation_disabled


class GreedyPolicy(nn.Module):
    """``observation [B, obs_dim] -> action [B, D]``: the critic's deterministic action (a copy of the critic)."""

    def __init__(self, critic: Critic):
        super().__init__()
        self.critic = copy.deepcopy(critic).eval()
        if isinstance(self.critic, ARSQCritic):
            self.critic.compile_act = False  # torch.export traces the eager loop; torch.compile has no place in it

    def forward(self, observation: Tensor) -> Tensor:
        with augmentation_disabled(self.critic):
            return self.critic.act(observation, deterministic=True)


def export_policy(critic: Critic, obs_dim: int) -> torch.export.ExportedProgram:
    """Trace the greedy policy for a batch of any size."""
    example = torch.zeros(2, obs_dim, device=critic.discretizer.low.device)
    with torch.no_grad():
        return torch.export.export(GreedyPolicy(critic), (example,),
                                   dynamic_shapes={"observation": {0: torch.export.Dim("batch", min=1)}})


def export_checkpoint(ckpt_path: str, out: str) -> str:
    """Write the policy of ``ckpt_path`` to ``out``; returns a one-line summary."""
    check_checkpoint(ckpt_path)
    module = ARSQModule.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=False)
    spec = module.hparams.env_spec
    if spec.observation_shapes is not None:
        raise ConfigError(f"--ckpt_path {ckpt_path}: export supports flat vector observations; this policy reads "
                          f"{sorted(spec.observation_shapes)}")
    program = export_policy(module.critic, spec.obs_dim)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, out)
    return (f"exported the greedy policy of {ckpt_path} ({type(module.critic).__name__}, observations [B, "
            f"{spec.obs_dim}] -> actions [B, {spec.action_dim}]) to {out}; "
            "load it with torch.export.load(path).module()")


def export_main(args: list[str]) -> None:
    """``arsq export --ckpt_path CKPT --out policy.pt2``."""
    parser = argparse.ArgumentParser(prog="arsq export", description="Write a checkpoint's deterministic policy as a "
                                     "self-contained torch.export program (observations in, env-space actions out).")
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint written by arsq fit")
    parser.add_argument("--out", default="policy.pt2", help="the program's file (default: policy.pt2)")
    options = parser.parse_args(args)
    print(export_checkpoint(options.ckpt_path, options.out))
