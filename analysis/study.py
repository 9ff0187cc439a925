"""The whole study, end to end, resumable: ``python -m analysis study``.

validate -> datalists -> segmentation (train / given weights) -> segmentation inference ->
masks (manual labels where present, else automatic) -> prognosis 4-fold cross-validation with
out-of-fold predictions -> Grad-CAM++ -> radiomics -> classical models -> mRECIST ->
Kaplan-Meier -> Cox -> nomogram -> Table 1 -> report.html

The two MONAI bundles are driven through ``python -m monai.bundle run`` with command-line
overrides (never through copies of their configs); everything else calls the ``analysis``
functions. :mod:`analysis.pipeline` gives the manifest, resume and progress.
"""

from __future__ import annotations

import json
import logging
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from analysis import io
from analysis.cohort import TIMEPOINTS, find_scan, is_synthetic, read_clinical, validate_cohort
from analysis.pipeline import Pipeline, Stage, StageFailure, StageResult

log = logging.getLogger(__name__)

#: the study's settings per profile. ``demo`` runs both bundles with the weights they ship
#: (``weights: shared``: inference only, through each bundle's ``configs/<weights_overlay>``) on
#: 48 synthetic patients whose seed (2026) was never used to train or tune them; ``scratch``
#: trains both networks from nothing at tiny size (its deep-learning numbers are near chance);
#: ``paper`` is the paper's setup for a GPU site.
_TINY_NETWORKS = {
    "feature_size": 12, "net_size": 64, "seg_roi": 64, "seg_epochs": 1, "prog_epochs": 2,
    "seg_spacing_mm": [2.5, 2.5, 5.0], "seg_num_samples": 1, "seg_val_interval": 1,
    "grad_checkpointing": False, "sw_batch_size": 1,
    "num_workers": 0,
    "radiomics_jobs": 2, "bootstrap": 1000, "cox_penalizer": 0.1, "device": "cpu", "tracking": "none",
}
PROFILES: dict[str, dict] = {
    "demo": {
        "patients": 48, "shape": 64, "seed": 2026, "folds": 4,
        "weights": "shared", "weights_overlay": "synthetic_weights.json", **_TINY_NETWORKS,
    },
    "scratch": {
        "patients": 12, "shape": 64, "seed": 0, "folds": 4,
        "weights": "train", "weights_overlay": None, **_TINY_NETWORKS,
    },
    "paper": {
        "patients": 181, "shape": 128, "seed": 0, "folds": 4,
        "weights": "train", "weights_overlay": None,
        "feature_size": 48, "net_size": 128, "seg_roi": 96, "seg_epochs": 300, "prog_epochs": 160,
        "seg_spacing_mm": [1.5, 1.5, 2.5], "seg_num_samples": 2, "seg_val_interval": 5,
        "grad_checkpointing": True, "sw_batch_size": 4,
        "num_workers": 4,
        "radiomics_jobs": os.cpu_count() or 2, "bootstrap": 2000, "cox_penalizer": 0.0, "device": "auto",
        "tracking": "none",
    },
}

#: the bundle id each network setting of a profile sets, per bundle: the one table that maps the
#: study's settings onto the bundles' configs (the settings not here are the study's own: cohort,
#: folds, statistics); values become what the id expects (a cube side -> [side] * 3, a device name
#: -> a torch.device expression)
BUNDLE_IDS: dict[str, dict[str, str]] = {
    "hcc_liver_seg": {
        "feature_size": "feature_size", "seg_roi": "roi_size", "seg_epochs": "max_epochs",
        "seg_spacing_mm": "target_spacing", "seg_num_samples": "num_samples", "seg_val_interval": "val_interval",
        "grad_checkpointing": "use_checkpoint", "sw_batch_size": "sw_batch_size", "num_workers": "num_workers",
        "device": "device",
    },
    "progswin_prognosis": {
        "feature_size": "feature_size", "net_size": "spatial_size", "prog_epochs": "max_epochs",
        "grad_checkpointing": "network_def#use_checkpoint", "num_workers": "num_workers", "device": "device",
    },
}
_CUBES = ("seg_roi", "net_size")

WEIGHTS_MODES = ("train", "shared")
#: experiment tracking of the bundles' training runs (monai.bundle run --tracking)
TRACKING_MODES = ("none", "mlflow")

#: the paper's headline numbers (Yao et al. 2025), shown beside this run's
PAPER = {
    "segmentation Dice (Eq. 2)": 0.83,
    "ProgSwin-UNETR macro AUC": 0.92,
    "ProgSwin-UNETR accuracy": 0.86,
    "best radiomics macro AUC": "0.76 (naive Bayes)",
    "KM log-rank p, ProgSwin, all": "<0.005",
    "KM log-rank p, mRECIST, all": 0.01,
    "Cox C-index": 0.81,
}

STAGE_NAMES = ("validate", "datalists", "segmentation", "segmentation_inference", "masks", "prognosis",
               "gradcam", "radiomics", "classify", "mrecist", "km", "cox", "nomogram", "table1", "report")


def find_bundles(bundles: str | os.PathLike | None = None) -> Path:
    """The folder holding hcc_liver_seg/ and progswin_prognosis/ (flag, $HCC_BUNDLES, ./bundles, repo)."""
    candidates = [bundles, os.environ.get("HCC_BUNDLES"), Path.cwd() / "bundles",
                  Path(__file__).resolve().parents[1] / "bundles"]
    for c in candidates:
        if c and (Path(c) / "hcc_liver_seg" / "configs").is_dir():
            return Path(c).resolve()
    raise FileNotFoundError("cannot find the bundles folder (hcc_liver_seg/, progswin_prognosis/): run from the "
                            "repository root or pass --bundles DIR (or set HCC_BUNDLES)")


@dataclass
class StudyContext:
    out: Path
    cohort: Path
    settings: dict
    bundles: Path | None = None
    seg_weights: Path | None = None
    masks_source: str = "auto"
    synthetic: bool = False
    stop_on_failure: dict = field(default_factory=lambda: {n: True for n in STAGE_NAMES[:5]})
    #: bundle folders given one by one (external validation of fetched bundles)
    seg_bundle_dir: Path | None = None
    prog_bundle_dir: Path | None = None

    # --- paths of stage outputs
    def path(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)

    @property
    def seg_bundle(self) -> Path:
        return self.seg_bundle_dir or self.bundles / "hcc_liver_seg"

    @property
    def prog_bundle(self) -> Path:
        return self.prog_bundle_dir or self.bundles / "progswin_prognosis"

    @property
    def shared(self) -> bool:
        """True when both bundles run their shared weights (inference only, no training)."""
        return self.settings.get("weights") == "shared"

    @property
    def dl_predictions(self) -> Path:
        """The labelled patients' ProgSwin-UNETR predictions: out of fold when trained here,
        the shared model's when evaluated (it never saw these patients either way)."""
        return self.path("prognosis", "predictions.csv" if self.shared else "oof_predictions.csv")

    @property
    def clinical(self) -> Path:
        return self.cohort / "clinical.csv"


