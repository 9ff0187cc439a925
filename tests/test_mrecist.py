"""mRECIST on hand-built masks whose diameters are exact by construction.

In-plane spacing 0.8 mm, slices 5 mm. A tumour is a box of ``ni x nj`` voxels in plane; its longest
axial diameter is the diagonal edge to edge: ``sqrt((0.8 ni)^2 + (0.8 nj)^2)``. With the 3-4-5
triangle, ``(3a, 4a)`` voxels measure exactly ``4a`` mm: 6x8 -> 8 mm, 9x12 -> 12 mm, 12x16 -> 16 mm,
15x20 -> 20 mm, 18x24 -> 24 mm. Liver is 100, viable tumour 200, necrotic tumour 50.
"""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from analysis.io import save_nifti
from analysis.mrecist import (
    classify_diameters,
    classify_response,
    longest_axial_diameter_mm,
    mrecist_cli,
    mrecist_from_masks,
)

SPACING = (0.8, 0.8, 5.0)
SHAPE = (64, 64, 6)
LIVER, VIABLE, NECROTIC = 100.0, 200.0, 50.0
SIDE = {8: (6, 8), 12: (9, 12), 16: (12, 16), 20: (15, 20), 24: (18, 24)}


def box(i0, j0, mm, value=VIABLE, k0=2, nk=2):
    """A tumour box at (i0, j0) whose longest axial diameter is ``mm``."""
    ni, nj = SIDE[mm]
    return (slice(i0, i0 + ni), slice(j0, j0 + nj), slice(k0, k0 + nk)), value


def build(boxes, pad_i=0):
    """(image, mask, affine) in RAS; ``pad_i`` voxels prepended along i shift the grid, not the world."""
    image = np.full(SHAPE, LIVER, dtype=np.float32)
    mask = np.ones(SHAPE, dtype=np.uint8)
    for sl, value in boxes:
        image[sl] = value
        mask[sl] = 2
    affine = np.diag([*SPACING, 1.0])
    if pad_i:
        image = np.concatenate([np.full((pad_i, *SHAPE[1:]), LIVER, np.float32), image])
        mask = np.concatenate([np.ones((pad_i, *SHAPE[1:]), np.uint8), mask])
        affine[0, 3] = -pad_i * SPACING[0]
    return image, mask, affine


def write(cohort, pid, tp, scan, axcodes=("R", "A", "S")):
    image, mask, affine = scan
    img = nib.Nifti1Image(image, affine)
    seg = nib.Nifti1Image(mask, affine)
    if axcodes != ("R", "A", "S"):
        tr = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("R", "A", "S")),
                                             nib.orientations.axcodes2ornt(axcodes))
        img, seg = img.as_reoriented(tr), seg.as_reoriented(tr)
        assert nib.aff2axcodes(img.affine) == axcodes
    save_nifti(cohort / "images" / pid / f"{tp}.nii.gz", np.asarray(img.dataobj), img.affine)
    save_nifti(cohort / "labels" / pid / f"{tp}.nii.gz", np.asarray(seg.dataobj), seg.affine, dtype=np.uint8)


