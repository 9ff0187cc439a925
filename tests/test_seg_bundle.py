"""hcc_liver_seg bundle: train -> checkpoint -> evaluate -> inference through monai.bundle, Model Zoo
checks, geometry, resume, multi-process training and bad input. CPU-tiny: SwinUNETR feature_size 12,
64^3 ROI, one training scan, one epoch; one trained checkpoint is shared by the whole module.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE = REPO_ROOT / "bundles" / "hcc_liver_seg"
CONFIGS = BUNDLE / "configs"
SCHEMA = REPO_ROOT / "bundles" / "schema" / "meta_schema_20240725.json"

pytestmark = pytest.mark.slow

#: tiny settings: every ROI side must be a multiple of 32 and at least 64; 2 mm in-plane keeps the
#: synthetic 64-matrix scans inside one 64^3 window (one forward pass per scan)
TINY = {
    "feature_size": 12,
    "roi_size": [64, 64, 64],
    "target_spacing": [2.0, 2.0, 5.0],
    "sw_batch_size": 1,
    "overlap": 0.25,
    "num_workers": 0,
    "device": "$torch.device('cpu')",
}
#: booleans as strings, as the command line and the study runner (json.dumps) deliver them
TRAIN = {**TINY, "use_checkpoint": "false", "num_samples": 1, "batch_size": 1, "cache_rate": 1.0,
         "max_epochs": 1, "val_interval": 1}


# ------------------------------------------------------------------------------------ helpers
def _bundle_on_path() -> None:
    """Make `scripts` resolve to this bundle's package (the prognosis bundle has one too)."""
    for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
        file = getattr(sys.modules[name], "__file__", None) or ""
        if not file.startswith(str(BUNDLE)):
            del sys.modules[name]
    logging.getLogger("hcc_liver_seg").disabled = False
    if str(BUNDLE) in sys.path:
        sys.path.remove(str(BUNDLE))
    sys.path.insert(0, str(BUNDLE))


def _workflow(configs, workflow_type="train", **overrides):
    from monai.bundle import ConfigWorkflow

    _bundle_on_path()
    files = [str(CONFIGS / c) for c in configs]
    return ConfigWorkflow(config_file=files if len(files) > 1 else files[0], workflow_type=workflow_type,
                          logging_file=False, bundle_root=str(BUNDLE), **overrides)


def _run(configs, workflow_type="train", **overrides):
    """Same as `python -m monai.bundle run`, in-process; returns the workflow for inspection."""
    wf = _workflow(configs, workflow_type, **overrides)
    wf.initialize()
    try:
        wf.run()
    finally:
        wf.finalize()
    return wf


def _messages(exc: BaseException) -> str:
    """All messages of an exception chain (MONAI wraps errors raised inside transforms/configs)."""
    out = []
    while exc is not None:
        out.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return "\n".join(out)


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _datalist(path: Path, training, validation, testing) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"training": training, "validation": validation, "testing": testing}))
    return path


# ----------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def data(small_cohort, tmp_path_factory):
    """The contract datalist of the shared synthetic cohort, cut to 1 training / 1 validation scan."""
    from analysis.datalists import segmentation_datalist

    full = segmentation_datalist(Path(small_cohort), Path(small_cohort), val_fraction=0.2, seed=0)
    t0 = lambda items: [i for i in items if i["timepoint"] == "t0"]  # noqa: E731
    work = tmp_path_factory.mktemp("seg")
    dl = _datalist(work / "datalists" / "segmentation.json", t0(full["training"])[:2][:1],
                   t0(full["validation"])[:1], t0(full["testing"])[:2])
    ddp = _datalist(work / "datalists" / "ddp.json", t0(full["training"])[:2], t0(full["validation"])[:1] +
                    t0(full["training"])[2:3], [])
    return {"cohort": Path(small_cohort), "datalist": dl, "ddp_datalist": ddp, "work": work}


@pytest.fixture(scope="module")
def trained(data):
    """One epoch of tiny training: the checkpoint every other test uses."""
    ckpt = data["work"] / "models"
    wf = _run(["train.json"], dataset_dir=str(data["cohort"]), datalist=str(data["datalist"]),
              ckpt_dir=str(ckpt), output_dir=str(data["work"] / "train_eval"), **TRAIN)
    trainer = wf.parser.get_parsed_content("train#trainer")
    return {"ckpt_dir": ckpt, "trainer_state": (trainer.state.epoch, trainer.state.iteration)}


def _copy_ckpt(trained, dst: Path) -> Path:
    shutil.copytree(trained["ckpt_dir"], dst)
    return dst


# -------------------------------------------------------------------------------- train, eval
def test_train_writes_best_and_latest_checkpoints(trained):
    ckpt = trained["ckpt_dir"]
    assert trained["trainer_state"] == (1, 1)
    assert (ckpt / "model.pt").is_file() and (ckpt / "checkpoint_epoch=1.pt").is_file()
    best = torch.load(ckpt / "model.pt", map_location="cpu", weights_only=True)
    # a flat state_dict of SwinUNETR(1 -> 3): shareable between sites without the training code
    assert best["out.conv.conv.weight"].shape[:2] == (3, 12)
    latest = torch.load(ckpt / "checkpoint_epoch=1.pt", map_location="cpu", weights_only=False)
    assert set(latest) == {"model", "optimizer", "lr_scheduler", "trainer"}
    assert latest["trainer"]["iteration"] == 1 and latest["trainer"]["epoch_length"] == 1


