"""analysis.radiomics: 1132 features, equality with a direct PyRadiomics call, cache, ROI errors.

A PyRadiomics extraction of these ROIs takes ~1 s, so the module builds one small cohort and runs
four real extractions in all; the cache and error paths reuse them or use a stand-in extractor.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import radiomics as R
from analysis.io import save_nifti

SHAPE = (48, 48, 24)
AFFINE = np.array([[-1.5, 0, 0, 30.0], [0, -1.5, 0, 40.0], [0, 0, 3.0, -20.0], [0, 0, 0, 1]])


def _ellipsoid(centre, radii):
    zz, yy, xx = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip((zz, yy, xx), centre, radii)) < 1


def _patient(root, pid, seed, tumour="normal", affine=AFFINE):
    rng = np.random.default_rng(seed)
    liver = _ellipsoid((24, 24, 12), (18, 18, 9))
    tum = _ellipsoid((22 + seed, 25, 12), (6 + seed, 5, 3))
    image = rng.normal(100, 10, SHAPE) + 60 * liver + 90 * tum * rng.random(SHAPE)
    label = np.zeros(SHAPE, np.uint8)
    label[liver] = 1
    if tumour == "normal":
        label[tum] = 2
    elif tumour == "one_voxel":
        label[24, 24, 12] = 2
    save_nifti(root / "images" / pid / "t1.nii.gz", image.astype(np.float32), AFFINE)
    save_nifti(root / "masks" / pid / "t1.nii.gz", label, affine, dtype=np.uint8)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("rad_cohort")
    _patient(root, "P001", 0)
    _patient(root, "P002", 1, tumour="empty")
    _patient(root, "P003", 2, tumour="one_voxel")
    (root / "images" / "P004").mkdir(parents=True)  # no t1 image
    _patient(root, "P005", 3)
    (root / "masks" / "P005" / "t1.nii.gz").unlink()  # image without mask
    return root


@pytest.fixture(scope="module")
def first_run(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("rad_out") / "features.csv"
    cache = out.parent / "cache"
    feats = R.extract_features(cohort, cohort / "masks", "t1", "tumour", cache_dir=cache, out=out, progress=False)
    return feats, out, cache


def test_default_settings_give_1132_features_and_outputs(first_run):
    feats, out, _ = first_run
    assert list(feats["patient_id"]) == ["P001"]
    cols = [c for c in feats.columns if c != "patient_id"]
    assert len(cols) == R.EXPECTED_FEATURES_DEFAULT == 1132
    assert not any(c.startswith("diagnostics_") for c in cols)
    # 13 image types x 86 + 14 shape
    assert sum(c.startswith("original_shape_") for c in cols) == 14
    types = {c.split("_")[0] for c in cols if "_shape_" not in c}
    assert len({c.rsplit("_", 2)[0] for c in cols if "_shape_" not in c}) == 13
    assert types == {"original", "log-sigma-2-0-mm-3D", "log-sigma-3-0-mm-3D", "log-sigma-4-0-mm-3D",
                     "log-sigma-5-0-mm-3D", "wavelet-LLL", "wavelet-LLH", "wavelet-LHL", "wavelet-LHH",
                     "wavelet-HLL", "wavelet-HLH", "wavelet-HHL", "wavelet-HHH"}
    assert not any("SumAverage" in c or "ngtdm" in c for c in cols)
    on_disk = pd.read_csv(out)
    assert on_disk.shape == (1, 1133)
    diag = pd.read_csv(out.with_name("features_diagnostics.csv"))
    assert diag.loc[0, "diagnostics_Versions_PyRadiomics"] == "v3.0.1"
    prov = json.loads(out.with_name("features.json").read_text())
    assert prov["pyradiomics_version"] == "v3.0.1" and prov["n_features"] == 1132
    assert prov["settings_sha256"] == diag.loc[0, "settings_sha256"] and len(prov["settings_sha256"]) == 64


def test_bad_rois_and_missing_files_go_to_errors_csv(first_run):
    _, out, _ = first_run
    err = pd.read_csv(out.with_name("features_errors.csv")).set_index("patient_id")["reason"]
    assert sorted(err.index) == ["P002", "P003", "P004", "P005"]
    assert err["P002"] == "ROI empty: no voxel with label 2"
    assert err["P003"] == "ROI too small: 1 voxels, 6.8 mm^3; minimum 8 voxels and 64 mm^3"
    assert err["P004"].startswith("no image ") and err["P004"].endswith("P004/t1.nii.gz")
    assert err["P005"].startswith("no mask ") and err["P005"].endswith("P005/t1.nii.gz")


def test_values_equal_direct_pyradiomics_call(first_run, cohort, tmp_path):
    from radiomics import featureextractor

    feats, _, _ = first_run
    label = np.asarray(__import__("nibabel").load(cohort / "masks" / "P001" / "t1.nii.gz").dataobj)
    binary = tmp_path / "roi.nii.gz"
    save_nifti(binary, (label == 2).astype(np.uint8), AFFINE, dtype=np.uint8)
    ref = featureextractor.RadiomicsFeatureExtractor(str(R.default_params_path())).execute(
        str(cohort / "images" / "P001" / "t1.nii.gz"), str(binary))
    ref = {k: float(v) for k, v in ref.items() if not k.startswith("diagnostics_")}
    ours = feats.iloc[0].drop("patient_id").astype(float)
    assert set(ref) == set(ours.index)
    got = ours[list(ref)].to_numpy()
    want = np.array(list(ref.values()))
    assert np.allclose(got, want, rtol=1e-9, atol=1e-12, equal_nan=True)
    assert abs(ref["original_shape_VoxelVolume"] - 0) > 0  # a real, non-empty ROI


def test_cache_hit_does_not_recompute_and_change_does(first_run, cohort, monkeypatch):
    feats, _, cache = first_run
    calls = []

    def fake(image, mask, params_path):
        calls.append(1)
        return {k: 0.0 for k in feats.columns if k != "patient_id"}

    monkeypatch.setattr(R, "_run_pyradiomics", fake)
    again = R.extract_all(cohort, cohort / "masks", "t1", "tumour", cache_dir=cache, progress=False)
    assert calls == []
    assert again.diagnostics["cache_hit"].tolist() == [True] and again.provenance["n_cache_hits"] == 1
    pd.testing.assert_frame_equal(again.features, feats)
    # a different ROI (labels 1+2) changes the key: recomputed once
    other = R.extract_all(cohort, cohort / "masks", "t1", "liver+tumour", cache_dir=cache, progress=False,
                          patients=["P001"])
    assert calls == [1] and other.diagnostics["cache_hit"].tolist() == [False]


def test_parallel_run_same_columns_every_patient(cohort, tmp_path):
    _patient(cohort, "P006", 4)
    try:
        out = tmp_path / "features.csv"
        msg = R.radiomics_cli(str(cohort), str(cohort / "masks"), out=str(out), jobs=2)
        feats = pd.read_csv(out)
        assert list(feats["patient_id"]) == ["P001", "P006"]
        assert feats.shape[1] == 1133 and feats.notna().all().all()
        assert msg.startswith("2 patients x 1132 features")
        assert (tmp_path / ".radiomics_cache").is_dir() and len(list((tmp_path / ".radiomics_cache").iterdir())) == 2
    finally:
        for sub in ("images", "masks"):
            (cohort / sub / "P006" / "t1.nii.gz").unlink()
            (cohort / sub / "P006").rmdir()


def test_pool_takes_largest_roi_first_and_returns_input_order(tmp_path, monkeypatch):
    """Longest-first scheduling: submission follows the label file's size (descending); the
    tables still follow the patients' order."""
    from concurrent.futures import Future

    for pid, seed in (("P020", 0), ("P021", 6), ("P022", 3)):  # tumours of different sizes
        _patient(tmp_path, pid, seed)
    sizes = {pid: (tmp_path / "masks" / pid / "t1.nii.gz").stat().st_size for pid in ("P020", "P021", "P022")}
    assert len(set(sizes.values())) == 3 and sorted(sizes, key=lambda p: -sizes[p]) != ["P020", "P021", "P022"]
    submitted = []

    class SerialPool:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def submit(self, fn, task):
            submitted.append(task["patient_id"])
            fut = Future()
            fut.set_result({"patient_id": task["patient_id"], "features": {"f": float(len(submitted))},
                            "diagnostics": {}, "error": None, "cache_hit": False})
            return fut

    monkeypatch.setattr(R, "ProcessPoolExecutor", SerialPool)
    res = R.extract_all(tmp_path, tmp_path / "masks", "t1", "tumour", jobs=2, progress=False,
                        patients=["P020", "P021", "P022"])
    assert submitted == sorted(sizes, key=lambda p: -sizes[p])
    assert res.features["patient_id"].tolist() == ["P020", "P021", "P022"]
    assert res.features.set_index("patient_id")["f"].to_dict() == {
        p: float(submitted.index(p) + 1) for p in ("P020", "P021", "P022")}


