"""4-fold cross-validation of ProgSwin-UNETR with out-of-fold predictions (paper: 75:25 per fold).

For each fold k: train ``configs/train.json`` with ``fold=k`` (trains on the other folds,
validates on fold k, keeps the best model by validation macro AUC in ``<ckpt_dir>/fold{k}/``);
then predict fold k's patients with fold k's best model only. The concatenation is
``oof_predictions.csv``: every labelled patient exactly once, predicted by the one model that
never trained on it; ``evaluation/`` holds its metrics (AUC per class with bootstrap CI, macro
AUC, accuracy, sensitivity/specificity, confusion matrix, ROC).

Run it through monai.bundle, from the bundle folder::

    python -m monai.bundle run --config_file configs/cross_validate.json \
        --dataset_dir <cohort> --output_dir <out> [--folds 4] [--force true] \
        [--overlays "['configs/cpu_recipe.json']"] \
        [--fold_overrides "{'max_epochs': 20, 'feature_size': 24}"]  # ids of train.json/inference.json

``fold_overrides``: ids set on every fold's training run, and on its inference run where
inference.json has that id; ``tracking`` (e.g. ``mlflow``) is passed to the training runs.
The module's own command line (``PYTHONPATH=<bundle> python -m scripts.cross_validate
--bundle_root <bundle> --dataset_dir <cohort> --output_dir <out> [--any#config#id value ...]``)
calls the same function and writes the same files.

``overlays``: config files (relative to the bundle root, or absolute) read after train.json and
after inference.json, e.g. the CPU recipe; their ids that inference does not use are ignored there.

Resumable: a fold whose best checkpoint exists and is newer than the datalist is not retrained
(``--force true`` retrains). Outputs: ``<ckpt_dir>/fold{k}/model.pt`` (``ckpt_dir`` defaults to
the bundle's ``models/`` in the config, to ``<out>/models`` on the module's command line),
``<out>/folds/fold{k}/predictions.csv``, ``<out>/oof_predictions.csv``, ``<out>/evaluation/``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import pandas as pd

from scripts.checkpoints import best_model_path
from scripts.flags import as_bool
from scripts.io import write_csv
from scripts.metrics import write_evaluation

log = logging.getLogger(__name__)

# ids whose override belongs to training only; everything else also goes to inference when the
# inference config has that id (e.g. network_def#feature_size, spatial_size, mask_channels)
_TRAIN_ONLY_ROOTS = {"train", "validate", "max_epochs", "val_interval", "batch_size", "learning_rate",
                     "optimizer", "loss", "class_weights", "cache_rate", "amp", "resume", "resume_from",
                     "pretrained", "warmup_steps", "warmup_learning_rate", "warmup_batch_size",
                     "warmup_feature_stride", "warmup_standardize", "warmup_l2", "warmup_solver",
                     "warmup_learned_scale", "balanced_sampling",
                     "backbone_lr_scale", "model_selection"}


def _config_roots(config_file: str) -> set[str]:
    import json

    with open(config_file) as f:
        return set(json.load(f))


def _split_overrides(overrides: dict[str, Any], infer_config: str) -> tuple[dict, dict]:
    infer_roots = _config_roots(infer_config)
    train, infer = dict(overrides), {}
    for key, value in overrides.items():
        root = key.split("#")[0].split("::")[0]
        if root not in _TRAIN_ONLY_ROOTS and root in infer_roots:
            infer[key] = value
    # the training config's network has gradient checkpointing; inference never needs it
    infer.pop("network_def#use_checkpoint", None)
    return train, infer


def _needs_training(ckpt: str, datalist: str, force: bool) -> bool:
    if force or not os.path.isfile(ckpt):
        return True
    if os.path.getmtime(ckpt) <= os.path.getmtime(datalist):
        log.info("%s is older than %s: retraining", ckpt, datalist)
        return True
    return False


def _config_files(configs: str, base: str, overlays) -> list[str]:
    files = [os.path.join(configs, base)]
    for f in ([overlays] if isinstance(overlays, str) else list(overlays or [])):
        path = f if os.path.isabs(f) else os.path.join(os.path.dirname(configs), f)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"overlay config not found: {path}")
        files.append(path)
    return files


def cross_validate(bundle_root: str, dataset_dir: str, output_dir: str, folds: int = 4,
                   overrides: dict[str, Any] | None = None, force: bool = False,
                   overlays: list[str] | str | None = None, datalist: str | None = None,
                   ckpt_dir: str | None = None, tracking: str | None = None) -> pd.DataFrame:
    """Train every fold (or reuse it), predict out of fold, evaluate. Returns the OOF table.

    Args:
        bundle_root: the bundle folder (its configs/ are read).
        dataset_dir: the cohort folder (paths in the datalist are relative to it).
        output_dir: where predictions per fold, oof_predictions.csv and evaluation/ go.
        folds: number of folds (the datalist's fold column runs 0..folds-1).
        overrides: ids set on every fold's training run and, where inference.json has them, on
            its inference run.
        force: retrain folds whose best model exists and is newer than the datalist.
        overlays: config files read after train.json and after inference.json.
        datalist: the prognosis datalist (default ``<dataset_dir>/datalists/prognosis.json``).
        ckpt_dir: where ``fold{k}/model.pt`` go (default ``<output_dir>/models``).
        tracking: experiment tracking of the training runs (monai.bundle's ``tracking``, e.g. mlflow).
    """
    from monai.bundle import run

    bundle_root = os.path.abspath(bundle_root)
    output_dir = os.path.abspath(output_dir)
    configs = os.path.join(bundle_root, "configs")
    if overrides is not None and not isinstance(overrides, dict):
        raise ValueError(f"fold_overrides: expected a dict of config ids to values, e.g. \"{{'max_epochs': 20}}\"; "
                         f"got {overrides!r}")
    overrides = dict(overrides or {})
    datalist = overrides.pop("datalist", None) or datalist or os.path.join(dataset_dir, "datalists", "prognosis.json")
    ckpt_dir = overrides.pop("ckpt_dir", None) or ckpt_dir or os.path.join(output_dir, "models")
    tracking = overrides.pop("tracking", None) or tracking
    # command-line values arrive as text: 'none' and 'null' mean no tracking
    tracking = None if str(tracking).strip().lower() in ("", "none", "null") else tracking
    force = as_bool(force, "force")
    if not os.path.isfile(datalist):
        raise FileNotFoundError(f"prognosis datalist not found: {datalist}")
    train_over, infer_over = _split_overrides(overrides, os.path.join(configs, "inference.json"))
    if tracking:
        train_over["tracking"] = tracking
    common = {"bundle_root": bundle_root, "dataset_dir": dataset_dir, "datalist": datalist, "ckpt_dir": ckpt_dir,
              "meta_file": os.path.join(configs, "metadata.json"),
              "logging_file": os.path.join(configs, "logging.conf")}
    frames = []
    for k in range(int(folds)):
        ckpt = best_model_path(ckpt_dir, k)
        if _needs_training(ckpt, datalist, force):
            log.info("fold %d/%d: training", k, folds)
            run(config_file=_config_files(configs, "train.json", overlays), fold=k,
                output_dir=os.path.join(output_dir, "train"), **common, **train_over)
            if not os.path.isfile(ckpt):
                raise RuntimeError(f"fold {k}: training finished without a best model at {ckpt} "
                                   f"(was validation run? check val_interval <= max_epochs)")
        else:
            log.info("fold %d/%d: %s is newer than the datalist, reusing it (--force retrains)", k, folds, ckpt)
        fold_out = os.path.join(output_dir, "folds", f"fold{k}")
        run(config_file=_config_files(configs, "inference.json", overlays), fold=k, infer_folds=[k],
            infer_sections=["training"], output_dir=fold_out, **common, **infer_over)
        frames.append(pd.read_csv(os.path.join(fold_out, "predictions.csv"), dtype={"patient_id": str}))
    oof = pd.concat(frames, ignore_index=True)
    _check_oof(oof, datalist, int(folds))
    oof = oof.sort_values("patient_id").reset_index(drop=True)
    write_csv(os.path.join(output_dir, "oof_predictions.csv"), oof)
    metrics = write_evaluation(oof, os.path.join(output_dir, "evaluation"))
    log.info("out-of-fold: n=%d macro AUC %s accuracy %.3f", metrics["n"], metrics["macro_auc"], metrics["accuracy"])
    return oof


def _check_oof(oof: pd.DataFrame, datalist: str, folds: int) -> None:
    """Every labelled patient exactly once, by the model of its own fold."""
    import json

    with open(datalist) as f:
        items = json.load(f).get("training", [])
    expected = {it["patient_id"]: it["fold"] for it in items if it.get("fold", -1) < folds}
    dup = sorted(oof.loc[oof["patient_id"].duplicated(), "patient_id"])
    missing = sorted(set(expected) - set(oof["patient_id"]))
    wrong = sorted(p for p, f in zip(oof["patient_id"], oof["fold"]) if expected.get(p) != f)
    if dup or missing or wrong:
        raise RuntimeError(f"out-of-fold predictions are inconsistent: duplicated {dup}, missing {missing}, "
                           f"predicted by a model that trained on them {wrong}")


def main(*verb: str, bundle_root: str = ".", dataset_dir: str | None = None, output_dir: str | None = None,
         folds: int = 4, force: bool = False, overlays=None, **overrides) -> None:
    """CLI: see the module docstring. Extra ``--id value`` pairs are monai.bundle overrides.

    An empty positional argument (a caller passing an empty verb) is ignored; anything else is
    an error rather than silently taken for a parameter.
    """
    if any(str(v).strip() for v in verb):
        raise SystemExit(f"unexpected positional argument(s) {list(verb)}: every option is --name value")
    if not dataset_dir or not output_dir:
        raise SystemExit("usage: python -m scripts.cross_validate --bundle_root B --dataset_dir D --output_dir O "
                         "[--folds 4] [--force] [--config#id value ...]")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(name)s - %(levelname)s - %(message)s")
    cross_validate(bundle_root, dataset_dir, output_dir, folds=folds, overrides=overrides, force=force,
                   overlays=overlays)


if __name__ == "__main__":
    import fire

    fire.Fire(main)