def test_evaluate_writes_per_case_and_summary(trained, data):
    import pandas as pd

    out = data["work"] / "evaluate"
    pytest.importorskip("mlflow")
    # --tracking mlflow: MONAI adds MLFlowHandlers logging to <output_dir>/mlruns.db
    _run(["train.json", "evaluate.json"], dataset_dir=str(data["cohort"]), datalist=str(data["datalist"]),
         ckpt_dir=str(trained["ckpt_dir"]), output_dir=str(out), tracking="mlflow", **TINY)
    assert (out / "mlruns.db").is_file() and list(out.glob("config_*.json"))
    per_case = pd.read_csv(out / "per_case.csv")
    summary = pd.read_csv(out / "metrics_summary.csv")
    metrics = ["dice_eq2", "dice_liver", "dice_tumour", "dice_whole_liver", "hd95_mm_liver", "hd95_mm_tumour"]
    assert list(per_case.columns) == ["image", "patient_id", "timepoint", *metrics]
    assert len(per_case) == 1 and summary["n_cases"].tolist() == [1]
    for m in ("dice_eq2", "dice_liver", "dice_tumour", "dice_whole_liver"):
        assert 0.0 <= summary[m].iloc[0] <= 1.0
        assert summary[m].iloc[0] == pytest.approx(per_case[m].iloc[0], rel=1e-4)
    # Eq. 2 pools voxels: it lies between the two class Dice values
    lo, hi = sorted([per_case["dice_liver"].iloc[0], per_case["dice_tumour"].iloc[0]])
    assert lo - 1e-6 <= per_case["dice_eq2"].iloc[0] <= hi + 1e-6
    assert (out / "metrics.csv").is_file() and (out / "val_hd95_mm_tumour_raw.csv").is_file()


def test_resume_continues_epoch_count(trained, data, caplog):
    ckpt = _copy_ckpt(trained, data["work"] / "resume_models")
    with caplog.at_level(logging.INFO):
        wf = _run(["train.json"], dataset_dir=str(data["cohort"]), datalist=str(data["datalist"]),
                  ckpt_dir=str(ckpt), output_dir=str(data["work"] / "resume_eval"),
                  **{**TRAIN, "max_epochs": 2, "val_interval": 100, "resume": "true"})
    trainer = wf.parser.get_parsed_content("train#trainer")
    # one more epoch of one iteration, counted on from the checkpoint's epoch 1 / iteration 1
    assert (trainer.state.epoch, trainer.state.iteration) == (2, 2)
    # the checkpoint restored a 1-epoch schedule; the run's own length (2 epochs) replaces it
    scheduler = wf.parser.get_parsed_content("lr_scheduler")
    assert (scheduler.warmup_steps, scheduler.t_total) == (1, 2)
    assert "warm-up + cosine to epoch 2 (the checkpoint had 1 to 1)" in caplog.text
    assert (ckpt / "checkpoint_epoch=2.pt").is_file()
    assert f"resuming from {ckpt / 'checkpoint_epoch=1.pt'}" in caplog.text
    _bundle_on_path()
    from scripts.checks import resume_checkpoint

    assert resume_checkpoint(str(ckpt), "false") is None
    assert resume_checkpoint(str(ckpt), "true") == str(ckpt / "checkpoint_epoch=2.pt")  # newest epoch, not newest file


@pytest.mark.parametrize("text, on", [("true", True), ("false", False), ("True", True), ("False", False),
                                      ("1", True), ("0", False)])
def test_boolean_ids_from_the_command_line(data, tmp_path, text, on):
    """Each boolean id of train/inference, given as command-line text, has its effect: resume,
    amp (trainer, evaluator, inference), gradient checkpointing."""
    from monai.bundle import ConfigParser

    _bundle_on_path()
    ckpt_dir = tmp_path / "models"
    ckpt_dir.mkdir()
    torch.save({"model": {}}, ckpt_dir / "checkpoint_epoch=3.pt")  # readable: resume takes it
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json")])
    parser.update({**TRAIN, "bundle_root": str(BUNDLE), "dataset_dir": str(data["cohort"]),
                   "datalist": str(data["datalist"]), "ckpt_dir": str(ckpt_dir), "cache_rate": 0.0,
                   "resume": text, "amp": text, "use_checkpoint": text})
    assert (parser.get_parsed_content("train#resume_loader#_disabled_")) is (not on)
    assert (parser.get_parsed_content("resume_from") is not None) is on
    assert parser.get_parsed_content("train#trainer").amp is on
    assert parser.get_parsed_content("validate#evaluator").amp is on
    assert parser.get_parsed_content("network_def").swinViT.layers1[0].blocks[0].use_checkpoint is on
    infer = ConfigParser()
    infer.read_config([str(CONFIGS / "inference.json")])
    infer.update({**TINY, "bundle_root": str(BUNDLE), "input_dir": str(data["cohort"] / "images"),
                  "output_dir": str(tmp_path / "out"), "amp": text})
    infer.get_parsed_content("imports")
    assert infer.get_parsed_content("evaluator").amp is on


def test_boolean_ids_refuse_other_text(data, tmp_path):
    from monai.bundle import ConfigParser

    _bundle_on_path()
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json")])
    parser.update({**TINY, "bundle_root": str(BUNDLE), "amp": "flase"})
    with pytest.raises(Exception) as exc:
        parser.get_parsed_content("train#trainer#amp")
    assert "amp: expected true/false (or 1/0); got 'flase'" in _messages(exc.value)


