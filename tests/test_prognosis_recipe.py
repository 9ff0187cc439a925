"""progswin_prognosis training recipe: command-line booleans, initialisation from a checkpoint
(segmentation or ProgSwin-UNETR), the head warm-up on cached features, the learning check and
the shipped synthetic weights. CPU, tiny settings (feature_size 12, 64^3, Swin depths 1).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "progswin_prognosis"
SEG_BUNDLE = REPO / "bundles" / "hcc_liver_seg"
CONFIGS = BUNDLE / "configs"
TINY = {"feature_size": 12, "network_def#depths": [1, 1, 1, 1], "spatial_size": [64, 64, 64],
        "num_workers": 0, "device": "cpu", "network_def#use_checkpoint": False}


def _bundle_on_path(bundle: Path = BUNDLE) -> None:
    """Make ``scripts`` resolve to ``bundle``'s package (the other bundle has one too)."""
    for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
        if not (getattr(sys.modules[name], "__file__", None) or "").startswith(str(bundle)):
            del sys.modules[name]
    for b in (BUNDLE, SEG_BUNDLE):
        if str(b) in sys.path:
            sys.path.remove(str(b))
    sys.path.insert(0, str(bundle))


def _parser(configs: list[str], bundle: Path = BUNDLE, **overrides):
    from monai.bundle import ConfigParser

    _bundle_on_path(bundle)
    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / c) for c in configs])
    parser.update({"bundle_root": str(bundle), **overrides})
    return parser


def _seg_network(feature_size=12, depths=(1, 1, 1, 1), seed=1):
    import torch
    from monai.networks.nets import SwinUNETR

    torch.manual_seed(seed)
    return SwinUNETR(in_channels=1, out_channels=3, feature_size=feature_size, depths=depths, spatial_dims=3)


@pytest.fixture(scope="module")
def cohort(small_cohort, tmp_path_factory) -> dict:
    """small_cohort's prognosis datalist, cut to 6 training patients (fold 1-3) + 2 of fold 0."""
    from analysis.datalists import write_datalists

    out = tmp_path_factory.mktemp("recipe_datalists")
    content = json.loads(Path(write_datalists(small_cohort, out=out)["prognosis"]).read_text())
    items = [it for k in range(4) for it in [i for i in content["training"] if i["fold"] == k][:2]]
    subset = out / "prognosis_8.json"
    subset.write_text(json.dumps({**content, "training": items, "unlabelled": []}))
    return {"dir": str(small_cohort), "datalist": str(subset), "items": items}


# --------------------------------------------------------------------------------- booleans
@pytest.mark.parametrize("value, expected", [(True, True), (False, False), ("true", True), ("false", False),
                                             ("True", True), ("False", False), ("1", True), ("0", False),
                                             (1, True), (0, False), (" FALSE ", False), (None, False)])
def test_as_bool_values(value, expected):
    _bundle_on_path()
    from scripts.flags import as_bool

    assert as_bool(value) is expected


def test_as_bool_refuses_other_text():
    _bundle_on_path()
    from scripts.flags import as_bool

    with pytest.raises(ValueError, match=r"resume: expected true/false \(or 1/0\); got 'flase'"):
        as_bool("flase", "resume")
    with pytest.raises(ValueError, match="got 2"):
        as_bool(2, "amp")


@pytest.mark.parametrize("text, on", [("true", True), ("false", False), ("True", True), ("False", False),
                                      ("1", True), ("0", False)])
def test_boolean_ids_from_the_command_line(cohort, tmp_path, text, on):
    """Each boolean id of train/inference, given as command-line text, has its effect."""
    import torch
    from monai.inferers import SimpleInferer

    fold_dir = tmp_path / "models" / "fold0"
    fold_dir.mkdir(parents=True)
    torch.save({"model": {}}, fold_dir / "checkpoint_epoch=3.pt")  # readable: resume takes it
    common = {**TINY, "dataset_dir": cohort["dir"], "datalist": cohort["datalist"], "ckpt_dir": str(tmp_path / "models")}
    p = _parser(["train.json"], **{**common, "resume": text, "amp": text, "balanced_sampling": text,
                                   "network_def#use_checkpoint": text, "keep_timepoints": text, "cache_rate": 0.0})
    assert (p.get_parsed_content("resume_from") is not None) is on
    assert p.get_parsed_content("train#trainer").amp is on
    assert p.get_parsed_content("network_def").swin.swinViT.layers1[0].blocks[0].use_checkpoint is on
    loader = p.get_parsed_content("train#dataloader")
    assert isinstance(loader.sampler, torch.utils.data.WeightedRandomSampler) is on
    item = p.get_parsed_content("validate#preprocessing")(_abs(cohort, 0))
    assert ("image_t0" in item) is on  # keep_timepoints
    q = _parser(["inference.json"], **{**common, "sliding_window": text})
    assert (not isinstance(q.get_parsed_content("inferer"), SimpleInferer)) is on


def test_resume_without_checkpoint_is_a_clear_error(cohort, tmp_path):
    """One resume rule in both bundles: --resume true with no checkpoint_epoch=<n>.pt in the
    fold's folder stops with an error naming the folder, never a silent fresh start."""
    common = {**TINY, "dataset_dir": cohort["dir"], "datalist": cohort["datalist"], "ckpt_dir": str(tmp_path / "models")}
    p = _parser(["train.json"], **{**common, "resume": "true", "cache_rate": 0.0})
    with pytest.raises(Exception) as exc:
        p.get_parsed_content("resume_from")
    text = "".join(str(e) for e in _chain(exc.value))
    assert f"no checkpoint_epoch=<n>.pt checkpoint in {tmp_path / 'models' / 'fold0'}" in text
    assert _parser(["train.json"], **{**common, "resume": "false"}).get_parsed_content("resume_from") is None


