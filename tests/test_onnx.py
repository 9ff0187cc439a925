"""ONNX export (``python -m analysis export-onnx``) and the bundles' ``--backend onnxruntime``.

Equality: ONNX Runtime's output equals PyTorch's within ATOL + RTOL x |torch| element-wise
(analysis.onnx_export: 1e-4 + 1e-3 x |output|, fp32 CPU) at 64^3, feature_size 12: random tiny
networks (ProgSwin-UNETR with region pooling over 9 channels, SwinUNETR) and the shipped synthetic
weights of each bundle. Bundle runs on the shared synthetic cohort with both backends: the
prognosis probabilities within PROB_ATOL, the segmentation masks with Dice > 0.99 per label.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SEG = REPO / "bundles" / "hcc_liver_seg"
PROG = REPO / "bundles" / "progswin_prognosis"
#: prognosis probabilities, torch vs onnxruntime backend
PROB_ATOL = 1e-4

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _sha(path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _close(path, net, x):
    import torch

    from analysis.onnx_export import ATOL, RTOL

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = net(x).numpy()
    got = session.run(None, {"image": x.numpy()})[0]
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=RTOL)
    return float(np.max(np.abs(got - ref)))


# ------------------------------------------------------------------ random tiny networks
def test_progswin_region_pooling_exports_with_its_head(tmp_path):
    """ProgSwin-UNETR with the head of the shipped sizes (9 channels, regions_images, peritumoral
    rings): the pooled statistics over the input's label channels are part of the graph, and the
    batch axis is free."""
    import torch

    from analysis.onnx_export import bundle_scripts, example_input, export_network

    with bundle_scripts(PROG):
        from scripts.net import ProgSwinUNETR

        torch.manual_seed(0)
        net = ProgSwinUNETR(in_channels=9, out_channels=4, feature_size=12, window_size=4, head_hidden=2,
                            pooling="regions_images", peritumoral_voxels=2, depths=(1, 1, 1, 1)).eval()
    with torch.no_grad():  # a non-trivial scaler, as a fitted one
        net.pooled_mean.normal_()
        net.pooled_scale.uniform_(0.5, 2.0)
    x = example_input([1, 9, 64, 64, 64], image_channels=3)
    path = export_network(net, x, tmp_path / "prog.onnx")
    _close(path, net, x)
    x2 = example_input([2, 9, 64, 64, 64], seed=3, image_channels=3)
    _close(path, net, x2)
    # the masks matter: other regions, other scores
    x3 = x.clone()
    x3[:, 3:] = torch.flip(x3[:, 3:], dims=[2])
    with torch.no_grad():
        assert not torch.allclose(net(x), net(x3))
    _close(path, net, x3)


def test_swinunetr_exports_and_matches(tmp_path):
    import torch
    from monai.networks.nets import SwinUNETR

    from analysis.onnx_export import export_network

    torch.manual_seed(0)
    net = SwinUNETR(in_channels=1, out_channels=3, feature_size=12, depths=(1, 1, 1, 1)).eval()
    x = torch.rand(2, 1, 64, 64, 64)
    path = export_network(net, x[:1], tmp_path / "seg.onnx")
    _close(path, net, x)


# --------------------------------------------------------------- shipped synthetic weights
@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """Both bundles' shipped synthetic weights exported through the verb's function (which
    itself checks ONNX Runtime against PyTorch on a random input)."""
    from analysis.onnx_export import export_bundle_onnx

    out = tmp_path_factory.mktemp("onnx")
    return {name: export_bundle_onnx(bundle, out / f"{name}.onnx", overlay="configs/synthetic_weights.json")
            for name, bundle in (("prog", PROG), ("seg", SEG))}


@pytest.mark.parametrize("name,bundle", [("prog", PROG), ("seg", SEG)], ids=["progswin_prognosis", "hcc_liver_seg"])
def test_shipped_weights_export_and_match(exported, name, bundle):
    import torch
    from monai.bundle import ConfigParser

    from analysis.onnx_export import WEIGHTS_SHA_KEY, bundle_scripts, example_input, onnx_metadata

    meta = onnx_metadata(exported[name])
    weights = bundle / "models" / "synthetic_fs12.pt"
    assert meta[WEIGHTS_SHA_KEY] == _sha(weights) and meta["bundle"] == bundle.name
    with bundle_scripts(bundle):
        parser = ConfigParser()
        parser.read_config([str(bundle / "configs" / "inference.json"), str(bundle / "configs" / "synthetic_weights.json")])
        parser.update({"bundle_root": str(bundle)})
        net = parser.get_parsed_content("network_def").eval()
        state = torch.load(weights, map_location="cpu", weights_only=True)
        net.load_state_dict(state.get("model", state))
    shape = json.loads(meta["input_shape"])
    _close(exported[name], net, example_input(shape, seed=5, image_channels=3 if name == "prog" else None))


def test_export_refuses_weights_that_do_not_match_their_sha256(tmp_path):
    from analysis.onnx_export import OnnxExportError, export_bundle_onnx

    copy = tmp_path / PROG.name
    shutil.copytree(PROG, copy, ignore=shutil.ignore_patterns("__pycache__", "eval"))
    raw = bytearray((copy / "models" / "synthetic_fs12.pt").read_bytes())
    raw[-100] ^= 0xFF
    (copy / "models" / "synthetic_fs12.pt").write_bytes(bytes(raw))
    with pytest.raises(OnnxExportError, match=r"synthetic_fs12\.pt: sha256 [0-9a-f]{64} does not match"):
        export_bundle_onnx(copy, tmp_path / "x.onnx", overlay="configs/synthetic_weights.json")
    assert not (tmp_path / "x.onnx").exists()


# ------------------------------------------------------------------------- the backends
def _workflow_run(bundle: Path, configs: list[str], **overrides):
    from monai.bundle import ConfigWorkflow

    from analysis.onnx_export import bundle_scripts

    with bundle_scripts(bundle):
        wf = ConfigWorkflow(config_file=[str(bundle / "configs" / c) for c in configs], workflow_type="infer",
                            logging_file=False, bundle_root=str(bundle), **overrides)
        wf.initialize()
        try:
            wf.run()
        finally:
            wf.finalize()


@pytest.fixture(scope="module")
def prog_datalist(small_cohort, tmp_path_factory) -> str:
    from analysis.datalists import write_datalists

    out = tmp_path_factory.mktemp("onnx_dl")
    paths = write_datalists(small_cohort, out=out)
    content = json.loads(Path(paths["prognosis"]).read_text())
    subset = out / "prognosis_3.json"
    subset.write_text(json.dumps({**content, "training": content["training"][:3], "unlabelled": []}))
    return str(subset)


def test_prognosis_backends_agree(exported, small_cohort, prog_datalist, tmp_path):
    import pandas as pd

    common = {"dataset_dir": str(small_cohort), "datalist": prog_datalist, "device": "cpu", "num_workers": 0}
    frames = {}
    for backend in ("torch", "onnxruntime"):
        out = tmp_path / backend
        _workflow_run(PROG, ["inference.json", "synthetic_weights.json"], output_dir=str(out), backend=backend,
                      onnx_path=str(exported["prog"]), **common)
        frames[backend] = pd.read_csv(out / "predictions.csv").sort_values("patient_id").reset_index(drop=True)
    cols = [f"prob_{k}" for k in range(4)]
    assert len(frames["torch"]) == 3
    assert list(frames["torch"]["patient_id"]) == list(frames["onnxruntime"]["patient_id"])
    np.testing.assert_allclose(frames["onnxruntime"][cols].to_numpy(), frames["torch"][cols].to_numpy(), atol=PROB_ATOL)
    assert (frames["onnxruntime"]["pred_class"] == frames["torch"]["pred_class"]).all()


def test_segmentation_backends_agree(exported, small_cohort, tmp_path):
    import nibabel as nib

    scan = sorted((Path(small_cohort) / "images").glob("*/t0.nii.gz"))[0]
    inputs = tmp_path / "inputs" / scan.parent.name
    inputs.mkdir(parents=True)
    os.link(scan, inputs / "t0.nii.gz")
    masks = {}
    for backend in ("torch", "onnxruntime"):
        out = tmp_path / backend
        _workflow_run(SEG, ["inference.json", "synthetic_weights.json"], input_dir=str(tmp_path / "inputs"),
                      output_dir=str(out), backend=backend, onnx_path=str(exported["seg"]), min_liver_ml=0.0,
                      num_workers=0, device="$torch.device('cpu')", amp=False)
        masks[backend] = np.asarray(nib.load(out / scan.parent.name / "t0.nii.gz").dataobj)
    a, b = masks["torch"], masks["onnxruntime"]
    assert a.shape == b.shape
    for label in (1, 2):
        inter, total = np.sum((a == label) & (b == label)), np.sum(a == label) + np.sum(b == label)
        dice = 1.0 if total == 0 else 2 * inter / total
        assert dice > 0.99, (label, dice)


def test_backend_text_and_missing_onnx_file(tmp_path):
    from monai.bundle import ConfigParser

    from analysis.onnx_export import bundle_scripts

    with bundle_scripts(PROG):
        from scripts.onnx_backend import backend_id

        assert backend_id(" ONNXRuntime ") == "onnxruntime" and backend_id("torch") == "torch"
        with pytest.raises(ValueError, match=r"backend: expected one of \['torch', 'onnxruntime'\]; got 'tensorrt'"):
            backend_id("tensorrt")
        parser = ConfigParser()
        parser.read_config(str(PROG / "configs" / "inference.json"))
        parser.update({"bundle_root": str(PROG), "backend": "onnxruntime", "onnx_path": str(tmp_path / "none.onnx")})
        with pytest.raises(Exception) as err:
            parser.get_parsed_content("network")
    chain, e = [], err.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    assert any("none.onnx: no ONNX model" in m and "export-onnx" in m for m in chain), chain


def test_onnx_sha256_is_checked_before_a_session_opens(exported, tmp_path):
    from analysis.onnx_export import bundle_scripts

    copy = tmp_path / SEG.name
    shutil.copytree(SEG, copy, ignore=shutil.ignore_patterns("__pycache__", "eval"))
    shutil.copy2(exported["seg"], copy / "models" / "model.onnx")
    with open(copy / "large_files.yml", "a", encoding="utf-8") as fh:
        fh.write(f'  - path: "models/model.onnx"\n    url: ""\n    hash_type: "sha256"\n    hash_val: "{"0" * 64}"\n')
    with bundle_scripts(copy):
        from scripts import integrity, onnx_backend

        with pytest.raises(integrity.IntegrityError, match=r"model\.onnx: sha256 [0-9a-f]{64} does not match"):
            onnx_backend.OnnxRuntimeNetwork(str(copy / "models" / "model.onnx"), str(copy))
        (copy / "large_files.yml").write_text((copy / "large_files.yml").read_text().replace("0" * 64, _sha(exported["seg"])))
        net = onnx_backend.OnnxRuntimeNetwork(str(copy / "models" / "model.onnx"), str(copy), threads=1)
        assert net.input_shape[1:] == [1, 64, 64, 32]


def test_onnx_backend_is_one_copy_in_both_bundles():
    assert (SEG / "scripts" / "onnx_backend.py").read_bytes() == (PROG / "scripts" / "onnx_backend.py").read_bytes()


# ------------------------------------------------------------------------ shared archive
def test_export_bundle_ships_model_onnx_with_its_sha256(exported, tmp_path):
    import torch

    from analysis.bundle_archive import BundleExportError, export_bundle
    from analysis.onnx_export import export_network

    copy = tmp_path / PROG.name
    shutil.copytree(PROG, copy, ignore=shutil.ignore_patterns("__pycache__", "eval"))
    shutil.copy2(exported["prog"], copy / "models" / "model.onnx")
    target = export_bundle(copy, tmp_path / "dist", trace=False)
    with zipfile.ZipFile(target) as z:
        manifest = json.loads(z.read(f"{PROG.name}/manifest.json"))
        assert manifest["files"]["models/model.onnx"]["sha256"] == _sha(exported["prog"])
        assert _sha(exported["prog"]) in z.read(f"{PROG.name}/large_files.yml").decode()
    # an ONNX file from other weights is refused
    export_network(torch.nn.Conv3d(1, 1, 1), torch.rand(1, 1, 4, 4, 4), copy / "models" / "model.onnx",
                   metadata={"source_weights_sha256": "1" * 64})
    with pytest.raises(BundleExportError, match=r"model\.onnx: exported from weights with sha256 1{64}"):
        export_bundle(copy, tmp_path / "dist2", trace=False)


def test_export_onnx_verb_writes_the_file(tmp_path):
    """``python -m analysis export-onnx`` as the README shows it (prognosis, synthetic sizes)."""
    out = tmp_path / "model.onnx"
    env = dict(os.environ, OMP_NUM_THREADS="2")
    run = subprocess.run([sys.executable, "-m", "analysis", "export-onnx", "--bundle", str(PROG), "--overlay",
                          "configs/synthetic_weights.json", "--out", str(out)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert out.is_file() and f"sha256 {_sha(out)}" in run.stdout
    bad = subprocess.run([sys.executable, "-m", "analysis", "export-onnx", "--bundle", str(PROG), "--weights",
                          str(tmp_path / "missing.pt"), "--out", str(tmp_path / "m.onnx")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "missing.pt" in bad.stderr