def test_flags_helper_is_one_copy_in_both_bundles():
    """Each bundle runs zipped alone, so each carries scripts/flags.py; one copy, two places, and
    integrity.py's own reader (loaded outside any package) accepts the same words."""
    prog = REPO_ROOT / "bundles" / "progswin_prognosis" / "scripts"
    assert (prog / "flags.py").read_bytes() == (BUNDLE / "scripts" / "flags.py").read_bytes()
    _bundle_on_path()
    from scripts import flags, integrity

    for word in sorted(flags._TRUE | flags._FALSE):
        assert integrity._as_bool(word) is flags.as_bool(word), word


def test_resume_without_checkpoint_is_a_clear_error(data, tmp_path):
    with pytest.raises(Exception) as exc:
        _run(["train.json"], dataset_dir=str(data["cohort"]), datalist=str(data["datalist"]),
             ckpt_dir=str(tmp_path / "empty"), output_dir=str(tmp_path / "eval"), **{**TRAIN, "resume": True})
    assert f"no checkpoint_epoch=<n>.pt checkpoint in {tmp_path / 'empty'}" in _messages(exc.value)


#: imported by the killed training run (PYTHONPATH): the 2nd save of a training state writes half
#: of it to the file ignite is saving into, tells the test, and hangs there until killed
_SLOW_SAVE = """
import os, time, io, torch
_save, _calls = torch.save, []
def _slow(obj, f, *args, **kwargs):
    if isinstance(obj, dict) and "trainer" in obj:
        _calls.append(1)
        if len(_calls) == 2:
            buf = io.BytesIO()
            _save(obj, buf, *args, **kwargs)
            half = buf.getvalue()[: len(buf.getvalue()) // 2]
            f.write(half) if hasattr(f, "write") else open(f, "wb").write(half)
            getattr(f, "flush", lambda: None)()
            open(os.environ["SAVE_MARKER"], "w").write(str(getattr(f, "name", f)))
            time.sleep(600)
    return _save(obj, f, *args, **kwargs)
torch.save = _slow
"""


def test_kill_during_checkpoint_save_then_resume(data, tmp_path):
    """Issue 15: kill -9 a training run in the middle of saving epoch 2's checkpoint; no corrupt
    checkpoint is loaded on resume: it continues from epoch 1's, the latest good one. A
    checkpoint cut short under the newest name is skipped with a warning naming it."""
    import signal
    import time

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_SLOW_SAVE)
    marker, ckpt = tmp_path / "saving", tmp_path / "models"
    over = {**TRAIN, "max_epochs": 3, "val_interval": 100, "dataset_dir": str(data["cohort"]),
            "datalist": str(data["datalist"]), "ckpt_dir": str(ckpt), "output_dir": str(tmp_path / "eval")}
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(CONFIGS / "train.json"),
           "--bundle_root", str(BUNDLE)] + [a for k, v in over.items()
                                            for a in (f"--{k}", v if isinstance(v, str) else json.dumps(v))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), str(BUNDLE)]), "SAVE_MARKER": str(marker)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert marker.exists(), "the run never reached its second checkpoint save"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    # MONAI's CheckpointSaver writes in place (not atomic) after removing the oldest: keeping 2
    # (n_saved) leaves epoch 1 whole beside the half-written epoch 2
    assert sorted(p.name for p in ckpt.glob("checkpoint_epoch=*.pt")) == ["checkpoint_epoch=1.pt",
                                                                          "checkpoint_epoch=2.pt"]
    _bundle_on_path()
    from scripts.checks import resume_checkpoint

    with pytest.raises(Exception):
        torch.load(ckpt / "checkpoint_epoch=2.pt", weights_only=True)
    assert resume_checkpoint(str(ckpt), "true") == str(ckpt / "checkpoint_epoch=1.pt")
    wf = _run(["train.json"], **{**over, "max_epochs": 2, "resume": "true"})
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert (trainer.state.epoch, trainer.state.iteration) == (2, 2)  # epoch 2 again, from epoch 1's state
    assert torch.load(ckpt / "checkpoint_epoch=2.pt", weights_only=True)["trainer"]["iteration"] == 2
    (ckpt / "checkpoint_epoch=1.pt").write_bytes(b"")
    (ckpt / "checkpoint_epoch=2.pt").write_bytes(b"PK\x03\x04 cut")
    with pytest.raises(ValueError, match="no checkpoint can be read: .*checkpoint_epoch=2.pt.*checkpoint_epoch=1.pt"):
        resume_checkpoint(str(ckpt), "true")


def test_nan_loss_stops_training_and_keeps_best_checkpoint(trained, data, tmp_path):
    ckpt = _copy_ckpt(trained, tmp_path / "models")
    before = {p.name: _sha(p) for p in ckpt.iterdir()}
    with pytest.raises(Exception) as exc:
        _run(["train.json"], dataset_dir=str(data["cohort"]), datalist=str(data["datalist"]),
             ckpt_dir=str(ckpt), output_dir=str(tmp_path / "eval"),
             **{**TRAIN, "loss": "$lambda pred, label: (pred * float('nan')).mean()"})
    msg = _messages(exc.value)
    assert "FloatingPointError: training stopped: loss became nan at epoch 1, iteration 1" in msg
    assert {p.name: _sha(p) for p in ckpt.iterdir()} == before  # best model.pt untouched


# ----------------------------------------------------------------------------------- inference
def _reoriented(src: Path, codes: str, dst: Path) -> nib.Nifti1Image:
    img = nib.load(src)
    out = img.as_reoriented(nib.orientations.ornt_transform(nib.io_orientation(img.affine),
                                                            nib.orientations.axcodes2ornt(tuple(codes))))
    dst.parent.mkdir(parents=True, exist_ok=True)
    nib.save(out, dst)
    return out


