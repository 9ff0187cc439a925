"""``python -m analysis VERB ...``: a thin fire layer over the package's functions.

Only the module behind the chosen verb is imported, so ``km`` or ``table1`` start without
loading torch or pyradiomics.
"""

from __future__ import annotations

import importlib
import logging
import sys

import fire

#: verb -> (module, function, one-line help)
VERBS: dict[str, tuple[str, str, str]] = {
    "synth": ("analysis.synthetic", "synth_cli", "write a synthetic HCC cohort folder"),
    "validate": ("analysis.cohort", "validate_cli", "check a cohort folder; exit 2 listing every problem"),
    "summary": ("analysis.cohort", "summary_cli", "print a short summary of a cohort folder"),
    "datalists": ("analysis.datalists", "datalists_cli", "write the MONAI datalists both bundles read"),
    "radiomics": ("analysis.radiomics", "radiomics_cli", "pyradiomics features per patient (exampleMR_3mm)"),
    "classify": ("analysis.models", "classify_cli", "feature selection + five classifiers + ROC/AUC CI"),
    "burden": ("analysis.burden", "burden_cli",
               "tumour-burden logistic regression baseline (cv4, same folds)"),
    "seg-dice": ("analysis.segmentation_agreement", "seg_dice_cli",
                 "Dice of automatic masks against manual labels, per scan (Eq. 2)"),
    "mrecist": ("analysis.mrecist", "mrecist_cli", "mRECIST response from masks or measured diameters"),
    "km": ("analysis.km", "km_cli", "Kaplan-Meier curves, log-rank tests, Fig. 6 grid"),
    "cox": ("analysis.cox", "cox_cli", "multivariable Cox model, forest plot, PH check"),
    "nomogram": ("analysis.nomogram", "nomogram_cli", "Cox nomogram, calibration and decision curve"),
    "table1": ("analysis.table1", "table1_cli", "baseline characteristics table (Table 1)"),
    "report": ("analysis.report", "report_cli", "one self-contained HTML report of a study folder"),
    "study": ("analysis.study", "study_cli", "the whole study end to end (resumable)"),
    "external-validation": ("analysis.study", "external_validation_cli",
                            "shared bundles on a local cohort, no training: metrics, KM, Cox, report"),
    "export-bundle": ("analysis.bundle_archive", "export_bundle_cli",
                      "a bundle with its weights as a Model Zoo zip + manifest + sha256"),
    "fetch-bundle": ("analysis.bundle_archive", "fetch_bundle_cli",
                     "fetch a bundle zip (URL or path), verify every file, unpack"),
    "verify-bundle": ("analysis.bundle_archive", "verify_bundle_cli",
                      "check a fetched bundle's files against its manifest"),
    "federated-job": ("analysis.federated", "federated_job_cli",
                      "NVFlare FedAvg job of a bundle over N sites' datalists; export its global model"),
    "synth-dicom": ("analysis.dicom_synth", "synth_dicom_cli",
                    "a synthetic cohort as DICOM MR series + series.csv + clinical.csv (import-dicom's input)"),
    "import-dicom": ("analysis.dicom_import", "import_dicom_cli",
                     "DICOM series (mapped by series.csv) -> cohort folder with provenance; exit 2 listing every problem"),
    "dicom-seg": ("analysis.dicom_seg", "dicom_seg_cli",
                  "segmentation masks of DICOM-imported scans -> DICOM Segmentation objects (liver, tumour)"),
    "export-onnx": ("analysis.onnx_export", "export_onnx_cli",
                    "a bundle's network with its weights as ONNX (models/model.onnx) for --backend onnxruntime"),
}


#: a verb's arguments asking for its help (fire's: NAME, SYNOPSIS, every flag with its Args line)
HELP_FLAGS = frozenset({"-h", "--help"})


def _usage() -> str:
    width = max(len(v) for v in VERBS)
    lines = ["usage: python -m analysis VERB [--flags]", "", "verbs:"]
    lines += [f"  {verb.ljust(width)}  {help_}" for verb, (_, _, help_) in VERBS.items()]
    lines += ["", "python -m analysis VERB --help shows a verb's flags."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(_usage())
        return
    verb, rest = argv[0], argv[1:]
    # the command line writes figures to files and never shows them: the backend is chosen here,
    # once, not inside the plotting functions (a notebook keeps its own)
    import matplotlib

    matplotlib.use("Agg")
    if verb not in VERBS:
        print(f"unknown verb {verb!r}\n\n{_usage()}", file=sys.stderr)
        raise SystemExit(2)
    module_name, func_name, _ = VERBS[verb]
    func = getattr(importlib.import_module(module_name), func_name)
    if any(arg in HELP_FLAGS for arg in rest):
        # fire's own help, never a call: after the ``--`` separator --help is a fire flag, so a verb
        # taking **overrides (study) cannot receive it as a setting, and no verb runs with the other
        # arguments given (``verb ARGS -- --help`` would call it, then show help on the result).
        # fire prints the help to stderr and raises FireExit(0), a SystemExit: exit status 0.
        rest = ["--", "--help"]
    # fire prints a returned object; verbs return None or a short summary string
    fire.Fire(func, command=rest, name=f"analysis {verb}")