def test_geometry_mismatch_names_patient(tmp_path):
    shifted = AFFINE.copy()
    shifted[0, 3] += 0.5  # origin 0.5 mm off
    _patient(tmp_path, "P010", 0)
    _patient(tmp_path, "P011", 0, affine=shifted)
    with pytest.raises(ValueError, match=r"geometry mismatch .* 1 patient\(s\):\n  P011: .*origin by 0.5 mm"):
        R.extract_all(tmp_path, tmp_path / "masks", "t1", "tumour", progress=False)
    assert not (tmp_path / "features.csv").exists()


def test_geometry_tolerance_boundary(tmp_path):
    near, far = AFFINE.copy(), AFFINE.copy()
    near[1, 1] -= 2e-4  # header round-off: accepted
    far[2, 2] += 5e-3  # 5 um of slice spacing: a different grid
    for pid, aff in (("A", near), ("B", far)):
        _patient(tmp_path, pid, 0, affine=aff)
    img = tmp_path / "images" / "{}" / "t1.nii.gz"
    msk = tmp_path / "masks" / "{}" / "t1.nii.gz"
    assert R.geometry_mismatch(str(img).format("A"), str(msk).format("A")) is None
    assert R.geometry_mismatch(str(img).format("B"), str(msk).format("B")).startswith("affine differs by 0.005 mm")


