"""Metrics MONAI does not ship: the paper's combined liver+tumour Dice (Eq. 2) and HD95 in mm."""

from __future__ import annotations

from typing import Sequence

import torch
from monai.metrics import CumulativeIterationMetric, HausdorffDistanceMetric
from monai.metrics.utils import do_metric_reduction


class CombinedDiceMetric(CumulativeIterationMetric):
    """Eq. 2 of the paper: 2 (|M1 n G1| + |M2 n G2|) / (|M1| + |G1| + |M2| + |G2|).

    Inputs are one-hot, batch first: channel 1 liver (M1/G1), channel 2 tumour (M2/G2). Unlike the
    mean of the two class Dice values, voxels are pooled, so the (large) liver dominates. A case with
    neither liver nor tumour in prediction and label is NaN (left out of the mean).
    """

    def __init__(self, channels: Sequence[int] = (1, 2), reduction: str = "mean") -> None:
        super().__init__()
        self.channels = list(channels)
        self.reduction = reduction

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
        if y_pred.shape != y.shape or y_pred.shape[1] <= max(self.channels):
            raise ValueError(f"expected one-hot pred and label of equal shape with >= 3 channels, got "
                             f"{tuple(y_pred.shape)} and {tuple(y.shape)}")
        p = y_pred[:, self.channels].float().flatten(2)
        g = y[:, self.channels].float().flatten(2)
        inter = (p * g).sum(dim=(1, 2))
        total = p.sum(dim=(1, 2)) + g.sum(dim=(1, 2))
        nan = torch.tensor(float("nan"), device=total.device)
        return torch.where(total > 0, 2.0 * inter / total.clamp(min=1), nan).unsqueeze(1)

    def aggregate(self, reduction: str | None = None):
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError("the data to aggregate must be a PyTorch Tensor.")
        f, _ = do_metric_reduction(data, reduction or self.reduction)
        return f


class HD95mmMetric(HausdorffDistanceMetric):
    """95th-percentile Hausdorff distance in mm on a grid of known `spacing` (the resampled grid)."""

    def __init__(self, spacing: Sequence[float], include_background: bool = False, reduction: str = "mean_batch",
                 **kwargs) -> None:
        super().__init__(include_background=include_background, percentile=95, reduction=reduction, **kwargs)
        self.spacing = [float(s) for s in spacing]

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
        kwargs.setdefault("spacing", self.spacing)
        return super()._compute_tensor(y_pred, y, **kwargs)


class ChannelOutput:
    """An ignite ``output_transform`` for one structure's metric: ``pred`` and ``label`` of each
    item reduced to channels ``start:stop`` summed into one channel (1:2 liver, 2:3 tumour, 1:3
    the whole liver, tumour included), as the metrics handlers expect ([preds], [labels])."""

    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop = int(start), int(stop)
        if not 0 <= self.start < self.stop:
            raise ValueError(f"ChannelOutput: expected 0 <= start < stop; got {start}, {stop}")

    def _one(self, t):
        part = t[self.start:self.stop]
        # one channel stays the slice itself (with its metadata, which HD95 in mm reads)
        return part if self.stop - self.start == 1 else part.sum(0, keepdim=True)

    def __call__(self, batch):
        return [[self._one(d["pred"]) for d in batch], [self._one(d["label"]) for d in batch]]
