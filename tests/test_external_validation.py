"""The study on shared weights: site A exports both bundles, site B fetches them and validates
them on its own cohort without training (``python -m analysis external-validation``), and the
demo profile, which runs the weights the bundles ship.

One external validation of 8 synthetic patients (a seed never used to train the shipped
weights) through the README's commands feeds the checks.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import BUNDLES, REPO_ROOT

pytestmark = pytest.mark.slow

#: the seeds the shipped weights were trained or tuned on (docs of both bundles)
TRAINING_SEEDS = {0, 11}


@pytest.fixture(scope="module")
def site_b(tmp_path_factory) -> dict:
    """Both bundles exported (site A), fetched with their sha256 (site B), and validated on a
    new 8-patient cohort, all through the command line."""
    from analysis.synthetic import make_cohort

    work = tmp_path_factory.mktemp("external")
    run = lambda *args: subprocess.run([sys.executable, "-m", "analysis", *args], cwd=REPO_ROOT,  # noqa: E731
                                       capture_output=True, text=True, timeout=1500)
    fetched = {}
    for name in ("hcc_liver_seg", "progswin_prognosis"):
        proc = run("export-bundle", str(BUNDLES / name), "--out", str(work / "dist"), "--trace", "false")
        assert proc.returncode == 0, proc.stderr[-2000:]
        zip_path = Path(proc.stdout.split()[0])
        digest = zip_path.with_name(zip_path.name + ".sha256").read_text().split()[0]
        proc = run("fetch-bundle", str(zip_path), "--sha256", digest, "--out", str(work / "site_b"))
        assert proc.returncode == 0, proc.stderr[-2000:]
        fetched[name] = work / "site_b" / name
    make_cohort(work / "cohort", n_patients=8, shape=64, seed=2026)
    proc = run("external-validation", "--seg-bundle", str(fetched["hcc_liver_seg"]), "--prognosis-bundle",
               str(fetched["progswin_prognosis"]), "--cohort", str(work / "cohort"), "--out", str(work / "ev"),
               "--quiet", "true")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"work": work, "out": work / "ev", "fetched": fetched, "stdout": proc.stdout, "run": run}


def test_external_validation_reports_without_training(site_b):
    out = site_b["out"]
    summary = json.loads((out / "summary.json").read_text())
    for key in ("segmentation_dice_eq2", "prognosis_macro_auc", "prognosis_accuracy", "best_radiomics_macro_auc",
                "logrank_p_prognosis_all", "logrank_p_mrecist_all", "cox_c_index"):
        assert key in summary and (summary[key] is None or isinstance(summary[key], float)), key
    assert summary["kind"] == "external validation" and summary["weights"] == "shared"
    for key in ("logrank_p_prognosis_all", "logrank_p_mrecist_all"):
        assert summary[key] is None or 0 < summary[key] <= 1, key  # significant digits: never a rounded 0
    # the shipped segmentation weights on patients they never saw (idle-machine check: 0.94 on 48)
    assert summary["segmentation_dice_eq2"] >= 0.85
    agreement = pd.read_csv(out / "segmentation_inference" / "agreement" / "per_scan.csv")
    assert len(agreement) == 24 and agreement["hd95_whole_liver_mm"].notna().all()
    # nothing was trained: no segmentation checkpoint, no fold models, the automatic masks downstream
    assert not (out / "segmentation" / "models").exists() and not (out / "prognosis" / "models").exists()
    assert set(pd.read_csv(out / "masks" / "sources.csv")["source"]) == {"segmentation"}
    metrics = json.loads((out / "prognosis" / "evaluation" / "metrics.json").read_text())
    assert metrics["trained_here"] is False and metrics["manifest"] is True
    assert metrics["macro_auc"] == pytest.approx(summary["prognosis_macro_auc"])
    lo, hi = metrics["macro_auc_ci"]
    assert lo <= metrics["macro_auc"] <= hi
    predictions = pd.read_csv(out / "prognosis" / "all_predictions.csv")
    assert len(predictions) == 8
    assert (predictions[[f"prob_{k}" for k in range(4)]].sum(axis=1) - 1).abs().max() < 1e-5
    calibration = pd.read_csv(out / "prognosis" / "evaluation" / "calibration.csv")
    assert (out / "prognosis" / "evaluation" / "calibration.png").is_file()
    assert calibration["mean_predicted"].between(0, 1).all() and calibration["n"].sum() > 0
    for part in ("km/tables/logrank.csv", "cox/summary.json", "gradcam"):
        assert (out / part).exists(), part
    html = (out / "report.html").read_text()
    assert "external validation report" in html and "not trained on this cohort" in html
    assert "SYNTHETIC" in html


def test_external_validation_refuses_a_changed_bundle_and_a_bad_cohort(site_b, tmp_path):
    import shutil

    seg = tmp_path / "hcc_liver_seg"
    shutil.copytree(site_b["fetched"]["hcc_liver_seg"], seg)
    weights = seg / "models" / "model.pt"
    raw = bytearray(weights.read_bytes())
    raw[2048] ^= 1
    weights.write_bytes(bytes(raw))
    run = site_b["run"]
    proc = run("external-validation", "--seg-bundle", str(seg), "--prognosis-bundle",
               str(site_b["fetched"]["progswin_prognosis"]), "--cohort", str(site_b["work"] / "cohort"), "--out",
               str(tmp_path / "ev"), "--quiet", "true")
    assert proc.returncode == 1
    assert f"{weights}: sha256" in proc.stderr and "differs from its manifest" in proc.stderr
    assert not (tmp_path / "ev" / "segmentation_inference").exists()

    bad = tmp_path / "cohort"
    shutil.copytree(site_b["work"] / "cohort", bad)
    (bad / "images" / "HCC001" / "t1.nii.gz").unlink()
    proc = run("external-validation", "--seg-bundle", str(site_b["fetched"]["hcc_liver_seg"]), "--prognosis-bundle",
               str(site_b["fetched"]["progswin_prognosis"]), "--cohort", str(bad), "--out", str(tmp_path / "ev2"),
               "--quiet", "true")
    assert proc.returncode == 2 and "HCC001" in proc.stderr and "t1" in proc.stderr
    assert not (tmp_path / "ev2" / "segmentation").exists()


def test_demo_profile_runs_the_shipped_weights_on_an_unseen_cohort():
    """The README's main job: shared weights (inference only) on at least 40 patients whose seed
    was never used to train them; the scratch profile trains everything instead."""
    from analysis.study import PROFILES

    demo, scratch = PROFILES["demo"], PROFILES["scratch"]
    assert demo["weights"] == "shared" and demo["weights_overlay"] == "synthetic_weights.json"
    assert demo["patients"] >= 40 and demo["seed"] not in TRAINING_SEEDS
    assert scratch["weights"] == "train" and PROFILES["paper"]["weights"] == "train"
    for bundle in ("hcc_liver_seg", "progswin_prognosis"):
        assert (BUNDLES / bundle / "configs" / demo["weights_overlay"]).is_file()


#: every study setting that reaches a bundle's config (issue 15: no user text in a $ expression)
_BUNDLE_FLAGS = ["device", "feature_size", "net_size", "seg_roi", "seg_epochs", "prog_epochs", "seg_spacing_mm",
                 "seg_num_samples", "seg_val_interval", "grad_checkpointing", "sw_batch_size", "num_workers",
                 "weights_overlay", "tracking", "folds"]


@pytest.mark.parametrize("key", _BUNDLE_FLAGS)
def test_every_bundle_flag_refuses_code(tmp_path, key):
    """The issue's payload, and a bare config expression, in each flag that reaches a bundle: a
    ValueError naming the flag before anything is written, and the command never runs."""
    from analysis.study import run_study

    marker = tmp_path / "pwned"
    for payload in (f"cpu') if __import__('os')._exit(__import__('os').system('touch {marker}')+3) else ('cpu",
                    f"$__import__('os').system('touch {marker}')"):
        with pytest.raises(ValueError, match="--" + key.replace("_", "-")):
            run_study(out=tmp_path / "o", profile="scratch", progress=False, **{key: payload})
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_settings_are_typed_from_command_line_text(tmp_path):
    from analysis.study import PROFILES, check_settings

    typed = check_settings({**PROFILES["scratch"], "feature_size": "24", "grad_checkpointing": "false",
                            "seg_spacing_mm": ["2", "2", "4.5"], "cox_penalizer": "0.5", "device": "auto"}, "scratch")
    assert typed["feature_size"] == 24 and typed["grad_checkpointing"] is False
    assert typed["seg_spacing_mm"] == [2.0, 2.0, 4.5] and typed["cox_penalizer"] == 0.5
    for key, bad in (("patients", "-3"), ("cox_penalizer", "inf"), ("seg_spacing_mm", [1, 1]),
                     ("weights_overlay", "../../evil.json"), ("grad_checkpointing", "maybe")):
        with pytest.raises(ValueError, match="--" + key.replace("_", "-")):
            check_settings({**PROFILES["scratch"], key: bad}, "scratch")


def test_device_reaches_the_bundles_as_a_plain_value():
    from analysis.study import PROFILES, bundle_overrides

    assert bundle_overrides({**PROFILES["scratch"], "device": "cuda:1"}, "hcc_liver_seg", ("device",)) == \
        {"device": "cuda:1"}
    assert bundle_overrides({**PROFILES["paper"]}, "progswin_prognosis", ("device", "feature_size")) == \
        {"feature_size": 48}  # auto: the bundle's own default picks the device


def test_run_bundle_refuses_config_syntax_at_any_depth(tmp_path):
    """The last guard before a bundle runs: no string the study passes starts with $, @ or %."""
    from analysis.study import run_bundle

    for overrides, where in (({"output_dir": "$print(1)"}, "output_dir"),
                             ({"fold_overrides": {"max_epochs": 2, "datalist": "@dataset_dir"}}, "fold_overrides#datalist"),
                             ({"infer_sections": ["training", "%train.json#x"]}, "infer_sections#1")):
        with pytest.raises(ValueError, match=f"bundle id {where}: the value"):
            run_bundle(BUNDLES / "hcc_liver_seg", ["inference.json"], overrides, tmp_path / "log.txt")
    assert not (tmp_path / "log.txt").exists()


def test_device_flag_is_a_device_name_never_code(tmp_path):
    """A --device value reaches the bundles' configs: anything but a device name is refused
    before a bundle runs (and the command it carries never runs)."""
    marker = tmp_path / "pwned"
    payload = f"cpu') if __import__('os').system('touch {marker}') else ('cpu"
    proc = subprocess.run([sys.executable, "-m", "analysis", "study", "--out", str(tmp_path / "o"), "--device",
                           payload, "--quiet"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--device" in proc.stderr and "expected cpu, cuda" in proc.stderr
    assert not marker.exists() and not (tmp_path / "o" / "validation").exists()


class _Recorded(Exception):
    """Raised by the recording run_bundle to stop a stage after the calls a test needs."""


class _Bar:
    def reset(self, total=None): pass
    def update(self, n=1): pass


def _recording_study(monkeypatch, tmp_path, stop_at, **settings):
    """(study module, a StudyContext on a stub cohort, the recorded (bundle, configs, overrides)
    calls): study.run_bundle records instead of running and raises _Recorded on the calls whose
    1-based number is in ``stop_at``."""
    from analysis import study

    calls = []

    def record(bundle, configs, overrides, log_file, bar=None):
        calls.append((bundle.name, tuple(configs), dict(overrides)))
        if len(calls) in stop_at:
            raise _Recorded

    monkeypatch.setattr(study, "run_bundle", record)
    (tmp_path / "datalists").mkdir()
    (tmp_path / "datalists" / "segmentation.json").write_text(json.dumps({"training": [{"image": "x"}]}))
    ctx = study.StudyContext(out=tmp_path, cohort=tmp_path, settings={**study.PROFILES["scratch"], **settings},
                             bundles=BUNDLES)
    return study, ctx, calls


@pytest.mark.parametrize("tracking, expected", [("mlflow", "mlflow"), ("MLflow", "mlflow"), ("none", None)])
def test_tracking_reaches_the_training_runs(tmp_path, monkeypatch, tracking, expected):
    """--tracking mlflow is passed on to every bundle training run the study drives (segmentation
    train and evaluate, prognosis cross-validation: as fold_tracking, since a plain --tracking on
    cross_validate.json would track the run that has no trainer); none passes nothing."""
    study, ctx, calls = _recording_study(monkeypatch, tmp_path, stop_at=(2, 3), tracking=tracking)
    with pytest.raises(_Recorded):
        study._segmentation(ctx, tmp_path / "seg", _Bar())
    with pytest.raises(_Recorded):
        study._prognosis(ctx, tmp_path / "prog", _Bar())
    assert [(b, c) for b, c, _ in calls] == [("hcc_liver_seg", ("train.json",)),
                                            ("hcc_liver_seg", ("train.json", "evaluate.json")),
                                            ("progswin_prognosis", ("cross_validate.json",))]
    assert [o.get("tracking") for _, _, o in calls[:2]] == [expected] * 2
    assert calls[2][2].get("fold_tracking") == expected and "tracking" not in calls[2][2]


def test_tracking_flag_refuses_an_unknown_tracker(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "analysis", "study", "--out", str(tmp_path / "o"), "--tracking",
                           "wandb", "--quiet"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--tracking 'wandb': expected one of none, mlflow" in proc.stderr
    assert not (tmp_path / "o" / "validation").exists()


def test_profile_settings_reach_the_bundle_ids_of_one_table(tmp_path, monkeypatch):
    """study.BUNDLE_IDS is the one map from profile settings to bundle ids: every id it names
    exists in that bundle's configs, and the training runs get each setting under its id."""
    from analysis import study

    for bundle, ids in study.BUNDLE_IDS.items():
        roots = set()
        for name in ("train.json", "inference.json"):
            config = json.loads((BUNDLES / bundle / "configs" / name).read_text())
            roots |= set(config) | {f"network_def#{k}" for k in config.get("network_def", {})}
        assert set(ids.values()) <= roots, (bundle, set(ids.values()) - roots)
    study, ctx, calls = _recording_study(monkeypatch, tmp_path, stop_at=(1, 2), feature_size=24, seg_roi=96,
                                         net_size=128, seg_epochs=7, prog_epochs=9, grad_checkpointing=True)
    settings = ctx.settings
    for stage in (study._segmentation, study._prognosis):
        with pytest.raises(_Recorded):
            stage(ctx, tmp_path / stage.__name__, _Bar())
    (_, _, seg), (_, _, cv) = calls
    prog = cv["fold_overrides"]
    assert cv["ckpt_dir"] == str(tmp_path / "_prognosis" / "models") and cv["folds"] == settings["folds"]
    assert (seg["feature_size"], seg["roi_size"], seg["max_epochs"], seg["use_checkpoint"]) == (24, [96] * 3, 7, True)
    assert seg["device"] == "cpu" and seg["target_spacing"] == settings["seg_spacing_mm"]
    assert (prog["feature_size"], prog["spatial_size"], prog["max_epochs"], prog["network_def#use_checkpoint"]) == \
        (24, [128] * 3, 9, True)


