"""hcc_liver_seg speed: whole-volume inference through the bundle's own inference.json.

One volume, timed end to end as a user runs it (load -> checks -> RAS/resample/scale/crop ->
SwinUNETR sliding window -> invert to the input grid -> post-process -> atomic save):

- baseline: plain eager fp32, ``torch.no_grad`` (the evaluator's default), ``sw_batch_size 1``;
- faster path, same run, same input: ``torch.inference_mode``, ``sw_batch_size 4`` (the bundle
  default: larger GEMMs), on CUDA also fp16 autocast (the bundle's ``amp``).

Both write masks; their agreement is reported (they must agree: the path changes speed only).
Full: the bundle defaults (feature_size 48, ROI 96^3, 1.5 x 1.5 x 2.5 mm, overlap 0.5) on a
synthetic 128-matrix scan (~200 mm field of view, 51 slices of 5 mm). ``quick=True``: feature_size
12, ROI 64^3, 1 x 1 x 2.5 mm on a 64-matrix scan (4 windows; < 1 minute on 2 idle cores). Weights are random: speed
does not depend on them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "hcc_liver_seg"


def _bundle_on_path() -> None:
    for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
        if not (getattr(sys.modules[name], "__file__", None) or "").startswith(str(BUNDLE)):
            del sys.modules[name]
    if str(BUNDLE) not in sys.path:
        sys.path.insert(0, str(BUNDLE))


def _infer(input_dir: Path, ckpt_dir: Path, out: Path, overrides: dict, inference_mode: bool) -> float:
    import torch
    from monai.bundle import ConfigWorkflow

    _bundle_on_path()
    wf = ConfigWorkflow(config_file=str(BUNDLE / "configs" / "inference.json"), workflow_type="infer",
                        logging_file=False, bundle_root=str(BUNDLE), input_dir=str(input_dir),
                        ckpt_dir=str(ckpt_dir), output_dir=str(out), **overrides)
    wf.initialize()
    ctx = torch.inference_mode() if inference_mode else contextlib.nullcontext()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    with ctx:
        wf.run()
    sync()
    return time.perf_counter() - start


def run(quick: bool = False) -> list[dict]:
    import nibabel as nib
    import numpy as np
    import torch
    from monai.networks.nets import SwinUNETR

    from analysis.synthetic import make_cohort

    cuda = torch.cuda.is_available()
    device = "cuda:0" if cuda else "cpu"
    if quick:
        # 1 x 1 x 2.5 mm makes the 64-matrix scan ~80 x 80 x 52: 4 windows of 64^3, so batching
        # windows has something to batch
        shape, fs, roi, spacing = 64, 12, [64, 64, 64], [1.0, 1.0, 2.5]
    else:
        shape, fs, roi, spacing = 128, 48, [96, 96, 96], [1.5, 1.5, 2.5]
    common = {"feature_size": fs, "roi_size": roi, "target_spacing": spacing, "num_workers": 0,
              "overlap": 0.5, "min_liver_ml": 0.0, "device": f"$torch.device('{device}')"}
    logging.getLogger("hcc_liver_seg").setLevel(logging.WARNING)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_cohort(tmp / "cohort", n_patients=1, shape=shape, seed=0, progress=False)
        inputs = tmp / "inputs"
        scan = next((tmp / "cohort" / "images").glob("*/t0.nii.gz"))
        (inputs / scan.parent.name).mkdir(parents=True)
        os.link(scan, inputs / scan.parent.name / "t0.nii.gz")
        torch.manual_seed(0)
        (tmp / "models").mkdir()
        torch.save(SwinUNETR(in_channels=1, out_channels=3, feature_size=fs).state_dict(), tmp / "models" / "model.pt")
        base = {**common, "sw_batch_size": 1, "amp": False}
        fast = {**common, "sw_batch_size": 4, "amp": cuda}
        if quick:
            # no warm-up (time); the faster path runs first, so it pays the first-call costs
            t_fast = _infer(inputs, tmp / "models", tmp / "fast", fast, True)
            t_base = _infer(inputs, tmp / "models", tmp / "base", base, False)
        else:
            _infer(inputs, tmp / "models", tmp / "warm", fast, True)  # allocator, thread pool, kernels
            t_base = _infer(inputs, tmp / "models", tmp / "base", base, False)
            t_fast = _infer(inputs, tmp / "models", tmp / "fast", fast, True)
        rel = Path(scan.parent.name) / "t0.nii.gz"
        a = np.asarray(nib.load(tmp / "base" / rel).dataobj)
        b = np.asarray(nib.load(tmp / "fast" / rel).dataobj)
        img = nib.load(scan)
    records.append({
        "name": "hcc_liver_seg inference per volume (load -> preprocess -> sliding window -> invert -> save)",
        "unit": "s", "value": round(t_fast, 2),
        "baseline_name": "eager fp32 no_grad, sw_batch_size 1", "baseline_value": round(t_base, 2),
        "ratio": round(t_base / t_fast, 2),
        "device": device,
        "settings": {"method": "inference_mode + sw_batch_size 4" + (" + fp16 autocast" if cuda else ""),
                     "feature_size": fs, "roi": roi, "target_spacing_mm": spacing, "overlap": 0.5,
                     "input_shape": list(img.shape),
                     "input_spacing_mm": [round(float(z), 2) for z in img.header.get_zooms()],
                     "mask_agreement": float(np.mean(a == b)), "threads": torch.get_num_threads(),
                     "load_average_1min": round(os.getloadavg()[0], 2), "quick": quick},
    })
    return records


if __name__ == "__main__":
    import json

    print(json.dumps(run(quick="--quick" in sys.argv), indent=1))
