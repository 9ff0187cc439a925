"""PyRadiomics features per patient for one time point and ROI (paper, Appendix 8).

Default settings: ``analysis/resources/exampleMR_3mm.yaml`` (the PyRadiomics exampleMR_3mm
settings), giving exactly 1132 features for a 3-D ROI.

Outputs (docs/contracts.md), for ``--out features.csv``:

- ``features.csv``: ``patient_id`` + one column per feature, the same columns for every patient;
- ``features_diagnostics.csv``: ``patient_id`` + PyRadiomics' ``diagnostics_*`` values +
  ``settings_sha256`` and ``cache_hit``;
- ``features_errors.csv``: ``patient_id, reason`` for every patient without features (no image,
  no mask, ROI empty or too small, PyRadiomics failure); the run goes on without them;
- ``features.json``: provenance: PyRadiomics version, settings file and its SHA-256, time point,
  ROI, labels, counts.

ROI rules:

- ``--roi tumour`` = label 2, ``liver`` = label 1, ``liver+tumour`` = labels 1 and 2.
- Minimum ROI: at least ``MIN_ROI_VOXELS`` (8) voxels on the mask's own grid and at least
  ``MIN_ROI_VOLUME_MM3`` (64 mm^3, i.e. 8 voxels of the 2 mm grid the settings resample to).
  Below that the texture matrices after resampling are degenerate (a one-voxel ROI has no
  neighbours). Such a patient goes to the errors CSV, as does any patient PyRadiomics rejects.
- Geometry: image and mask must have the same size and the same affine (direction x spacing and
  origin) within ``analysis.cohort.AFFINE_TOLERANCE_MM`` (1e-3 mm). Any patient beyond that stops
  the run before anything is computed, with every such patient named (a mask of another scan
  would give meaningless features silently).

Caching: each patient's result is stored in ``cache_dir`` under a key made of the SHA-256 of the
image file, the mask file, the settings file, the ROI labels and the PyRadiomics version, so a
re-run recomputes only patients whose inputs changed. Failures are not cached. A cache file's path
is checked to lie inside ``cache_dir`` (:func:`analysis.io.path_under`).

Patient ids follow the one rule of :func:`analysis.cohort.check_patient_id` (clinical.csv ids,
folder names under images/, ``patients=``); an id breaking it stops the run before any work.
With ``jobs > 1`` the pool workers end with the run, even when it is killed (``kill -9``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import ExitStack
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.cohort import (
    AFFINE_TOLERANCE_MM,
    TIMEPOINTS,
    check_patient_id,
    find_scan,
    image_path,
    mask_path,
)
from analysis.io import file_sha256, path_under, write_csv, write_json, write_text

log = logging.getLogger(__name__)

ROIS: dict[str, tuple[int, ...]] = {"tumour": (2,), "liver": (1,), "liver+tumour": (1, 2)}
_ROI_ALIASES = {"tumor": "tumour", "liver_tumour": "liver+tumour", "liver+tumor": "liver+tumour"}
MIN_ROI_VOXELS = 8
MIN_ROI_VOLUME_MM3 = 64.0
#: features of the default settings for a 3-D ROI: 13 image types x 86 + 14 shape
EXPECTED_FEATURES_DEFAULT = 1132
DEFAULT_SETTINGS = "exampleMR_3mm.yaml"
CACHE_FORMAT = 1



# ---------------------------------------------------------------------------------- settings
def default_params_path() -> Path:
    """The packaged exampleMR_3mm settings (a real file: the package is installed as files)."""
    return Path(str(resources.files("analysis").joinpath("resources", DEFAULT_SETTINGS)))


def resolve_roi(roi: str) -> tuple[str, tuple[int, ...]]:
    name = _ROI_ALIASES.get(str(roi).strip().lower(), str(roi).strip().lower())
    if name not in ROIS:
        raise ValueError(f"--roi {roi!r} is not known; expected one of {', '.join(ROIS)}")
    return name, ROIS[name]


def pyradiomics_version() -> str:
    import radiomics

    return str(radiomics.__version__)


@functools.lru_cache(maxsize=4)
def _extractor(params_path: str):
    """One extractor per process and settings file (building it parses and validates the YAML)."""
    from radiomics import featureextractor

    logging.getLogger("radiomics").setLevel(logging.ERROR)
    return featureextractor.RadiomicsFeatureExtractor(params_path)


def check_params(params_path: str | Path) -> None:
    """Fail early, naming the file, when the settings cannot be read by PyRadiomics."""
    p = Path(params_path)
    if not p.is_file():
        raise FileNotFoundError(f"--params {p}: no such settings file")
    try:
        _extractor(str(p))
    except Exception as exc:
        raise ValueError(f"--params {p}: PyRadiomics cannot use these settings: {exc}") from exc


# ---------------------------------------------------------------------------------- geometry
def _header(path: Path) -> dict:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return {"size": tuple(reader.GetSize()), "spacing": np.array(reader.GetSpacing()),
            "origin": np.array(reader.GetOrigin()), "direction": np.array(reader.GetDirection())}


def geometry_mismatch(image: str | Path, mask: str | Path, tol_mm: float = AFFINE_TOLERANCE_MM) -> str | None:
    """None when image and mask share size and affine within ``tol_mm``, else what differs."""
    a, b = _header(Path(image)), _header(Path(mask))
    if a["size"] != b["size"]:
        return f"size {a['size']} (image) vs {b['size']} (mask)"
    n = len(a["size"])
    lin_a = a["direction"].reshape(n, n) * a["spacing"]
    lin_b = b["direction"].reshape(n, n) * b["spacing"]
    d_lin = float(np.max(np.abs(lin_a - lin_b)))
    d_org = float(np.max(np.abs(a["origin"] - b["origin"])))
    if d_lin > tol_mm or d_org > tol_mm:
        return (f"affine differs by {d_lin:.4g} mm (direction x spacing) and origin by {d_org:.4g} mm; "
                f"tolerance {tol_mm} mm")
    return None


# -------------------------------------------------------------------------------- extraction
@dataclass
class ExtractionResult:
    features: pd.DataFrame
    diagnostics: pd.DataFrame
    errors: pd.DataFrame
    provenance: dict = field(default_factory=dict)


def _cache_key(image_sha: str, mask_sha: str, settings_sha: str, labels: tuple[int, ...]) -> str:
    text = json.dumps([CACHE_FORMAT, image_sha, mask_sha, settings_sha, list(labels), pyradiomics_version()])
    return hashlib.sha256(text.encode()).hexdigest()


def _roi_problem(roi: np.ndarray, labels: tuple[int, ...], voxel_mm3: float) -> str | None:
    n = int(roi.sum())
    if n == 0:
        return f"ROI empty: no voxel with label {'/'.join(map(str, labels))}"
    volume = n * voxel_mm3
    if n < MIN_ROI_VOXELS or volume < MIN_ROI_VOLUME_MM3:
        return (f"ROI too small: {n} voxels, {volume:.1f} mm^3; minimum {MIN_ROI_VOXELS} voxels and "
                f"{MIN_ROI_VOLUME_MM3:g} mm^3")
    return None


def _run_pyradiomics(image, mask, params_path: str) -> dict:
    """The PyRadiomics call (kept separate so tests can count calls)."""
    return _extractor(params_path).execute(image, mask, label=1)


def _as_value(v):
    if isinstance(v, np.ndarray) and v.ndim == 0:
        v = v.item()
    if isinstance(v, (np.floating, np.integer)):
        v = v.item()
    if isinstance(v, (tuple, list, dict)):
        return json.dumps(v, default=str)
    return v


def extract_patient(task: dict) -> dict:
    """Features of one patient, from the cache when its inputs are unchanged.

    ``task``: patient_id, image, mask, labels, params (path), settings_sha256, cache_dir.
    Returns {patient_id, features, diagnostics, error, cache_hit}. Never raises for a patient
    problem: the reason goes into ``error``. Raises ValueError when the cache file (named after
    the patient id) would lie outside ``cache_dir``, before any extraction or write.
    """
    import SimpleITK as sitk

    pid = task["patient_id"]
    out = {"patient_id": pid, "features": None, "diagnostics": None, "error": None, "cache_hit": False}
    cache_file = None
    if task.get("cache_dir"):
        key = _cache_key(file_sha256(task["image"]), file_sha256(task["mask"]), task["settings_sha256"],
                         tuple(task["labels"]))
        cache_file = path_under(task["cache_dir"], f"{pid}_{key[:24]}.json")
        if cache_file.exists():
            try:
                cached = json.loads(cache_file.read_text())
                out.update(features=cached["features"], diagnostics=cached["diagnostics"], cache_hit=True)
                return out
            except (OSError, ValueError, KeyError):
                log.warning("%s: unreadable cache file %s; recomputing", pid, cache_file)
    try:
        image = sitk.ReadImage(str(task["image"]), sitk.sitkFloat32)
        label_map = sitk.GetArrayFromImage(sitk.ReadImage(str(task["mask"])))
    except Exception as exc:  # noqa: BLE001 - any unreadable file is this patient's error
        out["error"] = f"cannot read image or mask: {exc}".splitlines()[0]
        return out
    roi = np.isin(label_map, task["labels"])
    problem = _roi_problem(roi, tuple(task["labels"]), float(np.prod(image.GetSpacing())))
    if problem:
        out["error"] = problem
        return out
    mask = sitk.GetImageFromArray(roi.astype(np.uint8))
    # the geometry check (within AFFINE_TOLERANCE_MM) already passed; copying the image's grid
    # keeps PyRadiomics' own 1e-6 tolerance from rejecting header round-off
    mask.CopyInformation(image)
    try:
        result = _run_pyradiomics(image, mask, task["params"])
    except Exception as exc:  # noqa: BLE001 - PyRadiomics raises bare Exception/ValueError
        out["error"] = f"PyRadiomics failed: {type(exc).__name__}: {exc}".splitlines()[0]
        return out
    feats = {k: float(v) for k, v in result.items() if not k.startswith("diagnostics_")}
    diags = {k: _as_value(v) for k, v in result.items() if k.startswith("diagnostics_")}
    out.update(features=feats, diagnostics=diags)
    if cache_file is not None:
        write_text(cache_file, json.dumps({"features": feats, "diagnostics": diags}))
    return out


#: Linux prctl option: the signal a process gets when its parent dies (linux/prctl.h)
PR_SET_PDEATHSIG = 1


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and has not ended (a zombie has ended), from Linux's /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def _die_with_parent(parent_pid: int) -> None:
    """End this pool worker when the run that started it ends, even by SIGKILL.

    On Linux the kernel sends SIGKILL when the worker's parent dies (prctl PR_SET_PDEATHSIG; with
    the forkserver start method the parent is the server, which itself ends with the run); a run
    that died before the signal was armed is caught by looking at ``parent_pid`` in /proc. On other
    POSIX systems a daemon thread polls the parent's pid once a second. Without this, a killed
    ``radiomics`` run leaves its workers computing the tasks already queued to them and writing
    cache files.
    """
    import signal
    import sys
    import threading

    if sys.platform.startswith("linux"):
        import ctypes

        try:
            armed = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
        if os.getppid() != parent_pid and not _running(parent_pid):  # the run ended before the signal was armed
            os.kill(os.getpid(), signal.SIGKILL)
        if armed:
            return
    if os.name != "posix":
        return
    ppid = os.getppid()

    def watch() -> None:
        import time

        while os.getppid() == ppid:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="radiomics-parent-watch", daemon=True).start()


def _worker_init(threads: int, parent_pid: int | None = None) -> None:
    # a worker ends with the run that started it (kill -9 included), so no orphan goes on writing
    if parent_pid is not None:
        _die_with_parent(parent_pid)
    # each process gets its share of the cores: SimpleITK filters are multithreaded
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, threads))
    os.environ["OMP_NUM_THREADS"] = str(max(1, threads))


def list_patients(cohort: str | Path, timepoint: str) -> list[str]:
    """Patients of the cohort: clinical.csv ids (when present) plus folders under images/.

    Ids follow the one patient-id rule (analysis.cohort.check_patient_id): clinical.csv is read by
    the verbs' reader (ids checked, no repeats) and a folder under images/ whose name breaks the
    rule is refused; hidden folders (``.name``) are not patients and are skipped.
    """
    from analysis.clinical_table import read_clinical_table

    cohort = Path(cohort)
    ids: list[str] = []
    clinical = cohort / "clinical.csv"
    if clinical.exists():
        ids += read_clinical_table(clinical, required=("patient_id",), typed=False)["patient_id"].tolist()
    images = cohort / "images"
    if images.is_dir():
        folders = sorted(p.name for p in images.iterdir() if p.is_dir() and not p.name.startswith("."))
        ids += [check_patient_id(name, f"{images / name} (a patient folder)") for name in folders]
    return list(dict.fromkeys(i for i in ids if i))


def extract_all(cohort: str | Path, masks: str | Path, timepoint: str = "t1", roi: str = "tumour",
                params: str | Path | None = None, jobs: int = 1, cache_dir: str | Path | None = None,
                patients: list[str] | None = None, progress: bool = True) -> ExtractionResult:
    """Features of every patient of ``cohort`` (see the module docstring for the rules)."""
    from tqdm.auto import tqdm

    if timepoint not in TIMEPOINTS:
        raise ValueError(f"--timepoint {timepoint!r}; expected one of {', '.join(TIMEPOINTS)}")
    roi_name, labels = resolve_roi(roi)
    cohort, masks = Path(cohort), Path(masks)
    if not (cohort / "images").is_dir():
        raise FileNotFoundError(f"--cohort {cohort}: no images/ folder (see docs/contracts.md)")
    if not masks.is_dir():
        raise FileNotFoundError(f"--masks {masks}: no such folder")
    params_path = Path(params) if params else default_params_path()
    check_params(params_path)
    settings_sha = file_sha256(params_path)
    jobs = max(1, int(jobs))

    errors: list[dict] = []
    tasks: list[dict] = []
    mismatches: list[str] = []
    if patients is not None:
        patients = [check_patient_id(pid, f"patients[{i}]") for i, pid in enumerate(patients)]
    for pid in patients if patients is not None else list_patients(cohort, timepoint):
        img = find_scan(cohort / "images", pid, timepoint)
        msk = find_scan(masks, pid, timepoint)
        if img is None:
            errors.append({"patient_id": pid, "reason": f"no image {image_path(cohort, pid, timepoint)}"})
            continue
        if msk is None:
            errors.append({"patient_id": pid, "reason": f"no mask {mask_path(masks, pid, timepoint)}"})
            continue
        try:
            problem = geometry_mismatch(img, msk)
        except Exception as exc:  # noqa: BLE001 - ITK raises RuntimeError with a long trace
            errors.append({"patient_id": pid, "reason": f"cannot read header: {exc}".splitlines()[0]})
            continue
        if problem:
            mismatches.append(f"{pid}: {img} vs {msk}: {problem}")
            continue
        tasks.append({"patient_id": pid, "image": str(img), "mask": str(msk), "labels": list(labels),
                      "params": str(params_path), "settings_sha256": settings_sha,
                      "cache_dir": str(cache_dir) if cache_dir else None})
    if mismatches:
        raise ValueError("image/mask geometry mismatch (mask must have the image's size and affine "
                         f"within {AFFINE_TOLERANCE_MM} mm) for {len(mismatches)} patient(s):\n  "
                         + "\n  ".join(mismatches))

    results: list[dict] = []
    bar = tqdm(total=len(tasks), desc=f"radiomics {timepoint} {roi_name}", unit="patient", disable=not progress)
    with ExitStack() as stack:
        if jobs == 1 or len(tasks) <= 1:
            for t in tasks:
                results.append(extract_patient(t))
                bar.update()
        else:
            threads = max(1, (os.cpu_count() or 1) // jobs)
            pool = stack.enter_context(ProcessPoolExecutor(max_workers=jobs, initializer=_worker_init,
                                                           initargs=(threads, os.getpid())))
            # largest first (longest-processing-time scheduling): a big ROI left to the end would
            # keep one worker busy while the other idles. The label file's size is a free proxy
            # for the ROI's extent (more label boundary compresses worse).
            by_cost = sorted(tasks, key=lambda t: -Path(t["mask"]).stat().st_size)
            futures = {pool.submit(extract_patient, t): t["patient_id"] for t in by_cost}
            for fut in as_completed(futures):
                try:
                    results.append(fut.result())
                except Exception as exc:  # noqa: BLE001 - a worker crash (e.g. out of memory) loses one patient only
                    results.append({"patient_id": futures[fut], "error": f"worker failed: {exc}"})
                bar.update()
    bar.close()

    order = {t["patient_id"]: i for i, t in enumerate(tasks)}
    results.sort(key=lambda r: order[r["patient_id"]])
    ok = [r for r in results if not r.get("error")]
    errors += [{"patient_id": r["patient_id"], "reason": r["error"]} for r in results if r.get("error")]
    columns: list[str] = list(ok[0]["features"]) if ok else []
    rows, diag_rows = [], []
    for r in ok:
        if list(r["features"]) != columns:
            missing = sorted(set(columns) - set(r["features"]))[:3]
            errors.append({"patient_id": r["patient_id"],
                           "reason": f"feature set differs from the first patient's (e.g. missing {missing})"})
            continue
        rows.append({"patient_id": r["patient_id"], **r["features"]})
        diag_rows.append({"patient_id": r["patient_id"], **r["diagnostics"], "settings_sha256": settings_sha,
                          "cache_hit": bool(r["cache_hit"])})
    for e in errors:
        log.warning("radiomics: %s left out: %s", e["patient_id"], e["reason"])
    features = pd.DataFrame(rows, columns=["patient_id", *columns])
    diagnostics = pd.DataFrame(diag_rows)
    err = pd.DataFrame(errors, columns=["patient_id", "reason"])
    provenance = {
        "pyradiomics_version": pyradiomics_version(),
        "settings_file": params_path.name,
        "settings_sha256": settings_sha,
        "timepoint": timepoint,
        "roi": roi_name,
        "labels": list(labels),
        "n_features": len(columns),
        "n_patients": len(features),
        "n_errors": len(err),
        "n_cache_hits": int(sum(bool(r.get("cache_hit")) for r in ok)),
        "min_roi_voxels": MIN_ROI_VOXELS,
        "min_roi_volume_mm3": MIN_ROI_VOLUME_MM3,
        "geometry_tolerance_mm": AFFINE_TOLERANCE_MM,
    }
    if params is None and ok and len(columns) != EXPECTED_FEATURES_DEFAULT:
        log.warning("default settings gave %d features, expected %d", len(columns), EXPECTED_FEATURES_DEFAULT)
    return ExtractionResult(features, diagnostics, err, provenance)


def output_paths(out: str | Path) -> dict[str, Path]:
    """features.csv -> features_diagnostics.csv, features_errors.csv, features.json beside it."""
    out = Path(out)
    stem = out.name.removesuffix(".csv")
    return {"features": out, "diagnostics": out.with_name(f"{stem}_diagnostics.csv"),
            "errors": out.with_name(f"{stem}_errors.csv"), "provenance": out.with_name(f"{stem}.json")}


def write_result(result: ExtractionResult, out: str | Path) -> dict[str, Path]:
    paths = output_paths(out)
    # features last: its presence means the run finished (the other files are written first)
    write_csv(paths["diagnostics"], result.diagnostics)
    write_csv(paths["errors"], result.errors)
    write_json(paths["provenance"], result.provenance)
    write_csv(paths["features"], result.features)
    return paths


def extract_features(cohort: str | Path, masks: str | Path, timepoint: str = "t1", roi: str = "tumour",
                     params: str | Path | None = None, jobs: int = 1, cache_dir: str | Path | None = None,
                     out: str | Path | None = None, progress: bool = True) -> pd.DataFrame:
    """Feature table (``patient_id`` + features); with ``out``, also writes the four output files."""
    result = extract_all(cohort, masks, timepoint=timepoint, roi=roi, params=params, jobs=jobs,
                         cache_dir=cache_dir, progress=progress)
    if out is not None:
        write_result(result, out)
    return result.features


def radiomics_cli(cohort: str, masks: str, out: str = "features.csv", timepoint: str = "t1",
                  roi: str = "tumour", params: str | None = None, jobs: int = 1,
                  cache_dir: str | None = None, no_cache: bool = False) -> str:
    """PyRadiomics features of one time point's ROI for every patient of a cohort.

    A patient without features (no image or mask, ROI empty or under 8 voxels / 64 mm^3, PyRadiomics
    failure) is listed in the errors CSV and the run goes on; an image/mask geometry mismatch stops
    the run before anything is computed. Rules and outputs are in the docstring of analysis.radiomics.

    Args:
        cohort: the cohort folder (images/<patient_id>/<timepoint>.nii.gz); its patients are the clinical.csv
            ids and the images/ folders.
        masks: folder of masks <masks>/<patient_id>/<timepoint>.nii.gz (0 background, 1 liver, 2 tumour),
            each with its image's size and affine.
        out: the feature table CSV (patient_id + one column per feature); <stem>_diagnostics.csv,
            <stem>_errors.csv and <stem>.json (provenance) are written beside it.
        timepoint: the scan whose features are computed, t0, t1 or t2.
        roi: the region, tumour (label 2), liver (label 1) or liver+tumour (labels 1 and 2).
        params: PyRadiomics settings YAML (default the packaged exampleMR_3mm settings, 1132 features).
        jobs: number of parallel worker processes (1 = in this process).
        cache_dir: per-patient result cache, keyed by the SHA-256 of image, mask and settings, the ROI
            labels and the PyRadiomics version (default <out folder>/.radiomics_cache).
        no_cache: neither read nor write the cache, so every patient is recomputed.
    """
    if cache_dir is None and not no_cache:
        cache_dir = str(Path(out).parent / ".radiomics_cache")
    try:
        result = extract_all(cohort, masks, timepoint=timepoint, roi=roi, params=params, jobs=jobs,
                             cache_dir=None if no_cache else cache_dir)
    except (ValueError, FileNotFoundError) as exc:
        from analysis.clinical_table import usage_exit

        raise usage_exit(f"radiomics: {exc}") from None
    paths = write_result(result, out)
    p = result.provenance
    return (f"{p['n_patients']} patients x {p['n_features']} features -> {paths['features']}; "
            f"{p['n_errors']} left out (see {paths['errors']}); {p['n_cache_hits']} from cache")
