"""Ensembles of independent MLPs evaluated with one batched matmul per layer.

ARSQ has two twin critics and, with ``qchunk < N``, several advantage MLPs per twin (docs/algorithm.md §3.2). Stacking
their weights as ``[E, in, out]`` and running ``torch.baddbmm`` evaluates all ``E`` members in one call, which is
what makes a training update and batch-1 acting fast. Initialisation follows the D4RL networks (§3.2): orthogonal
hidden weights with gain sqrt(2), zero biases.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from arsq_lightning.errors import require

ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "silu": nn.SiLU, "elu": nn.ELU}


def activation_module(name: str) -> nn.Module:
    """A fresh activation module by name (one of :data:`ACTIVATIONS`)."""
    require(name in ACTIVATIONS, f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def orthogonal_(weight: Tensor, gain: float) -> Tensor:
    """Orthogonal init of every member of an ensemble weight ``[E, in, out]`` (as ``nn.Linear`` would ``[out, in]``)."""
    with torch.no_grad():
        for member in weight:
            nn.init.orthogonal_(member.T, gain=gain)
    return weight


def _outside_autocast(op, *tensors: Tensor) -> Tensor:
    """``op(*tensors)``; under autocast, on fp32 copies with autocast switched off."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return op(*tensors)
    with torch.autocast(device, enabled=False):
        return op(*[tensor.float() for tensor in tensors])


def fp32_affine(bias: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    """``bias + x @ weight`` (``[E, M, in] -> [E, M, out]``) in fp32 even under bf16 autocast, for output layers:
    values reach the hundreds, where bf16 keeps under three significant digits (steps of 2 at 300), coarser than the
    gaps between actions' values. Costs one small matmul in fp32; the hidden layers stay in bf16."""
    return _outside_autocast(torch.baddbmm, bias, x, weight)


def fp32_linear(layer: nn.Linear, x: Tensor) -> Tensor:
    """``layer(x)`` in fp32 even under autocast, as :func:`fp32_affine` (for output layers)."""
    return _outside_autocast(F.linear, x, layer.weight, layer.bias)


class EnsembleLinear(nn.Module):
    """``E`` independent affine maps: ``[E, M, in] -> [E, M, out]``.

    Args:
        members: ``E``.
        in_features: input width.
        out_features: output width.
        gain: orthogonal-init gain.
        fp32: compute in fp32 even under autocast (:func:`fp32_affine`; for output layers).
    """

    def __init__(self, members: int, in_features: int, out_features: int, *, gain: float = math.sqrt(2.0),
                 fp32: bool = False):
        super().__init__()
        self.weight = nn.Parameter(orthogonal_(torch.empty(members, in_features, out_features), gain))
        self.bias = nn.Parameter(torch.zeros(members, 1, out_features))
        self.fp32 = fp32

    def forward(self, x: Tensor) -> Tensor:
        return fp32_affine(self.bias, x, self.weight) if self.fp32 else torch.baddbmm(self.bias, x, self.weight)


class EnsembleMLP(nn.Module):
    """A stack of :class:`EnsembleLinear` layers, each followed by an optional LayerNorm and the activation:
    ``[E, M, in] -> [E, M, H]``.

    Args:
        members: ``E``.
        in_features: input width.
        hidden_dims: widths of the hidden layers (at least one).
        activation: one of ``tanh``, ``relu``, ``silu``, ``elu``.
        layer_norm: normalise every hidden layer's pre-activation over its width, with a learned per-member scale
            and shift (as CQN's critic; it bounds how far values can extrapolate away from the data).
    """

    def __init__(self, members: int, in_features: int, hidden_dims: Sequence[int], activation: str = "tanh",
                 layer_norm: bool = False):
        super().__init__()
        widths = [in_features, *hidden_dims]
        self.layers = nn.ModuleList(EnsembleLinear(members, i, o) for i, o in zip(widths[:-1], widths[1:]))
        self.norm_weights = nn.ParameterList(nn.Parameter(torch.ones(members, 1, w)) for w in hidden_dims) \
            if layer_norm else None
        self.norm_biases = nn.ParameterList(nn.Parameter(torch.zeros(members, 1, w)) for w in hidden_dims) \
            if layer_norm else None
        self.act = activation_module(activation)
        self.out_features = widths[-1]

    def activate(self, index: int, x: Tensor, members: slice = slice(None)) -> Tensor:
        """Hidden layer ``index``'s LayerNorm (if any) and activation of its pre-activation ``x`` ``[E', M, H]``,
        ``members`` selecting the ``E'`` members whose norm parameters apply."""
        if self.norm_weights is not None:
            x = torch.addcmul(self.norm_biases[index][members], F.layer_norm(x, x.shape[-1:]),
                              self.norm_weights[index][members])
        return self.act(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.after_first_layer(self.layers[0](x))

    def after_first_layer(self, pre: Tensor) -> Tensor:
        """The stack from the first layer's output ``pre`` ``[E, M, H0]`` on (its norm and activation, then the other
        layers), for callers that compute the first affine map in parts."""
        x = self.activate(0, pre)
        for index, layer in enumerate(self.layers[1:], start=1):
            x = self.activate(index, layer(x))
        return x