@pytest.mark.parametrize("kwargs,msg", [
    ({"roi": "kidney"}, r"--roi 'kidney' is not known; expected one of tumour, liver, liver\+tumour"),
    ({"timepoint": "t3"}, r"--timepoint 't3'; expected one of t0, t1, t2"),
    ({"params": "nope.yaml"}, r"--params nope.yaml: no such settings file"),
])
def test_bad_arguments(cohort, kwargs, msg):
    args = {"timepoint": "t1", "roi": "tumour", **kwargs}
    with pytest.raises((ValueError, FileNotFoundError), match=msg):
        R.extract_all(cohort, cohort / "masks", progress=False, **args)


def test_cli_bad_input_is_one_line_exit(cohort, tmp_path):
    with pytest.raises(SystemExit, match=r"^radiomics: --roi 'lung' is not known"):
        R.radiomics_cli(str(cohort), str(cohort / "masks"), out=str(tmp_path / "f.csv"), roi="lung")
    assert not (tmp_path / "f.csv").exists()


# ------------------------------------------------------------------ pool workers end with the run
def _children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid``, from /proc (psutil may not be installed)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


def _running(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_pool_workers_end_when_the_run_is_killed(tmp_path):
    """kill -9 of ``radiomics --jobs 2``: its pool workers are gone within seconds and write no
    further cache file (before, they went on with the tasks queued to them, then hung)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO_ROOT

    for i in range(8):
        _patient(tmp_path, f"K{i:02d}", i % 4)
    cache = tmp_path / "out" / ".radiomics_cache"
    proc = subprocess.Popen([sys.executable, "-m", "analysis", "radiomics", str(tmp_path), str(tmp_path / "masks"),
                             "--out", str(tmp_path / "out" / "features.csv"), "--jobs", "2"], cwd=REPO_ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 180
        while len(workers) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            workers = _children(proc.pid)
        assert len(workers) >= 2, f"no pool workers seen (exit status {proc.poll()})"
        time.sleep(1.0)  # the workers have taken their first tasks
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 5
        while any(_running(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [w for w in workers if _running(w)] == []
        written = sorted(cache.glob("*")) if cache.is_dir() else []
        time.sleep(3.0)
        assert (sorted(cache.glob("*")) if cache.is_dir() else []) == written
        assert len(written) < 8  # killed mid-run
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for w in workers:
            if _running(w):
                os.kill(w, signal.SIGKILL)