# ------------------------------------------------------------------------------ bundle driver
def bundle_code(bundle: Path, with_models: bool = False) -> list[Path]:
    """What defines a bundle's behaviour (hashed as stage input): configs and scripts, and its
    models/ when the study runs the weights it ships."""
    return [bundle / "configs", bundle / "scripts"] + ([bundle / "models"] if with_models else [])


#: log lines of a bundle run that mark progress: a finished training epoch (ignite's trainer), a
#: segmented scan (hcc_liver_seg's "[k/N] <scan>" lines)
_EPOCH_DONE = re.compile(r"SupervisedTrainer - INFO - Epoch\[(\d+)\] Complete")
_SCAN_DONE = re.compile(r" - INFO - \[(\d+)/(\d+)\] ")


class BundleProgress:
    """A progress bar of one bundle run, fed its log lines: per training epoch (``epochs`` x
    ``runs`` in all, e.g. 4 folds of 2 epochs), or per scan for inference, whose total the log
    itself gives. ``bar`` is the stage's bar (None: no progress shown)."""

    def __init__(self, bar, label: str, epochs: int | None = None, runs: int = 1) -> None:
        self.bar = None
        if bar is not None and not getattr(bar, "disable", False):
            from tqdm.auto import tqdm

            total = int(epochs) * int(runs) if epochs else None
            self.bar = tqdm(total=total, desc=f"    {label}", unit="epoch" if epochs else "scan", position=2,
                            leave=False)
        self.count = 0

    def feed(self, line: str) -> None:
        if self.bar is None:
            return
        if _EPOCH_DONE.search(line):
            self.count += 1
            self.bar.update(1)
        elif (m := _SCAN_DONE.search(line)) is not None:
            done, total = int(m.group(1)), int(m.group(2))
            if self.bar.total != total:
                self.bar.reset(total=total)
                self.bar.update(done)
            else:
                self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_bundle(bundle: Path, configs: list[str], overrides: dict, log_file: Path, bar=None) -> None:
    """``python -m monai.bundle run`` on a bundle with ``--id value`` overrides; output to
    ``log_file``, and, when ``bar`` is given, a progress bar per training epoch or segmented scan
    read from that output as it comes (:class:`BundleProgress`)."""
    refuse_config_syntax(overrides)
    config_files = [str(bundle / "configs" / c) for c in configs]
    cmd = [sys.executable, "-m", "monai.bundle", "run",
           "--config_file", json.dumps(config_files) if len(config_files) > 1 else config_files[0],
           "--bundle_root", str(bundle), "--meta_file", str(bundle / "configs" / "metadata.json"),
           "--logging_file", str(bundle / "configs" / "logging.conf")]
    for k, v in overrides.items():
        cmd += [f"--{k}", v if isinstance(v, str) else json.dumps(v)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(bundle), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONUNBUFFERED"] = "1"  # log lines as they happen, for the progress bar
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log.info("running %s", " ".join(cmd))
    training = "cross_validate.json" in configs or ("train.json" in configs and "evaluate.json" not in configs)
    epochs = overrides.get("max_epochs", overrides.get("fold_overrides", {}).get("max_epochs"))
    progress = BundleProgress(bar, f"{bundle.name} {' '.join(configs)}", epochs=epochs if training else None,
                              runs=int(overrides.get("folds", 1)))
    try:
        with open(log_file, "a") as fh:
            fh.write("$ " + " ".join(cmd) + "\n")
            fh.flush()
            with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=str(bundle.parent),
                                  text=True, errors="replace") as proc:
                for line in proc.stdout:
                    fh.write(line)
                    progress.feed(line)
            returncode = proc.returncode
    finally:
        progress.close()
    if returncode != 0:
        with open(log_file) as fh:
            lines = fh.readlines()
        cause = root_cause(lines)
        raise StageFailure(f"{bundle.name} {' '.join(configs)} exited with status {returncode}"
                           + (f": {cause}" if cause else "") + f"\n(log {log_file}; last lines:\n"
                           + "".join(lines[-25:]) + ")")
    if bar is not None:
        bar.update(1)


_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?([A-Za-z_]\w*(?:Error|Exception|Failure|Exit)): (.+)$")
#: MONAI's wrappers around the error a config's code raised: never the cause itself
_WRAPPERS = ("Failed to instantiate component", "Failed to evaluate ConfigExpression", "Failed to import")


def root_cause(log_lines) -> str | None:
    """The error that stopped a bundle run, from its log: the first exception line of the last
    traceback that is not one of MONAI's wrappers (Python prints a chain's root cause first)."""
    text = [line.rstrip("\n") for line in log_lines]
    starts = [i for i, line in enumerate(text) if line.startswith("Traceback (most recent call last)")]
    for line in text[starts[0] if starts else 0:]:
        m = _EXCEPTION_LINE.match(line)
        if m and not m.group(2).startswith(_WRAPPERS):
            return f"{m.group(1)}: {m.group(2)}"
    return None


# ---------------------------------------------------------------------------------- stages
def _validate(ctx: StudyContext, staging: Path, bar) -> dict:
    problems = validate_cohort(ctx.cohort, progress=False)
    if problems:
        raise StageFailure(f"cohort {ctx.cohort} is not valid ({len(problems)} problem(s)):\n"
                           + "\n".join(f"  {p}" for p in problems))
    from analysis.cohort import summarise_cohort

    summary = summarise_cohort(ctx.cohort)
    io.write_json(staging / "summary.json", summary)
    bar.update(1)
    return {"patients": summary["patients"], "scans": summary["scans"]}


def _datalists(ctx: StudyContext, staging: Path, bar) -> dict:
    from analysis.datalists import write_datalists

    write_datalists(ctx.cohort, out=staging, folds=ctx.settings["folds"], seed=ctx.settings["seed"],
                    masks=ctx.path("masks"), dataset_dir=ctx.cohort)
    prog = json.loads((staging / "prognosis.json").read_text())
    bar.update(1)
    return {"labelled_patients": len(prog["training"]), "excluded": len(prog["excluded"])}


def _has_labels(ctx: StudyContext) -> bool:
    seg = json.loads(ctx.path("datalists", "segmentation.json").read_text())
    return bool(seg["training"])


def _verified(bundle: Path, weights: Path) -> str:
    """sha256 of ``weights`` after the bundle's own check (scripts/integrity.py: its manifest or
    large_files.yml, weights-only readability); a refusal stops the stage naming the file."""
    from analysis.bundle_archive import bundle_integrity

    integrity = bundle_integrity(bundle)
    try:
        integrity.verified_weights(str(weights))
    except (integrity.IntegrityError, FileNotFoundError) as exc:
        raise StageFailure(str(exc)) from exc
    return io.file_sha256(weights)


def _shared_bundle_check(bundle: Path) -> dict:
    """A fetched bundle (with manifest.json) must match its manifest before it runs."""
    from analysis.bundle_archive import verify_bundle

    if not (bundle / "manifest.json").is_file():
        return {"manifest": False}
    problems = verify_bundle(bundle)
    if problems:
        raise StageFailure(f"{bundle}: differs from its manifest.json ({len(problems)} problem(s)): "
                           + "; ".join(problems[:5]))
    return {"manifest": True}


