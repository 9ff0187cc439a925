"""progswin_prognosis bundle: metrics, input module, network, 4-fold CV end to end, ensemble,
Grad-CAM++, resume, torchrun, and the Model-Zoo checks. CPU, tiny settings (feature_size 12,
Swin depths 1, 64^3 input, 1 epoch, the 12-patient ``small_cohort``).

One cross-validation run (``cv`` fixture, ~2 min on 2 cores) feeds most tests; the rest are
seconds each. Bundle code is imported from the bundle folder (``scripts`` package), never from
``analysis``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "progswin_prognosis"
CONFIGS = BUNDLE / "configs"
SCHEMA = REPO / "bundles" / "schema" / "meta_schema_20240725.json"
CASES = REPO / "tests" / "data" / "metrics_cases.json"

#: tiny network and data settings shared by every run here (overrides of the bundle's ids)
TINY = {"feature_size": 12, "network_def#depths": [1, 1, 1, 1], "spatial_size": [64, 64, 64],
        "num_workers": 0, "device": "cpu"}
TINY_TRAIN = {**TINY, "network_def#use_checkpoint": False, "max_epochs": 1, "val_interval": 1}


# ------------------------------------------------------------------------------------ helpers
def _bundle_on_path() -> None:
    """Make ``scripts`` resolve to this bundle's package (hcc_liver_seg has one too)."""
    for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
        if not (getattr(sys.modules[name], "__file__", None) or "").startswith(str(BUNDLE)):
            del sys.modules[name]
    if str(BUNDLE) in sys.path:
        sys.path.remove(str(BUNDLE))
    sys.path.insert(0, str(BUNDLE))


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(BUNDLE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def _args(overrides: dict) -> list[str]:
    out = []
    for k, v in overrides.items():
        out += [f"--{k}", v if isinstance(v, str) else json.dumps(v)]
    return out


def _bundle_run(configs: list[str], overrides: dict, timeout: int = 1200) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run`` from the bundle folder, as docs/README.md says."""
    files = [f"configs/{c}" for c in configs]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
           json.dumps(files) if len(files) > 1 else files[0], *_args(overrides)]
    proc = subprocess.run(cmd, check=False, cwd=BUNDLE, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _parser(configs: list[str], **overrides):
    from monai.bundle import ConfigParser

    _bundle_on_path()
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / c) for c in configs])
    parser.update({"bundle_root": str(BUNDLE), **overrides})
    return parser


# ----------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cohort(small_cohort, tmp_path_factory) -> dict:
    """small_cohort (12 patients, 64^3) with its prognosis datalist written outside the cohort.

    The training runs use 2 patients per fold (8 of the 12, the first two of each fold in
    datalist order): 6 training patients per fold = 3 steps, which keeps the 4-fold loop near
    a minute on 2 free cores. The unused 4 stay in ``full_datalist`` for the data tests.
    """
    from analysis.datalists import write_datalists

    out = tmp_path_factory.mktemp("prog_datalists")
    paths = write_datalists(small_cohort, out=out)
    content = json.loads(Path(paths["prognosis"]).read_text())
    assert len(content["training"]) >= 8 and {it["fold"] for it in content["training"]} == {0, 1, 2, 3}
    items = [it for k in range(4) for it in [i for i in content["training"] if i["fold"] == k][:2]]
    subset = out / "prognosis_8.json"
    subset.write_text(json.dumps({**content, "training": items, "unlabelled": []}))
    return {"dir": small_cohort, "datalist": str(subset), "items": items,
            "full_datalist": str(paths["prognosis"]), "all_items": content["training"]}


@pytest.fixture(scope="module")
def cv(cohort, tmp_path_factory) -> dict:
    """The documented CV command, end to end: configs/cross_validate.json through monai.bundle
    run, which trains the 4 folds through monai.bundle run."""
    out = tmp_path_factory.mktemp("prog_cv")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/cross_validate.json",
           "--dataset_dir", str(cohort["dir"]), "--datalist", cohort["datalist"], "--output_dir", str(out),
           "--ckpt_dir", str(out / "models"), "--folds", "4", "--fold_overrides", json.dumps(TINY_TRAIN)]
    proc = subprocess.run(cmd, check=False, cwd=BUNDLE, env=_env(), capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {"out": out, "cmd": cmd, "log": proc.stdout + proc.stderr, **cohort}


# ------------------------------------------------------------------------------ unit: metrics
def test_metrics_reference_cases():
    """The bundle's metric copy reproduces the project's shared reference cases."""
    _bundle_on_path()
    from scripts import metrics

    cases = json.loads(CASES.read_text())
    assert cases
    for case in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", metrics.AbsentClassWarning)
            aucs = metrics.per_class_auc(case["y_true"], case["y_prob"])
            macro = metrics.macro_auc(case["y_true"], case["y_prob"])
        exp = case["expected"]
        want = [np.nan if a is None else a for a in exp["auc_per_class"]]
        np.testing.assert_allclose(aucs, want, atol=1e-9, equal_nan=True, err_msg=case["name"])
        if exp["macro_auc"] is None:
            assert math.isnan(macro), case["name"]
        else:
            assert macro == pytest.approx(exp["macro_auc"], abs=1e-9), case["name"]
        assert metrics.accuracy(case["y_true"], case["y_prob"]) == pytest.approx(exp["accuracy"]), case["name"]


@pytest.mark.parametrize("seed", [0, 7])
def test_metrics_copies_agree_in_full(seed):
    """The two metric copies (the bundle runs zipped alone, so it has its own) give the same
    full output on every shared reference case: per-class AUC, macro AUC, accuracy, n, and the
    bootstrap CIs (same resamples for the same seed), and the same confusion and
    sensitivity/specificity tables."""
    from analysis import metrics as project

    _bundle_on_path()
    from scripts import metrics as bundle

    for case in json.loads(CASES.read_text()):
        y, p = case["y_true"], case["y_prob"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", project.AbsentClassWarning)
            warnings.simplefilter("ignore", bundle.AbsentClassWarning)
            a = project.evaluate(y, p, n_boot=300, seed=seed)
            b = bundle.evaluate(y, p, n_boot=300, seed=seed)
        assert b.pop("n_boot") == 300
        assert set(a) == set(b), case["name"]
        for key in a:
            assert json.dumps(a[key], sort_keys=True) == json.dumps(b[key], sort_keys=True), (case["name"], key)
        pred = np.argmax(np.asarray(p), axis=1)
        pd.testing.assert_frame_equal(project.confusion(y, pred), bundle.confusion(y, pred), check_names=False)
        pd.testing.assert_frame_equal(project.sensitivity_specificity(y, pred), bundle.sensitivity_specificity(y, pred),
                                      check_names=False)


def test_metrics_by_hand_and_absent_class(tmp_path):
    _bundle_on_path()
    from scripts import metrics

    # class 3 absent: NaN with a warning naming it, macro over classes 0-2 only (not 0 averaged in)
    y = [0, 0, 1, 1, 2, 2]
    p = [[.8, .1, .05, .05], [.4, .3, .2, .1], [.1, .7, .1, .1], [.5, .4, .05, .05], [.1, .1, .7, .1],
         [.2, .2, .5, .1]]
    with pytest.warns(metrics.AbsentClassWarning, match="class 3"):
        aucs = metrics.per_class_auc(y, p)
    # class 0: positives {.8,.4} vs negatives {.1,.5,.1,.2}: .8 beats 4, .4 beats 3 -> 7/8
    # class 1: positives {.7,.4} vs {.1,.3,.1,.2}: 8/8; class 2: {.7,.5} vs {.05,.2,.1,.05}: 8/8
    np.testing.assert_allclose(aucs[:3], [7 / 8, 1.0, 1.0])
    assert math.isnan(aucs[3])
    assert metrics.macro_auc(y, p, warn=False) == pytest.approx((7 / 8 + 2) / 3)
    assert metrics.accuracy(y, p) == pytest.approx(5 / 6)  # only row 3 wrong (argmax 0, true 1)
    ss = metrics.sensitivity_specificity(y, np.argmax(p, axis=1))
    # class 0 predicted for rows 0,1,3 -> TP 2, FP 1 (row 3), TN 3
    assert ss.loc[0, "sensitivity"] == 1.0 and ss.loc[0, "specificity"] == pytest.approx(3 / 4)
    assert math.isnan(ss.loc[3, "sensitivity"]) and ss.loc[3, "specificity"] == 1.0

    frame = pd.DataFrame({"patient_id": [f"P{i}" for i in range(6)], "fold": 0, "label": y,
                          **{f"prob_{k}": [r[k] for r in p] for k in range(4)},
                          "pred_class": np.argmax(p, axis=1)})
    with pytest.warns(metrics.AbsentClassWarning):
        m = metrics.write_evaluation(frame, str(tmp_path / "ev"), n_boot=1000, seed=0)
    saved = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert saved["auc_per_class"]["3"] is None and saved["auc_ci"]["3"] is None
    assert saved["macro_auc"] == pytest.approx((7 / 8 + 2) / 3)
    lo, hi = saved["macro_auc_ci"]
    assert 0.5 <= lo <= saved["macro_auc"] <= hi <= 1.0
    assert set(saved) >= {"auc_per_class", "auc_ci", "macro_auc", "macro_auc_ci", "accuracy", "n"}
    assert m["n"] == saved["n"] == 6
    conf = pd.read_csv(tmp_path / "ev" / "confusion.csv")
    assert conf.drop(columns="true_class").to_numpy().sum() == 6 and conf.loc[1, "pred_0"] == 1
    for name in ("per_class.csv", "roc.png", "roc.csv"):
        assert (tmp_path / "ev" / name).stat().st_size > 0


# ------------------------------------------------------------------------- unit: input module
def _preprocess(cohort, item: dict, **overrides):
    parser = _parser(["inference.json"], dataset_dir=str(cohort["dir"]), datalist=cohort["datalist"],
                     **TINY, **overrides)
    return parser.get_parsed_content("preprocessing")(item)


def _abs_item(cohort, index=0) -> dict:
    item = dict(cohort["items"][index])
    for k in list(item):
        if k.startswith(("image_", "mask_")):
            item[k] = str(Path(cohort["dir"]) / item[k])
    return item


def test_input_module_shape_and_masking(cohort):
    item = _abs_item(cohort)
    out = _preprocess(cohort, item, keep_timepoints=True)
    img = out["image"]
    assert tuple(img.shape) == (3, 64, 64, 64)
    # Eq. 3: outside the (resized) liver+tumour mask the input is exactly 0; inside it is
    # z-normalised per time point over exactly those voxels
    for c, tp in enumerate(("t0", "t1", "t2")):
        mask = np.asarray(out[f"mask_{tp}"])[0] > 0
        assert mask.any()
        assert np.all(np.asarray(img[c])[~mask] == 0)
        inside = np.asarray(img[c])[mask]
        assert abs(inside.mean()) < 1e-3 and inside.std() == pytest.approx(1.0, abs=1e-2)
    assert int(out["label"]) == item["label"]
    six = _preprocess(cohort, _abs_item(cohort), mask_channels="union")["image"]
    assert tuple(six.shape) == (6, 64, 64, 64) and set(np.unique(np.asarray(six[3:]))) <= {0.0, 1.0}
    for c in range(3):  # the union channel is exactly where the image is masked in
        assert np.array_equal(np.asarray(six[3 + c]) > 0, np.asarray(out[f"mask_t{c}"])[0] > 0)
    # the paper's one-hot "enhanced target regions": liver and tumour channel per time point, disjoint,
    # together the union mask, tumour where the (resized, nearest) label map is 2
    nine = _preprocess(cohort, _abs_item(cohort), mask_channels="labels", keep_timepoints=True)
    x9 = np.asarray(nine["image"])
    assert x9.shape == (9, 64, 64, 64)
    for c in range(3):
        liver, tumour = x9[3 + 2 * c], x9[4 + 2 * c]
        label = np.asarray(out[f"mask_t{c}"])[0]  # mode none keeps the resized label map
        assert set(np.unique(liver)) <= {0.0, 1.0} and set(np.unique(tumour)) <= {0.0, 1.0}
        assert not np.any((liver > 0) & (tumour > 0))
        assert np.array_equal((liver + tumour) > 0, np.asarray(out[f"mask_t{c}"])[0] > 0)
        assert tumour.sum() > 0 and np.array_equal(tumour > 0, label == 2) and np.array_equal(liver > 0, label == 1)
    np.testing.assert_array_equal(x9[:3], np.asarray(img))  # the images do not depend on the mode
    with pytest.raises(Exception) as info:
        _preprocess(cohort, _abs_item(cohort), mask_channels="onehot")
    chain, err = [], info.value
    while err is not None:
        chain.append(str(err))
        err = err.__cause__
    assert any("mask_channels: expected one of ['labels', 'none', 'union']; got 'onehot'" in m for m in chain), chain


def _input_error(fn) -> str:
    """The PrognosisInputError behind a failure (MONAI's Compose wraps it in a RuntimeError
    whose chain keeps our message; the log shows it as the direct cause)."""
    from scripts.transforms import PrognosisInputError

    with pytest.raises(Exception) as info:
        fn()
    err = info.value
    while err is not None and not isinstance(err, PrognosisInputError):
        err = err.__cause__
    assert err is not None, f"no PrognosisInputError in the chain of {info.value!r}"
    return str(err)


def test_input_module_bad_inputs(cohort, tmp_path):
    import nibabel as nib

    _bundle_on_path()
    item = _abs_item(cohort)
    pid = item["patient_id"]
    missing = {k: v for k, v in item.items() if k != "image_t2"}
    assert _input_error(lambda: _preprocess(cohort, missing)).startswith(
        f"patient {pid}: time point t2 missing ('image_t2' not in the datalist item)")
    gone = dict(item, mask_t1=str(tmp_path / "nope.nii.gz"))
    assert _input_error(lambda: _preprocess(cohort, gone)) == (
        f"patient {pid}: time point t1: mask_t1 file not found: {tmp_path / 'nope.nii.gz'}")
    src = nib.load(item["mask_t0"])
    empty = tmp_path / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(src.shape, np.uint8), src.affine), empty)
    msg = _input_error(lambda: _preprocess(cohort, dict(item, mask_t0=str(empty))))
    assert msg.startswith(f"patient {pid}: time point t0: mask is empty (no liver or tumour voxel) in {empty}")
    # issue 15: non-finite voxels are named with patient, time point and file
    img = nib.load(item["image_t1"])
    arr = np.asanyarray(img.dataobj).astype(np.float32)
    arr[1, 2, 3], arr[4, 5, 6] = np.nan, -np.inf
    nan_scan = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(arr, img.affine), nan_scan)
    msg = _input_error(lambda: _preprocess(cohort, dict(item, image_t1=str(nan_scan))))
    assert msg.startswith(f"patient {pid}: time point t1: 2 voxel(s) are NaN or infinite in {nan_scan}")


def test_datalist_errors(cohort, tmp_path):
    _bundle_on_path()
    from scripts.data import load_items

    with pytest.raises(FileNotFoundError, match="prognosis datalist not found"):
        load_items(str(tmp_path / "none.json"), str(cohort["dir"]))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"training": [{"patient_id": "X1", "label": "2", "fold": 0}]}))
    with pytest.raises(ValueError, match="patient X1 .* needs an integer 'label'"):
        load_items(str(bad), str(cohort["dir"]))
    with pytest.raises(ValueError, match=r"patient\(s\) \['NOPE'\] not in"):
        load_items(cohort["datalist"], str(cohort["dir"]), patients=["NOPE"])
    # issue 15: the cohort contract's id rule, the bundle's own copy: ids name output folders
    for bad_id in ("../../escaped", "P1/x", "", "P 1"):
        bad.write_text(json.dumps({"training": [{"patient_id": bad_id, "label": 1, "fold": 0}]}))
        with pytest.raises(ValueError, match=r"training\[0\]: patient_id .* does not match"):
            load_items(str(bad), str(cohort["dir"]))
    train = load_items(cohort["datalist"], str(cohort["dir"]), exclude_folds=[1])
    val = load_items(cohort["datalist"], str(cohort["dir"]), folds=[1])
    assert {i["patient_id"] for i in train}.isdisjoint({i["patient_id"] for i in val})
    assert len(train) + len(val) == len(cohort["items"]) == 8
    assert all(os.path.isabs(i["image_t0"]) and os.path.exists(i["mask_t2"]) for i in train)


def test_patient_id_rule_is_one_rule_in_three_copies():
    """analysis (the schema), and each bundle's own copy (a bundle runs alone) agree."""
    from analysis.cohort import PATIENT_ID_PATTERN

    _bundle_on_path()
    from scripts.data import PATIENT_ID

    seg = (REPO / "bundles" / "hcc_liver_seg" / "scripts" / "checks.py").read_text()
    assert PATIENT_ID.pattern == PATIENT_ID_PATTERN and f're.compile(r"{PATIENT_ID_PATTERN}")' in seg


def test_gradcam_output_stays_under_its_folder(tmp_path):
    _bundle_on_path()
    from scripts.data import check_patient_id
    from scripts.io import path_under

    assert path_under(str(tmp_path), "P001", "montage.png") == str(tmp_path.resolve() / "P001" / "montage.png")
    for parts in (("..", "escaped"), ("/etc",), ("P1", "..", "..", "x")):
        with pytest.raises(ValueError, match="outside the output folder"):
            path_under(str(tmp_path), *parts)
    (tmp_path / "link").symlink_to(tmp_path.parent)
    with pytest.raises(ValueError, match="outside the output folder"):
        path_under(str(tmp_path), "link", "x")
    with pytest.raises(ValueError, match="Grad-CAM"):
        check_patient_id("../../escaped", "Grad-CAM++ item")


# ----------------------------------------------------------------------------- unit: network
def test_network_eq6_and_errors():
    import torch

    _bundle_on_path()
    from scripts.net import ProgSwinUNETR

    torch.manual_seed(0)
    net = ProgSwinUNETR(feature_size=12, depths=(1, 1, 1, 1)).eval()
    x = torch.randn(1, 3, 64, 64, 64)
    with torch.no_grad():
        dense = net(x, dense=True)
        scores = net(x)
    assert dense.shape == (1, 4, 64, 64, 64) and float(dense.min()) >= 0  # ReLU of the dense map
    assert scores.shape == (1, 4)
    torch.testing.assert_close(scores, dense.mean(dim=(2, 3, 4)))  # Eq. 6: pool of ReLU(O)
    with pytest.raises(ValueError, match=r"multiple of 32 and at least 64.*\(32, 32, 32\)"):
        net(torch.randn(1, 3, 32, 32, 32))
    with pytest.raises(ValueError, match=r"expects \(batch, 3, D, H, W\)"):
        net(torch.randn(1, 6, 64, 64, 64))
    from scripts.transforms import input_channels

    assert [input_channels(m) for m in ("none", "union", "labels")] == [3, 6, 9]
    assert ProgSwinUNETR(in_channels=9, feature_size=12, depths=(1, 1, 1, 1)).swin.encoder1.layer.conv1.conv.weight.shape[1] == 9
    # the Eq. 6 head on cached features is the forward pass
    torch.testing.assert_close(net.head(net.features(x)), scores, atol=1e-6, rtol=1e-5)

    # the paper's sliding-window option: with one window covering the input it equals the
    # whole-volume scores; with several it pools the stitched dense map, (B, 4) as well
    from scripts.inferers import PooledSlidingWindowInferer

    sw = PooledSlidingWindowInferer(roi_size=(64, 64, 64), sw_batch_size=2, overlap=0.25, mode="gaussian")
    with torch.no_grad():
        torch.testing.assert_close(sw(x, net), scores, atol=1e-5, rtol=1e-4)
        long_x = torch.randn(1, 3, 128, 64, 64)
        out = sw(long_x, net)
        dense_long = net(long_x, dense=True)
    assert out.shape == (1, 4) and torch.isfinite(out).all() and float(out.min()) >= 0
    assert not torch.allclose(out, dense_long.mean(dim=(2, 3, 4)), atol=1e-6)  # windows lack global context
    with pytest.raises(ValueError, match="multiple of 12"):
        ProgSwinUNETR(feature_size=16)


# ------------------------------------------------------------------- end to end: CV and OOF
@pytest.mark.slow
def test_cross_validation_oof(cv):
    oof = pd.read_csv(cv["out"] / "oof_predictions.csv", dtype={"patient_id": str})
    folds = {it["patient_id"]: it["fold"] for it in cv["items"]}
    labels = {it["patient_id"]: it["label"] for it in cv["items"]}
    # every labelled patient exactly once, by the model of its own fold (never trained on it)
    assert sorted(oof["patient_id"]) == sorted(folds)
    assert not oof["patient_id"].duplicated().any()
    assert all(oof["fold"] == oof["patient_id"].map(folds))
    assert all(oof["label"] == oof["patient_id"].map(labels))
    probs = oof[[f"prob_{k}" for k in range(4)]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert np.all(probs > 0) and np.all(oof["pred_class"] == probs.argmax(axis=1))
    for k in range(4):
        assert (cv["out"] / "models" / f"fold{k}" / "model.pt").exists()
        assert (cv["out"] / "models" / f"fold{k}" / "checkpoint_epoch=1.pt").exists()
    metrics = json.loads((cv["out"] / "evaluation" / "metrics.json").read_text())
    assert metrics["n"] == len(folds) and 0 <= metrics["accuracy"] <= 1
    assert metrics["accuracy"] == pytest.approx(float(np.mean(oof["pred_class"] == oof["label"])))
    for name in ("per_class.csv", "confusion.csv", "roc.png", "roc.csv"):
        assert (cv["out"] / "evaluation" / name).exists()


@pytest.mark.slow
def test_cross_validation_resumes_without_retraining(cv):
    """A second run reuses every fold's best model (newer than the datalist) and only predicts;
    the module's own command line (what the config calls) gives the same out-of-fold CSV."""
    model0 = cv["out"] / "models" / "fold0" / "model.pt"
    before = model0.stat().st_mtime_ns
    first = (cv["out"] / "oof_predictions.csv").read_text()
    cmd = [sys.executable, "-m", "scripts.cross_validate", "--bundle_root", str(BUNDLE),
           "--dataset_dir", str(cv["dir"]), "--output_dir", str(cv["out"]), "--folds", "4",
           "--datalist", cv["datalist"], *_args(TINY_TRAIN)]
    proc = subprocess.run(cmd, check=False, cwd=cv["out"], env=_env(), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert model0.stat().st_mtime_ns == before
    assert (proc.stdout + proc.stderr).count("reusing it") == 4
    assert "Epoch: 1/1" not in proc.stdout + proc.stderr
    assert (cv["out"] / "oof_predictions.csv").read_text() == first


def test_cross_validate_config_refuses_bad_values(cohort, tmp_path):
    """Command-line text reaches the function: 'false' means false, a non-dict fold_overrides
    and an unknown boolean are errors naming the id, before anything is trained."""
    _bundle_on_path()
    from scripts.cross_validate import cross_validate

    common = dict(bundle_root=str(BUNDLE), dataset_dir=str(cohort["dir"]), output_dir=str(tmp_path),
                  datalist=cohort["datalist"])
    with pytest.raises(ValueError, match="fold_overrides"):
        cross_validate(**common, overrides="max_epochs=2")
    with pytest.raises(ValueError, match="force"):
        cross_validate(**common, force="sometimes")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        cross_validate(**{**common, "datalist": str(tmp_path / "nope.json")})
    assert not any(tmp_path.iterdir())
    p = _parser(["cross_validate.json"], dataset_dir="/data/c", force="false", folds="4")
    assert p.get_parsed_content("datalist") == "/data/c/datalists/prognosis.json"
    assert p.get_parsed_content("ckpt_dir") == str(BUNDLE) + "/models"  # where Zoo tooling looks


@pytest.mark.slow
def test_ensemble_is_mean_of_fold_outputs(cv):
    import torch

    pid = cv["items"][0]["patient_id"]
    out = cv["out"] / "ensemble"
    _bundle_run(["inference.json", "inference_ensemble.json"],
                {**TINY, "bundle_root": ".", "dataset_dir": str(cv["dir"]), "datalist": cv["datalist"],
                 "ckpt_dir": str(cv["out"] / "models"), "output_dir": str(out), "patients": [pid]})
    ens = pd.read_csv(out / "predictions.csv", dtype={"patient_id": str})
    assert list(ens["patient_id"]) == [pid] and list(ens["fold"]) == [-1]

    parser = _parser(["inference.json"], dataset_dir=str(cv["dir"]), datalist=cv["datalist"], **TINY)
    from scripts.checkpoints import best_model_path, load_state

    x = parser.get_parsed_content("preprocessing")(_abs_item(cv))["image"][None]
    net = parser.get_parsed_content("network_def").eval()
    folds = []
    for k in range(4):
        net.load_state_dict(load_state(best_model_path(str(cv["out"] / "models"), k)))
        with torch.no_grad():
            folds.append(torch.softmax(net(x), dim=1)[0].numpy())
    expected = np.mean(folds, axis=0)
    got = ens[[f"prob_{k}" for k in range(4)]].to_numpy()[0]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert got.sum() == pytest.approx(1.0, abs=1e-5)
    # and not just one fold's output (the folds differ)
    assert max(np.abs(f - expected).max() for f in folds) > 1e-6


@pytest.mark.slow
def test_gradcam(cv):
    import nibabel as nib

    _bundle_on_path()
    from scripts.gradcam import representative_patients

    oof_csv = cv["out"] / "oof_predictions.csv"
    oof = pd.read_csv(oof_csv, dtype={"patient_id": str})
    reps = representative_patients(str(oof_csv))
    assert len(reps) == oof["pred_class"].nunique()
    for pid in reps:  # the most confident patient of its predicted class
        row = oof[oof["patient_id"] == pid].iloc[0]
        k = int(row["pred_class"])
        assert row[f"prob_{k}"] == oof.loc[oof["pred_class"] == k, f"prob_{k}"].max()

    pid = cv["items"][1]["patient_id"]
    out = cv["out"] / "gradcam"
    _bundle_run(["inference.json", "gradcam.json"], {**TINY, "dataset_dir": str(cv["dir"]), "datalist": cv["datalist"],
                                   "ckpt_dir": str(cv["out"] / "models"), "output_dir": str(out),
                                   "patients": [pid]})
    for tp in ("t0", "t1", "t2"):
        img = nib.load(out / pid / f"heatmap_{tp}.nii.gz")
        heat = np.asarray(img.dataobj)
        assert heat.shape == (64, 64, 64)  # the network input's spatial shape
        assert np.all(np.isfinite(heat)) and heat.min() >= 0 and heat.max() <= 1
        assert heat.std() > 1e-4  # not constant
    assert (out / pid / "montage.png").stat().st_size > 1000
    summary = pd.read_csv(out / "gradcam_summary.csv", dtype={"patient_id": str})
    assert list(summary["patient_id"]) == [pid]
    assert summary.loc[0, "fold"] == cv["items"][1]["fold"]  # explained by its own fold's model


@pytest.mark.slow
def test_resume_continues_epoch_count(cv, tmp_path):
    """resume=true loads the latest checkpoint (epoch 1) and trains only epoch 2 of 2."""
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    ckpt = tmp_path / "models"
    shutil.copytree(cv["out"] / "models" / "fold0", ckpt / "fold0")
    _bundle_on_path()
    wf = ConfigWorkflow(config_file=str(CONFIGS / "train.json"), workflow_type="train", logging_file=False,
                        meta_file=str(CONFIGS / "metadata.json"),
                        **{**TINY_TRAIN, "bundle_root": str(BUNDLE), "dataset_dir": str(cv["dir"]),
                           "datalist": cv["datalist"], "ckpt_dir": str(ckpt), "output_dir": str(tmp_path / "eval"),
                           "fold": 0, "max_epochs": 2, "resume": True})
    wf.initialize()
    trainer = wf.parser.get_parsed_content("train#trainer")
    started = []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: started.append(e.state.epoch))
    wf.run()
    wf.finalize()
    assert started == [2]  # epoch 1 came from the checkpoint
    assert trainer.state.epoch == 2
    assert (ckpt / "fold0" / "checkpoint_epoch=2.pt").exists()


@pytest.mark.slow
def test_torchrun_two_cpu_processes(cohort, tmp_path):
    """multi_gpu_train.json on 2 CPU processes (gloo): one epoch, checkpoints from rank 0."""
    small = {"train#dataset#data":
             "$scripts.data.load_items(@datalist, @dataset_dir, exclude_folds=[@fold])[:4]",
             "validate#dataset#data": "$scripts.data.load_items(@datalist, @dataset_dir, folds=[@fold])[:2]"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           "-m", "monai.bundle", "run", "--config_file", "['configs/train.json','configs/multi_gpu_train.json']",
           *_args({**TINY_TRAIN, "dataset_dir": str(cohort["dir"]), "datalist": cohort["datalist"],
                   "ckpt_dir": str(tmp_path / "models"), "output_dir": str(tmp_path / "eval"), **small})]
    env = _env()
    env["OMP_NUM_THREADS"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(cmd, check=False, cwd=BUNDLE, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert (tmp_path / "models" / "fold0" / "model.pt").exists()
    assert (tmp_path / "models" / "fold0" / "checkpoint_epoch=1.pt").exists()
    assert "Epoch: 1/1, Iter: 1/1" in proc.stdout + proc.stderr  # 4 items / 2 ranks / batch 2
    assert "Iter: 2/" not in proc.stdout + proc.stderr


# ------------------------------------------------------------------------------ Zoo checks
def test_check_properties_train_and_infer(cohort):
    from monai.bundle import ConfigWorkflow

    _bundle_on_path()
    common = {**TINY, "bundle_root": str(BUNDLE), "dataset_dir": str(cohort["dir"]),
              "datalist": cohort["datalist"], "cache_rate": 0.0}
    for configs, kind in ((["train.json"], "train"), (["train.json", "evaluate.json"], "train"),
                          (["inference.json"], "infer"), (["inference.json", "gradcam.json"], "infer")):
        files = [str(CONFIGS / c) for c in configs]
        wf = ConfigWorkflow(config_file=files if len(files) > 1 else files[0], workflow_type=kind,
                            meta_file=str(CONFIGS / "metadata.json"), logging_file=False,
                            **{k: v for k, v in common.items() if not (kind == "infer" and k == "cache_rate")})
        wf.initialize()
        assert wf.check_properties() == [], configs


def test_gradcam_is_a_thin_overlay_on_inference():
    """gradcam.json reuses inference.json's network, preprocessing and dataset (no copy of
    them): it only keeps the time points, picks the patients and replaces run."""
    gradcam = json.loads((CONFIGS / "gradcam.json").read_text())
    assert not {"network_def", "preprocessing", "imports", "image_keys"} & set(gradcam), sorted(gradcam)
    assert gradcam["keep_timepoints"] is True and gradcam["dataset#data#patients"] == "@gradcam_patients"
    p = _parser(["inference.json", "gradcam.json"], feature_size=12, device="cpu", patients=["P1"])
    assert p.get_parsed_content("gradcam_patients") == ["P1"]
    assert p.get_parsed_content("ckpt_path") is None  # each patient's own fold model
    transforms = p.get_parsed_content("preprocessing").transforms
    delete = [t for t in transforms if type(t).__name__ == "DeleteItemsd"]
    assert not delete, "the time points are kept for the montage"


def test_train_and_inference_configs_are_thin():
    """Issue 14: fewer expression lines than the 42 of train.json before, every time point's
    crop and mask one transform (no t0/t1/t2 copies), no lambda in a config."""
    for name in ("train.json", "inference.json"):
        text = (CONFIGS / name).read_text()
        assert text.count('"image_t1"') == 1 and text.count('"mask_t1"') == 1, name  # the key lists only
        assert "CropForegroundd" not in text and "MaskIntensityd" not in text, name
        assert "lambda" not in text, name
    assert sum('"$' in line for line in (CONFIGS / "train.json").read_text().splitlines()) <= 30
    # rank logic only in multi_gpu_train.json: the other ranks keep the ValidationHandler (its
    # metrics are gathered from every rank); logging, curves and savers run on rank 0
    train = json.loads((CONFIGS / "train.json").read_text())
    assert "is_main_rank" not in json.dumps(train)
    assert train["train"]["handlers"][0]["_target_"] == "ValidationHandler"
    multi = json.loads((CONFIGS / "multi_gpu_train.json").read_text())
    assert multi["train#trainer#train_handlers"] == "$@train#handlers if @is_main_rank else @train#handlers[:1]"


def test_per_timepoint_transforms_equal_monai_per_pair(cohort):
    """CropEachToMaskd / MaskEachImaged give exactly what one CropForegroundd / MaskIntensityd
    per (image, mask) pair gives, and refuse unpaired keys."""
    import torch
    from monai.transforms import CropForegroundd, MaskIntensityd

    _bundle_on_path()
    from scripts.transforms import CropEachToMaskd, MaskEachImaged

    g = torch.Generator().manual_seed(0)
    d = {}
    for k, (lo, hi) in enumerate([(2, 9), (4, 12), (1, 5)]):
        mask = torch.zeros(1, 16, 16, 16)
        mask[:, lo:hi, lo + 1:hi, lo:hi - 1] = 1 + (k % 2)
        d[f"image_t{k}"], d[f"mask_t{k}"] = torch.rand(1, 16, 16, 16, generator=g), mask
    images, masks = [f"image_t{k}" for k in range(3)], [f"mask_t{k}" for k in range(3)]
    got = MaskEachImaged(images, masks)(CropEachToMaskd(images, masks, margin=2)(d))
    want = dict(d)
    for i, m in zip(images, masks):
        want = CropForegroundd(keys=[i, m], source_key=m, margin=2, allow_smaller=True)(want)
        want = MaskIntensityd(keys=i, mask_key=m)(want)
    for key in images + masks:
        torch.testing.assert_close(torch.as_tensor(got[key]), torch.as_tensor(want[key]))
    assert got["image_t0"].shape[1:] == (11, 10, 10) and got["image_t1"].shape[1:] == (12, 11, 11)
    with pytest.raises(ValueError, match="one mask per image"):
        CropEachToMaskd(images, masks[:2])


def test_metadata_valid_and_bundle_self_contained():
    import jsonschema

    meta = json.loads((CONFIGS / "metadata.json").read_text())
    if not SCHEMA.exists():
        pytest.skip("bundles/schema/meta_schema_20240725.json not there yet")
    jsonschema.validate(meta, json.loads(SCHEMA.read_text()))
    assert meta["version"] in meta["changelog"]
    assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == 3
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 4
    for name in ("LICENSE", "large_files.yml", "docs/README.md", "docs/data_license.txt", "configs/logging.conf",
                 *[f"configs/{c}.json" for c in ("train", "evaluate", "inference", "multi_gpu_train", "gradcam")]):
        assert (BUNDLE / name).exists(), name
    for path in list((BUNDLE / "scripts").glob("*.py")) + list(CONFIGS.glob("*.json")):
        text = path.read_text()
        assert "import analysis" not in text and "from analysis" not in text, path
        assert "/work/" not in text, path


@pytest.mark.slow
def test_verify_net_in_out_and_traced_export(cv, tmp_path):
    import torch
    from monai.bundle import ckpt_export, verify_net_in_out

    _bundle_on_path()
    over = {"bundle_root": str(BUNDLE), "feature_size": 12, "network_def#depths": [1, 1, 1, 1], "device": "cpu"}
    # metadata's input is 3 x 128^3 (the paper's size); the tiny network checks in/out at that size
    verify_net_in_out(net_id="network_def", meta_file=str(CONFIGS / "metadata.json"),
                      config_file=str(CONFIGS / "inference.json"), **over)
    ckpt = cv["out"] / "models" / "fold0" / "model.pt"
    ts = tmp_path / "model.ts"
    ckpt_export(net_id="network_def", filepath=str(ts), ckpt_file=str(ckpt),
                meta_file=str(CONFIGS / "metadata.json"), config_file=str(CONFIGS / "inference.json"),
                use_trace=True, input_shape=[1, 3, 64, 64, 64], **over)
    traced = torch.jit.load(str(ts))
    parser = _parser(["inference.json"], **over)
    net = parser.get_parsed_content("network_def").eval()
    net.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
    x = torch.randn(2, 3, 64, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(traced(x), net(x), atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_share_model_puts_a_fold_model_where_zoo_tooling_finds_it(cv, tmp_path):
    """configs/share_model.json copies a fold model to <bundle>/models/model.pt after loading it
    strictly into network_def; ckpt_export then finds it without --ckpt_file; a model of other
    sizes and an existing target (without overwrite) are refused, naming the file."""
    import torch
    from monai.bundle import ckpt_export

    site = tmp_path / "bundle"
    shutil.copytree(BUNDLE / "configs", site / "configs")
    shutil.copytree(BUNDLE / "scripts", site / "scripts")
    fold0 = cv["out"] / "models" / "fold0" / "model.pt"
    over = {**TINY, "bundle_root": str(site), "ckpt_dir": str(cv["out"] / "models")}
    _bundle_run(["inference.json", "share_model.json"], {**over, "source_model": str(fold0)})
    shared = site / "models" / "model.pt"
    want = torch.load(fold0, map_location="cpu", weights_only=True)
    got = torch.load(shared, map_location="cpu", weights_only=True)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    umask = os.umask(0)
    os.umask(umask)
    assert shared.stat().st_mode & 0o777 == 0o666 & ~umask  # readable as a plain open() would leave it

    ts = tmp_path / "model.ts"
    ckpt_export(net_id="network_def", filepath=str(ts), meta_file=str(CONFIGS / "metadata.json"),
                config_file=str(CONFIGS / "inference.json"), use_trace=True, input_shape=[1, 3, 64, 64, 64],
                **{**over, "device": "cpu"})  # no ckpt_file: <bundle_root>/models/model.pt
    assert ts.stat().st_size > 1_000_000

    _bundle_on_path()
    from scripts.checkpoints import CheckpointMismatchError, share_model

    net = _parser(["inference.json"], **TINY).get_parsed_content("network_def")
    with pytest.raises(FileExistsError, match="overwrite"):
        share_model(net, str(cv["out"] / "models" / "fold1" / "model.pt"), str(shared))
    assert share_model(net, str(cv["out"] / "models" / "fold1" / "model.pt"), str(shared), overwrite="true")
    wider = _parser(["inference.json"], **{**TINY, "feature_size": 24}).get_parsed_content("network_def")
    with pytest.raises(CheckpointMismatchError, match="fold0.*feature_size 12, network feature_size 24"):
        share_model(wider, str(fold0), str(tmp_path / "other.pt"))
    assert not (tmp_path / "other.pt").exists()