def test_bundle_progress_counts_epochs_and_scans():
    """The study's per-bundle progress bar: ignite's 'Epoch[n] Complete' lines of the trainer
    (not the evaluator's) over folds x epochs, and the segmentation's '[k/N]' scan lines."""
    from analysis.study import BundleProgress

    class StageBar:
        disable = False

    train = BundleProgress(StageBar(), "progswin_prognosis cross-validation", epochs=2, runs=4)
    assert train.bar.total == 8
    lines = ["2026-12-04 03:20:01,1 - ignite.engine.engine.SupervisedTrainer - INFO - Epoch[1] Complete. Time taken: 00:02:50",
             "2026-12-04 03:20:02,1 - ignite.engine.engine.SupervisedEvaluator - INFO - Epoch[1] Complete. Time taken: 00:00:09",
             "2026-12-04 03:23:01,1 - ignite.engine.engine.SupervisedTrainer - INFO - Epoch[2] Complete. Time taken: 00:02:49",
             "2026-12-04 03:23:02,1 - ignite.engine.engine.SupervisedTrainer - INFO - Epoch[1] Complete. Time taken: 00:02:51"]
    for line in lines:
        train.feed(line)
    assert (train.count, train.bar.n) == (3, 3)
    train.close()
    scans = BundleProgress(StageBar(), "hcc_liver_seg inference.json")
    for k in (1, 2, 5):
        scans.feed(f"2026-12-04 02:02:42,458 - hcc_liver_seg - INFO - [{k}/600] c/images/HCC001/t0.nii.gz (5.7 s)")
    assert (scans.bar.total, scans.bar.n) == (600, 5)
    scans.close()
    quiet = BundleProgress(None, "x", epochs=2)
    quiet.feed(lines[0])
    assert quiet.bar is None and quiet.count == 0