def _chain(exc: BaseException):
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def _abs(cohort, index: int) -> dict:
    item = dict(cohort["items"][index])
    for k in list(item):
        if k.startswith(("image_", "mask_")):
            item[k] = os.path.join(cohort["dir"], item[k])
    return item


# --------------------------------------------------------------------- pretrained mapping
def test_segmentation_checkpoint_mapping(tmp_path):
    import torch
    import torch.nn.functional as F

    _bundle_on_path()
    from scripts.checkpoints import load_pretrained
    from scripts.net import ProgSwinUNETR

    seg = _seg_network()
    path = tmp_path / "seg.pt"
    torch.save(seg.state_dict(), path)  # CheckpointSaver's best model: a bare state dict
    seg_state = seg.state_dict()
    for in_channels in (3, 6, 9):
        torch.manual_seed(7)
        net = ProgSwinUNETR(in_channels=in_channels, feature_size=12, depths=(1, 1, 1, 1))
        fresh_out = {k: v.clone() for k, v in net.swin.out.state_dict().items()}
        fresh_in = {k: v.clone() for k, v in net.state_dict().items()}
        assert load_pretrained(net, str(path)) == "segmentation"
        state = net.state_dict()
        copied = [k for k in seg_state if not k.startswith("out.")]
        widened = {"swinViT.patch_embed.proj.weight", "encoder1.layer.conv1.conv.weight", "encoder1.layer.conv3.conv.weight"}
        for k in copied:
            if k in widened:
                w = seg_state[k]
                assert state["swin." + k].shape == (w.shape[0], in_channels, *w.shape[2:])
                for c in range(3):
                    torch.testing.assert_close(state["swin." + k][:, c:c + 1], w / 3)
                # mask channels keep the new network's own initialisation
                assert torch.equal(state["swin." + k][:, 3:], fresh_in["swin." + k][:, 3:])
            else:
                assert torch.equal(state["swin." + k], seg_state[k]), k
        # the 4-class output layer keeps its own new initialisation, not the 3-class one
        assert net.swin.out.conv.conv.weight.shape == (4, 12, 1, 1, 1)
        for k, v in net.swin.out.state_dict().items():
            assert torch.equal(v, fresh_out[k]), k
    # the first layer's response to 3 identical images = the segmentation network's to one
    x = torch.randn(1, 1, 64, 64, 64)
    net = ProgSwinUNETR(in_channels=3, feature_size=12, depths=(1, 1, 1, 1))
    load_pretrained(net, str(path))
    emb, emb_seg = net.swin.swinViT.patch_embed, seg.swinViT.patch_embed
    with torch.no_grad():
        torch.testing.assert_close(emb.proj(x.repeat(1, 3, 1, 1, 1)), emb_seg.proj(x), atol=1e-5, rtol=1e-5)
        net9 = ProgSwinUNETR(in_channels=9, feature_size=12, depths=(1, 1, 1, 1))
        load_pretrained(net9, str(path))
        x9 = torch.cat([x.repeat(1, 3, 1, 1, 1), torch.zeros(1, 6, 64, 64, 64)], 1)  # empty mask channels
        torch.testing.assert_close(net9.swin.swinViT.patch_embed.proj(x9), emb_seg.proj(x), atol=1e-5, rtol=1e-5)
        c1, c1_seg = net.swin.encoder1.layer.conv1.conv, seg.encoder1.layer.conv1.conv
        torch.testing.assert_close(F.conv3d(x.repeat(1, 3, 1, 1, 1), c1.weight, padding=1),
                                   F.conv3d(x, c1_seg.weight, padding=1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head_hidden", [0, 16])
def test_head_variants_split_and_map(tmp_path, head_hidden):
    """Eq. 6 head (0) and the hidden-layer head (16): the logit is the mean of the dense map,
    features() + head() give forward(), the head's parameters are exactly the head modules',
    and a segmentation checkpoint leaves every head layer at its new initialisation."""
    import torch

    _bundle_on_path()
    from scripts.checkpoints import load_pretrained
    from scripts.net import ProgSwinUNETR, backbone_and_head

    torch.manual_seed(3)
    net = ProgSwinUNETR(in_channels=9, feature_size=12, depths=(1, 1, 1, 1), head_hidden=head_hidden).eval()
    x = torch.randn(2, 9, 64, 64, 64)
    with torch.no_grad():
        logits, dense = net(x), net(x, dense=True)
        assert dense.shape == (2, 4, 64, 64, 64)
        torch.testing.assert_close(dense.mean((2, 3, 4)), logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(net.head(net.features(x)), logits, atol=1e-5, rtol=1e-5)
        if head_hidden == 0:  # Eq. 6: a ReLU'd map, so every score is >= 0
            assert (dense >= 0).all()
    backbone, head = backbone_and_head(net)
    assert len(backbone) + len(head) == len(list(net.parameters()))
    assert len(head) == (2 if head_hidden == 0 else 4)
    assert net.swin.out.conv.conv.weight.shape == (head_hidden or 4, 12, 1, 1, 1)
    fresh = {k: v.clone() for k, v in net.state_dict().items() if k.startswith(("swin.out.", "classifier."))}
    path = tmp_path / "seg.pt"
    torch.save(_seg_network().state_dict(), path)
    assert load_pretrained(net, str(path)) == "segmentation"
    for k, v in fresh.items():
        assert torch.equal(net.state_dict()[k], v), k
    with pytest.raises(ValueError, match="head_hidden must be 0"):
        ProgSwinUNETR(in_channels=3, feature_size=12, head_hidden=-1)


@pytest.mark.parametrize("pooling", ["regions", "regions_images"])
def test_region_pooling_reads_each_mask_region(pooling):
    """Region pooling: the classifier reads the hidden map's mean over all voxels, then per
    mask channel its mean and (population) standard deviation over that region, computed here
    by boolean indexing; regions_images adds, per region, its own time point's image mean and
    std there and the region's share of the volume; an empty region pools to 0; features() +
    head() give forward()."""
    import torch

    _bundle_on_path()
    from scripts.net import ProgSwinUNETR, backbone_and_head

    torch.manual_seed(4)
    net = ProgSwinUNETR(in_channels=9, feature_size=12, depths=(1, 1, 1, 1), head_hidden=5,
                        window_size=4, pooling=pooling).eval()
    x = torch.randn(2, 9, 64, 64, 64)
    x[:, 3:] = (torch.rand(2, 6, 64, 64, 64) > 0.8).float()
    x[1, 4] = 0.0  # patient 1 has no tumour at t0
    seen = []
    net.classifier.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0]))
    with torch.no_grad():
        logits = net(x)
        h = torch.relu(net.swin.out(net.features(x)))
        torch.testing.assert_close(net.head(net.features(x), net.pooling_input(x)), logits)
    pooled = seen[0]
    extra = 3 * 6 if pooling == "regions_images" else 0
    assert logits.shape == (2, 4) and pooled.shape == (2, 5 * (1 + 2 * 6) + extra)
    for b in range(2):
        expected = [h[b].flatten(1).mean(1)]
        means, stds, image_means, image_stds, shares = [], [], [], [], []
        for r in range(6):
            region = x[b, 3 + r] > 0
            inside = h[b][:, region]  # (5, voxels in region r)
            means.append(inside.mean(1) if inside.shape[1] else torch.zeros(5))
            stds.append(inside.std(1, unbiased=False) if inside.shape[1] else torch.zeros(5))
            own = x[b, r // 2][region]  # liver and tumour of t_k pool the image of t_k
            image_means.append(own.mean() if own.numel() else torch.tensor(0.0))
            image_stds.append(own.std(unbiased=False) if own.numel() else torch.tensor(0.0))
            shares.append(region.float().mean())
        expected = torch.cat(expected + means + stds)
        if extra:
            expected = torch.cat([expected, torch.stack(image_means), torch.stack(image_stds), torch.stack(shares)])
        torch.testing.assert_close(pooled[b], expected, atol=2e-3, rtol=1e-4)
    assert torch.all(pooled[1, 5 * 2:5 * 3] == 0)  # empty tumour region at t0: mean 0
    backbone, head = backbone_and_head(net)
    assert len(head) == 4 and len(backbone) + len(head) == len(list(net.parameters()))


def test_region_pooling_scaler():
    """set_standardization fits the pooled vector's scaler: the classifier then reads, on the
    fitting patients, mean 0 and std 1 per part (a constant part keeps scale 1); the scaler is
    in the state dict, and weights saved before it existed load as the identity."""
    import torch

    _bundle_on_path()
    from scripts.net import ProgSwinUNETR
    from scripts.warmup import pooled_vectors

    torch.manual_seed(5)
    net = ProgSwinUNETR(in_channels=9, feature_size=12, depths=(1, 1, 1, 1), head_hidden=3,
                        window_size=4, pooling="regions_images").eval()
    x = torch.randn(4, 9, 64, 64, 64)
    x[:, 3:] = (torch.rand(4, 6, 64, 64, 64) > 0.7).float()
    x[:, 3] = 1.0  # liver at t0 everywhere: its share is the same for every patient
    with torch.no_grad():
        feats = net.features(x)
    vectors = pooled_vectors(net, feats, x, "cpu", batch_size=3)
    assert vectors.shape == (4, 3 * 13 + 18)
    net.set_standardization(vectors)
    seen = []
    net.classifier.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0]))
    with torch.no_grad():
        net.head(feats, x)
    z = seen[0]
    constant = vectors.std(0) < 1e-6
    share_t0_liver = 3 * 13 + 12  # regions_images: ..., image means (6), image stds (6), shares (6)
    assert bool(constant[share_t0_liver]) and net.pooled_scale[share_t0_liver] == 1.0
    torch.testing.assert_close(z.mean(0), torch.zeros(z.shape[1]), atol=1e-4, rtol=0)
    torch.testing.assert_close(z[:, ~constant].std(0), torch.ones(int((~constant).sum())), atol=1e-4, rtol=0)
    fresh = ProgSwinUNETR(in_channels=9, feature_size=12, depths=(1, 1, 1, 1), head_hidden=3,
                          window_size=4, pooling="regions_images")
    fresh.load_state_dict(net.state_dict())
    assert torch.equal(fresh.pooled_mean, net.pooled_mean) and torch.equal(fresh.pooled_scale, net.pooled_scale)
    old = {k: v for k, v in net.state_dict().items() if not k.startswith("pooled_")}
    fresh.load_state_dict(old)  # a checkpoint of release <= 0.5.0
    assert torch.all(fresh.pooled_mean == 0) and torch.all(fresh.pooled_scale == 1)
    with pytest.raises(ValueError, match=r"expects \(N >= 2, 57\) pooled vectors; got \(4, 5\)"):
        net.set_standardization(torch.zeros(4, 5))


