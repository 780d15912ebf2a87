"""Observation encoders: ``obs [B, obs_dim] -> features [B, out_dim]``.

The D4RL networks of ALGORITHM.md §3.2 feed the raw state to every MLP, which is :class:`FlattenEncoder`.
:class:`MLPEncoder` adds a shared learned trunk in front of the critics. Encoders are built by the module as
``encoder(obs_dim)``, so a config only gives their own options. The online encoder also encodes next states (under
no-grad); it has no target copy (§3.3 step 7).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from arsq_lightning.layers import activation_module


class FlattenEncoder(nn.Module):
    """Pass the state through unchanged (flattening any trailing dims): ``[B, *obs_shape] -> [B, obs_dim]``.

    Args:
        obs_dim: size of the flattened observation.
    """

    def __init__(self, obs_dim: int):
        super().__init__()
        self.out_dim = obs_dim

    def forward(self, obs: Tensor) -> Tensor:
        return obs.flatten(1) if obs.dim() > 2 else obs


class MLPEncoder(nn.Module):
    """A shared MLP trunk: ``[B, obs_dim] -> [B, hidden_dims[-1]]``, optionally with LayerNorm before each activation.

    Args:
        obs_dim: observation size.

    Keyword Args:
        hidden_dims: layer widths.
        activation: ``tanh``, ``relu``, ``silu`` or ``elu``.
        layer_norm: add LayerNorm after each linear layer.
    """

    def __init__(self, obs_dim: int, *, hidden_dims: Sequence[int] = (256,), activation: str = "tanh",
                 layer_norm: bool = True):
        super().__init__()
        layers: list[nn.Module] = []
        for width_in, width_out in zip([obs_dim, *hidden_dims[:-1]], hidden_dims):
            layers += [nn.Linear(width_in, width_out)]
            layers += [nn.LayerNorm(width_out)] if layer_norm else []
            layers += [activation_module(activation)]
        self.net = nn.Sequential(*layers)
        self.out_dim = hidden_dims[-1]

    def forward(self, obs: Tensor) -> Tensor:
        return self.net(obs.flatten(1))