def test_diameter_exact_and_anisotropic():
    region = np.zeros((40, 40, 3), bool)
    region[5:20, 5:25, 1] = True  # 15 x 20 voxels at 0.8 mm: 12 x 16 mm -> 20 mm
    assert longest_axial_diameter_mm(region, np.diag([0.8, 0.8, 5.0, 1])) == pytest.approx(20.0, abs=1e-9)
    # spacing 0.5 x 2.0: 7.5 x 40 mm -> sqrt(7.5^2 + 40^2)
    assert longest_axial_diameter_mm(region, np.diag([0.5, 2.0, 5.0, 1])) == pytest.approx(math.hypot(7.5, 40))
    # slices are 5 mm apart but the diameter is axial: a tall thin column stays 0.8 * sqrt(2) wide
    column = np.zeros((5, 5, 20), bool)
    column[2, 2, :] = True
    assert longest_axial_diameter_mm(column, np.diag([0.8, 0.8, 5.0, 1])) == pytest.approx(0.8 * math.sqrt(2))
    assert longest_axial_diameter_mm(np.zeros((3, 3, 3), bool), np.eye(4)) == 0.0


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("mrecist_cohort")
    small_far = box(40, 40, 8)  # 8 mm: never a target
    pats = {
        # two targets 20 + 20 = 40; a 16 mm third lesion (not among the two largest) and an 8 mm one;
        # t1: second target 20 -> 8 mm: sum 28 = exactly -30 % -> PR; t2 unchanged -> PR
        "PR30": [[box(2, 2, 20), box(20, 2, 20), box(40, 2, 16), small_far],
                 [box(2, 2, 20), box(20, 2, 8), box(40, 2, 16), small_far],
                 [box(2, 2, 20), box(20, 2, 8), box(40, 2, 16), small_far]],
        # 24 -> 20 (-16.7 %: SD, nadir 20) -> 24 (+20 % from the nadir, 0 % from baseline): PD
        "PD20": [[box(10, 10, 24)], [box(10, 10, 20)], [box(10, 10, 24)]],
        # t1: the lesion is still there but fully necrotic -> CR; t2: gone -> CR
        "CR": [[box(10, 10, 20)], [box(10, 10, 20, NECROTIC)], []],
        # t1: a new enhancing 12 mm lesion -> PD; t2: a new 8 mm lesion only -> SD
        "NEW": [[box(2, 2, 20)], [box(2, 2, 20), box(40, 40, 12)], [box(2, 2, 20), box(40, 40, 8)]],
        # only an 8 mm lesion, and a 20 mm lesion that does not enhance -> not measurable
        "NONMEAS": [[box(2, 2, 8), box(20, 20, 20, NECROTIC)], [box(2, 2, 8)], [box(2, 2, 8)]],
    }
    for pid, scans in pats.items():
        for tp, boxes in zip(("t0", "t1", "t2"), scans):
            write(root, pid, tp, build(boxes))
    # partly necrotic target: 20 mm lesion whose viable part is a 12 x 16 voxel (16 mm) corner;
    # t1 the viable part shrinks to 9 x 12 voxels (12 mm): -25 % -> SD
    for tp, viable_mm in (("t0", 16), ("t1", 12), ("t2", 12)):
        image, mask, aff = build([box(10, 10, 20, NECROTIC)])
        (si, sj, sk), _ = box(10, 10, viable_mm)
        image[si, sj, sk] = VIABLE
        write(root, "NECRO", tp, (image, mask, aff))
    # the PR30 case again, t0 stored LPS, t1 stored as S-L-P with a shifted grid, t2 RAS padded
    scans = pats["PR30"]
    write(root, "LPS", "t0", build(scans[0]), ("L", "P", "S"))
    write(root, "LPS", "t1", build(scans[1], pad_i=5), ("S", "L", "P"))
    write(root, "LPS", "t2", build(scans[2], pad_i=3))
    pd.DataFrame({"patient_id": [*pats, "NECRO", "LPS", "MISSING"]}).to_csv(root / "clinical.csv", index=False)
    return root


@pytest.fixture(scope="module")
def table(cohort):
    return mrecist_from_masks(cohort).set_index("patient_id")


def test_pr_at_exactly_30_percent(table):
    r = table.loc["PR30"]
    assert r.n_lesions_t0 == 4 and r.n_targets == 2
    assert r.target1_longest_mm_t0 == pytest.approx(20) and r.target2_longest_mm_t0 == pytest.approx(20)
    assert (r.sum_mm_t0, r.sum_mm_t1, r.sum_mm_t2) == pytest.approx((40, 28, 28))
    assert (r.response_t1, r.response_t2, r.best_response) == ("PR", "PR", "PR")


def test_orientation_and_grid_do_not_change_anything(table):
    for col in ("sum_mm_t0", "sum_mm_t1", "sum_mm_t2", "target2_viable_mm_t1"):
        assert table.loc["LPS", col] == pytest.approx(table.loc["PR30", col], abs=1e-9)
    assert table.loc["LPS", "response_t1"] == "PR"
    assert table.loc["LPS", "new_lesion_t1"] == 0  # world-space matching despite a shifted grid