def test_inference_folder_keeps_input_geometry_ras_and_lps(trained, data, tmp_path):
    src = data["cohort"] / json.loads(data["datalist"].read_text())["testing"][0]["image"]
    inputs = tmp_path / "inputs"
    ras = _reoriented(src, "RAS", inputs / "PRAS" / "t0.nii.gz")
    lps = _reoriented(src, "LPS", inputs / "PLPS" / "t0.nii.gz")
    for img in (ras, lps):
        assert sorted(np.round(img.header.get_zooms(), 3))[-1] == 5.0  # 5 mm slices
    before = {p: _sha(p) for p in inputs.rglob("*.nii.gz")}
    out = tmp_path / "masks"
    _run(["inference.json"], "infer", input_dir=str(inputs), ckpt_dir=str(trained["ckpt_dir"]),
         output_dir=str(out), min_liver_ml=0.0, **TINY)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.nii.gz")) == ["PLPS/t0.nii.gz", "PRAS/t0.nii.gz"]
    masks = {}
    for name, img in (("PRAS", ras), ("PLPS", lps)):
        m = nib.load(out / name / "t0.nii.gz")
        assert m.shape == img.shape
        np.testing.assert_allclose(m.affine, img.affine, atol=1e-4)
        assert m.get_data_dtype() == np.uint8
        arr = np.asarray(m.dataobj)
        assert set(np.unique(arr)) <= {0, 1, 2}
        masks[name] = m
    # same anatomy in two storage orders -> the same segmentation once put back in one order
    lps_as_ras = masks["PLPS"].as_reoriented(nib.orientations.ornt_transform(
        nib.io_orientation(masks["PLPS"].affine), nib.orientations.axcodes2ornt(("R", "A", "S"))))
    agree = np.mean(np.asarray(lps_as_ras.dataobj) == np.asarray(masks["PRAS"].dataobj))
    assert agree > 0.999
    assert {p: _sha(p) for p in inputs.rglob("*.nii.gz")} == before  # inputs never touched


def test_inference_datalist_writes_masks_layout(trained, data, tmp_path, caplog):
    out = tmp_path / "masks"
    with caplog.at_level(logging.INFO, logger="hcc_liver_seg"):
        _run(["inference.json"], "infer", dataset_dir=str(data["cohort"]), datalist=str(data["datalist"]),
             ckpt_dir=str(trained["ckpt_dir"]), output_dir=str(out), min_liver_ml=0.0, **TINY)
    testing = json.loads(data["datalist"].read_text())["testing"]
    for item in testing:
        image = nib.load(data["cohort"] / item["image"])
        mask = nib.load(out / item["patient_id"] / f"{item['timepoint']}.nii.gz")
        assert mask.shape == image.shape
        np.testing.assert_allclose(mask.affine, image.affine, atol=1e-4)
    assert f"[{len(testing)}/{len(testing)}]" in caplog.text  # progress log


def test_inference_no_liver_writes_empty_mask_with_warning(trained, data, tmp_path, caplog):
    out = tmp_path / "masks"
    with caplog.at_level(logging.WARNING, logger="hcc_liver_seg"):
        _run(["inference.json"], "infer", dataset_dir=str(data["cohort"]), datalist=str(data["datalist"]),
             datalist_key="validation", ckpt_dir=str(trained["ckpt_dir"]), output_dir=str(out),
             min_liver_ml=1e9, **TINY)
    item = json.loads(data["datalist"].read_text())["validation"][0]
    mask = nib.load(out / item["patient_id"] / f"{item['timepoint']}.nii.gz")
    assert not np.asarray(mask.dataobj).any()
    assert f"no liver found in {data['cohort'] / item['image']}" in caplog.text


# ---------------------------------------------------------------------------------- bad input
def _infer_error(data, tmp_path, testing, trained=None, **overrides) -> str:
    dl = _datalist(tmp_path / "dl.json", [], [], testing)
    kwargs = {"dataset_dir": str(data["cohort"]), "datalist": str(dl), "output_dir": str(tmp_path / "masks"),
              "ckpt_dir": str(trained["ckpt_dir"] if trained else tmp_path / "none"), **TINY, **overrides}
    with pytest.raises(Exception) as exc:
        _run(["inference.json"], "infer", **kwargs)
    assert not list((tmp_path / "masks").rglob("*.nii.gz")) if (tmp_path / "masks").exists() else True
    return _messages(exc.value)


def test_missing_image_names_the_file(data, tmp_path, trained):
    missing = data["cohort"] / "images" / "NOPE" / "t0.nii.gz"
    msg = _infer_error(data, tmp_path, [{"image": "images/NOPE/t0.nii.gz"}], trained)
    assert f"image file not found: {missing} (expected a NIfTI file .nii or .nii.gz)" in msg


def test_unreadable_image_names_the_file(data, tmp_path, trained):
    bad = tmp_path / "images" / "P1" / "t0.nii.gz"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"this is not a nifti file")
    msg = _infer_error(data, tmp_path, [{"image": str(bad)}], trained, data_root_dir=str(tmp_path / "images"))
    assert f"image file is not a readable NIfTI image: {bad}" in msg


