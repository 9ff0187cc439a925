"""analysis.segmentation_agreement: hand-computed Dice, empty sets, bad input named, CLI outputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.io import save_nifti
from analysis.segmentation_agreement import PER_SCAN_COLUMNS, dice, dice_table, seg_dice_cli

REPO_ROOT = Path(__file__).resolve().parents[1]
SHAPE = (4, 4, 2)  # 32 voxels: every count below can be checked on paper
AFFINE = np.array([[-0.8, 0, 0, 120.0], [0, 0.8, 0, -40.0], [0, 0, 3.0, 10.0], [0, 0, 0, 1]])


def _write(folder: Path, pid: str, tp: str, volume: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    return save_nifti(folder / pid / f"{tp}.nii.gz", volume, affine, dtype=np.uint8)


def _liver_slice() -> np.ndarray:
    v = np.zeros(SHAPE, dtype=np.uint8)
    v[:, :, 0] = 1  # the whole z = 0 slice is liver: 16 voxels
    return v


@pytest.fixture
def hand(tmp_path) -> tuple[Path, Path]:
    """(masks, cohort) with five labelled scans whose Dice values are worked out below."""
    cohort, masks = tmp_path / "cohort", tmp_path / "masks"
    labels = cohort / "labels"

    # P1 t0. G: z=0 liver with a 2x2 tumour in the corner -> |G1| = 12, |G2| = 4.
    # M: tumour 2x3 (the 4 true voxels + 2 of true liver), and a 4-voxel row of liver at z=1
    # -> |M2| = 6, |M2 n G2| = 4; |M1| = (16 - 6) + 4 = 14, |M1 n G1| = 10 (z=0 liver minus the
    # 2x3 block, all true liver).
    #   dice_liver       = 2*10 / (14 + 12)             = 10/13
    #   dice_tumour      = 2*4 / (6 + 4)                 = 4/5
    #   dice_eq2         = 2*(10 + 4) / (14 + 12 + 6 + 4) = 28/36 = 7/9
    #   dice_whole_liver = 2*16 / (20 + 16)              = 8/9   (M organ 16 + 4, G organ 16)
    g = _liver_slice()
    g[0:2, 0:2, 0] = 2
    m = _liver_slice()
    m[0:2, 0:3, 0] = 2
    m[0, :, 1] = 1
    _write(labels, "P1", "t0", g)
    _write(masks, "P1", "t0", m)

    # P1 t1: the mask equals the label -> every Dice 1
    _write(labels, "P1", "t1", g)
    _write(masks, "P1", "t1", g)

    # P2 t0: no tumour anywhere; M liver = half the slice (8 voxels) of G's 16.
    #   dice_liver = 2*8 / (8 + 16) = 2/3; dice_tumour = 1 (empty vs empty);
    #   dice_eq2   = 2*(8 + 0) / (8 + 16 + 0 + 0) = 2/3; dice_whole_liver = 2/3
    m = np.zeros(SHAPE, dtype=np.uint8)
    m[0:2, :, 0] = 1
    _write(labels, "P2", "t0", _liver_slice())
    _write(masks, "P2", "t0", m)

    # P2 t1: both all background -> every Dice 1 (empty vs empty), 0 tumour voxels
    _write(labels, "P2", "t1", np.zeros(SHAPE, np.uint8))
    _write(masks, "P2", "t1", np.zeros(SHAPE, np.uint8))

    # P2 t2: G has 2 tumour voxels the mask calls liver. |M1| = 16, |G1| = 14, |M1 n G1| = 14.
    #   dice_liver = 28/30 = 14/15; dice_tumour = 0 / (0 + 2) = 0;
    #   dice_eq2   = 2*(14 + 0) / (16 + 14 + 0 + 2) = 28/32 = 7/8; dice_whole_liver = 1
    g = _liver_slice()
    g[3, 2:4, 0] = 2
    _write(labels, "P2", "t2", g)
    _write(masks, "P2", "t2", _liver_slice())

    # a mask without a manual label (inference covers every scan) is not scored
    _write(masks, "P3", "t0", _liver_slice())
    return masks, cohort


EXPECTED = {  # (patient, timepoint): (liver, tumour, eq2, whole liver, n pred tumour, n true tumour)
    ("P1", "t0"): (10 / 13, 4 / 5, 7 / 9, 8 / 9, 6, 4),
    ("P1", "t1"): (1.0, 1.0, 1.0, 1.0, 4, 4),
    ("P2", "t0"): (2 / 3, 1.0, 2 / 3, 2 / 3, 0, 0),
    ("P2", "t1"): (1.0, 1.0, 1.0, 1.0, 0, 0),
    ("P2", "t2"): (14 / 15, 0.0, 7 / 8, 1.0, 0, 2),
}


def test_dice_table_hand_computed(hand):
    masks, cohort = hand
    table = dice_table(masks, cohort / "labels")
    assert list(table.columns) == PER_SCAN_COLUMNS
    assert list(zip(table["patient_id"], table["timepoint"])) == list(EXPECTED)  # P3 (no label) absent
    for row in table.itertuples(index=False):
        got = (row.dice_liver, row.dice_tumour, row.dice_eq2, row.dice_whole_liver,
               row.n_voxels_pred_tumour, row.n_voxels_true_tumour)
        # exact: 2 * int / int is the correctly rounded quotient, as is the fraction written above
        assert got == EXPECTED[(row.patient_id, row.timepoint)], (row.patient_id, row.timepoint)


def test_empty_vs_empty_is_one():
    empty = np.zeros(SHAPE, dtype=bool)
    one = empty.copy()
    one[0, 0, 0] = True
    assert dice(empty, empty) == 1.0
    assert dice(one, empty) == 0.0
    assert dice(one, one) == 1.0


def test_nii_without_gz_is_read(hand):
    masks, cohort = hand
    (masks / "P1" / "t1.nii.gz").unlink()
    save_nifti(masks / "P1" / "t1.nii", _liver_slice(), AFFINE, dtype=np.uint8)
    row = dice_table(masks, cohort / "labels").set_index(["patient_id", "timepoint"]).loc[("P1", "t1")]
    # G: 12 liver + 4 tumour; M: 16 liver -> liver 2*12/28, tumour 0, eq2 2*12/32, whole 1
    assert (row["dice_liver"], row["dice_tumour"], row["dice_eq2"], row["dice_whole_liver"]) == \
        (6 / 7, 0.0, 3 / 4, 1.0)


# ------------------------------------------------------------------------------ bad input
def test_shape_mismatch_names_both_files_and_shapes(hand):
    masks, cohort = hand
    mask = _write(masks, "P2", "t1", np.zeros((4, 4, 3), np.uint8))
    label = cohort / "labels" / "P2" / "t1.nii.gz"
    with pytest.raises(ValueError, match="shape") as err:
        dice_table(masks, cohort / "labels")
    text = str(err.value)
    assert str(mask) in text and str(label) in text
    assert "(4, 4, 3)" in text and "(4, 4, 2)" in text


def test_affine_mismatch_names_both_files_and_affines(hand):
    masks, cohort = hand
    within = AFFINE.copy()
    within[0, 3] += 5e-4  # below the 1e-3 mm tolerance: a scanner's rounding, accepted
    _write(masks, "P2", "t1", np.zeros(SHAPE, np.uint8), within)
    assert len(dice_table(masks, cohort / "labels")) == len(EXPECTED)
    shifted = AFFINE.copy()
    shifted[0, 3] += 0.5  # a mask saved on another grid
    mask = _write(masks, "P2", "t1", np.zeros(SHAPE, np.uint8), shifted)
    label = cohort / "labels" / "P2" / "t1.nii.gz"
    with pytest.raises(ValueError, match="affine") as err:
        dice_table(masks, cohort / "labels")
    text = str(err.value)
    assert str(mask) in text and str(label) in text
    assert "120.5" in text and "120.0" in text  # both origins shown


def test_missing_masks_all_named_in_one_message(hand):
    masks, cohort = hand
    gone = [masks / "P1" / "t1.nii.gz", masks / "P2" / "t2.nii.gz"]
    for p in gone:
        p.unlink()
    with pytest.raises(FileNotFoundError) as err:
        dice_table(masks, cohort / "labels")
    text = str(err.value)
    assert "2 labelled scan(s)" in text
    assert all(str(p) in text for p in gone)


@pytest.mark.parametrize("which", ["label", "mask"])
def test_label_value_3_names_the_file(hand, which):
    masks, cohort = hand
    bad = _liver_slice()
    bad[1, 1, 1] = 3
    folder = cohort / "labels" if which == "label" else masks
    path = _write(folder, "P2", "t0", bad)
    with pytest.raises(ValueError, match="values") as err:
        dice_table(masks, cohort / "labels")
    assert str(path) in str(err.value) and "[3]" in str(err.value)


def test_truncated_file_names_the_file(hand):
    masks, cohort = hand
    path = masks / "P1" / "t0.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read") as err:
        dice_table(masks, cohort / "labels")
    assert str(path) in str(err.value)


def test_missing_or_empty_folders_named(hand, tmp_path):
    masks, cohort = hand
    with pytest.raises(FileNotFoundError, match=f"masks folder {tmp_path / 'nowhere'} not found"):
        dice_table(tmp_path / "nowhere", cohort / "labels")
    empty = tmp_path / "empty_labels"
    (empty / "P1").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=f"labels folder {empty} holds no"):
        dice_table(masks, empty)


# ------------------------------------------------------------------------------------- CLI
def test_cli_writes_per_scan_and_summary(hand, tmp_path):
    masks, cohort = hand
    out = tmp_path / "out"
    line = seg_dice_cli(str(masks), str(cohort), str(out))  # a cohort folder: its labels/ is used
    eq2 = [e[2] for e in EXPECTED.values()]
    # mean Eq. 2 = (7/9 + 1 + 2/3 + 1 + 7/8) / 5 = 0.8639; the worst scan is P2 t0 at 2/3
    assert line == "seg-dice: 5 scans, Eq. 2 Dice 0.864 (min 0.67 P2 t0)"
    per_scan = pd.read_csv(out / "per_scan.csv")
    assert list(per_scan.columns) == PER_SCAN_COLUMNS and len(per_scan) == 5
    assert per_scan["dice_eq2"].tolist() == pytest.approx(eq2, abs=1e-12)
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 1
    s = summary.iloc[0]
    assert s["n_scans"] == 5
    for i, col in enumerate(["dice_liver", "dice_tumour", "dice_eq2", "dice_whole_liver"]):
        assert s[f"{col}_mean"] == pytest.approx(np.mean([e[i] for e in EXPECTED.values()]), abs=1e-12)
    assert s["dice_eq2_min"] == pytest.approx(2 / 3, abs=1e-12)
    assert (s["dice_eq2_min_patient_id"], s["dice_eq2_min_timepoint"]) == ("P2", "t0")
    # a labels folder given directly scores the same scans
    out2 = tmp_path / "out2"
    assert seg_dice_cli(str(masks), str(cohort / "labels"), str(out2)) == line
    pd.testing.assert_frame_equal(pd.read_csv(out2 / "per_scan.csv"), per_scan)


def test_cli_bad_input_one_line_names_file_writes_nothing(hand, tmp_path):
    masks, cohort = hand
    gone = masks / "P2" / "t0.nii.gz"
    gone.unlink()
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as err:
        seg_dice_cli(str(masks), str(cohort), str(out))
    text = str(err.value.code)
    assert text.startswith("seg-dice: ") and "\n" not in text and str(gone) in text
    assert not out.exists()


def test_help_lists_every_flag_with_its_description():
    run = subprocess.run([sys.executable, "-m", "analysis", "seg-dice", "--help"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=120, env={**os.environ, "PAGER": "cat"})
    assert run.returncode == 0, run.stderr
    text = run.stdout + run.stderr  # fire writes help to stderr when it is not a terminal
    # required arguments are listed by name (fire: "MASKS"), usable as --masks too (NOTES)
    for name, words in (("MASKS", "folder of automatic masks"), ("LABELS", "a cohort folder"),
                        ("OUT", "output folder for per_scan.csv")):
        assert name in text and words in text, name
    assert "flags syntax" in text
    listing = subprocess.run([sys.executable, "-m", "analysis"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=60)
    assert "seg-dice" in listing.stdout and "per scan (Eq. 2)" in listing.stdout


def test_cli_flags_end_to_end(hand, tmp_path):
    masks, cohort = hand
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "analysis", "seg-dice", "--masks", str(masks),
                          "--labels", str(cohort), "--out", str(out)], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=120, env={**os.environ, "PAGER": "cat"})
    assert run.returncode == 0, run.stderr
    assert "seg-dice: 5 scans, Eq. 2 Dice 0.864 (min 0.67 P2 t0)" in run.stdout
    assert (out / "per_scan.csv").is_file() and (out / "summary.csv").is_file()


@pytest.mark.parametrize("axis, spacing, expected_mm", [(0, (2.0, 2.0, 5.0), 2.0), (2, (2.0, 2.0, 5.0), 5.0),
                                                         (1, (0.8, 0.8, 3.0), 0.8)])
def test_hd95_of_a_cube_shifted_by_one_voxel_is_one_spacing(axis, spacing, expected_mm):
    """A 10^3 cube against itself shifted by one voxel: more than 5% of surface points (the two
    faces across the shift) are one voxel apart, the rest 0, so HD95 is that axis's spacing."""
    from analysis.segmentation_agreement import hd95_mm

    true = np.zeros((24, 24, 24), bool)
    true[7:17, 7:17, 7:17] = True
    pred = np.roll(true, 1, axis=axis)
    assert hd95_mm(pred, true, spacing) == pytest.approx(expected_mm, abs=1e-6)
    assert hd95_mm(true, true, spacing) == 0.0
    assert np.isnan(hd95_mm(np.zeros_like(true), true, spacing))
