"""clinical.csv validation at scale: the vectorised checks against the row-wise code they replace.

What is timed is ``analysis.cohort.validate_clinical``: the clinical-table part of
``python -m analysis validate`` (reading the CSV, every rule of clinical.schema.json, unique ids,
the risk-class rule). The image part is not in it: with a million patients and no images,
``validate_cohort`` would time a million "no folder images/<id>" lines, not the checks.

1. The vectorised code on 1e6 valid rows, in a fresh subprocess: wall seconds of the call and
   the subprocess's peak RSS (VmHWM of /proc/self/status: the interpreter, pandas and the table
   included; ``ru_maxrss`` is not used where VmHWM exists, since Linux carries the parent's peak
   over ``exec`` into it).
2. Baseline, in the same run on the same machine: the code of commit c0bb321 (analysis/cohort.py
   before issue 15, read with ``git show`` and imported as a module; jsonschema on each row and a
   one-row DataFrame per row for the risk class) on 1e5 rows, also in its own subprocess. The
   ratio is the per-row speed-up: (baseline s / 1e5 rows) / (new s / 1e6 rows). Without git
   history the baseline is the current row-wise reference (``_validate_clinical_rowwise``), and
   the record says so.

The table is random but valid: unique ids, whole ages, os_months to 0.1 month, the stated
risk_class agreeing with the rule (empty when undefined), optional columns filled or empty.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
BASELINE_COMMIT = "c0bb321"
BUDGET_S, BUDGET_MB = 30.0, 2048.0

_CHILD = r"""
import importlib.util, json, resource, sys, time
sys.path.insert(0, sys.argv[3])
which, path = sys.argv[1], sys.argv[2]
if which == "new":
    from analysis.cohort import validate_clinical as check
elif which == "rowwise":
    from analysis.cohort import _validate_clinical_rowwise
    check = lambda p: (_validate_clinical_rowwise(p), None)
else:
    spec = importlib.util.spec_from_file_location("cohort_baseline", which)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    check = module.validate_clinical
start = time.perf_counter()
problems, _ = check(path)
seconds = time.perf_counter() - start
try:  # VmHWM: this process's own peak; ru_maxrss would include the parent's RSS carried over exec
    with open("/proc/self/status") as fh:
        peak = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024
except (OSError, StopIteration):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "problems": len(problems), "peak_rss_mb": peak}))
"""


def make_table(n: int, seed: int = 0) -> pd.DataFrame:
    """A valid clinical table of ``n`` random patients (vectorised; a million rows in seconds)."""
    from analysis.cohort import derive_risk_class

    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({
        "patient_id": np.char.add("HCC", np.arange(1, n + 1).astype(str)),
        "age": rng.integers(25, 95, n), "sex": rng.choice(["F", "M"], n),
        "treatment": rng.choice(["TACE", "TACE+MWA"], n), "sorafenib": rng.integers(0, 2, n),
        "os_months": np.round(rng.exponential(30, n) + 0.1, 1), "death": (rng.random(n) < 0.7).astype(int),
        "bclc": rng.choice(list("ABC"), n), "child_pugh": rng.choice(["A", "B", "NA"], n),
        "afp_ge_400": rng.integers(0, 2, n), "tumour_size": rng.choice(["<3cm", "3-5cm", ">5cm"], n),
        "nodules_gt3": rng.integers(0, 2, n), "tace_cycles": rng.integers(1, 9, n),
        "imaging_high_risk": rng.integers(0, 2, n),
        "aetiology": rng.choice(["HCV", "HBV", "Alcohol", "NASH", "Other", "NA", ""], n),
    })
    frame["risk_class"] = derive_risk_class(frame)
    frame["mrecist"] = rng.choice(["CR", "PR", "SD", "PD", "NA", ""], n)
    return frame


def _baseline_module(tmp: Path) -> tuple[str, str]:
    """(argument for the child, words for the record): c0bb321's cohort.py, else the row-wise reference."""
    try:
        source = subprocess.run(["git", "show", f"{BASELINE_COMMIT}:analysis/cohort.py"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "rowwise", "analysis.cohort._validate_clinical_rowwise (no git history here)"
    path = tmp / f"cohort_{BASELINE_COMMIT}.py"
    path.write_text(source)
    return str(path), f"validate_clinical of commit {BASELINE_COMMIT} (row-wise jsonschema)"


def _measure(which: str, csv: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", _CHILD, which, str(csv), str(ROOT)],
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"validate child ({which}) failed: {proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if out["problems"]:
        raise RuntimeError(f"the generated table should be valid; {which} found {out['problems']} problem(s)")
    return out


def _cpu() -> dict:
    model = None
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), None)
    except OSError:
        pass
    return {"cpu_model": model, "cpu_count": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2)}


def run(quick: bool = False) -> list[dict]:
    n_new, n_old = (100_000, 2_000) if quick else (1_000_000, 100_000)
    with tempfile.TemporaryDirectory(prefix="bench_validate_") as tmp:
        tmp = Path(tmp)
        big = tmp / "clinical_new.csv"
        small = tmp / "clinical_old.csv"
        start = time.perf_counter()
        make_table(n_new).to_csv(big, index=False)
        make_table(n_old, seed=1).to_csv(small, index=False)
        write_s = time.perf_counter() - start
        baseline, baseline_words = _baseline_module(tmp)
        before = _cpu()
        new = _measure("new", big)
        new_small = _measure("new", small)
        old = _measure(baseline, small)
        load_after = round(os.getloadavg()[0], 2)
        csv_mb = round(big.stat().st_size / 2**20, 1)
    per_row_new = new["seconds"] / n_new
    per_row_old = old["seconds"] / n_old
    settings = {
        "rows": n_new, "baseline_rows": n_old, "csv_mb": csv_mb, "columns": 17,
        "measured": "analysis.cohort.validate_clinical (CSV read + every schema rule + ids + risk-class rule), "
                    "one fresh subprocess per measurement",
        "baseline_code": baseline_words,
        "ratio_is": f"per-row speed-up: (baseline s / {n_old} rows) / (value s / {n_new} rows)",
        "us_per_row": round(per_row_new * 1e6, 2), "baseline_us_per_row": round(per_row_old * 1e6, 1),
        "new_on_baseline_rows_s": round(new_small["seconds"], 3),
        "budget_s": BUDGET_S, "table_write_s": round(write_s, 1),
        **before, "load_avg_1min_after": load_after,
    }
    return [
        {"name": f"validate clinical.csv, {n_new:.0e} rows (vectorised)", "unit": "s",
         "value": round(new["seconds"], 2),
         "baseline_name": f"row-wise validate ({BASELINE_COMMIT}) on {n_old:.0e} rows",
         "baseline_value": round(old["seconds"], 1), "ratio": round(per_row_old / per_row_new, 1),
         "settings": settings},
        {"name": f"validate clinical.csv, {n_new:.0e} rows, peak RSS", "unit": "MB",
         "value": round(new["peak_rss_mb"]),
         "baseline_name": "2 GB budget", "baseline_value": BUDGET_MB, "ratio": round(BUDGET_MB / new["peak_rss_mb"], 2),
         "settings": {"rows": n_new, "measured": "VmHWM of the validating subprocess (interpreter and imports "
                                                  "included)",
                      "baseline_code_peak_rss_mb": round(old["peak_rss_mb"]), "baseline_rows": n_old,
                      "new_on_baseline_rows_peak_rss_mb": round(new_small["peak_rss_mb"]),
                      "cpu_model": before["cpu_model"], "cpu_count": before["cpu_count"]}},
    ]


if __name__ == "__main__":
    print(json.dumps(run(quick=True), indent=2))
