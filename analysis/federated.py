"""Federated training of the bundles with NVIDIA FLARE and MONAI FL (README, "Federated training").

``python -m analysis federated-job`` splits a cohort into N sites (patient level, disjoint,
stratified by risk class), writes one datalist per site in the formats of
:mod:`analysis.datalists`, and writes an NVFlare job folder:

- ``app_server``: FLARE's ScatterAndGather workflow (FedAvg) with the InTimeAccumulateWeightedAggregator
  (each site's update weighted by its number of training iterations), a FullModelShareableGenerator
  and a PTFileModelPersistor that starts from ``custom/initial_global_model.pt`` and writes the
  global model (``FL_global_model.pt``) after every round;
- ``app_site-K`` for each site: monai_nvflare's ClientAlgoExecutor running
  :class:`analysis.federated_client.BundleAlgo` (MONAI FL's MonaiAlgo) on the bundle's own
  ``configs/train.json``, with the site's datalist and the job's overrides.

``--export-global WORK`` (:func:`export_global_model`) turns FLARE's global model (``{"model": state_dict, ...}``) into the flat
state_dict the bundles' loaders read.

Only the weights (as differences from the global model) and the training statistics leave a site;
the images, labels and datalists stay where they are.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import io
from analysis.datalists import assign_folds, deal_by_class, prognosis_datalist, segmentation_datalist

log = logging.getLogger(__name__)

#: the initial global model in the server app (FLARE resolves a relative source_ckpt_file_full_name
#: against the app's custom/ folder)
INITIAL_MODEL = "initial_global_model.pt"
#: FLARE's file name of the global model (DefaultCheckpointFileName.GLOBAL_MODEL)
GLOBAL_MODEL = "FL_global_model.pt"
#: key metric each bundle's validation reports (ClientAlgoExecutor's before-training validation)
KEY_METRIC = {"segmentation": "val_dice_eq2", "prognosis": "val_macro_auc"}
#: the shipped weights and the config of their network sizes (``--pretrained shipped``)
SHIPPED_WEIGHTS = "models/synthetic_fs12.pt"
SHIPPED_SIZES = "configs/synthetic_weights.json"
#: inference-only keys of synthetic_weights.json, not overrides of train.json
_INFERENCE_ONLY = ("ckpt_path",)


# ------------------------------------------------------------------------------------ the split
def split_sites(strata: pd.Series, sites: int, seed: int = 0) -> pd.Series:
    """Site 0..sites-1 of every patient: disjoint, every patient once, stratified by ``strata``.

    ``strata`` is indexed by patient id (the risk class; missing values form a stratum of their own).
    Each stratum's patients, shuffled, are dealt round-robin over the sites, carrying on where the
    previous stratum stopped, so site sizes differ by at most one and every stratum is spread as
    evenly as its size allows.
    """
    if sites < 1:
        raise ValueError(f"sites must be at least 1, got {sites}")
    if len(strata) < sites:
        raise ValueError(f"{len(strata)} patient(s) cannot fill {sites} sites: need at least one per site")
    if strata.index.has_duplicates:
        raise ValueError("a patient id appears more than once")
    keys = strata.astype("object").where(strata.notna(), "undefined").astype(str)
    return deal_by_class(keys, sites, seed)


def _kind(bundle: Path) -> str:
    train = json.loads((bundle / "configs" / "train.json").read_text())
    return "prognosis" if "fold" in train and "num_classes" in train else "segmentation"


def _site_segmentation(full: dict, ids: list[str], val_fraction: float, seed: int) -> dict:
    """The site's labelled patients split into training/validation as segmentation_datalist does."""
    items = full["training"] + full["validation"]
    labelled = [pid for pid in ids if any(i["patient_id"] == pid for i in items)]
    rng = np.random.default_rng(seed)
    order = list(rng.permutation(labelled))
    n_val = int(round(len(order) * val_fraction))
    if len(order) >= 2:
        n_val = min(max(n_val, 1), len(order) - 1)
    val = set(order[:n_val])
    keep = set(ids)
    return {
        "dataset_dir_hint": full["dataset_dir_hint"], "seed": seed,
        "training": [i for i in items if i["patient_id"] in keep and i["patient_id"] not in val],
        "validation": [i for i in items if i["patient_id"] in val],
        "testing": [i for i in full["testing"] if i["patient_id"] in keep],
    }


def _site_prognosis(full: dict, ids: list[str], folds: int, seed: int) -> dict:
    """The site's patients with folds assigned within the site (stratified by risk class)."""
    keep = set(ids)
    training = [dict(e) for e in full["training"] if e["patient_id"] in keep]
    if training:
        labels = pd.Series([e["label"] for e in training])
        for e, k in zip(training, assign_folds(labels, folds=min(folds, len(training)), seed=seed)):
            e["fold"] = int(k)
    return {
        "dataset_dir_hint": full["dataset_dir_hint"], "num_folds": min(folds, max(len(training), 1)),
        "seed": seed, "training": training,
        "unlabelled": [e for e in full["unlabelled"] if e["patient_id"] in keep],
        "excluded": [e for e in full["excluded"] if e["patient_id"] in keep],
    }


