"""Observation encoders: ``obs [B, ...] -> features [B, out_dim]``.

The D4RL networks of docs/algorithm.md §3.2 feed the raw state to every MLP, which is :class:`FlattenEncoder`.
:class:`MLPEncoder` adds a shared learned trunk in front of the critics. Encoders are built by the module as
``encoder(env_spec.encoder_input)``: ``obs_dim`` for flat vector observations, the ``observation_shapes`` dict for
nested ones (pixel envs), so a config only gives their own options. The online encoder also encodes next states
(under no-grad); it has no target copy (§3.3 step 7).

Pixel encoders (:class:`MultiViewCNNEncoder`, :class:`DrQEncoder`) read the nested ``observation`` TensorDict, keep
images as uint8 until the first layer, and random-shift them in training mode (next observations too, as CQN and
DrQ-v2 do: the target sees a differently shifted copy, which regularises it the same way as the online side).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tensordict import TensorDictBase
from torch import Tensor, nn

from arsq_lightning.errors import require
from arsq_lightning.keys import PIXELS
from arsq_lightning.nets.augment import RandomShift
from arsq_lightning.nets.layers import activation_module


class Encoder(nn.Module):
    """An observation encoder: ``forward(obs [B, ...]) -> features [B, out_dim]``, built as ``encoder(encoder_input)``
    with ``obs_dim`` for flat observations or the ``observation_shapes`` dict for nested ones. Subclasses set
    ``out_dim``."""

    out_dim: int


class FlattenEncoder(Encoder):
    """Pass the state through unchanged (flattening any trailing dims): ``[B, *obs_shape] -> [B, obs_dim]``.

    Args:
        obs_dim: size of the flattened observation.
    """

    def __init__(self, obs_dim: int):
        super().__init__()
        self.out_dim = obs_dim

    def forward(self, obs: Tensor) -> Tensor:
        return obs.flatten(1) if obs.dim() > 2 else obs


class MLPEncoder(Encoder):
    """A shared MLP trunk: ``[B, obs_dim] -> [B, hidden_dims[-1]]``, optionally with LayerNorm before each activation.

    Args:
        obs_dim: observation size.
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


# --- pixel encoders (nested observations: ``pixels`` uint8 [V, C, H, W] + low-dimensional entries) -----------------


class ViewLayerNorm(nn.Module):
    """Channel-wise LayerNorm of every view's feature map: ``[B, V * C, H, W]``, normalised over ``C`` at each pixel,
    with its own affine parameters per view (CQN's ``channel LayerNorm``, one per camera stack, §6.1)."""

    def __init__(self, views: int, channels: int):
        super().__init__()
        self.views, self.channels = views, channels
        self.weight = nn.Parameter(torch.ones(views, 1, 1, channels))
        self.bias = nn.Parameter(torch.zeros(views, 1, 1, channels))

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        x = x.view(b, self.views, self.channels, h, w).permute(0, 1, 3, 4, 2)  # [B, V, H, W, C]
        x = F.layer_norm(x, (self.channels,)) * self.weight + self.bias
        return x.permute(0, 1, 4, 2, 3).reshape(b, self.views * self.channels, h, w)


def _view_norm(kind: str, views: int, channels: int) -> nn.Module:
    if kind == "channel_layer_norm":
        return ViewLayerNorm(views, channels)
    if kind == "group_norm":  # GroupNorm(1) per view = GroupNorm(V) over the stacked V * C channels
        return nn.GroupNorm(views, views * channels)
    require(kind == "none", f"unknown norm {kind!r}; choose channel_layer_norm, group_norm or none")
    return nn.Identity()


def _projection(in_dim: int, out_dim: int | None) -> tuple[nn.Module, int]:
    """``Linear(no bias) -> LayerNorm -> tanh`` to ``out_dim`` (§3.2 steps 1-2), or identity for ``None``."""
    if out_dim is None:
        return nn.Identity(), in_dim
    require(out_dim >= 1, f"projection size must be >= 1, got {out_dim}")
    linear = nn.Linear(in_dim, out_dim, bias=False)
    nn.init.orthogonal_(linear.weight)
    return nn.Sequential(linear, nn.LayerNorm(out_dim), nn.Tanh()), out_dim


