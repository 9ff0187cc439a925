"""The demo study end to end: wall time and peak memory, cold and resumed.

Baselines: the cold run is compared with the 15-minute budget the demo profile must meet on
2 CPU cores (issue 7); the resumed rerun (every stage skipped) is compared with the cold run,
which measures what the manifest check costs.
"""

from __future__ import annotations

import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUDGET_S = 15 * 60


def _run(out: Path, extra: list[str]) -> tuple[float, str]:
    cmd = [sys.executable, "-m", "analysis", "study", "--out", str(out), "--quiet", *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"study failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return seconds, proc.stdout


def run(quick: bool = False) -> list[dict]:
    extra = ["--patients", "8", "--prog-epochs", "1", "--seg-epochs", "1", "--bootstrap", "200"] if quick else []
    settings = {"profile": "demo", **({"patients": 8, "epochs": 1} if quick else {})}
    with tempfile.TemporaryDirectory(prefix="bench_study_") as tmp:
        out = Path(tmp) / "study"
        cold, stdout = _run(out, extra)
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        m = re.search(r"peak memory (\d+) MB", stdout)
        if m:
            peak_mb = float(m.group(1))
        warm, _ = _run(out, extra)
        stages = json.loads((out / "manifest.json").read_text())["stages"]
    per_stage = {k: v.get("seconds") for k, v in stages.items()}
    return [
        {"name": "demo study wall time (cold)", "unit": "s", "value": round(cold, 1),
         "baseline_name": "15-minute budget", "baseline_value": BUDGET_S, "ratio": round(BUDGET_S / cold, 2),
         "settings": {**settings, "stage_seconds": per_stage}},
        {"name": "demo study peak memory", "unit": "MB", "value": round(peak_mb),
         "baseline_name": "24 GB machine", "baseline_value": 24 * 1024, "ratio": round(24 * 1024 / peak_mb, 1),
         "settings": settings},
        {"name": "demo study rerun, all stages skipped", "unit": "s", "value": round(warm, 2),
         "baseline_name": "cold run", "baseline_value": round(cold, 1), "ratio": round(cold / warm, 1),
         "settings": settings},
    ]