def test_peritumoral_ring_region():
    """peritumoral_voxels k adds, per time point, a ring region: the liver-label voxels within k
    voxels (a cube) of that time point's tumour label, checked against scipy's binary dilation.
    regions_images pools its own time point's image there (mean, std, share, by boolean
    indexing), the pooled vector grows by one region per time point, and a cache of
    pooling_input at every 2nd voxel holds the rings of the full-resolution pass."""
    import torch
    from scipy import ndimage

    _bundle_on_path()
    from scripts.net import ProgSwinUNETR

    torch.manual_seed(6)
    net = ProgSwinUNETR(in_channels=9, feature_size=12, depths=(1, 1, 1, 1), head_hidden=2, window_size=4,
                        pooling="regions_images", peritumoral_voxels=2).eval()
    x = torch.randn(2, 9, 64, 64, 64)
    rng = np.random.default_rng(0)
    expected_rings = np.zeros((2, 3, 64, 64, 64), bool)
    for b in range(2):
        for t in range(3):
            label = np.zeros((64, 64, 64), np.int64)
            label[6:58, 6:58, 6:58] = 1
            for _ in range(2):  # two tumour blocks per time point, one near the liver's edge
                lo = rng.integers(4, 50, 3)
                label[lo[0]:lo[0] + 8, lo[1]:lo[1] + 6, lo[2]:lo[2] + 5] = 2
            x[b, 3 + 2 * t] = torch.from_numpy(label == 1).float()
            x[b, 4 + 2 * t] = torch.from_numpy(label == 2).float()
            expected_rings[b, t] = ndimage.binary_dilation(label == 2, np.ones((5, 5, 5), bool)) & (label == 1)
    with torch.no_grad():
        rings = net.peritumoral_rings(x)
    assert rings.shape == (2, 3, 64, 64, 64) and np.array_equal(rings.numpy() > 0, expected_rings)
    pin = net.pooling_input(x)
    assert pin.shape[1] == net.pooling_channels == 12 and torch.equal(pin[:, :9], x)
    seen = []
    net.classifier.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0]))
    with torch.no_grad():
        logits = net(x)
        torch.testing.assert_close(net.head(net.features(x), pin), logits)
    pooled = seen[0]
    regions = 6 + 3
    assert pooled.shape == (2, 2 * (1 + 2 * regions) + 3 * regions) and net.classifier.in_features == 65
    start = 2 * (1 + 2 * regions)  # image means, image stds, shares: one per region, rings last
    for b in range(2):
        for t in range(3):
            own = x[b, t][torch.from_numpy(expected_rings[b, t])]
            got = pooled[b, [start + 6 + t, start + regions + 6 + t, start + 2 * regions + 6 + t]]
            want = torch.stack([own.mean(), own.std(unbiased=False), torch.tensor(expected_rings[b, t].mean())])
            torch.testing.assert_close(got, want.float(), atol=2e-3, rtol=1e-4)
    # the warm-up's cache subsamples pooling_input: the rings of the full-resolution input
    from scripts.warmup import cache_features

    items = [{"image": x[b], "label": torch.tensor(b)} for b in range(2)]
    _, cached, _ = cache_features(net, items, "cpu", dtype=torch.float32, stride=2)
    assert torch.equal(cached[:, 9:], rings[..., ::2, ::2, ::2])


