"""mRECIST measurement speed.

1. Longest axial diameter of a lesion: convex hull of the voxel corners (what analysis.mrecist
   does) against the brute-force maximum over all corner pairs, on a sphere at 0.8 x 0.8 x 5 mm
   (both give the same mm; the record checks it).
2. mRECIST from masks per patient (3 scans: load, reorient, components, viable part, matching) on
   a synthetic cohort, against reading the same 6 NIfTI files only (the I/O floor).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.spatial.distance import pdist


def _sphere(diameter_mm: float, spacing=(0.8, 0.8, 5.0)) -> tuple[np.ndarray, np.ndarray]:
    half = np.ceil(diameter_mm / 2 / np.array(spacing)).astype(int) + 1
    grid = np.meshgrid(*[np.arange(-h, h + 1) * s for h, s in zip(half, spacing)], indexing="ij")
    region = sum(g**2 for g in grid) <= (diameter_mm / 2) ** 2
    return region, np.diag([*spacing, 1.0])


def _brute_force_mm(region: np.ndarray, affine: np.ndarray) -> float:
    offsets = np.array([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]])
    best = 0.0
    for k in np.flatnonzero(region.any(axis=(0, 1))):
        ij = np.argwhere(region[:, :, k]).astype(float)
        corners = (ij[:, None, :] + offsets[None]).reshape(-1, 2)
        pts = np.column_stack([corners, np.full(len(corners), float(k))]) @ affine[:3, :3].T
        best = max(best, float(pdist(pts).max()))
    return best


def _timed(fn, repeat: int) -> tuple[float, object]:
    out, best = None, float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def run(quick: bool = False) -> list[dict]:
    from analysis.mrecist import load_canonical, longest_axial_diameter_mm, mrecist_from_masks
    from analysis.synthetic import make_cohort

    diameter = 30.0 if quick else 50.0
    region, affine = _sphere(diameter)
    t_hull, mm_hull = _timed(lambda: longest_axial_diameter_mm(region, affine), 3)
    t_brute, mm_brute = _timed(lambda: _brute_force_mm(region, affine), 1)
    records = [{
        "name": "longest axial diameter, one lesion", "unit": "s", "value": round(t_hull, 4),
        "baseline_name": "brute force over all voxel-corner pairs", "baseline_value": round(t_brute, 4),
        "ratio": round(t_brute / t_hull, 1),
        "settings": {"sphere_mm": diameter, "spacing_mm": [0.8, 0.8, 5.0], "voxels": int(region.sum()),
                     "hull_mm": round(mm_hull, 4), "brute_mm": round(mm_brute, 4)},
    }]
    n, shape = (2, 96) if quick else (6, 128)
    with tempfile.TemporaryDirectory(prefix="bench_mrecist_") as tmp:
        cohort = make_cohort(Path(tmp) / "cohort", n_patients=n, shape=shape, seed=0, progress=False)
        files = sorted((cohort / "images").rglob("*.nii.gz")) + sorted((cohort / "labels").rglob("*.nii.gz"))
        t_io, _ = _timed(lambda: [load_canonical(f) for f in files], 1)
        t_all, table = _timed(lambda: mrecist_from_masks(cohort), 1)
    records.append({
        "name": "mRECIST from masks, per patient (3 scans)", "unit": "s", "value": round(t_all / n, 3),
        "baseline_name": "reading and reorienting the same NIfTI files", "baseline_value": round(t_io / n, 3),
        "ratio": round(t_io / t_all, 2),
        "settings": {"patients": n, "shape": shape,
                     "best_response": table["best_response"].value_counts().to_dict()},
    })
    return records


if __name__ == "__main__":
    import json

    print(json.dumps(run(quick=True), indent=2))