def _segmentation(ctx: StudyContext, staging: Path, bar) -> dict:
    s = ctx.settings
    models = staging / "models"
    if ctx.shared:
        checked = _shared_bundle_check(ctx.seg_bundle)
        io.write_json(staging / "source.json", {"weights": "shared", "bundle": str(ctx.seg_bundle),
                                                "overlay": s["weights_overlay"], "trained": False, **checked})
        bar.update(1)
        return {"trained": False, "weights": f"shared ({s['weights_overlay']})"}
    if ctx.seg_weights:
        digest = _verified(ctx.seg_bundle, ctx.seg_weights)
        models.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ctx.seg_weights, models / "model.pt")
        io.write_json(staging / "source.json", {"weights": str(ctx.seg_weights), "sha256": digest, "trained": False})
        return {"trained": False}
    if not _has_labels(ctx):
        raise StageFailure("no manual labels (labels/<patient_id>/t*.nii.gz) to train the segmentation "
                           "model and no --seg-weights given: pass pretrained weights with --seg-weights FILE")
    overrides = {
        "dataset_dir": str(ctx.cohort), "datalist": str(ctx.path("datalists", "segmentation.json")),
        "ckpt_dir": str(models), "output_dir": str(staging / "eval"),
        **bundle_overrides(s, "hcc_liver_seg", BUNDLE_IDS["hcc_liver_seg"]), **_tracking(s),
    }
    bar.reset(total=2)
    run_bundle(ctx.seg_bundle, ["train.json"], overrides, staging / "train.log", bar)
    run_bundle(ctx.seg_bundle, ["train.json", "evaluate.json"], overrides, staging / "evaluate.log", bar)
    from analysis.report import segmentation_dice

    return {k: round(v, 4) for k, v in segmentation_dice(staging / "eval").items()}


_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?|auto)$")
#: an overlay is a config file of the bundle's own configs/ folder, named, never a path
_OVERLAY = re.compile(r"^[A-Za-z0-9_-]+\.json$")
#: how MONAI's config parser reads a string value: ``$`` runs it as Python, ``@`` and ``%`` refer
#: to other ids; the study sends values only, so no text it passes may start with one
_CONFIG_SYNTAX = ("$", "@", "%")


def bundle_overrides(settings: dict, bundle: str, keys) -> dict:
    """The bundle's ids for the study settings ``keys``, through :data:`BUNDLE_IDS` (device
    ``auto`` sets nothing: each bundle's own default picks CUDA when there is one)."""
    ids = BUNDLE_IDS[bundle]
    out = {}
    for key in keys:
        value = settings[key]
        if key == "device":
            value = _device(settings)
            if value is None:
                continue
        out[ids[key]] = [value] * 3 if key in _CUBES else value
    return out


def _typed(key: str, value, default):
    """``value`` of study setting ``key`` as the type of the profile's ``default`` (command-line
    text arrives as str), or a ValueError naming the flag, what was found and what is expected."""
    from analysis.flags import as_bool

    flag = f"--{key.replace('_', '-')}"
    if isinstance(default, bool):
        return as_bool(value, flag)
    if isinstance(default, int):
        if isinstance(value, bool) or not re.fullmatch(r"\d+", str(value).strip()):
            raise ValueError(f"{flag} {value!r}: expected a whole number >= 0")
        return int(str(value).strip())
    if isinstance(default, float):
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = float("nan")
        if not (number >= 0 and number != float("inf")):
            raise ValueError(f"{flag} {value!r}: expected a finite number >= 0")
        return number
    if isinstance(default, list):
        try:
            numbers = [float(v) for v in value]
        except (TypeError, ValueError):
            numbers = []
        if isinstance(value, str) or len(numbers) != len(default) or not all(0 < v < float("inf") for v in numbers):
            raise ValueError(f"{flag} {value!r}: expected {len(default)} positive numbers, e.g. {default}")
        return numbers
    return value


def check_settings(settings: dict, profile: str) -> dict:
    """Every setting typed as its profile default, and the text ones within their patterns:
    settings reach the bundles' configs, where a string may be code, so nothing else passes."""
    defaults = PROFILES[profile]
    typed = {k: _typed(k, v, defaults[k]) for k, v in settings.items()}
    if typed["weights"] not in WEIGHTS_MODES:
        raise ValueError(f"--weights {typed['weights']!r}: expected 'shared' (the bundles' shipped or fetched "
                         f"weights, inference only) or 'train' (train both networks on this cohort)")
    overlay = typed.get("weights_overlay")
    if overlay is not None and not _OVERLAY.match(str(overlay)):
        raise ValueError(f"--weights-overlay {overlay!r}: expected the name of a config file in each bundle's "
                         f"configs/ folder, e.g. synthetic_weights.json (letters, digits, _ and -; no path)")
    _device(typed)
    _tracking(typed)
    return typed


def refuse_config_syntax(overrides, where: str = "") -> None:
    """Stop before a bundle runs when any string the study passes (at any depth) would be read
    by MONAI's config parser as code or a reference rather than as a value."""
    if isinstance(overrides, dict):
        for key, value in overrides.items():
            refuse_config_syntax(value, f"{where}#{key}" if where else str(key))
    elif isinstance(overrides, (list, tuple)):
        for k, value in enumerate(overrides):
            refuse_config_syntax(value, f"{where}#{k}")
    elif isinstance(overrides, str) and overrides.lstrip().startswith(_CONFIG_SYNTAX):
        raise ValueError(f"bundle id {where}: the value {overrides!r} starts with "
                         f"'{overrides.lstrip()[0]}', which a MONAI config runs as code or reads as a "
                         f"reference; the study passes plain values only")


def _tracking(settings: dict) -> dict:
    """``{"tracking": "mlflow"}`` for the training runs' overrides, or nothing."""
    mode = str(settings["tracking"]).strip().lower()
    if mode not in TRACKING_MODES:
        raise ValueError(f"--tracking {settings['tracking']!r}: expected one of {', '.join(TRACKING_MODES)}")
    return {} if mode == "none" else {"tracking": mode}


def _device(settings: dict) -> str | None:
    """The device name the bundles get as a plain value (they take ``cpu``, ``cuda``, ``cuda:N``
    as torch does), None for ``auto``; anything else is refused before any stage runs."""
    if not _DEVICE.match(str(settings["device"])):
        raise ValueError(f"--device {settings['device']!r}: expected cpu, cuda, cuda:N or auto")
    return None if settings["device"] == "auto" else str(settings["device"])