def site_datalists(cohort: str | Path, kind: str, sites: int, seed: int = 0, folds: int = 4,
                   val_fraction: float = 0.2, masks: str | Path | None = None,
                   dataset_dir: str | Path | None = None) -> tuple[list[dict], pd.Series]:
    """One datalist per site (``kind`` "segmentation" or "prognosis") and the site of every patient."""
    from analysis.clinical_table import RULE_COLUMNS, read_clinical_table

    cohort = Path(cohort)
    base = Path(dataset_dir) if dataset_dir is not None else cohort
    clinical = read_clinical_table(cohort / "clinical.csv", required=("patient_id", *RULE_COLUMNS))
    strata = pd.Series(clinical["risk_class"].to_numpy(), index=clinical["patient_id"].to_numpy())
    site_of = split_sites(strata, sites, seed=seed)
    if kind == "segmentation":
        full = segmentation_datalist(cohort, base, val_fraction=val_fraction, seed=seed)
        make = lambda ids: _site_segmentation(full, ids, val_fraction, seed)  # noqa: E731
    else:
        full = prognosis_datalist(cohort, base, Path(masks) if masks else cohort / "labels", folds=folds,
                                  seed=seed)
        make = lambda ids: _site_prognosis(full, ids, folds, seed)  # noqa: E731
    lists = [make([pid for pid in site_of.index if site_of[pid] == k]) for k in range(sites)]
    return lists, site_of


# ------------------------------------------------------------------------------------ the job
def _read_overrides(overrides) -> dict:
    """Merge JSON files / JSON strings / dicts, later ones winning."""
    if overrides is None:
        return {}
    items = overrides if isinstance(overrides, (list, tuple)) else [overrides]
    merged: dict = {}
    for item in items:
        if isinstance(item, dict):
            merged.update(item)
        elif isinstance(item, str) and item.lstrip().startswith("{"):
            merged.update(json.loads(item))
        else:
            merged.update(json.loads(Path(item).read_text()))
    return merged


def build_network(bundle: str | Path, overrides: dict):
    """The bundle's ``network_def`` from its train.json with ``overrides`` (on CPU)."""
    from monai.bundle import ConfigParser

    from analysis.federated_client import bundle_on_path

    bundle = Path(bundle).resolve()
    bundle_on_path(str(bundle))
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "train.json"))
    parser.update({"bundle_root": str(bundle), **overrides, "device": "$torch.device('cpu')"})
    return parser.get_parsed_content("network_def")


def initial_weights(bundle: str | Path, overrides: dict, pretrained: str | None, seed: int = 0) -> dict:
    """The initial global model: ``pretrained`` weights checked against the network the sites build,
    or that network's own initialisation (seeded)."""
    import torch
    from monai.utils import set_determinism

    set_determinism(seed=seed)
    net = build_network(bundle, overrides)
    set_determinism(seed=None)
    if pretrained:
        path = Path(pretrained) if Path(pretrained).is_absolute() else Path(bundle) / pretrained
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"{path} does not fit the network of train.json with these overrides (give the "
                             f"sizes it was trained with, e.g. --pretrained shipped): {str(exc)[:300]}") from None
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}


def _server_config(sites: int, rounds: int) -> dict:
    return {
        "format_version": 2,
        "min_clients": sites,
        "num_rounds": rounds,
        "task_data_filters": [],
        "task_result_filters": [],
        "components": [
            {"id": "persistor", "path": "nvflare.app_opt.pt.file_model_persistor.PTFileModelPersistor",
             "args": {"source_ckpt_file_full_name": INITIAL_MODEL, "load_weights_only": True}},
            {"id": "shareable_generator",
             "path": "nvflare.app_common.shareablegenerators.full_model_shareable_generator."
                     "FullModelShareableGenerator", "args": {}},
            {"id": "aggregator",
             "path": "nvflare.app_common.aggregators.intime_accumulate_model_aggregator."
                     "InTimeAccumulateWeightedAggregator",
             "args": {"expected_data_kind": "WEIGHT_DIFF"}},
        ],
        "workflows": [
            {"id": "scatter_and_gather", "path": "nvflare.app_common.workflows.scatter_and_gather.ScatterAndGather",
             "args": {"min_clients": sites, "num_rounds": rounds, "start_round": 0,
                      "wait_time_after_min_received": 0, "aggregator_id": "aggregator",
                      "persistor_id": "persistor", "shareable_generator_id": "shareable_generator",
                      "train_task_name": "train", "train_timeout": 0}},
        ],
    }