def test_4d_image_is_refused(data, tmp_path, trained):
    four_d = tmp_path / "in" / "P4D" / "t0.nii.gz"
    four_d.parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.zeros((64, 64, 26, 3), np.float32), np.diag([1.5, 1.5, 5.0, 1.0])), four_d)
    with pytest.raises(Exception) as exc:
        _run(["inference.json"], "infer", input_dir=str(tmp_path / "in"), ckpt_dir=str(trained["ckpt_dir"]),
             output_dir=str(tmp_path / "masks"), **TINY)
    msg = _messages(exc.value)
    assert f"image file {four_d}: expected a 3-D volume (x, y, z), found a 4-D image of shape (64, 64, 26, 3)" in msg
    assert not list((tmp_path / "masks").rglob("*.nii.gz")) if (tmp_path / "masks").exists() else True


def test_output_into_input_folder_is_refused(data, tmp_path, trained):
    inputs = tmp_path / "in"
    _reoriented(data["cohort"] / json.loads(data["datalist"].read_text())["testing"][0]["image"], "RAS",
                inputs / "P1" / "t0.nii.gz")
    for out in (inputs, inputs / "masks"):
        with pytest.raises(Exception) as exc:
            _run(["inference.json"], "infer", input_dir=str(inputs), ckpt_dir=str(trained["ckpt_dir"]),
                 output_dir=str(out), **TINY)
        assert "refusing to write masks among the input images" in _messages(exc.value)
    assert [p.name for p in inputs.rglob("*.nii.gz")] == ["t0.nii.gz"]


def test_empty_input_folder_is_a_clear_error(tmp_path, trained):
    (tmp_path / "in").mkdir()
    with pytest.raises(Exception) as exc:
        _run(["inference.json"], "infer", input_dir=str(tmp_path / "in"), ckpt_dir=str(trained["ckpt_dir"]),
             output_dir=str(tmp_path / "masks"), **TINY)
    assert f"no input images found in {tmp_path / 'in'}" in _messages(exc.value)


def _two_scans(data, tmp_path, bad_name: str = "P9"):
    """An input folder of a good scan (P0, segmented first) and a place for a bad one."""
    src = data["cohort"] / json.loads(data["datalist"].read_text())["testing"][0]["image"]
    inputs = tmp_path / "in"
    (inputs / "P0").mkdir(parents=True)
    shutil.copyfile(src, inputs / "P0" / "t0.nii.gz")
    bad = inputs / bad_name / "t0.nii.gz"
    bad.parent.mkdir()
    return inputs, bad, nib.load(src)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_scan_stops_the_run_before_any_mask(data, tmp_path, trained, value):
    """Issue 15: a scan with NaN/Inf voxels is named and the run writes no mask (it wrote an
    all-zero one with 'no liver found'); with continue_on_error the others are segmented and
    the failure goes to failures.csv."""
    inputs, bad, good = _two_scans(data, tmp_path)
    arr = np.asanyarray(good.dataobj).astype(np.float32)
    arr[3, 4, 5] = value
    nib.save(nib.Nifti1Image(arr, good.affine), bad)
    out = tmp_path / "masks"
    with pytest.raises(Exception) as exc:
        _run(["inference.json"], "infer", input_dir=str(inputs), ckpt_dir=str(trained["ckpt_dir"]),
             output_dir=str(out), **TINY)
    msg = _messages(exc.value)
    assert f"image file {bad}: 1 voxel(s) are NaN or infinite" in msg and "no mask written" in msg
    assert not out.exists() or not list(out.rglob("*"))
    _run(["inference.json"], "infer", input_dir=str(inputs), ckpt_dir=str(trained["ckpt_dir"]),
         output_dir=str(out), continue_on_error="true", **TINY)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.nii.gz")) == ["P0/t0.nii.gz"]
    failures = (out / "failures.csv").read_text().splitlines()
    assert failures[0] == "image,error" and len(failures) == 2 and str(bad) in failures[1]
    assert not (out / ".partial").exists()