def _segmentation_inference(ctx: StudyContext, staging: Path, bar) -> dict:
    s = ctx.settings
    if ctx.shared:
        overrides = {
            "dataset_dir": str(ctx.cohort), "datalist": str(ctx.path("datalists", "segmentation.json")),
            "output_dir": str(staging), "data_root_dir": str(ctx.cohort / "images"),
            **bundle_overrides(s, "hcc_liver_seg", ("device", "num_workers")),
        }
        bar.reset(total=1)
        run_bundle(ctx.seg_bundle, ["inference.json", s["weights_overlay"]], overrides, staging / "inference.log", bar)
        headline = {"masks_written": len(list(staging.rglob("*.nii.gz")))}
        return {**headline, **_agreement(ctx, staging)}
    overrides = {
        "dataset_dir": str(ctx.cohort), "datalist": str(ctx.path("datalists", "segmentation.json")),
        "ckpt_dir": str(ctx.path("segmentation", "models")), "output_dir": str(staging),
        "data_root_dir": str(ctx.cohort / "images"),
        **bundle_overrides(s, "hcc_liver_seg", ("feature_size", "seg_roi", "device", "num_workers", "sw_batch_size",
                                                "seg_spacing_mm")),
    }
    bar.reset(total=1)
    run_bundle(ctx.seg_bundle, ["inference.json"], overrides, staging / "inference.log", bar)
    n = len(list(staging.rglob("*.nii.gz")))
    return {"masks_written": n}


def _agreement(ctx: StudyContext, staging: Path) -> dict:
    """Dice (Eq. 2) and HD95 of the automatic masks against the cohort's manual labels, when it has
    any: the segmentation's own evaluation when the network was not trained here."""
    from analysis.segmentation_agreement import dice_table, summarise

    labels = ctx.cohort / "labels"
    if not labels.is_dir() or not any(labels.rglob("*.nii*")):
        return {}
    per_scan = dice_table(staging, labels)
    summary = summarise(per_scan)
    io.write_csv(staging / "agreement" / "per_scan.csv", per_scan)
    io.write_csv(staging / "agreement" / "summary.csv", summary)
    row = summary.iloc[0]
    return {"dice_eq2": round(float(row["dice_eq2_mean"]), 4),
            "hd95_whole_liver_mm": round(float(row["hd95_whole_liver_mm_median"]), 2)}


def _masks(ctx: StudyContext, staging: Path, bar) -> dict:
    """Masks used downstream: manual label where present (unless --masks-source segmentation).

    Each mask's path is built from a patient id checked by the one rule and checked to lie
    inside ``staging`` (analysis.io.path_under) before anything is copied."""
    from analysis.cohort import check_patient_id

    clinical = read_clinical(ctx.clinical)
    rows = []
    bar.reset(total=len(clinical) * len(TIMEPOINTS))
    for i, pid in enumerate(clinical["patient_id"]):
        check_patient_id(pid, f"{ctx.clinical} row {i + 2}")
        for tp in TIMEPOINTS:
            manual = find_scan(ctx.cohort / "labels", pid, tp)
            auto = find_scan(ctx.path("segmentation_inference"), pid, tp)
            if ctx.masks_source != "segmentation" and manual is not None:
                src, kind = manual, "manual"
            elif auto is not None:
                src, kind = auto, "segmentation"
            else:
                raise StageFailure(f"patient {pid} time point {tp}: no manual label and no segmentation output "
                                   f"(looked in {ctx.cohort / 'labels'} and {ctx.path('segmentation_inference')})")
            dst = io.path_under(staging, pid, f"{tp}.nii.gz")
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            rows.append({"patient_id": pid, "timepoint": tp, "source": kind})
            bar.update(1)
    frame = pd.DataFrame(rows)
    io.write_csv(staging / "sources.csv", frame)
    return {k: int(v) for k, v in frame["source"].value_counts().items()}


def _prognosis(ctx: StudyContext, staging: Path, bar) -> dict:
    if ctx.shared:
        return _prognosis_shared(ctx, staging, bar)
    s = ctx.settings
    overrides = bundle_overrides(s, "progswin_prognosis", BUNDLE_IDS["progswin_prognosis"])
    tracking = _tracking(s)
    cv_overrides = {"dataset_dir": str(ctx.cohort), "datalist": str(ctx.path("datalists", "prognosis.json")),
                    "output_dir": str(staging), "ckpt_dir": str(staging / "models"), "folds": s["folds"],
                    "fold_overrides": overrides,
                    **({"fold_tracking": tracking["tracking"]} if tracking else {})}
    bar.reset(total=1)
    run_bundle(ctx.prog_bundle, ["cross_validate.json"], cv_overrides, staging / "cross_validate.log", bar)
    metrics_path = staging / "evaluation" / "metrics.json"
    if not metrics_path.exists():
        raise StageFailure(f"cross-validation finished without {metrics_path}")
    metrics = json.loads(metrics_path.read_text())
    _predict_unlabelled(ctx, staging, overrides)
    return {"macro_auc": metrics.get("macro_auc"), "accuracy": metrics.get("accuracy")}


def _prognosis_shared(ctx: StudyContext, staging: Path, bar) -> dict:
    """The shared ProgSwin-UNETR on every patient, no training: predictions.csv (labelled),
    all_predictions.csv (every patient), evaluation/ with metrics, CIs and calibration."""
    from analysis.calibration import brier_scores, calibration_plot, calibration_table
    from analysis.metrics import evaluate

    s = ctx.settings
    checked = _shared_bundle_check(ctx.prog_bundle)
    bar.reset(total=1)
    run_bundle(ctx.prog_bundle, ["inference.json", s["weights_overlay"]],
               {"dataset_dir": str(ctx.cohort), "datalist": str(ctx.path("datalists", "prognosis.json")),
                "output_dir": str(staging / "inference"), "infer_sections": ["training", "unlabelled"],
                **bundle_overrides(s, "progswin_prognosis", ("device", "num_workers"))}, staging / "inference.log", bar)
    frame = pd.read_csv(staging / "inference" / "predictions.csv", dtype={"patient_id": str})
    labelled = frame[frame["label"].notna() & (frame["label"] >= 0)].copy()
    labelled["label"] = labelled["label"].astype(int)
    io.write_csv(staging / "predictions.csv", labelled)
    io.write_csv(staging / "all_predictions.csv",
                 frame.assign(source=["shared model" if pd.notna(v) and v >= 0 else "shared model (no class: censored "
                                      "before 36 months)" for v in frame["label"]]))
    probs = labelled[[f"prob_{k}" for k in range(4)]].to_numpy(float)
    y = labelled["label"].to_numpy(int)
    metrics = evaluate(y, probs, n_boot=s["bootstrap"], seed=s["seed"])
    metrics.update({"brier": brier_scores(y, probs), "n_patients": int(len(labelled)), "trained_here": False,
                    "weights": f"shared: {ctx.prog_bundle}/configs/{s['weights_overlay']}", **checked})
    io.write_json(staging / "evaluation" / "metrics.json", metrics)
    table = calibration_table(y, probs)
    ax = calibration_plot(table)
    io.save_figure(staging / "evaluation" / "calibration.png", ax.figure, data=table)
    return {"macro_auc": metrics.get("macro_auc"), "accuracy": metrics.get("accuracy"), "trained": False}