@pytest.mark.parametrize("kwargs, message", [
    ({"in_channels": 6, "head_hidden": 2, "pooling": "regions"}, "needs region pooling over liver and tumour labels"),
    ({"in_channels": 9, "head_hidden": 2, "pooling": "mean"}, "needs region pooling over liver and tumour labels"),
    ({"in_channels": 9, "head_hidden": 2, "pooling": "regions", "peritumoral_voxels": -1}, "must be >= 0"),
])
def test_peritumoral_ring_refusals(kwargs, message):
    _bundle_on_path()
    from scripts.net import ProgSwinUNETR

    with pytest.raises(ValueError, match=message):
        ProgSwinUNETR(feature_size=12, depths=(1, 1, 1, 1), **{"peritumoral_voxels": 2, **kwargs})


@pytest.mark.parametrize("kwargs, message", [
    ({"in_channels": 3, "head_hidden": 8}, "needs head_hidden > 0 and mask channels"),
    ({"in_channels": 9, "head_hidden": 0}, "needs head_hidden > 0 and mask channels"),
    ({"in_channels": 9, "head_hidden": 8, "pooling": "max"}, "pooling: expected one of"),
])
def test_region_pooling_refuses_what_it_cannot_pool(kwargs, message):
    _bundle_on_path()
    from scripts.net import ProgSwinUNETR

    with pytest.raises(ValueError, match=message):
        ProgSwinUNETR(feature_size=12, depths=(1, 1, 1, 1), pooling=kwargs.pop("pooling", "regions"), **kwargs)


def test_region_pooling_has_no_dense_map():
    """No per-voxel class map: the sliding-window inferer's dense call and a head call without
    the masks are refused with what to do, not a shape error from deep inside."""
    import torch

    _bundle_on_path()
    from scripts.net import ProgSwinUNETR

    net = ProgSwinUNETR(in_channels=9, feature_size=12, depths=(1, 1, 1, 1), head_hidden=4, pooling="regions")
    x = torch.zeros(1, 9, 64, 64, 64)
    with pytest.raises(ValueError, match="sliding_window false"):
        net(x, dense=True)
    with pytest.raises(ValueError, match="needs the 9-channel pooling input"):
        net.head(torch.zeros(1, 12, 8, 8, 8))


