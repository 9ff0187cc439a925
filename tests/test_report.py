"""HTML report on a fake study folder built here (a few PNGs, CSVs and JSONs)."""

from __future__ import annotations

import base64
import json
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import pytest

from analysis.io import save_figure, write_csv, write_json
from analysis.report import PARTS, build_report, headline_table, report_cli


def _figure(path, data):
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot(data.iloc[:, 0], data.iloc[:, 1])
    save_figure(path, fig, data=data, dpi=30)


@pytest.fixture()
def study(tmp_path):
    s = tmp_path / "study"
    write_json(s / "manifest.json", {"version": 1, "synthetic": True, "profile": "demo",
                                     "stages": {"km": {"status": "done", "seconds": 1.5},
                                                "prognosis": {"status": "failed", "message": "out of memory"}}})
    write_json(s / "prognosis" / "evaluation" / "metrics.json",
               {"auc_per_class": {"0": 0.81, "1": 0.62, "2": None, "3": 0.7}, "macro_auc": 0.71,
                "macro_auc_ci": [0.6, 0.8], "accuracy": 0.5, "n": 12})
    _figure(s / "prognosis" / "evaluation" / "roc.png", pd.DataFrame({"fpr": [0, 1], "tpr": [0, 1]}))
    _figure(s / "km" / "figures" / "km_grid.png", pd.DataFrame({"time": [0, 10], "survival": [1, 0.5]}))
    write_csv(s / "km" / "tables" / "logrank.csv", pd.DataFrame([
        {"method": m, "subgroup": g, "n": 6, "n_groups": 2, "test_statistic": 3.0, "p_value": p, "skipped_reason": r}
        for m, g, p, r in [("mRECIST", "all", 0.0123, ""), ("mRECIST", "TACE", None, "no events"),
                           ("ProgSwin-UNETR", "all", 0.0004, ""), ("ProgSwin-UNETR", "TACE+MWA", 0.2, ""),
                           ("radiomics model", "TACE", 0.04567, "")]]))
    write_csv(s / "cox" / "tables" / "cox_summary.csv", pd.DataFrame(
        {"covariate": ["dl_class[0]", "dl_class[1]", "dl_class[2]", "dl_class[3]", "age"],
         "coef": [0.9, 0.4, -0.5, -0.8, 0.01], "se": 0.1, "hr": 1.0, "hr_lower_95": 0.9, "hr_upper_95": 1.1,
         "p": [0.01, 0.2, 0.3, 0.04, 0.9]}))
    write_json(s / "cox" / "summary.json", {"concordance": 0.777, "cv_concordance": 0.7, "n": 12, "events": 8,
                                             "converged": True, "ph_violations": []})
    write_csv(s / "table1" / "table1.csv", pd.DataFrame(
        {"characteristic": ["patients, n"] + ["Sex, n (%)"] * 3, "level": ["", "", "Female", "Male"],
         "overall": ["6", "", "2 (33.3)", "4 (66.7)"], "TACE": ["3", "", "1 (33.3)", "2 (66.7)"],
         "TACE+MWA": ["3", "", "1 (33.3)", "2 (66.7)"], "p_value": [None, 0.999, None, None]}))
    (s / "classify").mkdir()
    (s / "classify" / "summary.json").write_text("{not json")  # damaged: reported, not fatal
    return s


def test_report_parts_images_and_label(study):
    out = build_report(study, study / "out" / "report.html")
    page = out.read_text()
    present = {"prognosis", "km", "cox", "table1", "classify"}
    titles = dict(PARTS)
    for name in present:
        assert f'<h2 id="{name}">{titles[name]}</h2>' in page.replace("&amp;", "&")
    missing_section = page.split("Parts missing from this study")[1].split("<h2")[0]
    for name, title in PARTS:
        assert (f"{title} ({name}/)" in missing_section.replace("&amp;", "&")) == (name not in present)

    srcs = re.findall(r'src="([^"]*)"', page)
    assert len(srcs) == 2 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "http" not in "".join(srcs) and "<link" not in page and "<script" not in page
    embedded = {base64.b64decode(s.split(",", 1)[1]) for s in srcs}
    assert embedded == {(study / "prognosis" / "evaluation" / "roc.png").read_bytes(),
                        (study / "km" / "figures" / "km_grid.png").read_bytes()}

    assert 'class="synthetic">SYNTHETIC COHORT' in page and "<title>HCC after TACE: study report (SYNTHETIC)" in page
    assert "<td>Sex, n (%)</td><td></td><td></td><td></td><td></td><td>0.999</td>" in page
    assert "<tr><td></td><td>Female</td><td>2 (33.3)</td>" in page and "<td>0.999</td>" in page  # Table 1 rendered
    assert "summary.json: unreadable JSON" in page
    assert "<td>prognosis</td><td>failed</td><td></td><td>out of memory</td>" in page
    assert not [p for p in out.parent.iterdir() if p.name != "report.html"]  # atomic: no temp file left


