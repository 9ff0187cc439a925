"""Federated training (issue 16): the site split, the NVFlare job ``federated-job`` writes, and FLARE's
simulator running it (2 sites, 2 rounds, CPU-tiny).

The split and job-writing tests run in every env; the simulator test needs the ``federated`` extra
(nvflare, monai-nvflare), which tox installs in its own ``federated`` env, and is skipped elsewhere.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from analysis.federated import GLOBAL_MODEL, INITIAL_MODEL, site_datalists, split_sites, write_job
from analysis.federated_client import ROUND_STATE

REPO_ROOT = Path(__file__).resolve().parents[1]
SEG = REPO_ROOT / "bundles" / "hcc_liver_seg"
PROG = REPO_ROOT / "bundles" / "progswin_prognosis"

#: tests/test_seg_bundle.py's TINY/TRAIN settings, as a site's overrides of train.json
TINY_TRAIN = {"feature_size": 12, "roi_size": [64, 64, 64], "target_spacing": [2.0, 2.0, 5.0], "sw_batch_size": 1,
              "overlap": 0.25, "num_workers": 0, "device": "$torch.device('cpu')", "use_checkpoint": "false",
              "num_samples": 1, "batch_size": 1, "cache_rate": 1.0, "val_interval": 1}

HAVE_FLARE = all(importlib.util.find_spec(m) is not None for m in ("nvflare", "monai_nvflare"))


# ------------------------------------------------------------------------------------ the split
@pytest.mark.parametrize("sites", [2, 3, 5])
def test_split_is_disjoint_covering_and_stratified(sites):
    strata = pd.Series([0] * 11 + [1] * 7 + [2] * 9 + [3] * 5 + [None] * 4,
                       index=[f"P{i:03d}" for i in range(36)], dtype="object")
    site_of = split_sites(strata, sites, seed=2)
    # every patient exactly once, in a site 0..sites-1 (a Series over the patients: disjoint by construction)
    assert list(site_of.index) == list(strata.index) and set(site_of) == set(range(sites))
    sizes = Counter(site_of)
    assert max(sizes.values()) - min(sizes.values()) <= 1
    keys = strata.fillna("undefined")
    for stratum in keys.unique():
        per_site = Counter(site_of[keys == stratum])
        counts = [per_site.get(k, 0) for k in range(sites)]
        assert max(counts) - min(counts) <= 1, (stratum, counts)
    assert site_of.equals(split_sites(strata, sites, seed=2))  # deterministic for a seed
    assert not site_of.equals(split_sites(strata, sites, seed=3))


def test_split_errors():
    with pytest.raises(ValueError, match="cannot fill 4 sites"):
        split_sites(pd.Series([0, 1, 2], index=["a", "b", "c"]), 4)
    with pytest.raises(ValueError, match="more than once"):
        split_sites(pd.Series([0, 1, 2], index=["a", "a", "c"]), 2)


def test_site_datalists_partition_the_cohort(small_cohort):
    from analysis.cohort import read_clinical

    clin = read_clinical(Path(small_cohort) / "clinical.csv")
    seg, site_of = site_datalists(small_cohort, "segmentation", 3, seed=0)
    prog, site_of2 = site_datalists(small_cohort, "prognosis", 3, seed=0)
    assert site_of.equals(site_of2)  # one split for both bundles
    ids = lambda dl, keys: {i["patient_id"] for k in keys for i in dl[k]}  # noqa: E731
    seen = [ids(dl, ("training", "validation", "testing")) for dl in seg]
    assert sorted(p for s in seen for p in s) == sorted(clin["patient_id"])  # every patient once, disjoint
    for k, dl in enumerate(seg):
        assert seen[k] == set(site_of.index[site_of == k])
        assert ids(dl, ("training",)) and ids(dl, ("validation",))
        assert not ids(dl, ("training",)) & ids(dl, ("validation",))
        for item in dl["training"] + dl["validation"]:
            assert (Path(small_cohort) / item["image"]).is_file() and not Path(item["image"]).is_absolute()
    labelled = [p for dl in prog for p in ids(dl, ("training",))]
    assert sorted(labelled) == sorted(clin.loc[clin["risk_class"].notna(), "patient_id"])
    for dl in prog:
        folds = {e["fold"] for e in dl["training"]}
        assert folds == set(range(dl["num_folds"]))


# ------------------------------------------------------------------------------------- the job
def test_job_layout_and_shipped_start(small_cohort, tmp_path):
    import torch

    job = tmp_path / "job"
    result = write_job(SEG, small_cohort, job, sites=3, rounds=4, pretrained="shipped",
                       datalist_dir=tmp_path / "dl")
    meta = json.loads((job / "meta.json").read_text())
    assert meta["deploy_map"] == {"app_server": ["server"], "app_site-1": ["site-1"], "app_site-2": ["site-2"],
                                  "app_site-3": ["site-3"]}
    server = json.loads((job / "app_server" / "config" / "config_fed_server.json").read_text())
    (wf,) = server["workflows"]
    assert wf["path"].endswith("ScatterAndGather") and wf["args"]["num_rounds"] == 4
    assert wf["args"]["min_clients"] == 3
    paths = {c["id"]: c["path"] for c in server["components"]}
    assert paths["aggregator"].endswith("InTimeAccumulateWeightedAggregator")
    assert paths["persistor"].endswith("PTFileModelPersistor")
    # the FL-ready start: the shipped weights, as FLARE's {"model": state_dict}
    init = torch.load(job / "app_server" / "custom" / INITIAL_MODEL, map_location="cpu", weights_only=True)
    shipped = torch.load(SEG / "models" / "synthetic_fs12.pt", map_location="cpu", weights_only=True)
    shipped = shipped.get("model", shipped)
    assert init["model"].keys() == shipped.keys()
    assert all(torch.equal(init["model"][k], shipped[k]) for k in shipped)
    sizes = json.loads((SEG / "configs" / "synthetic_weights.json").read_text())
    for k in range(1, 4):
        client = json.loads((job / f"app_site-{k}" / "config" / "config_fed_client.json").read_text())
        assert client["executors"][0]["executor"]["path"] == "monai_nvflare.client_algo_executor.ClientAlgoExecutor"
        (algo,) = client["components"]
        args = algo["args"]
        # the bundle's own train.json, where the bundle lives: no copy of the config in the job
        assert args["bundle_root"] == str(SEG.resolve()) and args["config_train_filename"] == "configs/train.json"
        assert args["train_kwargs"]["datalist"] == str(result["datalists"][f"site-{k}"])
        assert args["train_kwargs"]["feature_size"] == sizes["feature_size"]
        assert args["train_kwargs"]["max_epochs"] == 4
    assert not list(job.rglob("train.json"))
    assert sum(result["sites"].values()) == 12


def test_pretrained_that_does_not_fit_is_refused(small_cohort, tmp_path):
    with pytest.raises(ValueError, match="does not fit"):
        write_job(SEG, small_cohort, tmp_path / "job", sites=2, rounds=1, pretrained="models/synthetic_fs12.pt",
                  datalist_dir=tmp_path / "dl")  # feature_size 48 of train.json, weights of 12


def test_too_many_sites_is_a_clear_error(small_cohort, tmp_path):
    with pytest.raises(ValueError, match="too few labelled patients"):
        write_job(SEG, small_cohort, tmp_path / "job", sites=12, rounds=1, datalist_dir=tmp_path / "dl")


def test_prognosis_job(small_cohort, tmp_path):
    result = write_job(PROG, small_cohort, tmp_path / "job", sites=2, rounds=1, pretrained="shipped",
                       datalist_dir=tmp_path / "dl")
    assert result["kind"] == "prognosis"
    client = json.loads((tmp_path / "job" / "app_site-1" / "config" / "config_fed_client.json").read_text())
    assert client["executors"][0]["executor"]["args"]["key_metric"] == "val_macro_auc"
    assert json.loads(result["datalists"]["site-1"].read_text())["training"]


# ------------------------------------------------------------------------------ FLARE's simulator
def _trim(datalist: Path) -> None:
    """One t0 scan to train on and one to validate, per site: the simulator test stays CPU-tiny."""
    dl = json.loads(datalist.read_text())
    t0 = lambda items: [i for i in items if i["timepoint"] == "t0"]  # noqa: E731
    dl["training"], dl["validation"], dl["testing"] = t0(dl["training"])[:1], t0(dl["validation"])[:1], []
    datalist.write_text(json.dumps(dl))


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(not HAVE_FLARE, reason="nvflare / monai-nvflare not installed: the simulator test runs in "
                                           "tox's 'federated' env (pip install -e .[federated])")
def test_simulator_two_sites_two_rounds(small_cohort, tmp_path):
    import torch

    job, work = tmp_path / "job", tmp_path / "work"
    result = write_job(SEG, small_cohort, job, sites=2, rounds=2, overrides=dict(TINY_TRAIN),
                       datalist_dir=tmp_path / "dl")
    for path in result["datalists"].values():
        _trim(path)
    nvflare = shutil.which("nvflare", path=os.path.dirname(sys.executable)) or shutil.which("nvflare")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    start = time.time()
    run = subprocess.run([nvflare, "simulator", str(job), "-w", str(work), "-n", "2", "-t", "1"],
                         capture_output=True, text=True, timeout=540, env=env)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    print(f"simulator: {time.time() - start:.0f} s")
    for k in (1, 2):
        assert f"Contribution from site-{k} ACCEPTED by the aggregator at round 1" in log, log[-4000:]

    # the global model where the README says it lands, and exported as the bundles load it
    (global_file,) = list(work.rglob(GLOBAL_MODEL))
    assert global_file == work / "server" / "simulate_job" / "app_server" / GLOBAL_MODEL
    out = tmp_path / "model.pt"
    done = subprocess.run([sys.executable, "-m", "analysis", "federated-job", "--export-global", str(work),
                           "--out", str(out)], capture_output=True, text=True, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    glob = torch.load(out, map_location="cpu", weights_only=True)
    from analysis.federated import build_network

    build_network(SEG, TINY_TRAIN).load_state_dict(glob, strict=True)

    init = torch.load(job / "app_server" / "custom" / INITIAL_MODEL, map_location="cpu", weights_only=True)["model"]
    local = [torch.load(work / f"site-{k}" / "simulate_job" / f"app_site-{k}" / "models" / "local_model.pt",
                        map_location="cpu", weights_only=True) for k in (1, 2)]

    def differs(a, b):
        return any(not torch.allclose(a[key].float(), b[key].float()) for key in a)

    assert glob.keys() == init.keys() == local[0].keys() == local[1].keys()
    assert differs(glob, init), "the global model is still the initial one"
    for k, site in enumerate(local, 1):
        assert differs(glob, site), f"the global model equals site-{k}'s local weights"
    assert differs(local[0], local[1])

    # each site's schedule ran over the whole job (2 rounds x 1 epoch), carried across the simulator's
    # fresh client process of round 2, not restarted at its warm-up epoch
    for k in (1, 2):
        app = work / f"site-{k}" / "simulate_job" / f"app_site-{k}"
        state = torch.load(app / "models" / ROUND_STATE, map_location="cpu", weights_only=True)
        assert (state["epoch"], state["lr_scheduler"]["last_epoch"]) == (2, 2)
        assert state["lr_scheduler"]["t_total"] == 2, "the schedule shrank to one round"
        assert "resumed the site's training state at epoch 1" in log + "".join(
            p.read_text(errors="replace") for p in (work / f"site-{k}").rglob("log*.txt")), log[-4000:]
