"""Segmentation Dice on SYNTHETIC data: 3 sites federated vs the same patients pooled vs each site alone.

Not part of ``python -m bench`` (it needs the ``federated`` extra):

    python bench/federated_dice.py --out /tmp/fl_dice [--patients 18] [--epochs 6]

Same total epochs for every arm: federated = ``epochs`` rounds x 1 local epoch (FLARE's simulator,
3 sites, FedAvg weighted by iterations); pooled = ``epochs`` epochs on the union of the sites'
datalists; local = ``epochs`` epochs on one site's datalist. Every arm starts from the same seeded
initialisation, trains hcc_liver_seg's own train.json with the same small CPU settings (feature_size
12, ROI 64x64x32, t0 scans only), and is scored by the bundle's own evaluator (``val_dice_eq2``,
liver, tumour) on a held-out synthetic cohort that no arm trained on. Writes ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "hcc_liver_seg"
SMALL = {"feature_size": 12, "roi_size": [64, 64, 32], "target_spacing": [1.5, 1.5, 5.0], "sw_batch_size": 2,
         "overlap": 0.25, "num_workers": 0, "device": "$torch.device('cpu')", "use_checkpoint": False,
         "num_samples": 1, "batch_size": 1, "cache_rate": 1.0, "val_interval": 1}


def t0_only(path: Path) -> dict:
    dl = json.loads(path.read_text())
    for key in ("training", "validation", "testing"):
        dl[key] = [i for i in dl.get(key, []) if i["timepoint"] == "t0"]
    path.write_text(json.dumps(dl))
    return dl


def train_plain(datalist: Path, cohort: Path, out: Path, epochs: int, init: Path) -> Path:
    """The bundle's train.json as ``monai.bundle run`` runs it, from the shared initial weights."""
    overrides = {**SMALL, "max_epochs": epochs, "dataset_dir": str(cohort), "datalist": str(datalist),
                 "ckpt_dir": str(out / "models"), "output_dir": str(out / "eval"), "pretrained": str(init)}
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(BUNDLE / "configs" / "train.json"),
           "--bundle_root", str(BUNDLE)]
    for k, v in overrides.items():
        cmd += [f"--{k}", v if isinstance(v, str) else json.dumps(v)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    last = sorted((out / "models").glob("checkpoint_epoch=*.pt"), key=lambda p: int(p.stem.split("=")[1]))[-1]
    import torch

    state = torch.load(last, map_location="cpu", weights_only=False)["model"]  # our own checkpoint
    torch.save(state, out / "last_model.pt")
    return out / "last_model.pt"


def dice_on(weights: Path, test_cohort: Path, test_datalist: Path) -> dict:
    """The bundle's validation evaluator (its key metric and liver / tumour Dice) on the held-out cohort."""
    import torch
    from monai.bundle import ConfigParser

    from analysis.federated_client import bundle_on_path

    bundle_on_path(str(BUNDLE))
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    parser.update({**SMALL, "bundle_root": str(BUNDLE), "dataset_dir": str(test_cohort),
                   "datalist": str(test_datalist), "ckpt_dir": str(weights.parent / "test_eval"),
                   "output_dir": str(weights.parent / "test_eval")})
    evaluator = parser.get_parsed_content("validate#evaluator")
    evaluator.network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    evaluator.run()
    return {k: round(float(v), 4) for k, v in evaluator.state.metrics.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--patients", type=int, default=18)
    ap.add_argument("--test-patients", type=int, default=6)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args()
    out = args.out.resolve()
    from analysis.datalists import segmentation_datalist
    from analysis.federated import find_global_model, write_job
    from analysis.synthetic import make_cohort

    cohort, test = out / "cohort", out / "test_cohort"
    if not (cohort / "clinical.csv").is_file():
        make_cohort(cohort, n_patients=args.patients, shape=64, seed=args.seed)
    if not (test / "clinical.csv").is_file():
        make_cohort(test, n_patients=args.test_patients, shape=64, seed=args.seed + 1000)
    test_dl = segmentation_datalist(test, test, val_fraction=0.2, seed=0)
    test_dl["validation"] = [i for i in test_dl["training"] + test_dl["validation"] if i["timepoint"] == "t0"]
    test_path = out / "test_datalist.json"
    test_path.write_text(json.dumps(test_dl))

    job = write_job(BUNDLE, cohort, out / "job", sites=3, rounds=args.epochs, overrides=dict(SMALL),
                    datalist_dir=out / "site_datalists", seed=args.seed)
    sites = {name: t0_only(path) for name, path in job["datalists"].items()}
    init = out / "initial_model.pt"
    import torch

    torch.save(torch.load(job["initial_model"], weights_only=True)["model"], init)
    results: dict = {"synthetic": True, "epochs": args.epochs, "settings": SMALL,
                     "site_sizes": {n: {"patients": job["sites"][n], "train_scans": len(d["training"]),
                                        "val_scans": len(d["validation"])} for n, d in sites.items()},
                     "test_scans": len(test_dl["validation"]), "arms": {}}

    start = time.time()
    work = out / "work"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    nvflare = str(Path(sys.executable).with_name("nvflare"))
    subprocess.run([nvflare, "simulator", str(job["job"]), "-w", str(work), "-n", "3", "-t", "1"], check=True,
                   capture_output=True, text=True, env=env)
    subprocess.run([sys.executable, "-m", "analysis", "federated-job", "--export-global", str(find_global_model(work)),
                    "--out", str(out / "federated.pt")], check=True, capture_output=True, cwd=REPO)
    results["arms"]["federated (3 sites, FedAvg)"] = {"seconds": round(time.time() - start),
                                                      **dice_on(out / "federated.pt", test, test_path)}

    pooled = {"training": [i for d in sites.values() for i in d["training"]],
              "validation": [i for d in sites.values() for i in d["validation"]], "testing": []}
    pooled_path = out / "pooled_datalist.json"
    pooled_path.write_text(json.dumps(pooled))
    start = time.time()
    w = train_plain(pooled_path, cohort, out / "pooled", args.epochs, init)
    results["arms"]["pooled (all sites' patients)"] = {"seconds": round(time.time() - start),
                                                       **dice_on(w, test, test_path)}
    for name, path in job["datalists"].items():
        start = time.time()
        w = train_plain(path, cohort, out / f"local_{name}", args.epochs, init)
        results["arms"][f"{name} alone"] = {"seconds": round(time.time() - start), **dice_on(w, test, test_path)}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
