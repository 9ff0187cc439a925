"""Run every benchmark and write bench/results.json and bench/results.md.

    python -m bench [--quick] [--only seg,prognosis,...] [--out bench]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path

TOPICS = ("seg", "prognosis", "radiomics", "mrecist", "study", "validate", "onnx")


def hardware() -> dict:
    info = {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version()}
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), None)
        if model:
            info["cpu_model"] = model
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return info


def to_markdown(results: list[dict], hw: dict) -> str:
    lines = [f"# Benchmarks ({time.strftime('%Y-%m-%d')})", "",
             "Hardware: " + ", ".join(f"{k} {v}" for k, v in hw.items() if v is not None), "",
             "Rows of topics not rerun in the latest run (`--only`) keep their own date; their hardware "
             "is stored with them in the JSON file.", "",
             "| benchmark | value | unit | baseline | baseline value | ratio | device | date | settings |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        ratio = r.get("ratio")
        lines.append("| {name} | {value} | {unit} | {baseline_name} | {baseline_value} | {ratio} | {device} | {date} | {settings} |".format(
            name=r.get("name"), value=_f(r.get("value")), unit=r.get("unit", ""),
            baseline_name=r.get("baseline_name") or "-", baseline_value=_f(r.get("baseline_value")),
            ratio=_f(ratio), device=r.get("device", "cpu"), date=str(r.get("date", "-"))[:16],
            settings=json.dumps(r.get("settings", {}), sort_keys=True).replace("|", "/")))
    gpu = [r for r in results if str(r.get("device", "cpu")).startswith("cuda")]
    lines += ["", "## GPU", ""]
    lines += (["GPU rows are those with device cuda above."] if gpu else
              ["No GPU was available for this run; GPU rows are filled when `python -m bench` runs on a machine "
               "with CUDA."])
    return "\n".join(lines) + "\n"


def _f(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in about a minute per topic")
    parser.add_argument("--only", default="", help="comma-separated topics: " + ",".join(TOPICS))
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent), help="folder for results.json/.md")
    args = parser.parse_args(argv)
    topics = [t for t in (args.only.split(",") if args.only else TOPICS) if t]
    unknown = sorted(set(topics) - set(TOPICS))
    if unknown:
        parser.error(f"--only: unknown topic(s) {', '.join(unknown)}; expected some of {', '.join(TOPICS)}")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    hw = hardware()
    results, errors = [], {}
    for topic in topics:
        print(f"== bench {topic}", flush=True)
        try:
            module = importlib.import_module(f"bench.bench_{topic}")
            records = module.run(quick=args.quick)
        except Exception as exc:  # noqa: BLE001 - one failing benchmark must not hide the others
            errors[topic] = f"{type(exc).__name__}: {exc}"
            print(f"   failed: {errors[topic]}", flush=True)
            continue
        for r in records:
            r.setdefault("topic", topic)
            print(f"   {r['name']}: {_f(r.get('value'))} {r.get('unit', '')} (ratio {_f(r.get('ratio'))})", flush=True)
        results.extend(records)
    out = Path(args.out)
    target = out / ("results_quick.json" if args.quick else "results.json")
    today = time.strftime("%Y-%m-%dT%H:%M:%S")
    for r in results:
        r.setdefault("date", today)
    # --only reruns some topics: the other topics' last results stay, each with its own date and
    # hardware, so one file always holds the latest figure of every benchmark
    # (a topic that failed this time keeps its last rows too: the error is reported beside them)
    rerun = {r["topic"] for r in results}
    kept = [r for r in _previous(target) if r.get("topic") not in rerun]
    payload = {"date": today, "quick": args.quick, "hardware": hw, "results": kept + results, "errors": errors}
    from analysis import io

    io.write_json(target, payload)
    io.write_text(target.with_suffix(".md"), to_markdown(kept + results, hw))
    print(f"wrote {target}")
    return 1 if errors else 0


def _previous(path: Path) -> list[dict]:
    """Rows of an earlier results file, each stamped with that run's date and hardware."""
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    records = list(payload.get("results", []))
    for r in records:
        r.setdefault("date", payload.get("date"))
        r.setdefault("hardware", payload.get("hardware"))
    return records


if __name__ == "__main__":
    raise SystemExit(main())
