"""Federated vs pooled vs single-site training of either bundle, on SYNTHETIC data.

Not part of ``python -m bench`` (it needs the ``federated`` extra, and trains 5 models):

    python bench/federated_compare.py --bundle hcc_liver_seg --out /tmp/fl_seg [--patients 24] [--epochs 8]
    python bench/federated_compare.py --bundle progswin_prognosis --out /tmp/fl_prog [--patients 200] [--epochs 2]

One cohort is split into 3 sites by ``federated-job`` (patient level, disjoint, stratified by risk
class). Every arm trains the bundle's own train.json with the same settings, from the same seeded
initialisation, for the same number of epochs, and is scored by the bundle's own validation
evaluator on a held-out synthetic cohort that no arm trained on:

- federated: FLARE's simulator, 3 sites, FedAvg weighted by iterations, ``epochs`` rounds x 1 local
  epoch (analysis.federated_client.BundleAlgo carries each site's LR schedule and optimizer state
  from round to round and runs ProgSwin-UNETR's head warm-up at each site before round 1);
- pooled: ``epochs`` epochs on the union of the sites' datalists (what a centralised study would do);
- each site alone: ``epochs`` epochs on that site's datalist.

hcc_liver_seg: small CPU settings (feature_size 12, ROI 64x64x32), t0 scans only, scored by
``val_dice_eq2`` and liver / tumour Dice. progswin_prognosis: ``configs/cpu_recipe.json`` (9 x 64^3
label channels, feature_size 12, head warm-up as a logistic regression, then end-to-end epochs),
masks = the generator's labels, each site's fold 0 validating; scored by macro AUC and accuracy.
Writes ``results.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CPU = "$torch.device('cpu')"
#: per bundle: overlay configs, the arms' shared overrides, the scores kept
SETUPS = {
    "hcc_liver_seg": {
        "overlays": [],
        "settings": {"feature_size": 12, "roi_size": [64, 64, 32], "target_spacing": [1.5, 1.5, 5.0],
                     "sw_batch_size": 2, "overlap": 0.25, "num_workers": 0, "device": CPU, "use_checkpoint": False,
                     "num_samples": 1, "batch_size": 1, "cache_rate": 1.0, "val_interval": 1},
    },
    "progswin_prognosis": {
        "overlays": ["configs/cpu_recipe.json"],
        "settings": {"num_workers": 0, "device": CPU},
    },
}


def _overlay_settings(bundle: Path, setup: dict) -> dict:
    """The overlays' values plus the setup's settings, as one dict of train.json overrides."""
    merged: dict = {}
    for overlay in setup["overlays"]:
        merged.update(json.loads((bundle / overlay).read_text()))
    return {**merged, **setup["settings"]}


def _config_files(bundle: Path, setup: dict) -> list[str]:
    return [str(bundle / "configs" / "train.json")] + [str(bundle / o) for o in setup["overlays"]]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def t0_only(path: Path) -> dict:
    dl = json.loads(path.read_text())
    for key in ("training", "validation", "testing"):
        dl[key] = [i for i in dl.get(key, []) if i["timepoint"] == "t0"]
    path.write_text(json.dumps(dl))
    return dl


def _flat_weights(files: list[Path]) -> dict:
    import torch

    state = torch.load(files[-1], map_location="cpu", weights_only=True)
    return state["model"] if isinstance(state.get("model"), dict) else state  # a training checkpoint, or flat


def train_plain(bundle: Path, setup: dict, datalist: Path, cohort: Path, out: Path, epochs: int, init: Path) -> Path:
    """The bundle's train.json as ``monai.bundle run`` runs it, from the shared initial weights."""
    import torch

    overrides = {**setup["settings"], "max_epochs": epochs, "dataset_dir": str(cohort), "datalist": str(datalist),
                 "ckpt_dir": str(out / "models"), "output_dir": str(out / "eval"), "pretrained": str(init)}
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", json.dumps(_config_files(bundle, setup)),
           "--bundle_root", str(bundle)]
    for k, v in overrides.items():
        cmd += [f"--{k}", v if isinstance(v, str) else json.dumps(v)]
    # train.json's `$import scripts` runs before monai.bundle puts a config list's bundle on sys.path
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(bundle), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"training in {out} failed:\n{done.stderr[-3000:]}")
    checkpoints = sorted((out / "models").rglob("checkpoint_epoch=*.pt"), key=lambda p: int(p.stem.split("=")[1]))
    if bundle.name == "progswin_prognosis":  # cpu_recipe's model_selection last_epoch: fold0/model.pt
        checkpoints = [out / "models" / "fold0" / "model.pt"]
    torch.save(_flat_weights(checkpoints), out / "last_model.pt")
    return out / "last_model.pt"