def test_truncated_scan_is_named_before_any_mask(data, tmp_path, trained):
    """The header alone reads fine; the voxels do not: named before P0's mask is written."""
    inputs, bad, _ = _two_scans(data, tmp_path)
    full = (inputs / "P0" / "t0.nii.gz").read_bytes()
    bad.write_bytes(full[: len(full) // 2])
    out = tmp_path / "masks"
    with pytest.raises(Exception) as exc:
        _run(["inference.json"], "infer", input_dir=str(inputs), ckpt_dir=str(trained["ckpt_dir"]),
             output_dir=str(out), **TINY)
    assert f"image file is not a readable NIfTI image: {bad}" in _messages(exc.value)
    assert not out.exists() or not list(out.rglob("*.nii.gz"))


def test_link_to_a_scan_outside_the_input_folder_is_named(data, tmp_path, trained):
    inputs, bad, _ = _two_scans(data, tmp_path)
    elsewhere = tmp_path / "elsewhere.nii.gz"
    shutil.copyfile(inputs / "P0" / "t0.nii.gz", elsewhere)
    bad.symlink_to(elsewhere)
    with pytest.raises(Exception) as exc:
        _run(["inference.json"], "infer", input_dir=str(inputs), ckpt_dir=str(trained["ckpt_dir"]),
             output_dir=str(tmp_path / "masks"), **TINY)
    assert f"links to files outside data_root_dir {inputs}, e.g. {bad} -> {elsewhere}" in _messages(exc.value)


def test_a_run_that_fails_midway_keeps_no_mask_of_it(tmp_path):
    """CommitOutputs: masks go to the staging folder and move into output_dir only when the run
    completes; an error on the second case leaves output_dir as it was (an earlier run's mask
    stays) and removes the staging folder."""
    from ignite.engine import Engine

    _bundle_on_path()
    from scripts.handlers import CommitOutputs

    out, staging = tmp_path / "masks", tmp_path / "masks" / ".partial"
    (out / "OLD").mkdir(parents=True)
    (out / "OLD" / "t0.nii.gz").write_bytes(b"earlier run")

    def step(engine, batch):
        (staging / f"P{batch}").mkdir(parents=True, exist_ok=True)
        (staging / f"P{batch}" / "t0.nii.gz").write_bytes(b"mask")
        if batch == fail_at:
            raise RuntimeError("out of memory on case 2")

    for fail_at, expected in ((1, ["OLD/t0.nii.gz"]), (None, ["OLD/t0.nii.gz", "P0/t0.nii.gz", "P1/t0.nii.gz"])):
        engine = Engine(step)
        CommitOutputs(str(staging), str(out)).attach(engine)
        if fail_at is None:
            engine.run([0, 1])
        else:
            with pytest.raises(RuntimeError, match="out of memory"):
                engine.run([0, 1])
        assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.nii.gz")) == expected
        assert not staging.exists()


def test_label_values_outside_0_1_2_name_the_file(data, tmp_path):
    item = dict(json.loads(data["datalist"].read_text())["training"][0])
    label = nib.load(data["cohort"] / item["label"])
    arr = np.asarray(label.dataobj).copy()
    arr[0, 0, 0] = 5
    bad = tmp_path / "labels" / "t0.nii.gz"
    bad.parent.mkdir()
    nib.save(nib.Nifti1Image(arr, label.affine, label.header), bad)
    item["label"] = str(bad)  # absolute paths pass through load_decathlon_datalist unchanged
    dl = _datalist(tmp_path / "dl.json", [item], [item], [])
    with pytest.raises(Exception) as exc:
        _run(["train.json"], dataset_dir=str(data["cohort"]), datalist=str(dl), ckpt_dir=str(tmp_path / "m"),
             output_dir=str(tmp_path / "e"), **TRAIN)
    assert f"label file {bad}: label values {{5}} outside {{0, 1, 2}}" in _messages(exc.value)
    assert not (tmp_path / "m").exists() or not list((tmp_path / "m").iterdir())


# ------------------------------------------------------------------------------- unit: scripts
def test_postprocessing_keeps_largest_liver_and_drops_outside_tumour(caplog):
    _bundle_on_path()
    from monai.data import MetaTensor
    from scripts.transforms import KeepLargestLiverd, LiverCheckd

    pred = torch.zeros(1, 20, 20, 20, dtype=torch.uint8)
    pred[0, 2:12, 2:12, 2:12] = 1          # liver body, 1000 voxels
    pred[0, 5:8, 5:8, 5:8] = 2             # tumour inside it
    pred[0, 15:18, 15:18, 15:18] = 2       # tumour blob away from the liver
    pred[0, 15:17, 2:4, 2:4] = 1           # stray liver speck
    out = KeepLargestLiverd("pred")({"pred": MetaTensor(pred.clone(), affine=torch.diag(torch.tensor([2., 2., 2., 1.])))})
    p = out["pred"]
    assert int((p == 2).sum()) == 27 and int((p == 1).sum()) == 1000 - 27
    with caplog.at_level(logging.INFO, logger="hcc_liver_seg"):
        LiverCheckd("pred", min_liver_ml=0.0)(out)
    assert "liver 7.8 mL, tumour 0.2 mL" in caplog.text  # 973 and 27 voxels of 8 mm^3
    empty = {"pred": MetaTensor(torch.zeros(1, 8, 8, 8, dtype=torch.uint8))}
    with caplog.at_level(logging.WARNING, logger="hcc_liver_seg"):
        LiverCheckd("pred", min_liver_ml=0.0)(empty)
    assert "no liver found in <in-memory image>" in caplog.text


def test_combined_dice_eq2_and_hd95_mm_reference_values():
    _bundle_on_path()
    from scripts.metrics import CombinedDiceMetric, HD95mmMetric

    def onehot(lab):
        return torch.nn.functional.one_hot(torch.as_tensor(lab), 3).permute(3, 0, 1, 2)[None].float()

    p = np.zeros((4, 4, 4), int)
    g = np.zeros((4, 4, 4), int)
    p[0, 0, :4] = 1       # |M1| = 4
    g[0, 0, 1:4] = 1      # |G1| = 6, |M1 n G1| = 3
    g[0, 1, :3] = 1
    p[3, 3, 2:4] = 2      # |M2| = 2
    g[3, 3, 3] = 2        # |G2| = 2, |M2 n G2| = 1
    g[3, 2, 3] = 2
    m = CombinedDiceMetric()
    m(onehot(p), onehot(g))
    assert float(m.aggregate()) == pytest.approx(2 * (3 + 1) / (4 + 6 + 2 + 2))

    a = np.zeros((8, 8, 8), int)
    b = np.zeros((8, 8, 8), int)
    a[2:5, 2:5, 2:5] = 1
    b[3:6, 2:5, 2:5] = 1  # shifted one voxel along axis 0, 2.5 mm there
    h = HD95mmMetric(spacing=[2.5, 1.0, 1.0], include_background=False, reduction="mean")
    h(onehot(a), onehot(b))
    assert float(h.aggregate()) == pytest.approx(2.5)


def test_whole_liver_dice_of_evaluate_config_pools_liver_and_tumour():
    """evaluate.json's dice_whole_liver (labels 1 and 2 as one organ, the mask the prognosis model
    multiplies with): a tumour voxel predicted as liver counts as a hit there, a miss in dice_liver."""
    from monai.bundle import ConfigParser
    from monai.metrics import DiceMetric

    cfg = json.loads((CONFIGS / "evaluate.json").read_text())
    transform = ConfigParser(cfg["validate#additional_metrics"]).get_parsed_content(
        "val_dice_whole_liver#output_transform")

    def onehot(lab):
        return torch.nn.functional.one_hot(torch.as_tensor(lab), 3).permute(3, 0, 1, 2).float()

    p = np.zeros((4, 4, 4), int)
    g = np.zeros((4, 4, 4), int)
    g[0, :2, :4] = 1          # liver 8
    g[1, 0, :2] = 2           # tumour 2: organ |G| = 10
    p[0, :2, :3] = 1          # 6 liver hits
    p[1, 0, :2] = 1           # the tumour called liver: 2 organ hits
    p[3, 3, 3] = 2            # 1 false tumour voxel outside: organ |P| = 9
    preds, labels = transform([{"pred": onehot(p), "label": onehot(g)}])
    dice = DiceMetric(include_background=True)
    dice(torch.stack(preds), torch.stack(labels))
    assert float(dice.aggregate()) == pytest.approx(2 * 8 / (9 + 10))


# ----------------------------------------------------------------------------- Model Zoo checks
def test_check_properties_train_and_infer(trained, data):
    common = {"dataset_dir": str(data["cohort"]), "datalist": str(data["datalist"]),
              "ckpt_dir": str(trained["ckpt_dir"]), "output_dir": str(data["work"] / "props")}
    for configs, kind in ((["train.json"], "train"), (["train.json", "evaluate.json"], "train"),
                          (["inference.json"], "infer")):
        wf = _workflow(configs, kind, **common, **(TRAIN if kind == "train" else TINY))
        wf.initialize()
        assert wf.check_properties() == [], configs


def test_verify_metadata_and_net_in_out(tmp_path):
    from monai.bundle import verify_metadata, verify_net_in_out

    schema = tmp_path / "schema.json"
    shutil.copy(SCHEMA, schema)  # an existing file is used as is: no download
    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=str(schema))
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    assert meta["intended_use"] == "research, not for diagnosis"
    bad = dict(meta)
    del bad["network_data_format"]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="network_data_format"):
        verify_metadata(meta_file=str(tmp_path / "bad.json"), filepath=str(schema))
    _bundle_on_path()
    # n = 1 -> "32*n+32" = 64: the smallest input SwinUNETR takes
    verify_net_in_out(net_id="network_def", meta_file=str(CONFIGS / "metadata.json"),
                      config_file=str(CONFIGS / "inference.json"), feature_size=12)


