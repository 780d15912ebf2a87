"""Random-shift image augmentation (DrQ / CQN, docs/algorithm.md §5.4 and §6.1).

Each image is padded by ``pad`` pixels with replicate padding and cropped back to its size at an integer offset drawn
independently per image (so per sample and per camera view): a shift of at most ``pad`` pixels in each direction.
The official code does the same crop with a bilinear ``grid_sample`` at integer offsets, which is an exact copy of
pixels; here it is an index gather on the uint8 images (about 3x cheaper than padding and cropping floats).

Augmentation runs only while the module is in training mode and not inside :func:`augmentation_disabled` (the actor
uses it, so acting never sees shifted images even though Lightning keeps the module in training mode while the
collector runs).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from arsq_lightning.errors import require


def random_shift(images: Tensor, pad: int, generator: torch.Generator | None = None) -> Tensor:
    """Shift every image by an integer offset in ``[-pad, pad]`` per axis: ``[N, C, H, W] -> [N, C, H, W]``.

    Borders repeat the edge pixels, i.e. replicate padding by ``pad`` followed by a crop; done as two gathers with
    clamped indices, so it works on any dtype (uint8 images are shifted before conversion to float).
    """
    if pad == 0:
        return images
    n, c, h, w = images.shape
    offsets = torch.randint(-pad, pad + 1, (2, n), device=images.device, generator=generator)
    rows = (offsets[0, :, None] + torch.arange(h, device=images.device)).clamp(0, h - 1).view(n, 1, h, 1)
    cols = (offsets[1, :, None] + torch.arange(w, device=images.device)).clamp(0, w - 1).view(n, 1, 1, w)
    return images.gather(2, rows.expand(n, c, h, w)).gather(3, cols.expand(n, c, h, w))


class RandomShift(nn.Module):
    """:func:`random_shift` in training mode, identity in eval mode or under :func:`augmentation_disabled`.

    Args:
        pad: maximum shift in pixels (CQN and DrQ-v2: 4); 0 disables the augmentation.
    """

    def __init__(self, pad: int = 4):
        super().__init__()
        require(pad >= 0, f"augmentation pad must be >= 0, got {pad}")
        self.pad = pad
        self.enabled = True

    def forward(self, images: Tensor) -> Tensor:
        if not (self.training and self.enabled) or self.pad == 0:
            return images
        return random_shift(images, self.pad)

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


@contextmanager
def augmentation_disabled(module: nn.Module) -> Iterator[None]:
    """Turn off every :class:`RandomShift` inside ``module`` for the duration of the block (e.g. while acting)."""
    shifts = [m for m in module.modules() if isinstance(m, RandomShift)]
    previous = [m.enabled for m in shifts]
    for m in shifts:
        m.enabled = False
    try:
        yield
    finally:
        for m, state in zip(shifts, previous):
            m.enabled = state