def _predict_unlabelled(ctx: StudyContext, staging: Path, overrides: dict) -> None:
    """all_predictions.csv: out-of-fold rows plus the fold ensemble's for patients with no class.

    Patients censored before 36 months have no label, so no out-of-fold prediction; Kaplan-Meier
    and Cox over the whole cohort still need their predicted group (the paper predicts every
    patient). The ensemble of the fold models never saw them, so this is no leak.
    """
    oof = pd.read_csv(staging / "oof_predictions.csv", dtype={"patient_id": str})
    datalist = json.loads(ctx.path("datalists", "prognosis.json").read_text())
    frames = [oof.assign(source="out-of-fold")]
    if datalist.get("unlabelled"):
        run_bundle(ctx.prog_bundle, ["inference.json", "inference_ensemble.json"],
                   {"dataset_dir": str(ctx.cohort), "datalist": str(ctx.path("datalists", "prognosis.json")),
                    "ckpt_dir": str(staging / "models"), "output_dir": str(staging / "unlabelled"),
                    "infer_sections": ["unlabelled"], "ensemble_folds": list(range(ctx.settings["folds"])),
                    "feature_size": overrides["feature_size"], "spatial_size": overrides["spatial_size"],
                    "device": overrides["device"], "num_workers": overrides["num_workers"]},
                   staging / "unlabelled.log")
        extra = pd.read_csv(staging / "unlabelled" / "predictions.csv", dtype={"patient_id": str})
        frames.append(extra.assign(source="fold ensemble (no class: censored before 36 months)"))
    io.write_csv(staging / "all_predictions.csv", pd.concat(frames, ignore_index=True))


def _gradcam(ctx: StudyContext, staging: Path, bar) -> dict:
    s = ctx.settings
    if ctx.shared:
        bar.reset(total=1)
        run_bundle(ctx.prog_bundle, ["inference.json", "gradcam.json", s["weights_overlay"]],
                   {"dataset_dir": str(ctx.cohort), "datalist": str(ctx.path("datalists", "prognosis.json")),
                    "output_dir": str(staging), "predictions": str(ctx.dl_predictions),
                    **bundle_overrides(s, "progswin_prognosis", ("device",))},
                   staging / "gradcam.log", bar)
        return {"montages": len(list(staging.rglob("*.png")))}
    overrides = {
        "dataset_dir": str(ctx.cohort), "datalist": str(ctx.path("datalists", "prognosis.json")),
        "ckpt_dir": str(ctx.path("prognosis", "models")), "output_dir": str(staging),
        "predictions": str(ctx.dl_predictions),
        **bundle_overrides(s, "progswin_prognosis", ("feature_size", "net_size", "device")),
    }
    bar.reset(total=1)
    run_bundle(ctx.prog_bundle, ["inference.json", "gradcam.json"], overrides, staging / "gradcam.log", bar)
    return {"montages": len(list(staging.rglob("*.png")))}


def _radiomics(ctx: StudyContext, staging: Path, bar) -> dict:
    from analysis.radiomics import extract_features

    features = extract_features(ctx.cohort, ctx.path("masks"), timepoint="t1", roi="tumour",
                                jobs=ctx.settings["radiomics_jobs"], out=staging / "features.csv",
                                cache_dir=ctx.path(".cache", "radiomics"))
    bar.update(1)
    return {"patients": int(len(features))}


def _classify(ctx: StudyContext, staging: Path, bar) -> dict:
    from analysis.models import classify

    oof = ctx.dl_predictions
    classify(ctx.path("radiomics", "features.csv"), ctx.clinical, out=staging,
             dl_predictions=oof if oof.exists() else None, seed=ctx.settings["seed"],
             n_boot=ctx.settings["bootstrap"])
    bar.update(1)
    summary = json.loads((staging / "summary.json").read_text())
    best = max(summary["models"].items(), key=lambda kv: kv[1].get("macro_auc") or 0)
    return {"best_model": best[0], "best_macro_auc": best[1].get("macro_auc")}


def _mrecist(ctx: StudyContext, staging: Path, bar) -> dict:
    from analysis.mrecist import mrecist_from_masks, plot_waterfall, waterfall_data

    frame = mrecist_from_masks(ctx.cohort, ctx.path("masks"))
    io.write_csv(staging / "mrecist.csv", frame)
    io.save_figure(staging / "figures" / "waterfall.png", plot_waterfall(frame).figure, data=waterfall_data(frame))
    bar.update(1)
    return {k: int(v) for k, v in frame["best_response"].fillna("NA").value_counts().items()}


def _risk_groups(ctx: StudyContext) -> pd.DataFrame:
    """One row per patient: the three methods' groups for Kaplan-Meier and the Cox table."""
    clinical = read_clinical(ctx.clinical)
    frame = clinical[["patient_id"]].copy()
    mrecist = pd.read_csv(ctx.path("mrecist", "mrecist.csv"), dtype={"patient_id": str})
    auto = frame["patient_id"].map(mrecist.set_index("patient_id")["best_response"])
    # the cohort's own mRECIST (its radiologists' reading) where given, else the automatic one;
    # "NA" (not assessed) counts as not given
    given = clinical["mrecist"] if "mrecist" in clinical else pd.Series(None, index=clinical.index, dtype=object)
    frame["mrecist"] = given.replace({"NA": None}).fillna(auto).replace({"NA": None})
    rad = ctx.path("classify", "radiomic_score.csv")
    if rad.exists():
        r = pd.read_csv(rad)
        keep = [c for c in ("patient_id", "radiomic_score", "pred_class") if c in r]
        frame = frame.merge(r[keep].rename(columns={"pred_class": "radiomics_class"}), on="patient_id", how="left")
    dl = ctx.path("prognosis", "all_predictions.csv")
    if not dl.exists():
        dl = ctx.dl_predictions
    if dl.exists():
        d = pd.read_csv(dl)[["patient_id", "pred_class"]].rename(columns={"pred_class": "dl_class"})
        frame = frame.merge(d, on="patient_id", how="left")
    return frame


def _km(ctx: StudyContext, staging: Path, bar) -> dict:
    from analysis.km import km_grid

    groups = _risk_groups(ctx)
    table = _cox_table(ctx, groups)
    io.write_csv(staging / "tables" / "risk_groups.csv", groups)
    methods = [(name, col) for name, col in (("mRECIST", "mrecist"), ("radiomics model", "radiomics_class"),
                                               ("ProgSwin-UNETR", "dl_class")) if col in table]
    km_grid(table, methods=methods, by="treatment", out=staging)
    bar.update(1)
    logrank = pd.read_csv(staging / "tables" / "logrank.csv")
    # three significant digits, not decimals: a p of 1e-7 must not read as 0
    return {f"p {r.method} / {r.subgroup}": (None if pd.isna(r.p_value) else float(f"{float(r.p_value):.3g}"))
            for r in logrank.itertuples()}


def _cox_table(ctx: StudyContext, groups: pd.DataFrame | None = None) -> pd.DataFrame:
    """Clinical table joined with the three methods' groups (the resolved mRECIST replaces the column)."""
    clinical = read_clinical(ctx.clinical).drop(columns=["mrecist"], errors="ignore")
    return clinical.merge(_risk_groups(ctx) if groups is None else groups, on="patient_id", how="left")


