"""The prognosis datalist (docs/contracts.md): items, folds, and paths joined to dataset_dir."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Sequence

log = logging.getLogger(__name__)

TIMEPOINTS = ("t0", "t1", "t2")
IMAGE_KEYS = tuple(f"image_{t}" for t in TIMEPOINTS)
MASK_KEYS = tuple(f"mask_{t}" for t in TIMEPOINTS)
UNLABELLED = -1  # label/fold value of an ``unlabelled`` item, so batches collate
#: the cohort contract's patient-id rule (clinical.schema.json); the bundle runs alone, so it
#: keeps its own copy (a test checks the copies agree): ids name output folders
PATIENT_ID = re.compile(r"^[A-Za-z0-9_-]+$")


def check_patient_id(value, where: str) -> str:
    """``value`` when it matches :data:`PATIENT_ID`, else a ValueError naming ``where``."""
    text = str(value)
    if not PATIENT_ID.fullmatch(text):
        raise ValueError(f"{where}: patient_id {text!r} does not match {PATIENT_ID.pattern} (letters, digits, "
                         f"_ and - only: ids name output folders)")
    return text


def load_items(
    datalist: str,
    dataset_dir: str,
    sections: Sequence[str] = ("training",),
    folds: Iterable[int] | None = None,
    exclude_folds: Iterable[int] | None = None,
    patients: Iterable[str] | None = None,
) -> list[dict]:
    """Datalist items with absolute paths, filtered by fold and patient.

    Args:
        datalist: ``prognosis.json``.
        dataset_dir: folder the datalist's relative paths start from.
        sections: ``training`` (labelled, with ``fold``) and/or ``unlabelled``.
        folds: keep items whose ``fold`` is in this list (validation of fold k: ``[k]``).
        exclude_folds: drop items whose ``fold`` is in this list (training of fold k: ``[k]``).
        patients: keep only these patient ids (an unknown id is an error, not a silent skip).

    Missing time-point keys are left for :class:`scripts.transforms.ValidateTimepointsd`,
    which names the patient and time point when the item is used.
    """
    if not os.path.isfile(datalist):
        raise FileNotFoundError(f"prognosis datalist not found: {datalist} (write it with "
                                f"`python -m analysis datalists <cohort>` or pass --datalist)")
    with open(datalist) as f:
        try:
            content = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{datalist}: not valid JSON ({e})") from e
    folds = None if folds is None else {int(k) for k in folds}
    exclude = set() if exclude_folds is None else {int(k) for k in exclude_folds}
    items: list[dict] = []
    for section in sections:
        for i, raw in enumerate(content.get(section, [])):
            if "patient_id" not in raw:
                raise ValueError(f"{datalist}: {section}[{i}] has no 'patient_id'")
            check_patient_id(raw["patient_id"], f"{datalist}: {section}[{i}]")
            item = dict(raw)
            if section == "training":
                for key in ("label", "fold"):
                    if not isinstance(item.get(key), int):
                        raise ValueError(f"{datalist}: patient {item['patient_id']} ({section}[{i}]) "
                                         f"needs an integer '{key}'; found {item.get(key)!r}")
            else:
                item.setdefault("label", UNLABELLED)
                item.setdefault("fold", UNLABELLED)
            if folds is not None and item["fold"] not in folds:
                continue
            if item["fold"] in exclude:
                continue
            for key in IMAGE_KEYS + MASK_KEYS:
                if isinstance(item.get(key), str) and not os.path.isabs(item[key]):
                    item[key] = os.path.join(dataset_dir, item[key])
            items.append(item)
    if patients is not None:
        wanted = [str(p) for p in patients]
        known = {it["patient_id"] for it in items}
        unknown = [p for p in wanted if p not in known]
        if unknown:
            raise ValueError(f"patient(s) {unknown} not in {datalist} sections {list(sections)}"
                             + ("" if folds is None else f" folds {sorted(folds)}"))
        items = [it for it in items if it["patient_id"] in set(wanted)]
    if not items:
        raise ValueError(f"{datalist}: no item in sections {list(sections)}"
                         + ("" if folds is None else f" with fold in {sorted(folds)}")
                         + ("" if not exclude else f" outside folds {sorted(exclude)}"))
    log.info("%s: %d item(s) from %s", os.path.basename(datalist), len(items), ", ".join(sections))
    return items


def balanced_sampler(items: Sequence[dict], enabled=True, seed: int = 0):
    """A ``WeightedRandomSampler`` that draws every risk class equally often (one epoch = as many
    draws as items), or None when ``enabled`` is false (plain shuffling)."""
    import torch

    from scripts.flags import as_bool

    if not as_bool(enabled, "balanced_sampling"):
        return None
    labels = torch.tensor([int(it["label"]) for it in items])
    counts = torch.bincount(labels)
    weights = (1.0 / counts[labels].double()).tolist()
    return torch.utils.data.WeightedRandomSampler(weights, num_samples=len(items), replacement=True,
                                                  generator=torch.Generator().manual_seed(int(seed)))