def test_segmentation_checkpoint_initialises_the_region_pooling_head(tmp_path):
    """The CPU recipe's network (regions_images, window 4) from a window-7 segmentation
    checkpoint: the backbone is copied, the classifier and the pooled vector's scaler keep their
    new initialisation (the scaler is fitted later, by the warm-up)."""
    import torch

    _bundle_on_path()
    from scripts.checkpoints import load_pretrained
    from scripts.net import ProgSwinUNETR

    torch.manual_seed(5)
    net = ProgSwinUNETR(in_channels=9, feature_size=12, depths=(1, 1, 1, 1), window_size=4, head_hidden=2,
                        pooling="regions_images")
    fresh = {k: v.clone() for k, v in net.state_dict().items() if k.startswith(("swin.out.", "classifier.", "pooled_"))}
    seg = _seg_network()
    path = tmp_path / "seg_w7.pt"
    torch.save(seg.state_dict(), path)
    assert load_pretrained(net, str(path)) == "segmentation"
    state = net.state_dict()
    assert {"pooled_mean", "pooled_scale", "classifier.weight"} <= set(fresh)
    for k, v in fresh.items():
        assert torch.equal(state[k], v), k
    assert torch.equal(state["swin.decoder1.conv_block.conv1.conv.weight"],
                       seg.state_dict()["decoder1.conv_block.conv1.conv.weight"])


def test_window_size_is_a_network_option(tmp_path):
    """window_size 4 (the CPU recipe's) builds and runs at 64^3; a window-7 segmentation
    checkpoint initialises it: every bias table resampled from 13^3 to 7^3 offsets (the centre
    offset and the corners keep their learned values exactly), the window-4 index kept."""
    import torch

    _bundle_on_path()
    from scripts.checkpoints import load_pretrained, resize_bias_table
    from scripts.net import ProgSwinUNETR

    net = ProgSwinUNETR(in_channels=9, feature_size=12, depths=(1, 1, 1, 1), window_size=4).eval()
    attn = net.swin.swinViT.layers1[0].blocks[0].attn
    assert attn.relative_position_bias_table.shape == (7 ** 3, 3)  # (2 x 4 - 1)^3 relative positions, 3 heads
    own_index = attn.relative_position_index.clone()
    with torch.no_grad():
        out = net(torch.randn(1, 9, 64, 64, 64))
    assert out.shape == (1, 4) and torch.isfinite(out).all()
    seg = _seg_network()
    src = seg.state_dict()["swinViT.layers1.0.blocks.0.attn.relative_position_bias_table"]
    assert src.shape == (13 ** 3, 3)
    path = tmp_path / "seg_w7.pt"
    torch.save(seg.state_dict(), path)
    assert load_pretrained(net, str(path)) == "segmentation"
    got = attn.relative_position_bias_table.detach()
    assert torch.allclose(got, resize_bias_table(src, 7))
    grid_src, grid_got = src.T.reshape(3, 13, 13, 13), got.T.reshape(3, 7, 7, 7)
    assert torch.allclose(grid_got[:, 3, 3, 3], grid_src[:, 6, 6, 6])  # zero offset
    assert torch.allclose(grid_got[:, 0, 0, 0], grid_src[:, 0, 0, 0]) and torch.allclose(grid_got[:, 6, 6, 6], grid_src[:, 12, 12, 12])
    assert torch.equal(attn.relative_position_index, own_index)
    # a constant table stays constant: interpolation adds no structure of its own
    assert torch.allclose(resize_bias_table(torch.full((13 ** 3, 2), 0.5), 7), torch.full((343, 2), 0.5))


def test_pretrained_mismatch_names_both_shapes(tmp_path):
    import torch

    _bundle_on_path()
    from scripts.checkpoints import CheckpointMismatchError, load_pretrained
    from scripts.net import ProgSwinUNETR

    net = ProgSwinUNETR(in_channels=3, feature_size=12, depths=(1, 1, 1, 1))
    wide = tmp_path / "seg24.pt"
    torch.save(_seg_network(feature_size=24).state_dict(), wide)
    with pytest.raises(CheckpointMismatchError, match=r"checkpoint feature_size 24, network feature_size 12.*"
                                                       r"checkpoint \(24, 1, 2, 2, 2\) vs network \(12, 3, 2, 2, 2\)"):
        load_pretrained(net, str(wide))
    deep = tmp_path / "seg_depth2.pt"
    torch.save(_seg_network(depths=(2, 2, 2, 2)).state_dict(), deep)
    with pytest.raises(CheckpointMismatchError, match=r"swinViT.layers1.0.blocks.1.* has no counterpart"):
        load_pretrained(net, str(deep))
    # a ProgSwin-UNETR checkpoint (site fine-tuning) must match exactly: 6 vs 3 input channels
    six = tmp_path / "prog6.pt"
    torch.save({"model": ProgSwinUNETR(in_channels=6, feature_size=12, depths=(1, 1, 1, 1)).state_dict()}, six)
    with pytest.raises(CheckpointMismatchError, match=r"swin.swinViT.patch_embed.proj.weight: checkpoint "
                                                       r"\(12, 6, 2, 2, 2\) vs network \(12, 3, 2, 2, 2\)"):
        load_pretrained(net, str(six))
    junk = tmp_path / "other.pt"
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, junk)
    with pytest.raises(CheckpointMismatchError, match="neither a ProgSwin-UNETR"):
        load_pretrained(net, str(junk))


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_CHECKPOINT",))


def test_pretrained_refuses_pickled_code(tmp_path, monkeypatch):
    import torch

    _bundle_on_path()
    from scripts.checkpoints import load_pretrained
    from scripts.net import ProgSwinUNETR

    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "evil.pt"
    with open(bad, "wb") as f:
        pickle.dump({"model": _Payload()}, f)
    net = ProgSwinUNETR(in_channels=3, feature_size=12, depths=(1, 1, 1, 1))
    with pytest.raises(ValueError, match=r"evil.pt: not a weights-only checkpoint"):
        load_pretrained(net, str(bad))
    assert not (tmp_path / "PWNED_BY_CHECKPOINT").exists()
    progswin = tmp_path / "site.pt"
    ref = ProgSwinUNETR(in_channels=3, feature_size=12, depths=(1, 1, 1, 1))
    torch.save(ref.state_dict(), progswin)
    assert load_pretrained(net, str(progswin)) == "progswin"
    for k, v in ref.state_dict().items():
        assert torch.equal(net.state_dict()[k], v)