def _cox(ctx: StudyContext, staging: Path, bar) -> dict:
    from analysis.cox import FALLBACK_PENALIZER, fit_cox_with_fallback, paper_covariates, write_cox_outputs

    table = _cox_table(ctx)
    io.write_csv(staging / "tables" / "cox_input.csv", table)
    covariates, categorical = paper_covariates(table)
    # a refit with a ridge penalty is logged and recorded in summary.json (penalizer, penalizer_note)
    result = fit_cox_with_fallback(table, duration="os_months", event="death", covariates=covariates,
                                   categorical=categorical, penalizer=ctx.settings["cox_penalizer"],
                                   fallback_penalizer=FALLBACK_PENALIZER)
    write_cox_outputs(result, staging)
    bar.update(1)
    summary = json.loads((staging / "summary.json").read_text())
    return {"concordance": summary.get("concordance"), "cv_concordance": summary.get("cv_concordance")}


def _nomogram(ctx: StudyContext, staging: Path, bar) -> dict:
    from analysis.cox import FALLBACK_PENALIZER, paper_covariates
    from analysis.nomogram import NoSignificantVariableError, nomogram

    table = _cox_table(ctx)
    covariates, categorical = paper_covariates(table)
    model = dict(duration="os_months", event="death", covariates=covariates, categorical=categorical,
                 penalizer=ctx.settings["cox_penalizer"], fallback_penalizer=FALLBACK_PENALIZER, out=staging)
    try:
        nomogram(table, **model)
    except NoSignificantVariableError as exc:
        # Appendix 11 draws the nomogram on all six variables; use them when none is significant
        log.warning("nomogram: %s; using the paper's Appendix 11 variables %s", exc, covariates)
        nomogram(table, variables=covariates, **model)
    bar.update(1)
    summary = json.loads((staging / "summary.json").read_text())
    return {"n_high_risk": summary.get("n_high_risk")}


def _table1(ctx: StudyContext, staging: Path, bar) -> dict:
    from analysis.table1 import table1, write_table1

    clinical = read_clinical(ctx.clinical)
    # the cohort's own mRECIST column when it has one (a site's radiologists), else the automatic one
    given = "mrecist" in clinical and clinical["mrecist"].notna().any()
    mrecist = None if given else pd.read_csv(ctx.path("mrecist", "mrecist.csv"))
    frame = table1(clinical, group="treatment", mrecist=mrecist)
    write_table1(frame, staging / "table1.csv")
    bar.update(1)
    return {"rows": int(len(frame))}


def _report(ctx: StudyContext, staging: Path, bar) -> dict:
    from analysis.report import build_report

    build_report(ctx.out, staging / "report.html")
    bar.update(1)
    return {}


def build_stages(ctx: StudyContext) -> list[Stage]:
    stages = [
        Stage("validate", "validation", _validate, inputs=lambda c: [c.cohort],
              description="schema + image checks"),
        Stage("datalists", "datalists", _datalists, inputs=lambda c: [c.clinical, c.path("validation")],
              settings=lambda c: dict(folds=c.settings["folds"], seed=c.settings["seed"])),
        Stage("segmentation", "segmentation", _segmentation,
              inputs=lambda c: [c.path("datalists", "segmentation.json"), c.cohort / "labels",
                                *bundle_code(c.seg_bundle, c.shared), *([c.seg_weights] if c.seg_weights else [])],
              settings=lambda c: {k: c.settings[k] for k in ("seg_epochs", "feature_size", "seg_roi", "seed",
                                                             "seg_num_samples", "grad_checkpointing",
                                                             "seg_spacing_mm", "weights", "weights_overlay")}),
        Stage("segmentation_inference", "segmentation_inference", _segmentation_inference,
              inputs=lambda c: [c.path("segmentation", "models"), c.path("datalists", "segmentation.json"),
                                c.cohort / "images", c.cohort / "labels", *bundle_code(c.seg_bundle, c.shared)],
              settings=lambda c: dict(feature_size=c.settings["feature_size"], roi=c.settings["seg_roi"],
                                   spacing=c.settings["seg_spacing_mm"], weights=c.settings["weights"],
                                   overlay=c.settings["weights_overlay"])),
        Stage("masks", "masks", _masks,
              inputs=lambda c: [c.path("segmentation_inference"), c.cohort / "labels", c.clinical],
              settings=lambda c: dict(masks_source=c.masks_source)),
        Stage("prognosis", "prognosis", _prognosis,
              inputs=lambda c: [c.path("datalists", "prognosis.json"), c.path("masks"), c.cohort / "images",
                                *bundle_code(c.prog_bundle, c.shared)],
              settings=lambda c: {k: c.settings[k] for k in ("feature_size", "net_size", "prog_epochs", "folds",
                                                             "seed", "weights", "weights_overlay", "bootstrap")}),
        Stage("gradcam", "gradcam", _gradcam,
              inputs=lambda c: [c.path("prognosis"), c.path("masks"), *bundle_code(c.prog_bundle, c.shared)]),
        Stage("radiomics", "radiomics", _radiomics, inputs=lambda c: [c.cohort / "images", c.path("masks")],
              settings=lambda c: dict(timepoint="t1", roi="tumour")),
        Stage("classify", "classify", _classify,
              inputs=lambda c: [c.path("radiomics"), c.clinical, c.dl_predictions],
              settings=lambda c: dict(seed=c.settings["seed"], bootstrap=c.settings["bootstrap"])),
        Stage("mrecist", "mrecist", _mrecist, inputs=lambda c: [c.cohort / "images", c.path("masks")]),
        Stage("km", "km", _km,
              inputs=lambda c: [c.clinical, c.path("mrecist"), c.path("classify", "radiomic_score.csv"),
                                c.dl_predictions, c.path("prognosis", "all_predictions.csv")]),
        Stage("cox", "cox", _cox,
              inputs=lambda c: [c.clinical, c.path("mrecist"), c.path("classify", "radiomic_score.csv"),
                                c.dl_predictions, c.path("prognosis", "all_predictions.csv")],
              settings=lambda c: dict(penalizer=c.settings["cox_penalizer"])),
        Stage("nomogram", "nomogram", _nomogram,
              inputs=lambda c: [c.clinical, c.path("mrecist"), c.path("classify", "radiomic_score.csv"),
                                c.dl_predictions, c.path("prognosis", "all_predictions.csv")],
              settings=lambda c: dict(penalizer=c.settings["cox_penalizer"])),
        Stage("table1", "table1", _table1, inputs=lambda c: [c.clinical, c.path("mrecist")]),
        Stage("report", "report.html", _report, is_file=True,
              inputs=lambda c: [c.path(d) for d in ("validation", "segmentation", "prognosis", "gradcam", "classify",
                                                    "mrecist", "km", "cox", "nomogram", "table1")]),
    ]
    assert tuple(s.name for s in stages) == STAGE_NAMES
    return stages


