"""ProgSwin-UNETR (paper Appendix 4, Eq. 4-6): Swin-UNETR encoder/decoder + ReLU + global pooling."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets import SwinUNETR
from torch import nn

from scripts.flags import as_bool


#: the heads' pooling: Eq. 6's mean over all voxels, or the region-pooling variant
POOLINGS = ("mean", "regions", "regions_images")


class ProgSwinUNETR(nn.Module):
    """Four risk-class scores from a stack of masked time points.

    ``SwinUNETR`` produces a dense ``out_channels`` map at the input resolution (Eq. 4-5); ReLU
    and ``AdaptiveAvgPool3d(1)`` turn it into one score per class (Eq. 6). The scores are
    logits for ``CrossEntropyLoss``; softmax of them gives the probabilities the bundle writes.

    The Eq. 6 head is ``swin.out`` (a 1x1x1 convolution of the last decoder stage), ReLU and the
    mean over all voxels; :meth:`features` gives what it reads and :meth:`head` applies it, so a
    head can be trained on cached features (``scripts.warmup``).

    ``head_hidden`` > 0 selects the *hidden-layer* variant: ``swin.out`` maps the decoder
    features to ``head_hidden`` channels, ReLU, then a second 1x1x1 convolution
    (``classifier``) maps them to the class scores, and the mean over voxels is the logit.
    Each voxel then votes through a small MLP instead of one linear map; on frozen features it
    fits the training patients better than Eq. 6 (docs/README.md, "Recipe measurements"). The
    dense map stays a per-voxel class map whose mean is the logit, so sliding windows stitch it
    as they stitch Eq. 6's.

    ``pooling="regions"`` selects the *region-pooling* variant: the hidden map (``swin.out`` to
    ``head_hidden`` channels, ReLU) is pooled over the whole volume (Eq. 6's mean) and, per mask
    channel of the input (liver and tumour at t0, t1, t2 with ``mask_channels`` labels), by its
    mean and standard deviation over that region's voxels; a linear ``classifier`` maps the
    concatenation to the class scores. Eq. 6 averages every voxel, so the tumour, a few percent of
    the liver box, is diluted by the rest; region pooling reads the tumour's own features and
    their spread (enhancement heterogeneity) at each time point. It has no per-voxel class map,
    so whole-volume inference only (``sliding_window`` false). ``pooling="regions_images"`` also
    pools each time point's image over its own regions (mean and standard deviation of the
    normalised intensity) and takes each region's share of the volume: first-order statistics the
    classifier reads beside the learned features (docs/README.md, "Recipe measurements", says what
    each part contributes).

    Args:
        in_channels: input channels, 3 per extra kind of map: 3 = the masked images at t0, t1,
            t2 (paper, Eq. 3; ``mask_channels`` none), 6 = images + binary liver masks (union),
            9 = images + liver and tumour label maps (labels); see
            ``scripts.transforms.input_channels``.
        out_channels: number of risk classes (4).
        feature_size: Swin-UNETR embedding size, a multiple of 12 (paper-size model: 48).
        depths, num_heads: Swin stages, SwinUNETR's defaults; tests shrink depths to save time.
        head_hidden: 0 = the paper's Eq. 6 head; > 0 = the hidden-layer head with that width.
        pooling: ``"mean"`` (Eq. 6, the mean over all voxels), ``"regions"`` (region pooling,
            needs ``head_hidden`` > 0 and mask channels in the input) or ``"regions_images"``
            (region pooling plus the images' own region statistics).
        image_channels: how many leading input channels are images (3: t0, t1, t2); the
            channels after them are the masks that ``"regions"`` pools over.
        peritumoral_voxels: region pooling over liver and tumour labels (``mask_channels``
            labels) only: > 0 adds, per time point, a peritumoral ring region (the liver voxels
            within this many voxels of the tumour, a max-pool dilation of the tumour label) to the
            regions pooled; 0 (default) = none. Peritumoral arterial enhancement is one of the
            paper's imaging high-risk signs, and outside the tumour label neither the tumour's
            statistics nor the whole liver's (which dilutes a thin rim) read it.
        window_size: Swin attention window (SwinUNETR's default 7, the paper's). On a CPU the
            window attention is most of a training step at 64^3 (7^3 = 343 tokens per window,
            and 32 tokens per side padded to 35); 4 divides every stage of a 64^3 input and
            makes a training step 3.6x cheaper there (docs/README.md, "Recipe measurements").
        use_checkpoint: gradient checkpointing (less memory, ~30% slower): training only.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 4,
        feature_size: int = 48,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        use_checkpoint: bool = False,
        dropout_path_rate: float = 0.0,
        head_hidden: int = 0,
        window_size: int = 7,
        pooling: str = "mean",
        image_channels: int = 3,
        peritumoral_voxels: int = 0,
    ) -> None:
        super().__init__()
        if int(feature_size) % 12:
            raise ValueError(f"feature_size must be a multiple of 12 (SwinUNETR); got {feature_size}")
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.feature_size = int(feature_size)
        self.head_hidden = int(head_hidden)
        if self.head_hidden < 0:
            raise ValueError(f"head_hidden must be 0 (Eq. 6 head) or a positive width; got {head_hidden}")
        self.pooling = str(pooling).strip().lower()
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling: expected one of {list(POOLINGS)}; got {pooling!r}")
        self.image_channels = int(image_channels)
        self.n_regions = self.in_channels - self.image_channels
        self.region_pooling = self.pooling.startswith("regions")
        if self.region_pooling and (self.head_hidden == 0 or self.n_regions < 1
                                    or self.n_regions % self.image_channels):
            raise ValueError(
                f"pooling '{self.pooling}' needs head_hidden > 0 and mask channels after the {self.image_channels} "
                f"images (mask_channels union or labels); got head_hidden {self.head_hidden}, "
                f"in_channels {self.in_channels}")
        self.peritumoral_voxels = int(peritumoral_voxels)
        if self.peritumoral_voxels < 0:
            raise ValueError(f"peritumoral_voxels must be >= 0; got {peritumoral_voxels}")
        if self.peritumoral_voxels and not (self.region_pooling and self.n_regions == 2 * self.image_channels):
            raise ValueError(
                f"peritumoral_voxels > 0 needs region pooling over liver and tumour labels per time point "
                f"(mask_channels labels, {3 * self.image_channels} input channels); got pooling '{self.pooling}', "
                f"in_channels {self.in_channels}")
        # the regions pooled: the input's mask channels, then one peritumoral ring per time point;
        # region_timepoint[r] is the image whose statistics region r reads
        per = self.n_regions // self.image_channels if self.n_regions else 1
        self.region_timepoint = [r // per for r in range(self.n_regions)]
        if self.peritumoral_voxels:
            self.region_timepoint += list(range(self.image_channels))
        self.n_pooled_regions = len(self.region_timepoint)
        self.swin = SwinUNETR(
            in_channels=self.in_channels,
            out_channels=self.head_hidden or self.out_channels,
            feature_size=self.feature_size,
            depths=tuple(int(d) for d in depths),
            num_heads=tuple(int(h) for h in num_heads),
            window_size=int(window_size),
            use_checkpoint=as_bool(use_checkpoint, "use_checkpoint"),
            dropout_path_rate=dropout_path_rate,
            spatial_dims=3,
        )
        self.pool = nn.AdaptiveAvgPool3d(1)
        # a 1x1x1 convolution rather than a Linear after pooling: the same map (the mean is
        # linear), but it keeps a dense per-voxel class map for stitching and saliency
        if self.region_pooling:
            # global mean + per-region mean and std of each hidden channel (+ per region the own
            # time point's image mean and std, and the region's share of the volume)
            r = self.n_pooled_regions
            width = self.head_hidden * (1 + 2 * r) + (3 * r if self.pooling == "regions_images" else 0)
            self.classifier = nn.Linear(width, self.out_channels)
            # a fitted scaler of the pooled vector (set_standardization): its parts differ in scale
            # by orders of magnitude (an image's std in a region ~0.1, a hidden channel's mean ~1),
            # and AdamW's few hundred head steps move the small ones too little to use them
            self.register_buffer("pooled_mean", torch.zeros(width))
            self.register_buffer("pooled_scale", torch.ones(width))
        elif self.head_hidden:
            self.classifier = nn.Conv3d(self.head_hidden, self.out_channels, 1)
        else:
            self.classifier = None

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"ProgSwinUNETR expects (batch, {self.in_channels}, D, H, W); got {tuple(x.shape)}")
        bad = [s for s in x.shape[2:] if s % 32 or s < 64]
        if bad:
            raise ValueError(
                f"every spatial side must be a multiple of 32 and at least 64 (SwinUNETR has 5 "
                f"downsamplings, and 32 leaves a 1-voxel bottleneck); got {tuple(x.shape[2:])}")

    def _classify(self, out: torch.Tensor) -> torch.Tensor:
        """The per-voxel class map from ``swin.out``'s output."""
        h = torch.relu(out)
        return h if self.classifier is None else self.classifier(h)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """The dense class map (B, C, D, H, W) whose mean over voxels is the logit: what
        sliding windows stitch (Eq. 6: ReLU of the decoder's class map)."""
        if self.region_pooling:
            raise ValueError(f"pooling '{self.pooling}' has no per-voxel class map (its scores pool each mask "
                             "region over the whole volume): use whole-volume inference, sliding_window false")
        self._check_input(x)
        return self._classify(self.swin(x))

    def forward(self, x: torch.Tensor, dense: bool = False) -> torch.Tensor:
        if self.region_pooling and not dense:
            return self.head(self.features(x), self.pooling_input(x))
        d = self.dense(x)
        return d if dense else self.pool(d).flatten(1)

    def pooling_input(self, x: torch.Tensor) -> torch.Tensor | None:
        """What region pooling reads beside the features: the input itself (its mask channels
        are the regions), followed by the peritumoral rings when ``peritumoral_voxels`` > 0;
        None for the voxel-mean heads. Computed at the input's resolution, so a cache of it at
        every n-th voxel (``scripts.warmup``) holds the same rings as the full-resolution pass."""
        if not self.region_pooling:
            return None
        if not self.peritumoral_voxels:
            return x
        return torch.cat([x, self.peritumoral_rings(x)], 1)

    def peritumoral_rings(self, x: torch.Tensor) -> torch.Tensor:
        """(B, time points, D, H, W): per time point the liver-label voxels within
        ``peritumoral_voxels`` voxels (a cube, max-pool dilation) of that time point's tumour label."""
        masks = x[:, self.image_channels:self.in_channels]
        liver, tumour = masks[:, 0::2], masks[:, 1::2]
        k = self.peritumoral_voxels
        return F.max_pool3d(tumour, 2 * k + 1, stride=1, padding=k) * liver

    @property
    def pooling_channels(self) -> int:
        """Channels of :meth:`pooling_input`: the input's, plus a ring per time point."""
        return self.in_channels + (self.image_channels if self.peritumoral_voxels else 0)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last decoder stage's output (B, feature_size, D, H, W): the input of ``swin.out``.

        SwinUNETR's forward is one function, so the tensor is taken with a forward hook rather
        than by re-implementing its encoder/decoder wiring.
        """
        self._check_input(x)
        caught: list[torch.Tensor] = []
        hook = self.swin.out.register_forward_hook(lambda _m, inputs, _o: caught.append(inputs[0]))
        try:
            self.swin(x)
        finally:
            hook.remove()
        return caught[0]

    def head(self, features: torch.Tensor, inputs: torch.Tensor | None = None) -> torch.Tensor:
        """The head on decoder features -> (B, classes). Eq. 6: 1x1x1 convolution, ReLU, mean
        over voxels; hidden-layer variant: the same, then ``classifier``, then the mean; region
        pooling: the hidden map's pooled statistics over the regions of ``inputs`` (the network
        input on the features' grid), then ``classifier``."""
        if not self.region_pooling:
            return self.pool(self._classify(self.swin.out(features))).flatten(1)
        if inputs is None or inputs.shape[2:] != features.shape[2:] or inputs.shape[1] != self.pooling_channels:
            raise ValueError(f"pooling '{self.pooling}' needs the {self.pooling_channels}-channel pooling input "
                             f"(ProgSwinUNETR.pooling_input) on the features' "
                             f"grid {tuple(features.shape[2:])}; got {None if inputs is None else tuple(inputs.shape)}")
        v = self.pooled_vector(features, inputs)
        return self.classifier((v - self.pooled_mean) / self.pooled_scale)

    def pooled_vector(self, features: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Region pooling: the (B, width) vector the linear classifier reads, before standardisation."""
        h = torch.relu(self.swin.out(features)).flatten(2)  # (B, H, V)
        m = inputs[:, self.image_channels:].flatten(2).to(h.dtype)  # (B, R, V)
        count = m.sum(-1) + 1e-6  # an empty region pools to 0
        pooled = [h.mean(-1), *_region_mean_std(h, m, count)]
        if self.pooling == "regions_images":
            pooled += [*_region_mean_std(self._own_images(inputs).to(h.dtype), m, count, per_region=True), m.mean(-1)]
        return torch.cat([p.flatten(1) for p in pooled], 1)

    @property
    def n_learned(self) -> int:
        """Region pooling: how many leading parts of the pooled vector are learned (the hidden
        map's statistics); the rest (``regions_images``) are the images' own statistics."""
        return self.head_hidden * (1 + 2 * self.n_pooled_regions) if self.region_pooling else 0

    @torch.no_grad()
    def set_standardization(self, vectors: torch.Tensor, learned_scale: float = 1.0) -> None:
        """Fit the pooled vector's scaler: mean and std over ``vectors`` (N, width), the training
        patients' pooled vectors (``scripts.warmup.pooled_vectors``); a constant part keeps scale 1.

        ``learned_scale`` < 1 shrinks the learned parts (the first :attr:`n_learned`) after
        standardisation, so that a ridge penalty on the classifier weighs ``1 / learned_scale ** 2``
        times more on them: at the start they are a random backbone's features (noise), the
        images' statistics are not."""
        if not self.region_pooling:
            raise ValueError(f"pooling '{self.pooling}' has no pooled vector to standardise")
        vectors = torch.as_tensor(vectors, dtype=self.pooled_mean.dtype)
        if vectors.ndim != 2 or vectors.shape[1] != self.pooled_mean.numel() or len(vectors) < 2:
            raise ValueError(f"set_standardization expects (N >= 2, {self.pooled_mean.numel()}) pooled vectors; "
                             f"got {tuple(vectors.shape)}")
        if not 0 < float(learned_scale) <= 1:
            raise ValueError(f"learned_scale must be in (0, 1]; got {learned_scale}")
        std = vectors.std(0)
        scale = torch.where(std > 1e-6, std, torch.ones_like(std))
        scale[:self.n_learned] /= float(learned_scale)
        self.pooled_mean.copy_(vectors.mean(0))
        self.pooled_scale.copy_(scale)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # weights saved before the scaler existed (progswin_prognosis < 0.6.0) load as the identity
        if self.region_pooling:
            for name, fill in (("pooled_mean", self.pooled_mean), ("pooled_scale", self.pooled_scale)):
                if prefix + "classifier.weight" in state_dict and prefix + name not in state_dict:
                    state_dict[prefix + name] = torch.zeros_like(fill) if name == "pooled_mean" else torch.ones_like(fill)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _own_images(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, R, V): for each pooled region, the image of its own time point (the masks come
        per time point in the images' order, ``n_regions // image_channels`` each; then the rings)."""
        return inputs[:, self.region_timepoint].flatten(2)

    def final_weight(self) -> torch.Tensor:
        """The weight of the head's last linear map (``classifier``, or ``swin.out`` for Eq. 6):
        what a ridge penalty on the scores regularises."""
        return self.swin.out.conv.conv.weight if self.classifier is None else self.classifier.weight

    def head_modules(self) -> list[nn.Module]:
        """The modules of the head: ``swin.out`` (and ``classifier``)."""
        return [self.swin.out] + ([] if self.classifier is None else [self.classifier])


def _region_mean_std(values: torch.Tensor, masks: torch.Tensor, count: torch.Tensor,
                     per_region: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and population std over each region. masks (B, R, V), count (B, R). values (B, H, V):
    every channel over every region -> two (B, R, H); ``per_region``, values (B, R, V), region r
    pools its own channel r -> two (B, R)."""
    if per_region:
        mean = (values * masks).sum(-1) / count
        square = (values * values * masks).sum(-1) / count
    else:
        mean = torch.einsum("bhv,brv->brh", values, masks) / count.unsqueeze(-1)
        square = torch.einsum("bhv,brv->brh", values * values, masks) / count.unsqueeze(-1)
    # the epsilon keeps the gradient of sqrt finite where a region is constant
    return mean, torch.sqrt(torch.clamp(square - mean * mean, min=0.0) + 1e-6)


def unwrap(network: nn.Module) -> nn.Module:
    """The ProgSwinUNETR inside a DistributedDataParallel / DataParallel wrapper (or itself)."""
    return getattr(network, "module", network)


def backbone_and_head(network: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(encoder/decoder parameters, head parameters)."""
    net = unwrap(network)
    head = [p for m in net.head_modules() for p in m.parameters()]
    head_ids = {id(p) for p in head}
    backbone = [p for p in net.parameters() if id(p) not in head_ids]
    return backbone, head


def param_groups(network: nn.Module, learning_rate: float, backbone_lr_scale: float = 1.0) -> list[dict]:
    """Optimizer groups: the head at ``learning_rate``, the backbone at ``learning_rate *
    backbone_lr_scale`` (1 = one rate for all, the paper; 0 = backbone frozen: with lr 0, AdamW's
    decoupled weight decay does not move it either)."""
    scale = float(backbone_lr_scale)
    if scale < 0:
        raise ValueError(f"backbone_lr_scale must be >= 0; got {backbone_lr_scale}")
    backbone, head = backbone_and_head(network)
    return [{"params": backbone, "lr": float(learning_rate) * scale, "name": "backbone"},
            {"params": head, "lr": float(learning_rate), "name": "head"}]