# ----------------------------------------------------------- warm-up, learning, pretrained
@pytest.fixture(scope="module")
def learned(cohort, tmp_path_factory) -> dict:
    """The CPU recipe (configs/cpu_recipe.json) on 6 tiny patients: warm-up, then 1 epoch
    end to end, through ``monai.bundle`` (ConfigWorkflow, in process)."""
    import torch
    from monai.bundle import ConfigWorkflow

    out = tmp_path_factory.mktemp("recipe_run")
    _bundle_on_path()
    wf = ConfigWorkflow(config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "cpu_recipe.json")],
                        workflow_type="train", logging_file=False, meta_file=str(CONFIGS / "metadata.json"),
                        **{**TINY, "bundle_root": str(BUNDLE), "dataset_dir": cohort["dir"],
                           "datalist": cohort["datalist"], "ckpt_dir": str(out / "models"),
                           "output_dir": str(out / "eval"), "fold": 0, "max_epochs": 1, "val_interval": 1,
                           "warmup_steps": 300, "batch_size": 2})
    wf.initialize()
    net = wf.parser.get_parsed_content("network")
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    warmup = wf.parser.get_parsed_content("train#head_warmup")
    after_warmup = {}
    trainer = wf.parser.get_parsed_content("train#trainer")
    from ignite.engine import Events

    trainer.add_event_handler(Events.EPOCH_STARTED(once=1), lambda e: after_warmup.update(
        {k: v.detach().clone() for k, v in net.state_dict().items()}))
    wf.run()
    wf.finalize()
    return {"out": out, "before": before, "after_warmup": after_warmup, "curve": warmup.curve,
            "after": {k: v.detach().clone() for k, v in net.state_dict().items()}, "torch": torch}


@pytest.mark.slow
def test_warmup_trains_only_the_head(learned):
    """The recipe's warm-up (warmup_solver logistic) fits the classifier and the pooled vector's
    scaler on cached features and nothing else: swin.out and the backbone are as initialised;
    the end-to-end epoch then moves the backbone and swin.out too."""
    torch = learned["torch"]
    before, warm = learned["before"], learned["after_warmup"]
    fitted = [k for k in before if k.startswith(("classifier.", "pooled_"))]
    assert len(fitted) == 4 and all(not torch.equal(before[k], warm[k]) for k in fitted)
    untouched = [k for k in before if k not in fitted]
    assert all(torch.equal(before[k], warm[k]) for k in untouched)
    moved = [k for k in untouched if not torch.equal(warm[k], learned["after"][k])]
    assert any(k.startswith("swin.out.") for k in moved) and any(k.startswith("swin.swinViT.") for k in moved)


@pytest.mark.slow
def test_recipe_writes_learning_curves(learned):
    """The warm-up and end-to-end learning curves are written per fold, with finite numbers."""
    import pandas as pd

    curve = learned["curve"]
    assert len(curve) == 1 and 0 < curve["step"].iloc[0] <= 300 and np.isfinite(curve["train_loss"]).all()
    out = learned["out"] / "eval" / "fold0"
    for name in ("warmup_curve.png", "warmup_curve.csv", "learning_curve.png", "learning_curve.csv"):
        assert (out / name).stat().st_size > 0, name
    lc = pd.read_csv(out / "learning_curve.csv")
    assert list(lc["epoch"]) == [1] and np.isfinite(lc.loc[0, "train_loss"]) and np.isfinite(lc.loc[0, "val_macro_auc"])


@pytest.mark.slow
def test_recipe_learns_its_training_patients(learned):
    """The learning check, recipe as shipped: the warm-up's logistic regression on the pooled
    vectors fits its 6 tiny training patients (training accuracy 1.0, class-balanced loss well
    below the chance level ln 4). A network, head, ring, scaler or cache wiring that loses the
    signal fails here. Seeded, so the same on every run of the same platform."""
    curve = learned["curve"]
    assert curve["train_accuracy"].iloc[-1] == 1.0, curve.to_string()
    assert curve["train_loss"].iloc[-1] < 0.6 * np.log(4), curve.to_string()


@pytest.fixture(scope="module")
def tiny_cache(cohort) -> dict:
    """Features and pooling input of the 6 tiny training patients, cached by the recipe's own
    network and preprocessing (train.json + cpu_recipe.json at the test sizes)."""
    import torch
    from monai.data import Dataset
    from monai.utils import set_determinism

    p = _parser(["train.json", "cpu_recipe.json"], **{**TINY, "dataset_dir": cohort["dir"],
                                                      "datalist": cohort["datalist"], "fold": 0})
    from scripts.warmup import cache_features

    set_determinism(seed=123)
    net = p.get_parsed_content("network_def")
    train = p.get_parsed_content("train#dataset#data")
    features, inputs, labels = cache_features(net, Dataset(train, p.get_parsed_content("validate#preprocessing")),
                                              "cpu", stride=2)
    set_determinism(None)
    return {"net": net, "features": features, "inputs": inputs, "labels": labels, "torch": torch}


