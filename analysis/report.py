"""One self-contained HTML page of a study output folder (docs/contracts.md, "Study output folder").

The page holds: a SYNTHETIC banner when the cohort is synthetic (``manifest.json`` key
``synthetic`` or ``cohort/cohort.json`` ``{"synthetic": true}``), a short methods summary, the
paper's headline numbers beside this run's (read from the machine-readable summary files), the
stage status from the manifest, then every part that exists: Table 1, figures (PNG embedded as
base64, no external reference), tables (HTML, long ones truncated with a note) and summary.json
files. Parts that do not exist are listed as missing. The page is written atomically.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import re
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from analysis.cohort import CLASS_NAMES, is_synthetic
from analysis.io import write_text

log = logging.getLogger(__name__)

__all__ = ["PAPER", "PARTS", "build_report", "headline_table", "report_cli", "study_is_synthetic"]

#: (folder, title) of every part a study may produce, in reading order
PARTS: tuple[tuple[str, str], ...] = (
    ("table1", "Table 1: baseline characteristics"),
    ("segmentation", "Liver and tumour segmentation (hcc_liver_seg)"),
    ("prognosis", "ProgSwin-UNETR four-class prognosis"),
    ("gradcam", "Grad-CAM++ activation maps"),
    ("radiomics", "Radiomics features (PyRadiomics)"),
    ("classify", "Radiomics classifiers"),
    ("mrecist", "mRECIST response"),
    ("km", "Kaplan-Meier overall survival (Fig. 6)"),
    ("cox", "Multivariable Cox model (Fig. 7)"),
    ("nomogram", "Nomogram (Appendix 11)"),
)

#: the paper's headline numbers: (metric, paper value as printed)
PAPER: dict[str, str] = {
    "segmentation Dice": "0.83",
    "ProgSwin-UNETR macro AUC": "0.92",
    **{f"ProgSwin-UNETR AUC class {k}": v for k, v in enumerate(("0.92", "0.89", "0.97", "0.88"))},
    "ProgSwin-UNETR accuracy": "0.86",
    "best radiomics macro AUC": "0.76 (Naive Bayes)",
    **{f"log-rank p, {m}, {s}": v for m, vals in (("mRECIST", ("0.01", "0.08", "0.18")),
                                                  ("radiomics model", ("<0.05", "<0.05", "0.37")),
                                                  ("ProgSwin-UNETR", ("<0.005", "<0.005", "<0.005")))
       for s, v in zip(("all", "TACE", "TACE+MWA"), vals)},
    **{f"Cox log(HR), class {k}": v for k, v in enumerate(("0.97", "0.51", "-0.53", "-0.92"))},
    "Cox C-index": "0.81",
    "nomogram high-risk cut-off (36-month mortality)": "0.70",
}

#: how km/tables/logrank.csv may name the three methods (lower case, substring match)
_METHOD_ALIASES = {"mRECIST": ("mrecist",), "radiomics model": ("radiomic", "naive", "bayes"),
                   "ProgSwin-UNETR": ("progswin", "deep", "dl_", "swin")}
MAX_ROWS = 40
MAX_COLS = 20
MAX_FIGURES = 12

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
color:#222;line-height:1.4}
h1{margin-bottom:.2em} h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.85em} th,td{border:1px solid #ccc;padding:.2em .5em;
text-align:left;vertical-align:top} th{background:#f3f3f3}
.synthetic{background:#b00020;color:#fff;font-weight:bold;font-size:1.3em;padding:.6em 1em;margin:1em 0;
border-radius:4px} .missing{color:#b00020} .note{color:#666;font-size:.85em}
figure{margin:1em 0} figure img{max-width:100%;border:1px solid #eee} figcaption{font-size:.85em;color:#555}
pre{background:#f7f7f7;padding:.6em;overflow:auto;font-size:.8em} details{margin:.4em 0}
"""


# ------------------------------------------------------------------------------------ reading
def _read_json(path: Path, problems: list[str], expect_object: bool = True):
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        problems.append(f"{path.name}: unreadable JSON ({exc})")
        return None
    if expect_object and not isinstance(data, dict):
        problems.append(f"{path.name}: expected a JSON object, found {type(data).__name__}")
        return None
    return data


def _read_csv(path: Path, problems: list[str], nrows: int | None = None) -> pd.DataFrame | None:
    if not path.exists():
        return None
    try:
        return pd.read_csv(path, nrows=nrows, keep_default_na=False, na_values=[""])
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        problems.append(f"{path.name}: unreadable CSV ({exc})")
        return None