# ------------------------------------------------------------------------------------- entry
def run_study(cohort: str | os.PathLike | None = None, out: str | os.PathLike = "study_output",
              profile: str = "demo", seg_weights: str | os.PathLike | None = None,
              force: list[str] | None = None, masks_source: str | None = None, bundles: str | None = None,
              progress: bool = True, seg_bundle: str | os.PathLike | None = None,
              prognosis_bundle: str | os.PathLike | None = None, kind: str = "study",
              **overrides) -> tuple[list[StageResult], dict]:
    """Run (or resume) the study; returns the stage results and the run's summary dict.

    ``masks_source`` defaults to ``segmentation`` with shared weights (the paper's pipeline:
    the automatic masks feed everything downstream) and to ``auto`` otherwise. ``seg_bundle`` /
    ``prognosis_bundle`` name the two bundle folders one by one (fetched bundles); ``kind``
    labels the report (``"external validation"``). Writes ``OUT/summary.json``.
    """
    if profile not in PROFILES:
        raise ValueError(f"--profile {profile!r} is unknown; choose one of {', '.join(PROFILES)}")
    settings = dict(PROFILES[profile])
    unknown = set(overrides) - set(settings)
    if unknown:
        raise ValueError(f"unknown setting(s) {sorted(unknown)}; known: {', '.join(sorted(settings))}")
    settings.update({k: v for k, v in overrides.items() if v is not None})
    settings = check_settings(settings, profile)
    if settings["weights"] == "shared" and not settings.get("weights_overlay"):
        raise ValueError("--weights shared needs --weights-overlay (the bundles' overlay selecting the weights and "
                         "their sizes, e.g. synthetic_weights.json)")
    if masks_source is None:
        masks_source = "segmentation" if settings["weights"] == "shared" else "auto"
    if masks_source not in ("auto", "segmentation"):
        raise ValueError(f"--masks-source {masks_source!r}: expected 'auto' (manual labels where present) "
                         "or 'segmentation' (automatic masks everywhere)")
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if cohort is None:
        cohort_path = out / "cohort"
        marker = cohort_path / "cohort.json"
        wanted = {"patients": settings["patients"], "shape": settings["shape"], "seed": settings["seed"]}
        current = json.loads(marker.read_text()) if marker.exists() else {}
        if not marker.exists() or any(current.get(k if k != "patients" else "n_patients") != v
                                      for k, v in wanted.items()):
            from analysis.synthetic import make_cohort

            log.info("no --cohort given: synthesising the embedded default (%s)", wanted)
            tmp = out / ".partial" / "cohort"
            shutil.rmtree(tmp, ignore_errors=True)
            make_cohort(tmp, n_patients=settings["patients"], shape=settings["shape"], seed=settings["seed"],
                        progress=progress)
            shutil.rmtree(cohort_path, ignore_errors=True)
            os.replace(tmp, cohort_path)
    else:
        cohort_path = Path(cohort).resolve()
    given = {"seg_bundle_dir": seg_bundle, "prog_bundle_dir": prognosis_bundle}
    for name, folder in given.items():
        if folder is not None and not (Path(folder) / "configs").is_dir():
            raise FileNotFoundError(f"--{name.replace('_dir', '').replace('prog_', 'prognosis_').replace('_', '-')} "
                                    f"{folder}: not a bundle folder (no configs/)")
    ctx = StudyContext(out=out, cohort=cohort_path, settings=settings,
                       bundles=None if seg_bundle and prognosis_bundle else find_bundles(bundles),
                       seg_weights=Path(seg_weights).resolve() if seg_weights else None, masks_source=masks_source,
                       synthetic=is_synthetic(cohort_path),
                       **{k: Path(v).resolve() for k, v in given.items() if v is not None})
    if ctx.seg_weights and not ctx.seg_weights.exists():
        raise FileNotFoundError(f"--seg-weights {ctx.seg_weights}: no such file")
    if ctx.seg_weights and ctx.shared:
        raise ValueError("--seg-weights trains nothing but replaces the trained segmentation; with --weights shared "
                         "the bundle's own shared weights run: give one or the other")
    pipeline = Pipeline(out, build_stages(ctx), ctx, force=set(force or ()), progress=progress)
    results = pipeline.run(set_meta={"profile": profile, "settings": settings, "synthetic": ctx.synthetic,
                                     "cohort": str(cohort_path), "kind": kind,
                                     "seg_bundle": str(ctx.seg_bundle), "prognosis_bundle": str(ctx.prog_bundle)})
    peak_mb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
    summary = {"seconds": round(time.perf_counter() - started, 1), "peak_memory_mb": round(peak_mb),
               "synthetic": ctx.synthetic, "profile": profile, "kind": kind, "weights": settings["weights"],
               **headline_numbers(results)}
    io.write_json(out / "summary.json", summary)
    return results, summary


def headline_numbers(results: list[StageResult]) -> dict:
    """The numbers of the report's paper-vs-run table, as floats (None where not produced)."""
    by_name = {r.name: r.headline for r in results}

    def num(stage: str, key: str):
        value = by_name.get(stage, {}).get(key)
        try:
            return None if value is None else float(value)
        except (TypeError, ValueError):
            return None

    seg_stage = "segmentation_inference" if "dice_eq2" in by_name.get("segmentation_inference", {}) else "segmentation"
    return {
        "segmentation_dice_eq2": num(seg_stage, "dice_eq2"),
        "prognosis_macro_auc": num("prognosis", "macro_auc"),
        "prognosis_accuracy": num("prognosis", "accuracy"),
        "best_radiomics_macro_auc": num("classify", "best_macro_auc"),
        "logrank_p_prognosis_all": num("km", "p ProgSwin-UNETR / all"),
        "logrank_p_mrecist_all": num("km", "p mRECIST / all"),
        "cox_c_index": num("cox", "concordance"),
    }


def format_summary(results: list[StageResult], summary: dict) -> str:
    width = max(len(r.name) for r in results)
    lines = ["", "stage".ljust(width) + "  status    seconds  headline"]
    for r in results:
        head = ", ".join(f"{k}={_fmt(v)}" for k, v in list(r.headline.items())[:4])
        if r.status == "failed":
            head = r.message.splitlines()[0][:100]
        lines.append(f"{r.name.ljust(width)}  {r.status:<8} {r.seconds:8.1f}  {head}")
    lines.append(f"total {summary['seconds']:.1f} s, peak memory {summary['peak_memory_mb']} MB, profile "
                 f"{summary['profile']}{' (SYNTHETIC cohort)' if summary['synthetic'] else ''}; weights "
                 f"{'shared (inference only, nothing trained on this cohort)' if summary.get('weights') == 'shared' else 'trained on this cohort'}")
    by_name = {r.name: r.headline for r in results}
    numbers = headline_numbers(results)
    ours = {
        "segmentation Dice (Eq. 2)": numbers["segmentation_dice_eq2"],
        "ProgSwin-UNETR macro AUC": numbers["prognosis_macro_auc"],
        "ProgSwin-UNETR accuracy": numbers["prognosis_accuracy"],
        "best radiomics macro AUC": _best_radiomics(by_name.get("classify", {})),
        "KM log-rank p, ProgSwin, all": numbers["logrank_p_prognosis_all"],
        "KM log-rank p, mRECIST, all": numbers["logrank_p_mrecist_all"],
        "Cox C-index": numbers["cox_c_index"],
    }
    lines += ["", "headline".ljust(42) + "paper".ljust(20) + "this run" + (" (synthetic)" if summary["synthetic"] else "")]
    for k, v in PAPER.items():
        lines.append(f"{k.ljust(42)}{str(v).ljust(20)}{_fmt(ours.get(k))}")
    return "\n".join(lines)


