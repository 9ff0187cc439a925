"""Grad-CAM++ explanations (paper Fig. 8): heatmap NIfTIs and a PNG montage per patient."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from scripts.data import check_patient_id
from scripts.io import path_under, save_figure, save_nifti, write_csv

log = logging.getLogger(__name__)

TIMEPOINTS = ("t0", "t1", "t2")


def representative_patients(oof_csv: str) -> list[str]:
    """One patient per predicted class: the most confident prediction of that class.

    Classes nobody was predicted as are skipped (and logged), so the list has 0-4 ids.
    """
    frame = pd.read_csv(oof_csv, dtype={"patient_id": str})
    chosen = []
    for k in sorted(frame["pred_class"].unique()):
        rows = frame[frame["pred_class"] == k]
        chosen.append(str(rows.loc[rows[f"prob_{k}"].idxmax(), "patient_id"]))
    missing = sorted(set(range(4)) - {int(k) for k in frame["pred_class"].unique()})
    if missing:
        log.info("Grad-CAM++: no patient predicted as class(es) %s in %s", missing, oof_csv)
    return chosen


def select_patients(patients: Sequence[str] | str | None, oof_csv: str | None) -> list[str] | None:
    """``patients`` when given; else one per predicted class from ``oof_csv``; else None (= all)."""
    if patients:
        return [patients] if isinstance(patients, str) else [str(p) for p in patients]
    if oof_csv:
        if not os.path.isfile(oof_csv):
            raise FileNotFoundError(f"oof_csv not found: {oof_csv} (run scripts.cross_validate first)")
        return representative_patients(oof_csv)
    return None


def explain(cam, network: torch.nn.Module, dataset, output_dir: str, device, ckpt_dir: str,
            default_fold: int = 0, class_idx: int | None = None, load_path: str | None = None) -> list[dict]:
    """Run Grad-CAM++ on every item of ``dataset`` and write ``<output_dir>/<patient_id>/``.

    Each labelled patient is explained by its own fold's best model (``<ckpt_dir>/fold{k}/model.pt``,
    the model that never trained on it and produced its out-of-fold prediction); unlabelled
    patients by fold ``default_fold``'s model. With ``load_path`` (one model for everyone, e.g.
    shared weights through configs/synthetic_weights.json) every patient is explained by it.
    Outputs:

    - ``heatmap_t{0,1,2}.nii.gz``: the (D, H, W) map in [0, 1] in the model's input space
      (after crop to the mask and resize), with the affine of that time point's cropped and
      resized image, so it overlays the network input in any NIfTI viewer;
    - ``montage.png``: one row per time point, columns image and image + heatmap, on the axial
      slice where the heatmap is largest; ``montage.csv``: slice index and map statistics.

    The explained class is the predicted one unless ``class_idx`` is given.
    """
    from scripts.checkpoints import best_model_path, load_state

    network.eval()
    rows, loaded = [], None
    for item in dataset:
        pid = str(item["patient_id"])
        fold = int(item.get("fold", -1))
        fold = fold if fold >= 0 else int(default_fold)
        weights = load_path if load_path else best_model_path(ckpt_dir, fold)
        if weights != loaded:  # weights change in place: the CAM's hooks stay on the same modules
            network.load_state_dict(load_state(weights, device))
            loaded = weights
        x = item["image"].unsqueeze(0).to(device)
        with torch.no_grad():
            prob = torch.softmax(network(x), dim=1)[0].cpu()
        target = int(prob.argmax()) if class_idx is None else int(class_idx)
        heat = cam(x, class_idx=target)[0, 0].detach().cpu().float().numpy()  # (D, H, W), [0, 1]
        if heat.shape != tuple(x.shape[2:]):
            raise RuntimeError(f"patient {pid}: Grad-CAM++ map {heat.shape} != input {tuple(x.shape[2:])}")
        out = path_under(output_dir, check_patient_id(pid, "Grad-CAM++ item"))
        image = item["image"].cpu().numpy()
        for c, tp in enumerate(TIMEPOINTS):
            ref = item.get(f"image_{tp}")
            affine = ref.affine if hasattr(ref, "affine") else getattr(item["image"], "affine", np.eye(4))
            save_nifti(os.path.join(out, f"heatmap_{tp}.nii.gz"), heat, np.asarray(affine))
        # the axial slice where the heatmap inside the masked region is largest (outside the
        # mask the input is 0 and the map carries no information)
        inside = np.any(image != 0, axis=0)
        z = int(np.argmax((heat * inside).sum(axis=(0, 1))))
        _montage(image, heat, z, pid, target, prob, os.path.join(out, "montage.png"))
        rows.append({"patient_id": pid, "fold": fold, "explained_class": target, "prob": float(prob[target]), "slice_index": z,
                     "heat_mean": float(heat.mean()), "heat_max": float(heat.max())})
        log.info("Grad-CAM++: %s class %d (p=%.2f) -> %s", pid, target, float(prob[target]), out)
    if rows:
        write_csv(os.path.join(output_dir, "gradcam_summary.csv"), pd.DataFrame(rows))
    return rows


def _montage(image: np.ndarray, heat: np.ndarray, z: int, pid: str, target: int, prob, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_tp = min(len(TIMEPOINTS), image.shape[0])
    fig, axes = plt.subplots(n_tp, 2, figsize=(5, 2.5 * n_tp), squeeze=False)
    data = []
    for c in range(n_tp):
        sl = np.rot90(image[c, :, :, z])
        hm = np.rot90(heat[:, :, z])
        inside = np.rot90(np.any(image[:, :, :, z] != 0, axis=0))
        axes[c, 0].imshow(sl, cmap="gray")
        axes[c, 1].imshow(sl, cmap="gray")
        axes[c, 1].imshow(np.ma.masked_where(~inside, hm), cmap="jet", alpha=0.5, vmin=0, vmax=1)
        axes[c, 0].set_ylabel(TIMEPOINTS[c])
        for a in axes[c]:
            a.set_xticks([])
            a.set_yticks([])
        data.append({"timepoint": TIMEPOINTS[c], "slice_index": z, "image_mean": float(sl.mean()),
                     "heat_mean": float(hm.mean()), "heat_max": float(hm.max())})
    axes[0, 0].set_title("masked image")
    axes[0, 1].set_title("Grad-CAM++")
    fig.suptitle(f"{pid}: class {target} (p={float(prob[target]):.2f})")
    save_figure(path, fig, data=pd.DataFrame(data))
