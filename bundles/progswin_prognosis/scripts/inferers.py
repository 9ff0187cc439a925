"""The paper's sliding-window inference (ROI 64^3), adapted to a classifier."""

from __future__ import annotations

import torch
from monai.inferers import SlidingWindowInferer


class PooledSlidingWindowInferer(SlidingWindowInferer):
    """Stitch the dense ReLU class map window by window, then average-pool it to class scores.

    Why this differs from whole-volume inference (the default, ``SimpleInferer``): each window
    sees only its own 64^3 block, so self-attention and the decoder have no context beyond it,
    and the stitched map is a (gaussian- or constant-) weighted blend of window outputs. Pooling
    that map gives scores close to, but not equal to, the whole-volume ones. It needs less
    memory for large inputs; at 128^3 on one GPU whole-volume inference fits and is faster.
    The network must expose ``forward(x, dense=True)`` (ProgSwinUNETR does).
    """

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:  # type: ignore[override]
        dense = super().__call__(inputs, network, *args, dense=True, **kwargs)
        return torch.nn.functional.adaptive_avg_pool3d(dense, 1).flatten(1)