def _client_config(bundle: Path, kind: str, train_kwargs: dict, local_epochs: int) -> dict:
    return {
        "format_version": 2,
        "executors": [{
            "tasks": ["train", "submit_model", "validate"],
            "executor": {"id": "executor", "path": "monai_nvflare.client_algo_executor.ClientAlgoExecutor",
                         "args": {"client_algo_id": "client_algo", "key_metric": KEY_METRIC[kind]}},
        }],
        "task_result_filters": [],
        "task_data_filters": [],
        "components": [{
            "id": "client_algo",
            "path": "analysis.federated_client.BundleAlgo",
            "args": {
                "bundle_root": str(bundle),
                "local_epochs": local_epochs,
                "config_train_filename": "configs/train.json",
                # the before-training validation of the global model: train.json's own evaluator
                "config_evaluate_filename": "configs/train.json",
                "eval_workflow_name": "train",
                "train_kwargs": train_kwargs,
                "eval_kwargs": dict(train_kwargs),
            },
        }],
    }


def write_job(bundle: str | Path, cohort: str | Path, out: str | Path, sites: int = 3, rounds: int = 5,
              local_epochs: int = 1, seed: int = 0, overrides=None, pretrained: str | None = None,
              datalist_dir: str | Path | None = None, folds: int = 4, val_fraction: float = 0.2,
              masks: str | Path | None = None) -> dict:
    """Write the site datalists and the NVFlare job folder; returns a summary (paths, site sizes)."""
    import torch

    bundle, cohort, out = Path(bundle).resolve(), Path(cohort).resolve(), Path(out)
    if not (bundle / "configs" / "train.json").is_file():
        raise ValueError(f"{bundle} is not a bundle folder (no configs/train.json)")
    if sites < 1 or rounds < 1 or local_epochs < 1:
        raise ValueError("sites, rounds and local_epochs must be at least 1")
    kind = _kind(bundle)
    layers = []
    if pretrained == "shipped":
        pretrained = SHIPPED_WEIGHTS
        layers.append({k: v for k, v in _read_overrides(str(bundle / SHIPPED_SIZES)).items()
                       if k not in _INFERENCE_ONLY})
    settings = {**(layers[0] if layers else {}), **_read_overrides(overrides)}
    datalist_dir = Path(datalist_dir) if datalist_dir else cohort / "datalists" / f"federated_{sites}sites"
    lists, site_of = site_datalists(cohort, kind, sites, seed=seed, folds=folds, val_fraction=val_fraction,
                                    masks=masks)
    names = [f"site-{k + 1}" for k in range(sites)]
    for name, dl in zip(names, lists):
        # a site trains and validates every round: it needs patients on both sides
        if kind == "segmentation":
            short = not dl["training"] or not dl["validation"]
        else:
            short = len({e["fold"] for e in dl["training"]}) < 2
        if short:
            raise ValueError(f"{name} has too few labelled patients to train and validate "
                             f"({len(site_of[site_of == names.index(name)])} patients): use fewer --sites")
    datalists = {}
    for name, dl in zip(names, lists):
        filename = "segmentation.json" if kind == "segmentation" else "prognosis.json"
        datalists[name] = io.write_json(datalist_dir / name / filename, dl).resolve()

    weights = initial_weights(bundle, settings, pretrained, seed=seed)
    # the job names the app folders and the sites; FLARE's simulator runs sites site-1..site-N
    meta = {"name": f"{bundle.name}_fedavg_{sites}sites", "resource_spec": {}, "min_clients": sites,
            "deploy_map": {"app_server": ["server"], **{f"app_{n}": [n] for n in names}}}
    io.write_json(out / "meta.json", meta)
    io.write_json(out / "app_server" / "config" / "config_fed_server.json", _server_config(sites, rounds))
    init_path = out / "app_server" / "custom" / INITIAL_MODEL
    init_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": weights}, init_path)
    for name in names:
        train_kwargs = {**settings, "dataset_dir": str(cohort), "datalist": str(datalists[name]),
                        # the LR schedule spans the whole federation: rounds x local epochs
                        "max_epochs": rounds * local_epochs}
        io.write_json(out / f"app_{name}" / "config" / "config_fed_client.json",
                      _client_config(bundle, kind, train_kwargs, local_epochs))
    sizes = {n: int((site_of == k).sum()) for k, n in enumerate(names)}
    log.info("federated job %s: %s bundle, %d sites (%s patients), %d rounds x %d local epoch(s); "
             "initial global model from %s", out, kind, sites, ", ".join(f"{n}: {s}" for n, s in sizes.items()),
             rounds, local_epochs, pretrained or "the network's own initialisation")
    return {"job": out, "kind": kind, "sites": sizes, "datalists": datalists, "initial_model": init_path,
            "site_of": site_of}


