"""ProgSwin-UNETR (paper Appendix 4, Eq. 4-6): Swin-UNETR encoder/decoder + ReLU + global pooling."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import SwinUNETR
from torch import nn


class ProgSwinUNETR(nn.Module):
    """Four risk-class scores from a stack of masked time points.

    ``SwinUNETR`` produces a dense ``out_channels`` map at the input resolution (Eq. 4-5); ReLU
    and ``AdaptiveAvgPool3d(1)`` turn it into one score per class (Eq. 6). The scores are
    logits for ``CrossEntropyLoss``; softmax of them gives the probabilities the bundle writes.

    Args:
        in_channels: 3 = the masked images at t0, t1, t2 (paper, Eq. 3). With ``with_masks``
            the binary masks are stacked after the images, so the network sees 2 * in_channels.
        out_channels: number of risk classes (4).
        feature_size: Swin-UNETR embedding size, a multiple of 12 (paper-size model: 48).
        depths, num_heads: Swin stages, SwinUNETR's defaults; tests shrink depths to save time.
        use_checkpoint: gradient checkpointing (less memory, ~30% slower): training only.
        with_masks: the documented 6-channel variant (images + masks). Masking already zeroes
            everything outside the liver; the extra channels also tell the network where the
            liver ends when tissue inside has intensity 0 after normalisation.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 4,
        feature_size: int = 48,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        use_checkpoint: bool = False,
        with_masks: bool = False,
        dropout_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if feature_size % 12:
            raise ValueError(f"feature_size must be a multiple of 12 (SwinUNETR); got {feature_size}")
        self.in_channels = in_channels * (2 if with_masks else 1)
        self.out_channels = out_channels
        self.swin = SwinUNETR(
            in_channels=self.in_channels,
            out_channels=out_channels,
            feature_size=feature_size,
            depths=tuple(depths),
            num_heads=tuple(num_heads),
            use_checkpoint=use_checkpoint,
            dropout_path_rate=dropout_path_rate,
            spatial_dims=3,
        )
        self.pool = nn.AdaptiveAvgPool3d(1)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """ReLU of the decoder's dense class map, (B, C, D, H, W): what sliding windows stitch."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"ProgSwinUNETR expects (batch, {self.in_channels}, D, H, W); got {tuple(x.shape)}")
        bad = [s for s in x.shape[2:] if s % 32 or s < 64]
        if bad:
            raise ValueError(
                f"every spatial side must be a multiple of 32 and at least 64 (SwinUNETR has 5 "
                f"downsamplings, and 32 leaves a 1-voxel bottleneck); got {tuple(x.shape[2:])}")
        return torch.relu(self.swin(x))

    def forward(self, x: torch.Tensor, dense: bool = False) -> torch.Tensor:
        d = self.dense(x)
        return d if dense else self.pool(d).flatten(1)