def study_is_synthetic(study: str | Path) -> bool:
    """True when manifest.json says ``"synthetic": true`` or cohort/cohort.json does."""
    study = Path(study)
    manifest = _read_json(study / "manifest.json", [])
    if isinstance(manifest, dict) and manifest.get("synthetic") is True:
        return True
    return is_synthetic(study / "cohort")


def _num(value) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def _fmt(value, p: bool = False) -> str:
    v = _num(value)
    if v is None:
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)
    if p:
        return "<0.001" if v < 0.001 else f"{v:.3f}"
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


# ---------------------------------------------------------------------------- headline numbers
SEG_SUMMARY = "segmentation/eval/metrics_summary.csv"  # what hcc_liver_seg's evaluate.json writes
SEG_AGREEMENT = "segmentation_inference/agreement/summary.csv"  # shared weights: masks vs the cohort's labels


def _dice_row(frame: pd.DataFrame) -> dict[str, float]:
    if frame.empty:
        return {}
    dice_columns = [c for c in frame.columns if str(c).startswith("dice")]
    values = pd.to_numeric(frame.iloc[0][dice_columns], errors="coerce")
    return {c: float(v) for c, v in values.items() if pd.notna(v)}


def segmentation_dice(eval_dir: str | Path) -> dict[str, float]:
    """Dice columns (dice_eq2, dice_liver, ...) of the bundle's one-row evaluation summary; {} if absent."""
    frame = _read_csv(Path(eval_dir) / "metrics_summary.csv", [])
    return {} if frame is None else _dice_row(frame)


def _seg_dice(study: Path, problems: list[str]) -> tuple[float | None, str]:
    """The combined Dice (Eq. 2) of the study's segmentation evaluation: the trained network's
    validation, or, with shared weights, the inference masks against the cohort's labels."""
    if not (study / SEG_SUMMARY).exists() and (study / SEG_AGREEMENT).exists():
        frame = _read_csv(study / SEG_AGREEMENT, problems)
        if frame is not None and "dice_eq2_mean" in frame:
            return _num(frame["dice_eq2_mean"].iloc[0]), f"{SEG_AGREEMENT}: dice_eq2_mean (Eq. 2, every labelled scan)"
    frame = _read_csv(study / SEG_SUMMARY, problems)
    if frame is None:
        return None, SEG_SUMMARY
    dice = _dice_row(frame)
    if "dice_eq2" not in dice:
        problems.append(f"{SEG_SUMMARY}: no dice_eq2 value (columns: {', '.join(map(str, frame.columns))})")
        return None, SEG_SUMMARY
    return dice["dice_eq2"], f"{SEG_SUMMARY}: dice_eq2 (Eq. 2)"


def _cox_class_rows(summary: pd.DataFrame) -> dict[int, tuple[float, str]]:
    """class k -> (log HR, covariate) from cox_summary.csv rows like ``dl_class[2]``."""
    pattern = re.compile(r"^(?P<var>[^\[]*class[^\[]*)\[(?P<level>\d+)(?:\.0+)?\]$", re.IGNORECASE)
    found: dict[str, dict[int, tuple[float, str]]] = {}
    for row in summary.itertuples():
        m = pattern.match(str(row.covariate))
        if m and _num(row.coef) is not None:
            found.setdefault(m["var"], {})[int(m["level"])] = (float(row.coef), str(row.covariate))
    if not found:
        return {}
    var = "dl_class" if "dl_class" in found else next(iter(found))
    return found[var]