def test_pd_at_exactly_20_percent_from_nadir(table):
    r = table.loc["PD20"]
    assert (r.sum_mm_t0, r.sum_mm_t1, r.sum_mm_t2) == pytest.approx((24, 20, 24))
    assert (r.response_t1, r.response_t2) == ("SD", "PD")
    assert r.best_response == "SD"


def test_cr_no_viable_enhancement(table):
    r = table.loc["CR"]
    assert r.sum_mm_t0 == pytest.approx(20)
    assert (r.sum_mm_t1, r.sum_mm_t2) == (0, 0)
    assert (r.response_t1, r.response_t2, r.best_response) == ("CR", "CR", "CR")


def test_pd_by_new_lesion_only_from_10_mm(table):
    r = table.loc["NEW"]
    assert r.new_lesion_mm_t1 == pytest.approx(12) and r.new_lesion_t1 == 1
    assert r.new_lesion_mm_t2 == pytest.approx(8) and r.new_lesion_t2 == 0
    assert (r.sum_mm_t1, r.sum_mm_t2) == pytest.approx((20, 20))
    assert (r.response_t1, r.response_t2, r.best_response) == ("PD", "SD", "PD")


def test_non_measurable_baseline_is_na_with_reason(table):
    r = table.loc["NONMEAS"]
    assert (r.response_t1, r.response_t2, r.best_response) == ("NA", "NA", "NA")
    assert "no enhancing lesion with longest axial diameter >= 10 mm (2 lesion(s) found)" in r.reason


def test_viable_versus_necrotic(table):
    r = table.loc["NECRO"]
    assert r.target1_longest_mm_t0 == pytest.approx(20)
    assert (r.target1_viable_mm_t0, r.target1_viable_mm_t1) == pytest.approx((16, 12))
    assert r.response_t1 == "SD"  # (12 - 16) / 16 = -25 %


def test_missing_patient_is_listed_not_dropped(table):
    assert table.loc["MISSING", "best_response"] == "NA"
    assert table.loc["MISSING", "reason"] == "baseline not measurable: no mask for t0"


def test_classify_response_branches():
    assert classify_response(40, 40, 28) == "PR"
    assert classify_response(40, 40, 28.01) == "SD"
    assert classify_response(40, 20, 24) == "PD"
    assert classify_response(40, 20, 23.99) == "PR"  # +19.95 % over the nadir, -40 % from baseline
    assert classify_response(30, 25, 29.99) == "SD"  # +19.96 % over the nadir
    assert classify_response(40, 40, 0) == "CR"
    assert classify_response(40, 40, 0, new_lesion=True) == "PD"
    assert classify_response(40, 0, 5) == "PD"  # reappearance after CR