class MultiViewCNNEncoder(Encoder):
    """One conv stack per camera view, fused with the low-dimensional entries (CQN's encoder, docs/algorithm.md §6.1).

    Input: the nested ``observation`` TensorDict ``[B]`` with ``pixels`` uint8 ``[B, V, C, H, W]`` (``C`` = 3 x frame
    stack) and any other entries (``proprio``, ``state``; flattened and concatenated in sorted key order). Output
    ``[B, out_dim]``:

    1. random shift of every (sample, view) image by up to ``augment_pad`` pixels in training
       (:mod:`arsq_lightning.nets.augment`), then ``pixels / 255 - 0.5``;
    2. per view: ``len(channels)`` x [Conv(kernel, stride, padding) -> norm -> activation] (one grouped convolution
       holds all views' separate weights); 84x84 with the defaults: 42 -> 21 -> 10 -> 5, 256 x 5 x 5 per view;
    3. the flattened views, optionally projected by ``Linear -> LayerNorm -> tanh`` to ``feature_dim``;
    4. the low-dimensional entries, optionally projected the same way to ``proprio_dim``; concatenated after (3).

    The projections of (3) and (4) are the ``FullyConnectedNetwork`` input layers of §3.2; here they are shared by all
    critics (the official code gives every V / advantage network its own copy) so the head sees ``feature_dim +
    proprio_dim`` features instead of ~25k.

    Args:
        observation_shapes: ``{"pixels": [V, C, H, W], ...}`` (what ``EnvSpec.encoder_input`` gives).
        channels: output channels of each conv layer (CQN: 32, 64, 128, 256).
        kernel_size: conv kernel size (conv geometry).
        strides: one stride per conv layer.
        padding: conv padding.
        norm: ``channel_layer_norm`` (CQN RLBench), ``group_norm`` (GroupNorm(1) per view, CQN DMC) or ``none``.
        activation: ``silu`` (CQN), ``relu``, ...
        augment_pad: random-shift padding (0: no augmentation).
        feature_dim: projection size of the image features (``None``: the raw flattened features).
        proprio_dim: projection size of the low-dimensional entries (``None``: the raw values).
        pixels_key: the image entry.
    """

    def __init__(self, observation_shapes: dict[str, list[int]] | int, *, channels: Sequence[int] = (32, 64, 128, 256),
                 kernel_size: int = 4, strides: Sequence[int] = (2, 2, 2, 2), padding: int = 1,
                 norm: str = "channel_layer_norm", activation: str = "silu", augment_pad: int = 4,
                 feature_dim: int | None = None, proprio_dim: int | None = None, pixels_key: str = PIXELS):
        super().__init__()
        require(isinstance(observation_shapes, dict) and pixels_key in observation_shapes,
                f"{type(self).__name__} needs a nested observation with a {pixels_key!r} entry (a pixel env), "
                f"got {observation_shapes!r}")
        require(len(channels) == len(strides) and len(channels) >= 1,
                f"channels ({list(channels)}) and strides ({list(strides)}) need one entry per conv layer")
        views, in_channels, height, width = observation_shapes[pixels_key]
        self.pixels_key, self.views = pixels_key, views
        self.low_dim_keys = sorted(k for k in observation_shapes if k != pixels_key)
        self.augment = RandomShift(augment_pad)
        layers: list[nn.Module] = []
        for c_in, c_out, stride in zip([in_channels, *channels[:-1]], channels, strides):
            conv = nn.Conv2d(views * c_in, views * c_out, kernel_size, stride, padding, groups=views)
            for block in conv.weight.data.chunk(views):  # each view's stack is initialised on its own (§3.2)
                nn.init.orthogonal_(block, gain=nn.init.calculate_gain("relu"))
            nn.init.zeros_(conv.bias)
            layers += [conv, _view_norm(norm, views, c_out), activation_module(activation)]
        self.convs = nn.Sequential(*layers)
        with torch.no_grad():
            conv_dim = self.convs(torch.zeros(1, views * in_channels, height, width)).numel()
        require(conv_dim > 0, f"images of {height}x{width} are too small for this conv stack")
        self.image_projection, image_dim = _projection(conv_dim, feature_dim)
        low_dim = sum(math.prod(observation_shapes[k]) for k in self.low_dim_keys)
        self.low_dim_projection, low_out = (_projection(low_dim, proprio_dim) if low_dim else (nn.Identity(), 0))
        self.conv_dim, self.out_dim = conv_dim, image_dim + low_out

    def forward(self, obs: TensorDictBase) -> Tensor:
        pixels = obs[self.pixels_key]
        b, v, c, h, w = pixels.shape
        images = self.augment(pixels.reshape(b * v, c, h, w)).float().mul_(1.0 / 255.0).sub_(0.5)
        features = self.image_projection(self.convs(images.view(b, v * c, h, w)).flatten(1))
        if not self.low_dim_keys:
            return features
        low = torch.cat([obs[k].reshape(b, -1).float() for k in self.low_dim_keys], dim=-1)
        return torch.cat([features, self.low_dim_projection(low)], dim=-1)


class DrQEncoder(MultiViewCNNEncoder):
    """The DrQ-v2-style convnet CQN uses on DMC pixels (§6.1, last paragraph): 4 x [Conv 3x3, 32 channels, strides
    2, 1, 1, 1, no padding -> GroupNorm(1) -> SiLU]; 84x84 input gives 32 x 35 x 35 features per view. Options as
    :class:`MultiViewCNNEncoder`."""

    def __init__(self, observation_shapes: dict[str, list[int]] | int, *, channels: Sequence[int] = (32, 32, 32, 32),
                 kernel_size: int = 3, strides: Sequence[int] = (2, 1, 1, 1), padding: int = 0,
                 norm: str = "group_norm", activation: str = "silu", augment_pad: int = 4,
                 feature_dim: int | None = None, proprio_dim: int | None = None, pixels_key: str = PIXELS):
        super().__init__(observation_shapes, channels=channels, kernel_size=kernel_size, strides=strides,
                         padding=padding, norm=norm, activation=activation, augment_pad=augment_pad,
                         feature_dim=feature_dim, proprio_dim=proprio_dim, pixels_key=pixels_key)