# ------------------------------------------------------------------------------ the global model
def find_global_model(work: str | Path) -> Path:
    """FLARE's global model under a simulator workspace (or the file itself)."""
    work = Path(work)
    if work.is_file():
        return work
    found = sorted(work.rglob(GLOBAL_MODEL))
    if not found:
        raise ValueError(f"no {GLOBAL_MODEL} under {work} (did the FLARE run finish a round?)")
    if len(found) > 1:
        raise ValueError(f"several {GLOBAL_MODEL} under {work}: {', '.join(map(str, found))}; give the file")
    return found[0]


def export_global_model(work: str | Path, out: str | Path) -> Path:
    """FLARE's ``{"model": state_dict, "train_conf": ...}`` as the flat state_dict the bundles load
    (their ``ckpt_path`` / ``pretrained``), like the ``model.pt`` their own training writes."""
    import torch

    src = find_global_model(work)
    data = torch.load(src, map_location="cpu", weights_only=True)
    state = data.get("model", data) if isinstance(data, dict) else data
    flat = {k: torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v.detach().cpu()
            for k, v in state.items()}
    out = Path(out)
    with io.atomic_path(out) as tmp:
        torch.save(flat, tmp)
    log.info("global model %s -> %s (%d tensors)", src, out, len(flat))
    return out


def federated_job_cli(bundle: str | None = None, cohort: str | None = None, out: str | None = None,
                      sites: int = 3, rounds: int = 5, local_epochs: int = 1, seed: int = 0,
                      overrides=None, pretrained: str | None = None, datalist_dir: str | None = None,
                      folds: int = 4, val_fraction: float = 0.2, masks: str | None = None,
                      export_global: str | None = None) -> None:
    """python -m analysis federated-job --bundle BUNDLE --cohort DIR --sites 3 --rounds R --out JOB

    Writes one datalist per site (patients split disjointly, stratified by risk class) and an NVFlare
    job folder: FedAvg (ScatterAndGather) on the server, MONAI FL's client (monai_nvflare
    ClientAlgoExecutor + MonaiAlgo) running the bundle's configs/train.json at every site. Run it with
    `nvflare simulator JOB -w WORK -n SITES -t 1` (pip install -e .[federated]); then
    `federated-job --export-global WORK --out model.pt` writes the global model as the bundles load it.

    Args:
        bundle: the bundle folder (bundles/hcc_liver_seg or bundles/progswin_prognosis); the sites run its
            configs/train.json from there.
        cohort: the cohort folder split into sites (docs/contracts.md).
        out: the job folder to write; with --export-global, the state_dict file to write.
        sites: number of sites (FLARE clients site-1..site-N), each with its own patients.
        rounds: number of FedAvg rounds.
        local_epochs: training epochs at each site per round.
        seed: seed of the site split, the sites' validation split / folds and the initial network.
        overrides: config overrides for every site: a JSON file, a JSON string, or a list of them (later
            ones win), e.g. tiny settings.
        pretrained: initial global model: a weights file (relative to the bundle or absolute), or "shipped"
            for the bundle's models/synthetic_fs12.pt with the sizes of configs/synthetic_weights.json;
            default the network's own initialisation.
        datalist_dir: folder of the site datalists <datalist_dir>/site-K/segmentation.json|prognosis.json
            (default <cohort>/datalists/federated_<N>sites).
        folds: prognosis folds within each site (fold 0 validates; fewer when a site has fewer patients).
        val_fraction: fraction of each site's labelled patients held out for segmentation validation.
        masks: prognosis only: folder of liver/tumour masks (default <cohort>/labels).
        export_global: a FLARE workspace (or its FL_global_model.pt): write its global model to --out
            as a flat state_dict and do nothing else.
    """
    from analysis.clinical_table import usage_exit

    try:
        if export_global:
            if not out:
                raise ValueError("--export-global needs --out FILE")
            print(export_global_model(export_global, out))
            return
        if not (bundle and cohort and out):
            raise ValueError("--bundle, --cohort and --out are required")
        result = write_job(bundle, cohort, out, sites=sites, rounds=rounds, local_epochs=local_epochs, seed=seed,
                           overrides=overrides, pretrained=pretrained, datalist_dir=datalist_dir, folds=folds,
                           val_fraction=val_fraction, masks=masks)
    except (ValueError, FileNotFoundError) as exc:
        raise usage_exit(f"federated-job: {exc}") from None
    print(f"job: {result['job']}")
    for name, size in result["sites"].items():
        print(f"{name}: {size} patients, datalist {result['datalists'][name]}")
    print(f"run: nvflare simulator {result['job']} -w WORK -n {len(result['sites'])} -t 1", file=sys.stdout)

