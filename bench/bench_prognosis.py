"""ProgSwin-UNETR speed: per-case inference latency and training step time.

1. Inference, one case (3 x 128^3, feature_size 48: the paper's model): the bundle's deployable
   path, a traced and frozen TorchScript module (what ``ckpt_export --use_trace`` gives, frozen
   for inference), against plain eager fp32 ``torch.no_grad`` in the same run. On a GPU both
   also run under fp16 autocast (the bundle's ``amp``); the paper reports 0.93 s per case on an
   RTX 4090.
2. Training step (forward + backward + AdamW): with gradient checkpointing (the training
   config's ``use_checkpoint: true``, less memory) against without it, with the peak resident
   memory of the process. Batch 2 as in the paper on a GPU and at the ``--quick`` size; at full
   size on a CPU batch 1, because batch 2 at 3 x 128^3 x feature_size 48 needs more than the
   24 GB of host memory of the project's CI-class machines (SwinUNETR checkpoints only its Swin
   blocks; the full-resolution convolutional decoder keeps its activations).

3. Training step at the CPU recipe's size (9 x 64^3, feature_size 12, Swin depths 2, hidden-layer
   head 32, batch 2): Swin window 4 (``cpu_recipe.json``) against the paper's window 7 in the
   same run. At this size the window attention, not the convolutions, is most of a step.

``quick=True`` shrinks the network to feature_size 12, Swin depths 1, at 64^3 (about 30 s on 2
free CPU cores).
Weights are random: speed does not depend on them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "progswin_prognosis"


def _net_class():
    for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
        if not (getattr(sys.modules[name], "__file__", None) or "").startswith(str(BUNDLE)):
            del sys.modules[name]
    if str(BUNDLE) not in sys.path:
        sys.path.insert(0, str(BUNDLE))
    from scripts.net import ProgSwinUNETR

    return ProgSwinUNETR


def _peak_memory_gb(cuda: bool) -> float:
    """Peak memory so far: GPU allocator peak on CUDA (then reset), else the process's peak RSS."""
    import torch

    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
        return round(peak, 2)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # kB on Linux


def _timed(fn, repeat: int, sync) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best, out


def run(quick: bool = False) -> list[dict]:
    import torch

    Net = _net_class()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    feature_size, side = (12, 64) if quick else (48, 128)
    depths = (1, 1, 1, 1) if quick else (2, 2, 2, 2)
    repeat = 3 if cuda else (2 if quick else 1)  # a full-size CPU forward takes ~40 s
    settings = {"feature_size": feature_size, "depths": list(depths), "input": [1, 3, side, side, side], "device": str(device),
                "threads": torch.get_num_threads(), "repeat_best_of": repeat}
    torch.manual_seed(0)
    net = Net(feature_size=feature_size, depths=depths).to(device).eval()
    x = torch.randn(1, 3, side, side, side, device=device)
    records = []

    with torch.no_grad():
        net(x)  # warm-up: allocator, kernels
        t_eager, y_eager = _timed(lambda: net(x), repeat, sync)
        traced = torch.jit.freeze(torch.jit.trace(net, x, check_trace=False))
        traced(x)
        traced(x)  # the profiling executor specialises on the first calls
        t_traced, y_traced = _timed(lambda: traced(x), repeat, sync)
        diff = float((y_traced - y_eager).abs().max())
    print(f"bench_prognosis: eager {t_eager:.2f} s, traced {t_traced:.2f} s per case", file=sys.stderr)
    records.append({
        "name": "ProgSwin-UNETR inference per case", "unit": "s", "value": round(t_traced, 3),
        "baseline_name": "eager fp32 no_grad", "baseline_value": round(t_eager, 3),
        "ratio": round(t_eager / t_traced, 2),
        "settings": {**settings, "method": "torch.jit.trace + freeze",
                     "max_abs_diff": diff, "paper_s_per_case": 0.93, "paper_hardware": "RTX 4090"},
    })
    if cuda:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
            net(x)
            t_amp, _ = _timed(lambda: net(x), repeat, sync)
        records.append({
            "name": "ProgSwin-UNETR inference per case, fp16 autocast", "unit": "s", "value": round(t_amp, 3),
            "baseline_name": "eager fp32 no_grad", "baseline_value": round(t_eager, 3),
            "ratio": round(t_eager / t_amp, 2), "settings": {**settings, "paper_s_per_case": 0.93},
        })

    # training step, batch 2 as in the paper (1 at full size on a CPU: see the module docstring)
    batch = 1 if (not cuda and not quick) else 2
    xb = torch.randn(batch, 3, side, side, side, device=device)
    yb = torch.tensor([0, 3][:batch], device=device)
    loss_fn = torch.nn.CrossEntropyLoss()
    step_times, peak_gb = {}, {}
    train_repeat = 2 if cuda else 1
    # checkpointing first: on a CPU the peak is the process's high-water mark, so the lighter run
    # must come before the heavier one for both peaks to be read
    for ckpt in (True, False):
        torch.manual_seed(0)
        model = Net(feature_size=feature_size, depths=depths, use_checkpoint=ckpt).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)

        def step(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(xb), yb).backward()
            opt.step()

        if quick or cuda:
            step()  # warm-up
        step_times[ckpt], _ = _timed(step, train_repeat, sync)
        peak_gb[ckpt] = _peak_memory_gb(cuda)
        del model, opt
    records.append({
        "name": f"ProgSwin-UNETR training step (batch {batch})", "unit": "s", "value": round(step_times[True], 3),
        "baseline_name": "without gradient checkpointing", "baseline_value": round(step_times[False], 3),
        "ratio": round(step_times[False] / step_times[True], 2),
        "settings": {**settings, "input": [batch, 3, side, side, side], "optimizer": "AdamW",
                     "peak_memory_gb": {"checkpointing": peak_gb[True], "no_checkpointing": peak_gb[False]},
                     "value_is": "use_checkpoint=True (train.json default: fits 128^3 x fs48 in GPU memory)",
                     "repeat_best_of": train_repeat},
    })
    records.append(_window_record(Net, device, sync, cuda))
    return records


def _window_record(Net, device, sync, cuda) -> dict:
    import torch

    x = torch.randn(2, 9, 64, 64, 64, device=device)
    y = torch.tensor([0, 3], device=device)
    times = {}
    for window in (7, 4):
        torch.manual_seed(0)
        model = Net(in_channels=9, feature_size=12, head_hidden=32, window_size=window).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

        step()  # warm-up
        times[window], _ = _timed(step, 2, sync)
        del model, opt
    return {
        "name": "ProgSwin-UNETR training step, CPU recipe size (batch 2, 9 x 64^3, feature_size 12)", "unit": "s",
        "value": round(times[4], 3), "baseline_name": "Swin window 7 (paper)", "baseline_value": round(times[7], 3),
        "ratio": round(times[7] / times[4], 2),
        "settings": {"input": [2, 9, 64, 64, 64], "feature_size": 12, "depths": [2, 2, 2, 2], "head_hidden": 32,
                     "value_is": "window_size=4 (cpu_recipe.json)", "device": str(device),
                     "threads": torch.get_num_threads(), "repeat_best_of": 2, "cuda": cuda},
    }


if __name__ == "__main__":
    import json

    quick = "--quick" in sys.argv
    print(json.dumps(run(quick=quick), indent=2))