def score_on(bundle: Path, setup: dict, weights: Path, test_cohort: Path, test_datalist: Path) -> dict:
    """The bundle's validation evaluator on the held-out cohort: its key metric and the others."""
    import torch
    from monai.bundle import ConfigParser

    from analysis.federated_client import bundle_on_path

    bundle_on_path(str(bundle))
    parser = ConfigParser()
    parser.read_config(_config_files(bundle, setup))
    parser.update({**setup["settings"], "bundle_root": str(bundle), "dataset_dir": str(test_cohort),
                   "datalist": str(test_datalist), "ckpt_dir": str(weights.parent / "test_eval"),
                   "output_dir": str(weights.parent / "test_eval")})
    evaluator = parser.get_parsed_content("validate#evaluator")
    evaluator.network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    evaluator.run()
    return {k: round(float(v), 4) for k, v in evaluator.state.metrics.items()}


def _test_datalist(kind: str, test: Path, seed: int) -> tuple[dict, int]:
    from analysis.datalists import prognosis_datalist, segmentation_datalist

    if kind == "segmentation":
        dl = segmentation_datalist(test, test, val_fraction=0.2, seed=0)
        dl["validation"] = [i for i in dl["training"] + dl["validation"] if i["timepoint"] == "t0"]
        return dl, len(dl["validation"])
    dl = prognosis_datalist(test, test, test / "labels", folds=4, seed=seed)
    for item in dl["training"]:
        item["fold"] = 0  # every labelled test patient is validated
    return dl, len(dl["training"])


def _pooled(kind: str, sites: dict) -> dict:
    if kind == "segmentation":
        return {"training": [i for d in sites.values() for i in d["training"]],
                "validation": [i for d in sites.values() for i in d["validation"]], "testing": []}
    first = next(iter(sites.values()))
    return {**first, "training": [i for d in sites.values() for i in d["training"]],
            "unlabelled": [], "excluded": []}