def headline_table(study: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """metric, paper, this_run, source: the paper's headline numbers beside this run's."""
    study = Path(study)
    problems: list[str] = []
    run: dict[str, tuple[str, str]] = {}

    dice, src = _seg_dice(study, problems)
    run["segmentation Dice"] = (_fmt(dice), src)

    metrics = _read_json(study / "prognosis" / "evaluation" / "metrics.json", problems) or {}
    src = "prognosis/evaluation/metrics.json"
    ci = metrics.get("macro_auc_ci")
    ci_text = f" (95% CI {_fmt(ci[0])}-{_fmt(ci[1])})" if isinstance(ci, list) and len(ci) == 2 else ""
    run["ProgSwin-UNETR macro AUC"] = (_fmt(metrics.get("macro_auc")) + (ci_text if metrics.get("macro_auc")
                                                                          is not None else ""), src)
    per_class = metrics.get("auc_per_class") or {}
    for k in range(4):
        run[f"ProgSwin-UNETR AUC class {k}"] = (_fmt(per_class.get(str(k))), src)
    run["ProgSwin-UNETR accuracy"] = (_fmt(metrics.get("accuracy")), src)

    classify = _read_json(study / "classify" / "summary.json", problems) or {}
    models = {k: v for k, v in (classify.get("models") or {}).items() if _num((v or {}).get("macro_auc")) is not None}
    if models:
        name, best = max(models.items(), key=lambda kv: float(kv[1]["macro_auc"]))
        run["best radiomics macro AUC"] = (f"{_fmt(best['macro_auc'])} ({name})", "classify/summary.json")
    else:
        run["best radiomics macro AUC"] = ("-", "classify/summary.json")

    logrank = _read_csv(study / "km" / "tables" / "logrank.csv", problems)
    for method, aliases in _METHOD_ALIASES.items():
        for sub in ("all", "TACE", "TACE+MWA"):
            value, src = "-", "km/tables/logrank.csv"
            if logrank is not None and {"method", "subgroup", "p_value"} <= set(logrank.columns):
                hit = logrank[logrank["method"].astype(str).str.lower().map(lambda m, al=aliases: any(a in m for a in al))
                              & (logrank["subgroup"].astype(str).str.lower() == sub.lower())]
                if len(hit):
                    r = hit.iloc[0]
                    reason = str(r.get("skipped_reason", "") or "")
                    value = _fmt(r["p_value"], p=True) if _num(r["p_value"]) is not None else f"skipped: {reason}"
                    src = f"km/tables/logrank.csv: {r['method']} / {r['subgroup']}"
            run[f"log-rank p, {method}, {sub}"] = (value, src)

    cox = _read_csv(study / "cox" / "tables" / "cox_summary.csv", problems)
    classes = _cox_class_rows(cox) if cox is not None and {"covariate", "coef"} <= set(cox.columns) else {}
    for k in range(4):
        coef, name = classes.get(k, (None, ""))
        run[f"Cox log(HR), class {k}"] = (_fmt(coef), f"cox/tables/cox_summary.csv: {name}" if name
                                          else "cox/tables/cox_summary.csv")
    cox_summary = _read_json(study / "cox" / "summary.json", problems) or {}
    c_text = _fmt(cox_summary.get("concordance"))
    if cox_summary.get("cv_concordance") is not None:
        c_text += f" (cross-validated {_fmt(cox_summary['cv_concordance'])})"
    if cox_summary and cox_summary.get("converged") is False:
        c_text += " NOT CONVERGED"
    run["Cox C-index"] = (c_text, "cox/summary.json")

    nomo = _read_json(study / "nomogram" / "summary.json", problems) or {}
    nomo_text = _fmt(nomo.get("cutoff"))
    if nomo.get("n_high_risk") is not None:
        nomo_text += f" ({nomo['n_high_risk']} high-risk patients)"
    run["nomogram high-risk cut-off (36-month mortality)"] = (nomo_text, "nomogram/summary.json")

    rows = [{"metric": m, "paper": v, "this_run": run[m][0], "source": run[m][1]} for m, v in PAPER.items()]
    return pd.DataFrame(rows), problems


# ------------------------------------------------------------------------------------ HTML
def _esc(value) -> str:
    return html.escape("" if value is None else str(value))


def _html_table(frame: pd.DataFrame, p_columns: tuple[str, ...] = ()) -> str:
    head = "".join(f"<th>{_esc(c)}</th>" for c in frame.columns)
    body = []
    for row in frame.itertuples(index=False):
        cells = []
        for col, value in zip(frame.columns, row):
            text = "" if value is None or (isinstance(value, float) and math.isnan(value)) else value
            if col in p_columns and text != "":
                text = _fmt(text, p=True)
            elif isinstance(text, float):
                text = _fmt(text)
            cells.append(f"<td>{_esc(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _count_rows(path: Path) -> int:
    with open(path, "rb") as fh:
        return max(sum(1 for _ in fh) - 1, 0)


def _csv_block(path: Path, rel: str, problems: list[str]) -> str:
    frame = _read_csv(path, problems, nrows=MAX_ROWS)
    if frame is None:
        return f'<p class="missing">{_esc(rel)}: could not be read</p>'
    n_rows, n_cols = _count_rows(path), frame.shape[1]
    notes = []
    if n_cols > MAX_COLS:
        frame = frame.iloc[:, :MAX_COLS]
        notes.append(f"first {MAX_COLS} of {n_cols} columns")
    if n_rows > MAX_ROWS:
        notes.append(f"first {MAX_ROWS} of {n_rows} rows")
    p_cols = tuple(c for c in frame.columns if c in ("p", "p_value") or c.startswith("p_"))
    note = f' <span class="note">({"; ".join(notes)}; full table in {_esc(rel)})</span>' if notes else ""
    return f"<h4>{_esc(rel)}{note}</h4>{_html_table(frame, p_cols)}"


def _png_block(path: Path, rel: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{_esc(rel)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_esc(rel)}</figcaption></figure>")


def _part_files(folder: Path) -> tuple[list[Path], list[Path], list[Path]]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    return ([p for p in files if p.suffix.lower() == ".png"], [p for p in files if p.suffix.lower() == ".csv"],
            [p for p in files if p.suffix.lower() == ".json"])


def _render_part(study: Path, name: str, title: str, problems: list[str]) -> str:
    folder = study / name
    pngs, csvs, jsons = _part_files(folder)
    out = [f'<h2 id="{name}">{_esc(title)}</h2>']
    if name == "table1" and (folder / "table1.csv").exists():
        frame = _read_csv(folder / "table1.csv", problems)
        if frame is not None:
            # the CSV repeats the characteristic on every level row (machine-readable); the page shows it once
            shown_frame = frame.copy()
            repeat = shown_frame["characteristic"].eq(shown_frame["characteristic"].shift())
            shown_frame.loc[repeat, "characteristic"] = ""
            out.append(_html_table(shown_frame, ("p_value",)))
            out.append('<p class="note">n (%) for categories (N/A in the denominator), mean (SD) for continuous '
                       "rows; Pearson chi-square (scipy defaults: Yates correction for 2 x 2), Student t-test; "
                       "N/A rows shown but left out of the tests.</p>")
        csvs = [p for p in csvs if p.name != "table1.csv"]
    shown = pngs[:MAX_FIGURES]
    out += [_png_block(p, str(p.relative_to(study))) for p in shown]
    if len(pngs) > len(shown):
        rest = ", ".join(str(p.relative_to(study)) for p in pngs[len(shown):])
        out.append(f'<p class="note">{len(pngs) - len(shown)} more figure(s) not embedded: {_esc(rest)}</p>')
    figure_stems = {p.stem for p in pngs}
    primary = [p for p in csvs if p.stem not in figure_stems]
    behind = [p for p in csvs if p.stem in figure_stems]
    out += [_csv_block(p, str(p.relative_to(study)), problems) for p in primary]
    if behind:
        out.append("<details><summary>data behind the figures</summary>"
                   + "".join(_csv_block(p, str(p.relative_to(study)), problems) for p in behind) + "</details>")
    for p in jsons:
        data = _read_json(p, problems, expect_object=False)
        if data is not None:
            out.append(f"<details><summary>{_esc(p.relative_to(study))}</summary>"
                       f"<pre>{_esc(json.dumps(data, indent=2)[:20000])}</pre></details>")
    if not (pngs or csvs or jsons) and name != "table1":
        out.append(f'<p class="note">no figures, tables or summaries in {_esc(name)}/ '
                   f"({sum(1 for p in folder.rglob('*') if p.is_file())} other file(s))</p>")
    return "\n".join(out)


def _methods(manifest: dict | None) -> str:
    profile = (manifest or {}).get("profile")
    settings = (manifest or {}).get("settings")
    extra = ""
    if profile or settings:
        extra = (f"<p class=\"note\">profile: {_esc(profile or '-')}; settings: "
                 f"{_esc(json.dumps(settings, sort_keys=True)[:2000]) if settings else '-'}</p>")
    classes = "; ".join(f"{_esc(v)}" for v in CLASS_NAMES.values())
    if (settings or {}).get("weights") == "shared":
        how = (f"<strong>not trained on this cohort</strong>: both networks ran the shared weights selected by each "
               f"bundle's configs/{_esc(settings.get('weights_overlay'))} (inference only), so every patient's "
               f"prediction comes from a model that never saw them; the automatic masks feed every later step")
    else:
        how = "trained and evaluated by four-fold cross-validation with out-of-fold predictions"
    return f"""<h2 id="methods">Methods (summary)</h2>
<p>Arterial-phase CE-MRI at three time points (before TACE, after the first and after the second TACE) with
liver/tumour masks from a SwinUNETR segmentation model (hcc_liver_seg) feed ProgSwin-UNETR, a Swin-Transformer
classifier of four prognosis classes ({classes}), {how}; discrimination by one-vs-rest AUC with bootstrap 95% CIs and accuracy. Grad-CAM++ maps
show the regions driving the prediction. Baselines: PyRadiomics features (exampleMR_3mm) with LASSO selection and
five classifiers, and mRECIST response (Lencioni &amp; Llovet 2010; longest viable axial diameter of up to two
targets &ge; 10 mm) measured on the masks. Overall survival by risk group: Kaplan-Meier curves with multivariate
log-rank tests for all patients and per treatment (TACE, TACE+MWA); multivariable Cox model (model class, age,
sex, sorafenib, mRECIST, radiomic score) with Harrell's C-index and a Schoenfeld-residual check; a nomogram with a
36-month high-risk cut-off. Table 1: Pearson chi-square and t-tests between treatment groups.</p>{extra}"""


def _stage_table(manifest: dict | None) -> str:
    stages = (manifest or {}).get("stages")
    if not isinstance(stages, dict) or not stages:
        return ""
    rows = [{"stage": k, "status": (v or {}).get("status", ""), "seconds": (v or {}).get("seconds", ""),
             "message": str((v or {}).get("message", ""))[:300]} for k, v in stages.items()]
    return '<h2 id="stages">Stages of this run</h2>' + _html_table(pd.DataFrame(rows))


def build_report(study: str | Path, out: str | Path | None = None) -> Path:
    """Write the HTML report of a study folder to ``out`` (default ``<study>/report.html``)."""
    study = Path(study)
    if not study.is_dir():
        raise FileNotFoundError(f"study folder {study} not found; expected the output of `python -m analysis study`")
    out = Path(out) if out is not None else study / "report.html"
    problems: list[str] = []
    manifest = _read_json(study / "manifest.json", problems)
    synthetic = study_is_synthetic(study)
    present = [(n, t) for n, t in PARTS if (study / n).is_dir() and any(p.is_file() for p in (study / n).rglob("*"))]
    missing = [(n, t) for n, t in PARTS if (n, t) not in present]
    headline, head_problems = headline_table(study)
    problems += head_problems
    parts_html = [_render_part(study, n, t, problems) for n, t in present]

    banner = ('<div class="synthetic">SYNTHETIC COHORT: every number on this page comes from generated data; '
              "it shows that the software runs, not how the method performs on patients.</div>") if synthetic else ""
    toc = "".join(f'<li><a href="#{n}">{_esc(t)}</a></li>' for n, t in present)
    missing_html = ("<ul>" + "".join(f'<li class="missing">{_esc(t)} ({_esc(n)}/)</li>' for n, t in missing)
                    + "</ul>") if missing else "<p>none</p>"
    problems_html = ("<h2>Problems reading the study folder</h2><ul>"
                     + "".join(f"<li>{_esc(p)}</li>" for p in problems) + "</ul>") if problems else ""
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    kind = str((manifest or {}).get("kind") or "study")
    title = f"HCC after TACE: {kind} report" + (" (SYNTHETIC)" if synthetic else "")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title><style>{_CSS}</style></head>
<body>
<h1>{_esc(title)}</h1>
{banner}
<p class="note">study folder: {_esc(study.name)}; generated {when}</p>
<h2 id="contents">Contents</h2><ul>{toc}</ul>
<h3>Parts missing from this study</h3>{missing_html}
{_methods(manifest)}
<h2 id="headline">Paper vs this run</h2>
<p class="note">Paper: ProgSwin-UNETR (four-fold cross-validation, 181 patients). "-" = not produced by this run.
{"Synthetic data: agreement or disagreement with the paper means nothing." if synthetic else ""}</p>
{_html_table(headline)}
{_stage_table(manifest)}
{''.join(parts_html)}
{problems_html}
</body></html>
"""
    write_text(out, page)
    log.info("report: %s (%d part(s), %d missing%s)", out, len(present), len(missing),
             ", SYNTHETIC" if synthetic else "")
    return out


def report_cli(study: str, out: str | None = None) -> str:
    """One self-contained HTML page of a study folder (default OUT: <study>/report.html).

    Args:
        study: the study folder, the OUT of ``python -m analysis study`` (manifest.json, a folder per stage).
        out: the HTML file to write (default <study>/report.html).
    """
    try:
        path = build_report(study, out)
    except FileNotFoundError as exc:
        raise SystemExit(str(exc)) from exc
    return str(path)
