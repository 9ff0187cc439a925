"""ONNX Runtime against PyTorch on CPU, both bundles, full size, all in one run.

One row per backend and bundle, each a ratio against eager fp32 in the same run:

- prognosis: ProgSwin-UNETR (inference.json's network: 3 time points x 128^3, feature_size 48,
  window 7, Eq. 6 head), per case = the network's forward on a preprocessed case (random input);
- segmentation: one synthetic 128-matrix scan through the bundle's whole inference.json pipeline
  (load -> checks -> RAS/resample/scale/crop -> sliding window -> invert -> post-process ->
  saved mask) at inference.json's default sizes (feature_size 48, ROI 96^3, 1.5 x 1.5 x 2.5 mm,
  overlap 0.5, sw_batch_size 4), ``--backend torch`` / ``onnxruntime`` / the traced network as
  ``network``.

Backends: eager fp32 (``torch.no_grad``), traced TorchScript (``torch.jit.trace`` + ``freeze``),
ONNX Runtime (``python -m analysis export-onnx``'s exporter, CPU provider, intra-op threads = the
cores of this process; graph optimisation ``all`` and ``basic`` are both timed on the prognosis
network and the faster one is used for the segmentation pipeline). Every backend runs once
untimed (warm-up: allocator, thread pool, ORT's first-run layout work) and then ``repeats`` times
timed; the best timed run is reported. Full size: 1 warm-up + 2 timed (prognosis) and 1 + 1
(segmentation) per backend, few because one eager case takes tens of seconds on 2 cores.

GFLOP/s: the network's floating-point operations (``torch.utils.flop_counter`` on the eager
warm-up run: convolutions and matrix products) over the time, beside an sgemm rate measured in the
same run (a 4096^2 fp32 ``torch.matmul``, best of 5). Weights are random: speed does not depend on
them. ``quick=True``: feature_size 12, 64^3 (prognosis) and ROI 64^3 on a 64-matrix scan.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEG = REPO / "bundles" / "hcc_liver_seg"
PROG = REPO / "bundles" / "progswin_prognosis"


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "unknown")
    except OSError:
        return "unknown"


def sgemm_gflops(n: int = 4096, repeats: int = 5) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


def _ort_session(path: Path, level: str):
    sys.path.insert(0, str(PROG))
    try:
        from scripts.onnx_backend import session_options
    finally:
        sys.path.remove(str(PROG))
    import onnxruntime as ort

    return ort.InferenceSession(str(path), sess_options=session_options(_cores(), level),
                                providers=["CPUExecutionProvider"])


def _prognosis(tmp: Path, quick: bool, sgemm: float, common: dict) -> list[dict]:
    import numpy as np
    import torch

    from analysis.onnx_export import bundle_scripts, export_network

    fs, side = (12, 64) if quick else (48, 128)
    repeats = 1 if quick else 2
    with bundle_scripts(PROG):
        from scripts.net import ProgSwinUNETR

        torch.manual_seed(0)
        net = ProgSwinUNETR(in_channels=3, out_channels=4, feature_size=fs, window_size=7).eval()
    x = torch.randn(1, 3, side, side, side)
    times, outs = {}, {}

    def eager():
        with torch.no_grad():
            outs["eager"] = torch.softmax(net(x), 1).numpy()

    flops = _flops(eager)  # the warm-up, counted
    times["eager"] = _best(eager, repeats)

    start = time.perf_counter()
    with torch.no_grad():
        ts = torch.jit.freeze(torch.jit.trace(net, x, check_trace=False))
    ts_build = time.perf_counter() - start

    def traced():
        with torch.no_grad():
            outs["torchscript"] = torch.softmax(ts(x), 1).numpy()

    traced()
    times["torchscript"] = _best(traced, repeats)

    start = time.perf_counter()
    export_network(net, x, tmp / "prog.onnx")
    export_s = time.perf_counter() - start
    sessions = {}
    for level in ("all", "basic"):
        sessions[level] = _ort_session(tmp / "prog.onnx", level)

        def ort_run(level=level):
            out = sessions[level].run(None, {"image": x.numpy()})[0]
            outs[f"ort_{level}"] = torch.softmax(torch.from_numpy(out), 1).numpy()

        ort_run()
        times[f"ort_{level}"] = _best(ort_run, repeats)
    best_level = min(("all", "basic"), key=lambda k: times[f"ort_{k}"])
    rows = []
    labels = {"eager": "eager fp32 (torch.no_grad)", "torchscript": "traced TorchScript (jit.trace + freeze)",
              "ort_all": "ONNX Runtime, ORT_ENABLE_ALL", "ort_basic": "ONNX Runtime, ORT_ENABLE_BASIC"}
    for key in ("eager", "torchscript", "ort_all", "ort_basic"):
        rows.append({
            "name": f"ProgSwin-UNETR per case, {labels[key]}", "unit": "s", "value": round(times[key], 3),
            "baseline_name": labels["eager"], "baseline_value": round(times["eager"], 3),
            "ratio": round(times["eager"] / times[key], 2), "device": "cpu",
            "settings": {**common, "bundle": "progswin_prognosis", "backend": key, "input": list(x.shape),
                         "feature_size": fs, "window_size": 7, "head": "Eq. 6 (mean)", "timed_runs": repeats,
                         "warmup_runs": 1, "gflop_per_case": round(flops / 1e9, 1),
                         "gflops_per_s": round(flops / times[key] / 1e9, 1),
                         "fraction_of_sgemm": round(flops / times[key] / 1e9 / sgemm, 3),
                         "max_abs_prob_diff_vs_eager": float(np.max(np.abs(outs[key] - outs["eager"]))),
                         **({"torchscript_build_s": round(ts_build, 1)} if key == "torchscript" else {}),
                         **({"onnx_export_s": round(export_s, 1), "opset": 17,
                             "kept": key == f"ort_{best_level}"} if key.startswith("ort") else {})},
        })
    return rows, best_level


def _seg(tmp: Path, quick: bool, sgemm: float, common: dict, level: str) -> list[dict]:
    import nibabel as nib
    import numpy as np
    import torch
    from monai.bundle import ConfigWorkflow
    from monai.networks.nets import SwinUNETR

    from analysis.onnx_export import bundle_scripts, export_network
    from analysis.synthetic import make_cohort

    if quick:
        shape, fs, roi, spacing = 64, 12, [64, 64, 64], [1.0, 1.0, 2.5]
    else:
        shape, fs, roi, spacing = 128, 48, [96, 96, 96], [1.5, 1.5, 2.5]
    repeats = 1
    make_cohort(tmp / "cohort", n_patients=1, shape=shape, seed=0, progress=False)
    inputs = tmp / "inputs"
    scan = next((tmp / "cohort" / "images").glob("*/t0.nii.gz"))
    (inputs / scan.parent.name).mkdir(parents=True)
    os.link(scan, inputs / scan.parent.name / "t0.nii.gz")
    torch.manual_seed(0)
    net = SwinUNETR(in_channels=1, out_channels=3, feature_size=fs).eval()
    (tmp / "models").mkdir()
    torch.save(net.state_dict(), tmp / "models" / "model.pt")
    start = time.perf_counter()
    export_network(net, torch.rand(1, 1, *roi), tmp / "models" / "model.onnx")
    export_s = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        ts = torch.jit.freeze(torch.jit.trace(net, torch.rand(1, 1, *roi), check_trace=False))
    torch.jit.save(ts, str(tmp / "models" / "model.ts"))
    ts_build = time.perf_counter() - start
    base = {"feature_size": fs, "roi_size": roi, "target_spacing": spacing, "num_workers": 0, "min_liver_ml": 0.0,
            "device": "$torch.device('cpu')", "amp": False, "ckpt_dir": str(tmp / "models"),
            "input_dir": str(inputs)}
    variants = {
        "eager": {"backend": "torch"},
        "torchscript": {"backend": "torch", "load_pretrain": False,
                        "network": f"$torch.jit.load('{tmp / 'models' / 'model.ts'}')"},
        "onnxruntime": {"backend": "onnxruntime", "onnx_path": str(tmp / "models" / "model.onnx"),
                        "onnx_threads": _cores(), "onnx_network#optimization": level},
    }
    logging.getLogger("hcc_liver_seg").setLevel(logging.WARNING)
    times, flops = {}, None
    with bundle_scripts(SEG):
        for key, over in variants.items():
            def once(tag, key=key, over=over):
                wf = ConfigWorkflow(config_file=str(SEG / "configs" / "inference.json"), workflow_type="infer",
                                    logging_file=False, bundle_root=str(SEG), output_dir=str(tmp / f"{key}_{tag}"),
                                    **base, **over)
                wf.initialize()
                start = time.perf_counter()
                with torch.no_grad():
                    wf.run()
                took = time.perf_counter() - start
                wf.finalize()
                return took

            if key == "eager":
                flops = _flops(lambda: once("warm"))
            else:
                once("warm")
            times[key] = min(once(f"t{i}") for i in range(repeats))
    rel = Path(scan.parent.name) / "t0.nii.gz"
    masks = {k: np.asarray(nib.load(tmp / f"{k}_t0" / rel).dataobj) for k in variants}
    img = nib.load(scan)
    labels = {"eager": "eager fp32 (--backend torch)", "torchscript": "traced TorchScript (jit.trace + freeze)",
              "onnxruntime": f"ONNX Runtime (--backend onnxruntime, ORT level {level})"}
    rows = []
    for key in variants:
        rows.append({
            "name": f"hcc_liver_seg per volume (load -> saved mask), {labels[key]}", "unit": "s",
            "value": round(times[key], 2), "baseline_name": labels["eager"], "baseline_value": round(times["eager"], 2),
            "ratio": round(times["eager"] / times[key], 2), "device": "cpu",
            "settings": {**common, "bundle": "hcc_liver_seg", "backend": key, "feature_size": fs, "roi": roi,
                         "target_spacing_mm": spacing, "overlap": 0.5, "sw_batch_size": 4,
                         "input_shape": list(img.shape), "timed_runs": repeats, "warmup_runs": 1,
                         "gflop_per_volume": round(flops / 1e9, 1),
                         "gflops_per_s": round(flops / times[key] / 1e9, 1),
                         "fraction_of_sgemm": round(flops / times[key] / 1e9 / sgemm, 3),
                         "mask_agreement_vs_eager": float(np.mean(masks[key] == masks["eager"])),
                         **({"torchscript_build_s": round(ts_build, 1)} if key == "torchscript" else {}),
                         **({"onnx_export_s": round(export_s, 1)} if key == "onnxruntime" else {})},
        })
    return rows


def run(quick: bool = False) -> list[dict]:
    import torch

    cores = _cores()
    torch.set_num_threads(cores)
    sgemm = sgemm_gflops(1024 if quick else 4096)
    common = {"cpu_model": _cpu_model(), "cores": cores, "torch_threads": torch.get_num_threads(),
              "ort_intra_op_threads": cores, "sgemm_gflops": round(sgemm, 1),
              "load_average_1min": round(os.getloadavg()[0], 2), "quick": quick, "weights": "random"}
    import onnxruntime

    common["onnxruntime"] = onnxruntime.__version__
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "p").mkdir()
        (tmp / "s").mkdir()
        prog, level = _prognosis(tmp / "p", quick, sgemm, common)
        for r in prog:
            print(f"   {r['name']}: {r['value']} s (x{r['ratio']})", flush=True)
        seg = _seg(tmp / "s", quick, sgemm, common, level)
    return prog + seg


if __name__ == "__main__":
    import json

    print(json.dumps(run(quick="--quick" in sys.argv), indent=1))