def test_headline_numbers_beside_paper(study):
    table, problems = headline_table(study)
    got = dict(zip(table.metric, table.this_run))
    paper = dict(zip(table.metric, table.paper))
    assert paper["ProgSwin-UNETR macro AUC"] == "0.92" and paper["Cox C-index"] == "0.81"
    assert paper["log-rank p, radiomics model, TACE+MWA"] == "0.37"
    assert got["ProgSwin-UNETR macro AUC"] == "0.71 (95% CI 0.6-0.8)"
    assert [got[f"ProgSwin-UNETR AUC class {k}"] for k in range(4)] == ["0.81", "0.62", "-", "0.7"]
    assert got["log-rank p, mRECIST, all"] == "0.012"
    assert got["log-rank p, mRECIST, TACE"] == "skipped: no events"
    assert got["log-rank p, ProgSwin-UNETR, all"] == "<0.001"
    assert got["log-rank p, radiomics model, TACE"] == "0.046"
    assert got["log-rank p, radiomics model, all"] == "-"
    assert [got[f"Cox log(HR), class {k}"] for k in range(4)] == ["0.9", "0.4", "-0.5", "-0.8"]
    assert got["Cox C-index"] == "0.777 (cross-validated 0.7)"
    assert got["segmentation Dice"] == "-" and got["best radiomics macro AUC"] == "-"
    assert problems == [("summary.json: unreadable JSON (Expecting property name enclosed in double quotes: "
                         "line 1 column 2 (char 1))")]


def test_segmentation_dice_is_eq2_from_the_bundle_summary(tmp_path):
    eval_dir = tmp_path / "segmentation" / "eval"
    eval_dir.mkdir(parents=True)
    # MONAI's MetricsSaver writes metrics.csv without a header beside the summary: not read
    (eval_dir / "metrics.csv").write_text("val_dice_liver,0.1\nval_dice_eq2,0.2\n")
    (eval_dir / "metrics_summary.csv").write_text(
        "n_cases,dice_eq2,dice_liver,dice_tumour,dice_whole_liver\n15,0.876331,0.724045,0.892601,0.931916\n")
    table, problems = headline_table(tmp_path)
    got = dict(zip(table.metric, table.this_run))
    assert got["segmentation Dice"] == "0.876" and problems == []

    (eval_dir / "metrics_summary.csv").write_text("n_cases,dice_liver\n15,0.7\n")
    table, problems = headline_table(tmp_path)
    assert dict(zip(table.metric, table.this_run))["segmentation Dice"] == "-"
    assert problems == ["segmentation/eval/metrics_summary.csv: no dice_eq2 value (columns: n_cases, dice_liver)"]


def test_synthetic_label_sources(tmp_path):
    plain = tmp_path / "plain"
    write_json(plain / "manifest.json", ["not", "an", "object"])
    page = build_report(plain).read_text()
    assert "manifest.json: expected a JSON object, found list" in page
    assert "SYNTHETIC" not in page
    assert all(f"{t} ({n}/)" in page.replace("&amp;", "&") for n, t in PARTS)  # everything missing, listed
    write_json(plain / "cohort" / "cohort.json", {"synthetic": True})
    assert 'class="synthetic"' in build_report(plain).read_text()


def test_cli_missing_study(tmp_path):
    with pytest.raises(SystemExit, match=r"study folder .*nowhere not found"):
        report_cli(str(tmp_path / "nowhere"))
    write_json(tmp_path / "s" / "manifest.json", json.loads('{"synthetic": false}'))
    assert report_cli(str(tmp_path / "s"), out=str(tmp_path / "r.html")) == str(tmp_path / "r.html")
