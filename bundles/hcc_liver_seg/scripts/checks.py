"""Checks run before inference writes anything."""

from __future__ import annotations

import logging
import os
from typing import Mapping, Sequence

from scripts.flags import as_bool

logger = logging.getLogger("hcc_liver_seg")


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


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
    outside = [str(d[key]) for d in data if not _inside(str(d[key]), data_root_dir)]
    if outside:
        raise ValueError(f"{len(outside)} input(s) are not under data_root_dir {data_root_dir}, e.g. {outside[0]}: "
                         f"output names are derived from the path relative to it; set --data_root_dir")
    logger.info("inference: %d image(s) from %s -> %s", len(data), source or data_root_dir, output_dir)
    return len(data)


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
    path = os.path.join(ckpt_dir, max(found)[1])
    logger.info("resuming from %s", path)
    return path