@pytest.mark.slow
def test_adamw_warmup_learns_its_training_patients(tiny_cache):
    """The learning check of the step-wise solver (warmup_solver adamw, every head layer): on the
    same 6 patients, 300 AdamW steps reach training accuracy 1.0, the loss falling at every
    logged step to well below ln 4."""
    import copy

    from scripts.warmup import pooled_vectors, train_head

    net = copy.deepcopy(tiny_cache["net"])
    f, x, y = tiny_cache["features"], tiny_cache["inputs"], tiny_cache["labels"]
    net.set_standardization(pooled_vectors(net, f, x, "cpu"))
    curve = train_head(net, f, y, 300, 3e-3, 8, True, 1e-4, "cpu", 0, 100, inputs=x, l2=0.0035)
    assert list(curve["step"]) == [100, 200, 300]
    assert (np.diff(curve["train_loss"]) < 0).all(), curve.to_string()
    assert curve["train_accuracy"].iloc[-1] == 1.0, curve.to_string()
    assert curve["train_loss"].iloc[-1] < 0.6 * np.log(4), curve.to_string()


@pytest.mark.slow
def test_logistic_warmup_is_scikit_learns_logistic_regression(tiny_cache):
    """warmup_solver logistic: the classifier then gives scikit-learn's own probabilities for the
    same standardised pooled vectors (C = 1 / (2 l2 N), class-balanced), with all classes present
    and with two (the binary coefficient form mapped to two softmax rows; an absent class ~0);
    the learned parts enter shrunk by learned_scale."""
    import copy

    from sklearn.linear_model import LogisticRegression

    from scripts.warmup import fit_head_logistic, head_probabilities, pooled_vectors

    torch = tiny_cache["torch"]
    f, x, y = tiny_cache["features"], tiny_cache["inputs"], tiny_cache["labels"]
    first = int(y[0])
    second = next(int(k) for k in y if int(k) != first)
    for keep in (None, (first, second)):
        idx = torch.arange(len(y)) if keep is None else torch.tensor([i for i, k in enumerate(y) if int(k) in keep])
        net = copy.deepcopy(tiny_cache["net"])
        vectors = pooled_vectors(net, f[idx], x[idx], "cpu")
        net.set_standardization(vectors, learned_scale=0.3)
        std = vectors.std(0)
        nl = net.n_learned
        assert nl == 2 * (1 + 2 * 9) and net.classifier.in_features == nl + 3 * 9
        varying = std[:nl] > 1e-6
        torch.testing.assert_close(net.pooled_scale[:nl][varying], std[:nl][varying] / 0.3)
        curve = fit_head_logistic(net, f[idx], y[idx], x[idx], l2=0.01)
        z = ((vectors - net.pooled_mean) / net.pooled_scale).double().numpy()
        ref = LogisticRegression(C=1 / (2 * 0.01 * len(idx)), class_weight="balanced", max_iter=1000)
        ref.fit(z, y[idx].numpy())
        ours = head_probabilities(net, f[idx], "cpu", inputs=x[idx])
        np.testing.assert_allclose(ours[:, ref.classes_], ref.predict_proba(z), atol=2e-4)
        absent = [k for k in range(4) if k not in ref.classes_]
        assert np.all(ours[:, absent] < 1e-6) and curve["train_accuracy"].iloc[0] == 1.0


@pytest.mark.parametrize("kwargs, message", [
    ({"solver": "sgd"}, "warmup_solver: expected one of"),
    ({"learned_scale": 0}, r"warmup_learned_scale must be in \(0, 1\]"),
    ({"learned_scale": 2}, r"warmup_learned_scale must be in \(0, 1\]"),
])
def test_warmup_refuses_bad_settings(kwargs, message):
    _bundle_on_path()
    from scripts.warmup import HeadWarmup

    with pytest.raises(ValueError, match=message):
        HeadWarmup(network=None, dataset=[], steps=10, **kwargs)


def test_logistic_warmup_needs_region_pooling():
    import torch

    _bundle_on_path()
    from scripts.net import ProgSwinUNETR
    from scripts.warmup import fit_head_logistic

    net = ProgSwinUNETR(in_channels=3, feature_size=12, depths=(1, 1, 1, 1), window_size=4)
    with pytest.raises(ValueError, match="fits the region-pooling classifier.*pooling 'mean'"):
        fit_head_logistic(net, torch.zeros(2, 12, 8, 8, 8), torch.tensor([0, 1]), None)
    with pytest.raises(ValueError, match=r"learned_scale must be in \(0, 1\]"):
        ProgSwinUNETR(in_channels=9, feature_size=12, depths=(1, 1, 1, 1), head_hidden=2,
                      pooling="regions").set_standardization(torch.randn(4, 26), learned_scale=0)


@pytest.mark.slow
def test_resume_with_pretrained_keeps_the_checkpoint(learned, cohort, tmp_path, caplog):
    """A resumed run continues from its own checkpoint: neither pretrained weights nor the
    warm-up are applied again, and the epoch count continues."""
    import logging
    import shutil

    import torch
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    seg_ckpt = tmp_path / "seg.pt"
    torch.save(_seg_network().state_dict(), seg_ckpt)
    shutil.copytree(learned["out"] / "models" / "fold0", tmp_path / "models" / "fold0")
    _bundle_on_path()
    wf = ConfigWorkflow(config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "cpu_recipe.json")],
                        workflow_type="train", logging_file=False, meta_file=str(CONFIGS / "metadata.json"),
                        **{**TINY, "bundle_root": str(BUNDLE), "dataset_dir": cohort["dir"],
                           "datalist": cohort["datalist"], "ckpt_dir": str(tmp_path / "models"),
                           "output_dir": str(tmp_path / "eval"), "fold": 0, "max_epochs": 2,
                           "warmup_steps": 300, "batch_size": 2, "resume": "true", "pretrained": str(seg_ckpt)})
    wf.initialize()
    net = wf.parser.get_parsed_content("network")
    trainer = wf.parser.get_parsed_content("train#trainer")
    at_start = {}
    trainer.add_event_handler(Events.EPOCH_STARTED(once=2), lambda e: at_start.update(
        {k: v.detach().clone() for k, v in net.state_dict().items()}))
    with caplog.at_level(logging.INFO):
        wf.run()
    wf.finalize()
    assert trainer.state.epoch == 2
    saved = torch.load(tmp_path / "models" / "fold0" / "checkpoint_epoch=1.pt", weights_only=True)["model"]
    for k, v in saved.items():
        assert torch.equal(at_start[k], v), k
    text = caplog.text
    assert "pretrained" in text and "not reloaded" in text and "head warm-up skipped" in text


