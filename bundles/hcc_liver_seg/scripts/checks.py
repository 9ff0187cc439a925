"""Checks run before inference writes anything."""

from __future__ import annotations

import logging
import os
import re
from typing import Mapping, Sequence

from scripts.flags import as_bool

logger = logging.getLogger("hcc_liver_seg")

#: the cohort contract's patient-id rule (clinical.schema.json); the bundle runs alone, so it
#: keeps its own copy (a test checks the copies agree)
PATIENT_ID = re.compile(r"^[A-Za-z0-9_-]+$")


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _inside(path: str, folder: str) -> bool:
    """``path``, links resolved, lies in ``folder``."""
    return _under(os.path.realpath(path), os.path.realpath(folder))


def _named_inside(path: str, folder: str) -> bool:
    """``path`` as named (links not followed) lies in ``folder``."""
    path = os.path.abspath(path)
    return _under(path, os.path.abspath(folder)) or _under(path, os.path.realpath(folder))


def check_inference_io(data: Sequence[Mapping], data_root_dir: str, output_dir: str, source: str = "",
                       key: str = "image") -> int:
    """Refuse an inference run that could overwrite or mix with its inputs; return the case count.

    - at least one input (else: which datalist/folder was empty);
    - output_dir must not be the input folder or inside it (masks would overwrite images or be
      picked up as inputs by the next folder run);
    - every input must lie under data_root_dir, since output names are the input paths relative to it.
    """
    if not data:
        raise ValueError(f"no input images found in {source or data_root_dir}: expected NIfTI files "
                         f"(*.nii, *.nii.gz) or a datalist 'testing' list")
    if not data_root_dir:
        raise ValueError("data_root_dir is empty: set it to the folder the input images live under")
    if _inside(output_dir, data_root_dir):
        raise ValueError(f"output_dir {output_dir} is the input folder {data_root_dir} or inside it: refusing to "
                         f"write masks among the input images; choose another --output_dir")
    links = [str(d[key]) for d in data if _named_inside(str(d[key]), data_root_dir)
             and not _inside(str(d[key]), data_root_dir)]
    if links:
        raise ValueError(f"{len(links)} input(s) are links to files outside data_root_dir {data_root_dir}, e.g. "
                         f"{links[0]} -> {os.path.realpath(links[0])}: copy the scans into the input folder")
    outside = [str(d[key]) for d in data if not _inside(str(d[key]), data_root_dir)]
    if outside:
        raise ValueError(f"{len(outside)} input(s) are not under data_root_dir {data_root_dir}, e.g. {outside[0]}: "
                         f"output names are derived from the path relative to it; set --data_root_dir")
    logger.info("inference: %d image(s) from %s -> %s", len(data), source or data_root_dir, output_dir)
    return len(data)


def checked_inputs(data: Sequence[Mapping], data_root_dir: str, output_dir: str, source: str = "",
                   key: str = "image", continue_on_error=False) -> list:
    """The inference inputs after :func:`check_inference_io` and a read of every scan
    (:class:`scripts.transforms.CheckNiftid`: readable, 3-D, finite), all before the first mask
    is written: a run is all or nothing.

    A scan that fails stops the run with its name and nothing is written; with
    ``continue_on_error`` the failures are listed in ``<output_dir>/failures.csv`` (image,
    error) and the other scans are segmented.
    """
    from scripts.transforms import CheckNiftid

    check_inference_io(data, data_root_dir, output_dir, source, key)
    bad_ids = [str(d["patient_id"]) for d in data if "patient_id" in d and not PATIENT_ID.fullmatch(str(d["patient_id"]))]
    if bad_ids:
        raise ValueError(f"{source or data_root_dir}: patient_id {bad_ids[0]!r} does not match {PATIENT_ID.pattern} "
                         f"(letters, digits, _ and - only)" + (f"; {len(bad_ids) - 1} more" if len(bad_ids) > 1 else ""))
    check = CheckNiftid(keys=key)
    good, failures = [], []
    for item in data:
        try:
            check(item)
            good.append(item)
        except (ValueError, FileNotFoundError) as e:
            failures.append([str(item[key]), str(e)])
    if failures and not as_bool(continue_on_error, "continue_on_error"):
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise ValueError(f"{failures[0][1]}{more}; no mask written. Fix or remove the scan, or pass "
                         f"--continue_on_error true to segment the others and list the failures in "
                         f"{os.path.join(output_dir, 'failures.csv')}")
    if failures:
        from scripts.handlers import write_csv_atomic

        write_csv_atomic(os.path.join(output_dir, "failures.csv"), ["image", "error"], failures)
        logger.warning("%d scan(s) could not be read and are skipped (listed in %s): %s", len(failures),
                       os.path.join(output_dir, "failures.csv"), "; ".join(f[0] for f in failures))
        if not good:
            raise ValueError(f"none of the {len(failures)} input scan(s) could be read; see "
                             f"{os.path.join(output_dir, 'failures.csv')}")
    return good


def resume_checkpoint(ckpt_dir: str, resume=True, pattern: str = "checkpoint_epoch=") -> str | None:
    """The checkpoint a run resumes from (the ``resume_from`` id of both bundles): None when
    ``resume`` is false; else the newest ``checkpoint_epoch=<n>.pt`` in ckpt_dir (by n), and
    resuming with none there is an error naming the folder, never a silent fresh start."""
    if not as_bool(resume, "resume"):
        return None
    found = []
    if os.path.isdir(ckpt_dir):
        for name in os.listdir(ckpt_dir):
            if name.startswith(pattern) and name.endswith(".pt"):
                try:
                    found.append((int(name[len(pattern):-3]), name))
                except ValueError:
                    continue
    if not found:
        raise FileNotFoundError(f"resume requested but no {pattern}<n>.pt checkpoint in {ckpt_dir}: train once "
                                f"without --resume, or point --ckpt_dir at the folder holding it")
    return newest_readable([os.path.join(ckpt_dir, name) for _, name in sorted(found, reverse=True)])


def newest_readable(paths: Sequence[str]) -> str:
    """The first of ``paths`` (newest first) that ``torch.load(weights_only=True)`` reads whole.

    A checkpoint cut short (a copy or a save interrupted by a crash, a full disk) is skipped with
    a warning naming it, so a resumed run continues from the latest good state instead of
    failing on, or loading, a corrupt one; when none reads, the error names every file.
    """
    import torch

    problems = []
    for path in paths:
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            problems.append(f"{path} ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})")
            logger.warning("skipping unreadable checkpoint %s", problems[-1])
            continue
        logger.info("resuming from %s", path)
        return path
    raise ValueError("resume requested but no checkpoint can be read: " + "; ".join(problems))