def test_ckpt_export_traced_torchscript_matches_checkpoint(trained, tmp_path):
    from monai.bundle import ckpt_export
    from monai.networks.nets import SwinUNETR

    ts = tmp_path / "model.ts"
    _bundle_on_path()
    ckpt_export(net_id="network_def", filepath=str(ts), ckpt_file=str(trained["ckpt_dir"] / "model.pt"),
                meta_file=str(CONFIGS / "metadata.json"), config_file=str(CONFIGS / "inference.json"),
                use_trace=True, input_shape=[1, 1, 64, 64, 64], feature_size=12,
                converter_kwargs={"check_trace": False})  # the comparison below is the check
    traced = torch.jit.load(str(ts), map_location="cpu")
    net = SwinUNETR(in_channels=1, out_channels=3, feature_size=12)
    net.load_state_dict(torch.load(trained["ckpt_dir"] / "model.pt", map_location="cpu", weights_only=True))
    net.eval()
    x = torch.rand(1, 1, 64, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        np.testing.assert_allclose(traced(x).numpy(), net(x).numpy(), atol=1e-4, rtol=1e-4)


# -------------------------------------------------------------------------------- multi-process
@pytest.mark.timeout(600)
def test_torchrun_two_processes_cpu_gloo(data, tmp_path):
    ckpt = tmp_path / "models"
    cfg = json.dumps([str(CONFIGS / "train.json"), str(CONFIGS / "multi_gpu_train.json")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           "-m", "monai.bundle", "run", "--config_file", cfg, "--bundle_root", str(BUNDLE),
           "--meta_file", str(CONFIGS / "metadata.json"), "--logging_file", str(CONFIGS / "logging.conf"),
           "--dataset_dir", str(data["cohort"]), "--datalist", str(data["ddp_datalist"]),
           "--ckpt_dir", str(ckpt), "--output_dir", str(tmp_path / "eval")]
    for k, v in TRAIN.items():
        if k != "device":  # multi_gpu_train.json picks cuda:LOCAL_RANK or falls back to cpu
            cmd += [f"--{k}", v if isinstance(v, str) else json.dumps(v)]
    env = {**os.environ, "PYTHONPATH": str(BUNDLE), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=580)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "Epoch: 1/1, Iter: 1/1" in log  # 2 training scans split over 2 ranks
    assert "val_dice_eq2" in log
    assert (ckpt / "model.pt").is_file() and (ckpt / "checkpoint_epoch=1.pt").is_file()
    state = torch.load(ckpt / "model.pt", map_location="cpu", weights_only=True)
    assert not any(k.startswith("module.") for k in state)  # DDP wrapper stripped: portable weights


def test_channel_output_selects_and_pools_structures():
    """The metrics' output transform: liver 1:2, tumour 2:3, whole liver 1:3 (liver + tumour
    summed into one channel), for pred and label alike; a bad range is refused."""
    _bundle_on_path()
    from scripts.metrics import ChannelOutput

    pred = torch.zeros(3, 2, 2, 2)
    pred[1, 0], pred[2, 1] = 1, 1
    label = pred.flip(1)
    batch = [{"pred": pred, "label": label}]
    (p_liver,), (l_liver,) = ChannelOutput(1, 2)(batch)
    assert p_liver.shape == (1, 2, 2, 2) and torch.equal(p_liver[0], pred[1]) and torch.equal(l_liver[0], label[1])
    (p_whole,), _ = ChannelOutput(1, 3)(batch)
    assert p_whole.shape == (1, 2, 2, 2) and float(p_whole.sum()) == 8.0
    with pytest.raises(ValueError, match="0 <= start < stop"):
        ChannelOutput(2, 2)


def test_validation_scores_the_post_processed_mask():
    """Validation and evaluation apply the inference post-processing (largest liver + tumour
    component) before scoring, so the reported Dice is the Dice of the masks the bundle writes:
    a liver-looking blob away from the liver (the spleen, say) is dropped, not counted."""
    from monai.bundle import ConfigParser

    _bundle_on_path()
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    post = parser.get_parsed_content("validate#postprocessing")
    logits = torch.zeros(3, 12, 12, 12)
    logits[0] = 1.0                              # background everywhere ...
    logits[1, 1:6, 1:6, 1:6] = 5.0               # ... but a 125-voxel liver
    logits[2, 2:4, 2:4, 2:4] = 9.0               # with an 8-voxel tumour inside
    logits[1, 9:11, 9:11, 9:11] = 5.0            # and an 8-voxel blob far from it
    label = torch.zeros(1, 12, 12, 12)
    label[0, 1:6, 1:6, 1:6] = 1
    label[0, 2:4, 2:4, 2:4] = 2
    out = post({"pred": logits, "label": label})
    pred, lab = out["pred"], out["label"]
    assert tuple(pred.shape) == (3, 12, 12, 12) and tuple(lab.shape) == (3, 12, 12, 12)
    assert int(pred[1].sum()) == 125 - 8 and int(pred[2].sum()) == 8
    assert torch.equal(pred, lab)


def test_pretrained_initialises_training_from_verified_weights(data, tmp_path):
    """``pretrained``: the shipped weights (sha256 checked against large_files.yml) are the
    network's state when training starts; null trains from scratch; a tampered file is refused."""
    from ignite.engine import Engine

    shipped = BUNDLE / "models" / "synthetic_fs12.pt"
    want = torch.load(shipped, weights_only=True)
    want = want.get("model", want)
    common = dict(dataset_dir=str(data["cohort"]), datalist=str(data["datalist"]), ckpt_dir=str(tmp_path / "m"),
                  output_dir=str(tmp_path / "e"), **TRAIN)
    wf = _workflow(["train.json"], pretrained=str(shipped), **common)
    wf.initialize()
    loader = wf.parser.get_parsed_content("train#pretrained_loader")
    net = wf.parser.get_parsed_content("network")
    loader(Engine(lambda e, b: None))
    got = net.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k].to(got[k].dtype)) for k in want)

    wf = _workflow(["train.json"], pretrained="null", **common)
    wf.initialize()
    assert wf.parser.get_parsed_content("train#pretrained_loader") is None

    copy = tmp_path / "bundle"
    (copy / "models").mkdir(parents=True)
    (copy / "configs").mkdir()
    shutil.copy(BUNDLE / "large_files.yml", copy / "large_files.yml")
    raw = bytearray(shipped.read_bytes())
    raw[4096] ^= 1
    (copy / "models" / "synthetic_fs12.pt").write_bytes(bytes(raw))
    wf = _workflow(["train.json"], pretrained=str(copy / "models" / "synthetic_fs12.pt"), **common)
    with pytest.raises(Exception) as err:
        wf.initialize()
        wf.parser.get_parsed_content("train#pretrained_loader")
    assert "synthetic_fs12.pt: sha256" in _messages(err.value) and "does not match" in _messages(err.value)