def _best_radiomics(headline: dict) -> str | None:
    if headline.get("best_macro_auc") is None:
        return None
    return f"{headline['best_macro_auc']:.3g} ({headline.get('best_model', '?').replace('_', ' ')})"


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _finish(results: list[StageResult], summary: dict, out: str) -> None:
    print(format_summary(results, summary))
    failed = [r for r in results if r.status == "failed"]
    if failed:
        first = failed[0]
        print(f"\nstage {first.name} failed:\n{first.message}", file=sys.stderr)
        raise SystemExit(2 if first.name == "validate" else 1)
    print(f"\nreport: {Path(out).resolve() / 'report.html'}\nsummary: {Path(out).resolve() / 'summary.json'}")


def study_cli(cohort: str | None = None, out: str = "study_output", profile: str = "demo",
              seg_weights: str | None = None, force: str | list | tuple | None = None, masks_source: str | None = None,
              bundles: str | None = None, quiet: bool = False, **overrides) -> None:
    """python -m analysis study [--cohort DIR] [--out DIR] [--profile demo|scratch|paper] [--seg-weights FILE]
    [--force STAGE[,STAGE]] [--masks-source auto|segmentation] [--patients N --shape S --prog-epochs E ...]

    With no --cohort the embedded synthetic cohort of the profile is generated. Reruns skip every
    stage whose inputs (content hashes) and settings did not change. The demo profile runs both
    bundles' shipped synthetic weights (inference only); scratch trains both networks instead.

    Every other --flag VALUE sets one setting of the profile (PROFILES in analysis/study.py); an
    unknown name stops the run with the list of known ones.

      --patients N, --shape S        the synthetic cohort made when no --cohort is given (matrix S x S)
      --seed K                       seed of that cohort, the folds and splits, classify and the bootstraps
      --folds N                      prognosis cross-validation folds
      --weights shared|train         run the bundles' shared weights (inference only) or train both networks
      --weights-overlay FILE         the bundles' config overlay selecting the shared weights and their sizes
      --device cpu|cuda|cuda:N|auto  where both networks run
      --tracking none|mlflow         MLflow tracking of the bundles' training runs (their <output_dir>/mlruns.db)
      --seg-epochs E, --prog-epochs E    training epochs (prognosis per fold)
      --feature-size F               Swin-UNETR feature size of both networks (when training)
      --net-size N, --seg-roi R      prognosis input and segmentation patch edge in voxels (when training)
      --seg-spacing-mm [X,Y,Z]       segmentation resampling spacing in mm
      --seg-num-samples N            random patches per image and iteration in segmentation training
      --seg-val-interval N           validate the segmentation every N epochs
      --grad-checkpointing BOOL      gradient checkpointing in segmentation training (less memory, slower)
      --sw-batch-size N              sliding-window batch size of segmentation inference
      --num-workers N                data loader worker processes
      --radiomics-jobs N             parallel radiomics processes
      --bootstrap N                  bootstrap resamples of the confidence intervals (prognosis, classify)
      --cox-penalizer P              ridge penalty of the cox and nomogram stages

    Args:
        cohort: the cohort folder (docs/contracts.md); without it the profile's synthetic cohort is made
            in OUT/cohort.
        out: the study folder (a folder per stage, manifest.json, summary.json, report.html); a rerun
            resumes it.
        profile: demo (48 synthetic patients, the bundles' shared weights, inference only), scratch (trains
            both networks at tiny size) or paper (the paper's setup, for a GPU).
        seg_weights: segmentation weights file (model.pt) used instead of training the segmentation network,
            checked by the bundle's integrity script; not with --weights shared.
        force: stage(s) to rerun even when unchanged, comma-separated, among validate, datalists,
            segmentation, segmentation_inference, masks, prognosis, gradcam, radiomics, classify, mrecist,
            km, cox, nomogram, table1, report.
        masks_source: auto (manual labels where present, else the automatic masks) or segmentation
            (automatic masks everywhere); default segmentation with shared weights, auto otherwise.
        bundles: folder holding hcc_liver_seg/ and progswin_prognosis/ (default $HCC_BUNDLES, ./bundles,
            then the repository's bundles/).
        quiet: no progress bars.
    """
    from analysis.flags import as_bool

    if isinstance(force, str):
        force = [f.strip() for f in force.split(",") if f.strip()]
    overrides = {k.replace("-", "_"): v for k, v in overrides.items()}
    try:
        results, summary = run_study(cohort=cohort, out=out, profile=profile, seg_weights=seg_weights,
                                     force=list(force or []), masks_source=masks_source, bundles=bundles,
                                     progress=not as_bool(quiet, "quiet"), **overrides)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2)
    _finish(results, summary, out)


def external_validation(seg_bundle: str | os.PathLike, prognosis_bundle: str | os.PathLike,
                        cohort: str | os.PathLike, out: str | os.PathLike, weights_overlay: str = "synthetic_weights.json",
                        device: str = "cpu", progress: bool = True, **overrides) -> tuple[list[StageResult], dict]:
    """Both bundles' shared weights on a local cohort, with no training: segmentation Dice and
    HD95 against the cohort's labels (when it has any), ProgSwin-UNETR metrics with CIs and
    calibration, the radiomics baseline, Kaplan-Meier and Cox by predicted class, one report
    labelled "external validation". A bad cohort stops at validation."""
    return run_study(cohort=cohort, out=out, profile="demo", seg_bundle=seg_bundle, prognosis_bundle=prognosis_bundle,
                     kind="external validation", progress=progress, weights="shared", weights_overlay=weights_overlay,
                     device=device, **overrides)


def external_validation_cli(seg_bundle: str, prognosis_bundle: str, cohort: str, out: str = "external_validation",
                            weights_overlay: str = "synthetic_weights.json", device: str = "cpu",
                            quiet: bool = False) -> None:
    """Validate shared bundles on a local cohort without training; one HTML report.

    Args:
        seg_bundle: the hcc_liver_seg bundle folder (e.g. a fetched one: fetch-bundle's OUT/hcc_liver_seg).
        prognosis_bundle: the progswin_prognosis bundle folder.
        cohort: the local cohort folder (docs/contracts.md); checked first, a bad one stops here.
        out: output folder (report.html, summary.json, one folder per stage).
        weights_overlay: each bundle's config overlay that selects the weights and their sizes.
        device: cpu, cuda or auto.
        quiet: no progress bars.
    """
    from analysis.flags import as_bool

    try:
        results, summary = external_validation(seg_bundle, prognosis_bundle, cohort, out,
                                               weights_overlay=weights_overlay, device=device,
                                               progress=not as_bool(quiet, "quiet"))
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2)
    _finish(results, summary, out)