def test_classify_diameters_csv_and_errors(tmp_path):
    df = pd.DataFrame({"patient_id": ["a", "b", "c", "d"], "sum_mm_t0": [50, 50, 0, 50],
                       "sum_mm_t1": [35, 60, None, None], "sum_mm_t2": [20, 50, None, 35],
                       "new_lesion_t2": [0, 0, 0, 1]})
    out = classify_diameters(df).set_index("patient_id")
    assert out.loc["a", ["response_t1", "response_t2", "best_response"]].tolist() == ["PR", "PR", "PR"]
    # 60 is +20 % over baseline (= nadir): PD at t1, so the later SD does not count
    assert out.loc["b", ["response_t1", "response_t2", "best_response"]].tolist() == ["PD", "SD", "PD"]
    assert out.loc["c", "best_response"] == "NA" and "sum_mm_t0" in out.loc["c", "reason"]
    assert out.loc["d", ["response_t1", "response_t2", "best_response"]].tolist() == ["NA", "PD", "PD"]

    with pytest.raises(ValueError, match=r"row 2 \(patient_id b\): column sum_mm_t1 = 'big'"):
        classify_diameters(pd.DataFrame({"patient_id": ["a", "b"], "sum_mm_t0": [1, 2], "sum_mm_t1": ["1", "big"]}))
    with pytest.raises(ValueError, match=r"row 1 \(patient_id a\): column sum_mm_t0 = '-3.0'; expected a diameter"):
        classify_diameters(pd.DataFrame({"patient_id": ["a"], "sum_mm_t0": [-3.0]}))
    with pytest.raises(ValueError, match="lacks column 'sum_mm_t0'"):
        classify_diameters(pd.DataFrame({"patient_id": ["a"]}))
    with pytest.raises(ValueError, match=r"column new_lesion_t1 = '2'; expected 0 or 1"):
        classify_diameters(pd.DataFrame({"patient_id": ["a"], "sum_mm_t0": [1], "new_lesion_t1": [2]}))

    src = tmp_path / "diam.csv"
    df.to_csv(src, index=False)
    msg = mrecist_cli(diameters=str(src), out=str(tmp_path / "m" / "mrecist.csv"))
    assert msg.endswith("CR 0, PR 1, SD 0, PD 2, NA 1")
    written = pd.read_csv(tmp_path / "m" / "mrecist.csv")
    assert written["best_response"].fillna("NA").tolist() == ["PR", "PD", "NA", "PD"]
    assert (tmp_path / "m" / "figures" / "waterfall.png").stat().st_size > 0
    assert pd.read_csv(tmp_path / "m" / "tables" / "waterfall.csv")["best_change_pct"].round(6).tolist() == [0.0, -30.0, -60.0]


def test_bad_mask_values_named(tmp_path):
    image, mask, aff = build([box(2, 2, 20)])
    mask[0, 0, 0] = 7
    write(tmp_path, "P1", "t0", (image, mask, aff))
    with pytest.raises(ValueError, match=r"P1/t0.nii.gz: mask values \[1, 2, 7\] found"):
        mrecist_from_masks(tmp_path)


def test_enhancement_reference_fallbacks(tmp_path):
    from analysis.mrecist import find_lesions

    affine = np.diag([*SPACING, 1.0])
    # no liver at all: enhancement cannot be judged, the whole lesion counts as viable (and says so)
    image, mask, _ = build([box(10, 10, 20, NECROTIC)])
    mask[mask == 1] = 0
    (lesion,), _ = find_lesions(mask, affine, image)
    assert lesion.viable_mm == pytest.approx(20) and "whole lesion counted as viable" in lesion.notes[0]
    # liver only far away (> 5 mm shell): whole liver is the reference; necrotic 50 < liver 100 -> 0 mm
    mask[50:, 50:, :] = 1
    (lesion,), _ = find_lesions(mask, affine, image)
    assert lesion.viable_mm == 0 and lesion.notes == ["liver shell too small: whole liver used as enhancement reference"]


def test_min_target_mm_is_the_only_size_threshold(cohort):
    from analysis.mrecist import measure_patient

    # with an 8 mm threshold the 8 mm enhancing lesion of NONMEAS becomes the target (8 -> 8 -> 8: SD)
    row = classify_diameters(pd.DataFrame([measure_patient(cohort, cohort / "labels", "NONMEAS", min_target_mm=8)]))
    assert row.loc[0, "n_targets"] == 1 and row.loc[0, "sum_mm_t0"] == pytest.approx(8)
    assert row.loc[0, "best_response"] == "SD"


def test_cli_errors_are_one_line_and_write_nothing(tmp_path):
    out = tmp_path / "m.csv"
    with pytest.raises(SystemExit, match=r"mrecist: masks folder .*labels not found"):
        mrecist_cli(cohort=str(tmp_path), out=str(out))
    with pytest.raises(SystemExit, match=r"mrecist: diameters file .*none.csv not found"):
        mrecist_cli(diameters=str(tmp_path / "none.csv"), out=str(out))
    with pytest.raises(SystemExit, match=r"give --cohort DIR \[--masks DIR\] or --diameters FILE"):
        mrecist_cli(out=str(out))
    assert not out.exists()