def test_train_config_is_thin():
    """Issue 14: fewer expression lines than the 37 of train.json before; the rank logic lives in
    multi_gpu_train.json (as in the Model Zoo), which keeps the schedule, validation and NaN-stop
    handlers on every rank and logs, plots and saves on rank 0 only."""
    train = (CONFIGS / "train.json").read_text()
    assert sum('"$' in line for line in train.splitlines()) <= 24
    assert "is_main_rank" not in train and "lambda" not in train
    multi = json.loads((CONFIGS / "multi_gpu_train.json").read_text())
    assert multi["train#trainer#train_handlers"] == "$@train#handlers if @is_main_rank else @train#handlers[:3]"
    handlers = json.loads(train)["train"]["handlers"]
    # every rank steps its learning rate, validates (metrics are gathered) and stops on NaN
    assert [h["_target_"] for h in handlers[:3]] == ["LrScheduleHandler", "ValidationHandler",
                                                     "scripts.handlers.StopOnNaNLoss"]


def test_attach_skips_disabled_handlers():
    from ignite.engine import Engine

    _bundle_on_path()
    from scripts.handlers import attach

    calls = []

    class Handler:
        def __init__(self, name):
            self.name = name

        def attach(self, engine):
            calls.append(self.name)

    engine = Engine(lambda e, b: None)
    assert attach(engine, [Handler("resume"), None, Handler("saver")]) is engine
    assert calls == ["resume", "saver"]