def _site_size(kind: str, dl: dict, patients: int) -> dict:
    if kind == "segmentation":
        return {"patients": patients, "train_scans": len(dl["training"]), "val_scans": len(dl["validation"])}
    folds = [i["fold"] for i in dl["training"]]
    return {"patients": patients, "train_patients": sum(f != 0 for f in folds),
            "val_patients": sum(f == 0 for f in folds)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", choices=sorted(SETUPS), default="hcc_liver_seg")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--patients", type=int, default=None, help="default 24 (segmentation), 200 (prognosis)")
    ap.add_argument("--test-patients", type=int, default=None, help="default 8 (segmentation), 48 (prognosis)")
    ap.add_argument("--epochs", type=int, default=None, help="default 8 (segmentation), 2 (prognosis)")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--test-seed", type=int, default=2026)
    ap.add_argument("--local-epochs", type=int, default=1,
                    help="the federated arm's local epochs per round (rounds = --epochs); with more than 1 its "
                         "results go to results_local<N>.json")
    ap.add_argument("--federated-only", action="store_true", help="train and score the federated arm only")
    ap.add_argument("--reuse", action="store_true",
                    help="score the weights an earlier run left in --out instead of training again (e.g. on a "
                         "larger --test-patients); the arms' training seconds are taken from its results.json")
    args = ap.parse_args()
    bundle, setup = REPO / "bundles" / args.bundle, SETUPS[args.bundle]
    prognosis = args.bundle == "progswin_prognosis"
    kind = "prognosis" if prognosis else "segmentation"
    patients = args.patients or (200 if prognosis else 24)
    test_patients = args.test_patients or (48 if prognosis else 8)
    epochs = args.epochs or (2 if prognosis else 8)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    import torch

    from analysis.federated import find_global_model, write_job
    from analysis.synthetic import make_cohort

    cohort, test = out / "cohort", out / f"test_cohort_{test_patients}"
    if not (cohort / "clinical.csv").is_file():
        make_cohort(cohort, n_patients=patients, shape=64, seed=args.seed)
    if not (test / "clinical.csv").is_file():
        make_cohort(test, n_patients=test_patients, shape=64, seed=args.test_seed)
    test_dl, n_test = _test_datalist(kind, test, args.seed)
    test_path = out / f"test_datalist_{test_patients}.json"
    test_path.write_text(json.dumps(test_dl))

    tag = f"_local{args.local_epochs}" if args.local_epochs > 1 else ""
    job = write_job(bundle, cohort, out / f"job{tag}", sites=3, rounds=epochs, local_epochs=args.local_epochs,
                    overrides=_overlay_settings(bundle, setup), datalist_dir=out / "site_datalists", seed=args.seed)
    sites = {name: (t0_only(path) if not prognosis else json.loads(path.read_text()))
             for name, path in job["datalists"].items()}
    init = out / "initial_model.pt"
    torch.save(torch.load(job["initial_model"], weights_only=True)["model"], init)
    results: dict = {"synthetic": True, "bundle": args.bundle, "epochs": epochs, "seed": args.seed,
                     "federated_local_epochs": args.local_epochs,
                     "settings": {"overlays": setup["overlays"], **setup["settings"]},
                     "site_sizes": {n: _site_size(kind, d, job["sites"][n]) for n, d in sites.items()},
                     "test_cohort": {"patients": test_patients, "seed": args.test_seed, "scored": n_test},
                     "hardware": f"{os.cpu_count()} CPU cores, {_cpu_name()}",
                     "arms": {}}

    earlier = json.loads((out / "results.json").read_text())["arms"] if args.reuse else {}

    def seconds(arm: str, start: float) -> int:
        return earlier[arm]["seconds"] if args.reuse else round(time.time() - start)

    start = time.time()
    work, federated = out / f"work{tag}", out / f"federated{tag}.pt"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    nvflare = str(Path(sys.executable).with_name("nvflare"))
    if not args.reuse:
        done = subprocess.run([nvflare, "simulator", str(job["job"]), "-w", str(work), "-n", "3", "-t", "1"],
                              capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise SystemExit(f"the simulator failed:\n{done.stderr[-3000:]}")
        subprocess.run([sys.executable, "-m", "analysis", "federated-job", "--export-global",
                        str(find_global_model(work)), "--out", str(federated)],
                       check=True, capture_output=True, cwd=REPO)
    arm = "federated (3 sites, FedAvg)" + (f", {args.local_epochs} local epochs per round" if tag else "")
    results["arms"][arm] = {"seconds": seconds(arm, start), **score_on(bundle, setup, federated, test, test_path)}
    print(json.dumps(results["arms"], indent=2), flush=True)

    pooled_path = out / "pooled_datalist.json"
    pooled_path.write_text(json.dumps(_pooled(kind, sites)))
    arms = [("pooled (all sites' patients)", pooled_path, out / "pooled")]
    arms += [(f"{name} alone", path, out / f"local_{name}") for name, path in job["datalists"].items()]
    for arm, datalist, folder in [] if args.federated_only else arms:
        start = time.time()
        w = folder / "last_model.pt" if args.reuse else train_plain(bundle, setup, datalist, cohort, folder, epochs, init)
        results["arms"][arm] = {"seconds": seconds(arm, start), **score_on(bundle, setup, w, test, test_path)}
        print(arm, json.dumps(results["arms"][arm]), flush=True)
    name = f"results{tag}" + (f"_test{test_patients}" if args.reuse else "") + ".json"
    (out / name).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