def test_fresh_run_loads_pretrained(cohort, tmp_path):
    """pretrained = an hcc_liver_seg checkpoint: the network starts from it (one iteration run)."""
    import torch
    from ignite.engine import Events

    seg = _seg_network()
    seg_ckpt = tmp_path / "seg.pt"
    torch.save(seg.state_dict(), seg_ckpt)
    p = _parser(["train.json"], **{**TINY, "dataset_dir": cohort["dir"], "datalist": cohort["datalist"],
                                   "ckpt_dir": str(tmp_path / "models"), "output_dir": str(tmp_path / "eval"),
                                   "pretrained": str(seg_ckpt), "cache_rate": 0.0})
    net = p.get_parsed_content("network")
    trainer = p.get_parsed_content("train#trainer")
    p.get_parsed_content("train#pretrained_loader").attach(trainer)
    seen = {}
    trainer.add_event_handler(Events.ITERATION_STARTED(once=1), lambda e: (seen.update(
        {"w": net.swin.encoder2.layer.conv1.conv.weight.detach().clone()}), e.terminate()))
    trainer.run()
    assert torch.equal(seen["w"], seg.encoder2.layer.conv1.conv.weight)


# --------------------------------------------------------------------------- shipped files
def _large_files(bundle: Path) -> list[dict]:
    import yaml

    return yaml.safe_load((bundle / "large_files.yml").read_text())["large_files"]


@pytest.mark.parametrize("bundle", [SEG_BUNDLE, BUNDLE], ids=["hcc_liver_seg", "progswin_prognosis"])
def test_shipped_weights_match_sha256_and_load(bundle):
    import torch

    entries = [e for e in _large_files(bundle) if "synthetic" in e["path"]]
    assert entries, f"{bundle.name}: no synthetic weights listed in large_files.yml"
    for entry in entries:
        path = bundle / entry["path"]
        assert path.stat().st_size <= 25 * 1024 * 1024, f"{path} is over the Model Zoo's 25 MB"
        assert entry["hash_type"] == "sha256"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["hash_val"], path
    p = _parser(["inference.json", "synthetic_weights.json"], bundle=bundle, device="cpu")
    net = p.get_parsed_content("network_def")
    ckpt = p.get_parsed_content("ckpt_path")
    assert os.path.isfile(ckpt) and Path(ckpt).resolve() == (bundle / entries[0]["path"]).resolve()
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    state = state.get("model", state)
    net.load_state_dict(state)  # strict: every tensor of the overlay's network is in the file
    assert all(v.dtype == torch.float32 for v in net.state_dict().values() if v.is_floating_point())
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert any("synthetic" in k for k in meta["eval_metrics"]), meta["eval_metrics"]


def test_shipped_prognosis_weights_run_from_the_repository_root(cohort, tmp_path):
    """The issue's command, as a user types it: from the repository root, no PYTHONPATH, the
    inference config plus the synthetic-weights overlay writes one row per patient with
    probabilities that sum to 1 (the bundle's own package is found through ``_target_``)."""
    import subprocess

    import pandas as pd

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    configs = "['bundles/progswin_prognosis/configs/inference.json','bundles/progswin_prognosis/configs/synthetic_weights.json']"
    out = tmp_path / "predictions"
    run = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", configs,
                          "--bundle_root", "bundles/progswin_prognosis", "--dataset_dir", cohort["dir"],
                          "--datalist", cohort["datalist"], "--output_dir", str(out), "--device", "cpu"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    frame = pd.read_csv(out / "predictions.csv")
    assert sorted(frame["patient_id"]) == sorted(it["patient_id"] for it in cohort["items"])
    probs = frame[[f"prob_{k}" for k in range(4)]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert (frame["pred_class"] == probs.argmax(1)).all()


def test_warmup_l2_penalises_every_heads_last_map():
    """warmup_l2 regularises the last linear map of every head: classifier for the hidden-layer
    and region-pooling heads, swin.out for Eq. 6, whose weights shrink under a large penalty."""
    import torch

    _bundle_on_path()
    from scripts.net import ProgSwinUNETR
    from scripts.warmup import train_head

    eq6 = ProgSwinUNETR(in_channels=3, feature_size=12, depths=(1, 1, 1, 1), window_size=4)
    hidden = ProgSwinUNETR(in_channels=3, feature_size=12, depths=(1, 1, 1, 1), window_size=4, head_hidden=3)
    assert eq6.final_weight() is eq6.swin.out.conv.conv.weight and hidden.final_weight() is hidden.classifier.weight
    feats, labels = torch.randn(8, 12, 4, 4, 4), torch.tensor([0, 1, 2, 3] * 2)
    norms = []
    for l2 in (0.0, 10.0):
        torch.manual_seed(0)
        net = ProgSwinUNETR(in_channels=3, feature_size=12, depths=(1, 1, 1, 1), window_size=4)
        train_head(net, feats, labels, steps=50, learning_rate=0.01, l2=l2, log_interval=50)
        norms.append(float(net.final_weight().norm()))
    assert norms[1] < 0.5 * norms[0], norms