def test_a_failed_bundle_run_names_its_root_cause(tmp_path):
    """Issue 15: the study's failure line says why a bundle stopped (the error its config's code
    raised), not only MONAI's wrapper; the log keeps the whole story."""
    from analysis.pipeline import StageFailure
    from analysis.study import root_cause, run_bundle

    log = ["2026-12-05 - INFO - starting\n", "Traceback (most recent call last):\n", '  File "x.py", line 3\n',
           "ValueError: image file /c/P9/t0.nii.gz: 1 voxel(s) are NaN or infinite; expected finite intensities\n",
           "\n", "The above exception was the direct cause of the following exception:\n", "\n",
           "Traceback (most recent call last):\n",
           "RuntimeError: Failed to instantiate component 'scripts.checks.checked_inputs' with keywords: data\n"]
    assert root_cause(log) == ("ValueError: image file /c/P9/t0.nii.gz: 1 voxel(s) are NaN or infinite; "
                               "expected finite intensities")
    assert root_cause(["all fine\n"]) is None
    # a real run: a missing datalist
    with pytest.raises(StageFailure) as exc:
        run_bundle(BUNDLES / "progswin_prognosis", ["cross_validate.json"],
                   {"dataset_dir": str(tmp_path), "output_dir": str(tmp_path / "o")}, tmp_path / "cv.log")
    first = str(exc.value).splitlines()[0]
    assert first.endswith(f"FileNotFoundError: prognosis datalist not found: {tmp_path}/datalists/prognosis.json")
