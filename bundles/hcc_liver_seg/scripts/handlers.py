"""Ignite handlers the configs attach: stop on a NaN loss, keep the learning-rate schedule's length
after a resume, and a per-case progress log."""

from __future__ import annotations

import logging
import math
import time

import torch
from ignite.engine import Engine, Events

logger = logging.getLogger("hcc_liver_seg")


def attach(engine: Engine, handlers) -> Engine:
    """Attach ``handlers`` to ``engine`` in the order given, skipping the disabled ones (None).

    For the handlers that hold the engine itself (the resume loader and the checkpoint saver
    restore and save the trainer's state): listed in the trainer's ``train_handlers`` they would
    make a reference cycle in the config, so the ``run`` section attaches them, as a ``_target_``
    item (resolved when the run starts, with the bundle folder on the import path).
    """
    for handler in handlers:
        if handler is not None:
            handler.attach(engine)
    return engine


class StopOnNaNLoss:
    """Stop training at the first non-finite loss and fail the run with a clear error.

    The validation CheckpointSaver only writes model.pt when the key metric improves, so the best
    checkpoint on disk stays the last good one. The latest-epoch checkpoint is not written for the
    interrupted epoch (ignite does not fire EPOCH_COMPLETED after terminate).
    """

    def __init__(self, loss_key: str = "loss") -> None:
        self.loss_key = loss_key
        self.bad: tuple[int, int, float] | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._check)
        engine.add_event_handler(Events.TERMINATE, self._fail)

    def _check(self, engine: Engine) -> None:
        out = engine.state.output
        items = out if isinstance(out, list) else [out]
        for item in items:
            loss = item.get(self.loss_key) if isinstance(item, dict) else item
            value = float(loss.detach().float().mean()) if isinstance(loss, torch.Tensor) else float(loss)
            if not math.isfinite(value):
                self.bad = (engine.state.epoch, engine.state.iteration, value)
                logger.error("loss is %s at epoch %d, iteration %d: stopping training", value,
                             engine.state.epoch, engine.state.iteration)
                engine.terminate()
                return

    def _fail(self, engine: Engine) -> None:
        if self.bad is not None:
            epoch, iteration, value = self.bad
            raise FloatingPointError(
                f"training stopped: loss became {value} at epoch {epoch}, iteration {iteration}; the best "
                f"checkpoint (model.pt) from earlier validation is kept unchanged. Lower the learning rate "
                f"or check the inputs."
            )


class ScheduleLength:
    """Set the warm-up/cosine schedule's length to this run's ``max_epochs`` when training starts.

    A resumed checkpoint restores the scheduler's attributes, ``t_total`` included (LambdaLR saves
    them), so without this a resume with a larger ``--max_epochs`` would keep the old length and
    the cosine would climb back up past its end. Attach after the checkpoint loader: ignite runs
    STARTED handlers in the order they were added.
    """

    def __init__(self, lr_scheduler, warmup_steps: int, t_total: int) -> None:
        self.lr_scheduler, self.warmup_steps, self.t_total = lr_scheduler, int(warmup_steps), int(t_total)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if (self.lr_scheduler.t_total, self.lr_scheduler.warmup_steps) != (self.t_total, self.warmup_steps):
            logger.info("learning-rate schedule: %d warm-up + cosine to epoch %d (the checkpoint had %d to %d)",
                        self.warmup_steps, self.t_total, self.lr_scheduler.warmup_steps, self.lr_scheduler.t_total)
        self.lr_scheduler.warmup_steps, self.lr_scheduler.t_total = self.warmup_steps, self.t_total


class ProgressLogger:
    """Log `[i/n] <file> (<seconds> s)` after each inference iteration."""

    def __init__(self, key: str = "image") -> None:
        self.key = key
        self._t0 = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._done)

    def _start(self, engine: Engine) -> None:
        self._t0 = time.perf_counter()

    def _done(self, engine: Engine) -> None:
        n = engine.state.epoch_length or "?"
        names = []
        batch = engine.state.batch
        items = batch if isinstance(batch, list) else [batch]
        for item in items:
            img = item.get(self.key) if isinstance(item, dict) else None
            meta = getattr(img, "meta", {}) or {}
            fn = meta.get("filename_or_obj", "?")
            names.extend(fn if isinstance(fn, (list, tuple)) else [fn])
        logger.info("[%d/%s] %s (%.1f s)", engine.state.iteration, n, ", ".join(map(str, names)),
                    time.perf_counter() - self._t0)


class CommitOutputs:
    """All or nothing per inference run: the masks are written under ``staging_dir`` and moved
    into ``output_dir`` (same relative paths, one rename each) only when the run completes; a run
    that fails (or is stopped) removes the staging folder, so ``output_dir`` never holds a partial
    set from it. A staging folder left by a killed run is cleared when the next run starts."""

    def __init__(self, staging_dir: str, output_dir: str) -> None:
        self.staging_dir, self.output_dir = staging_dir, output_dir

    def attach(self, engine: Engine) -> None:
        import shutil

        engine.add_event_handler(Events.STARTED, lambda e: shutil.rmtree(self.staging_dir, ignore_errors=True))
        engine.add_event_handler(Events.COMPLETED, self._commit)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._discard)

    def _commit(self, engine: Engine) -> None:
        import os
        import shutil

        moved = 0
        for folder, _, files in os.walk(self.staging_dir):
            for name in files:
                src = os.path.join(folder, name)
                dst = os.path.realpath(os.path.join(self.output_dir, os.path.relpath(src, self.staging_dir)))
                if not dst.startswith(os.path.realpath(self.output_dir).rstrip(os.sep) + os.sep):
                    raise ValueError(f"{src}: its output path {dst} lies outside {self.output_dir}")
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                os.replace(src, dst)
                moved += 1
        shutil.rmtree(self.staging_dir, ignore_errors=True)
        logger.info("wrote %d mask(s) to %s", moved, self.output_dir)

    def _discard(self, engine: Engine, e: Exception) -> None:
        import shutil

        shutil.rmtree(self.staging_dir, ignore_errors=True)
        logger.error("inference stopped (%s: %s); no mask of this run kept in %s", type(e).__name__, e,
                     self.output_dir)
        raise e


def write_csv_atomic(path: str, header: list[str], rows: list[list]) -> None:
    import csv
    import os

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"  # a run interrupted mid-write leaves the old file or none
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    os.replace(tmp, path)


class SegmentationReport:
    """Write `per_case.csv` (one row per case, every metric) and `metrics_summary.csv` (one row of
    the aggregated metrics, plus n_cases) into `output_dir` when evaluation completes.

    MetricsSaver writes one file per metric; this is the merged table a person (or the study
    runner) reads. Metric names lose their `val_` prefix: dice_eq2, dice_liver, hd95_mm_tumour, ...
    """

    def __init__(self, output_dir: str, image_key: str = "image", id_keys: tuple = ("patient_id", "timepoint")):
        self.output_dir = output_dir
        self.image_key = image_key
        self.id_keys = tuple(id_keys)
        self.cases: list[list[str]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self.cases.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _collect(self, engine: Engine) -> None:
        batch = engine.state.batch
        for item in batch if isinstance(batch, list) else [batch]:
            meta = getattr(item.get(self.image_key), "meta", {}) or {}
            row = [str(meta.get("filename_or_obj", ""))]
            row += [str(item.get(k, "")) for k in self.id_keys]
            self.cases.append(row)

    @staticmethod
    def _name(metric: str) -> str:
        return metric[4:] if metric.startswith("val_") else metric

    def _write(self, engine: Engine) -> None:
        import os

        details = getattr(engine.state, "metric_details", {}) or {}
        names = sorted(details)
        rows = []
        for i, case in enumerate(self.cases):
            values = []
            for n in names:
                v = details[n][i] if i < len(details[n]) else float("nan")
                v = torch.as_tensor(v, dtype=torch.float32)
                values.append(f"{float(v.nanmean()) if v.numel() else float('nan'):.6g}")
            rows.append(case + values)
        header = ["image", *self.id_keys, *[self._name(n) for n in names]]
        write_csv_atomic(os.path.join(self.output_dir, "per_case.csv"), header, rows)
        metrics = {self._name(k): v for k, v in engine.state.metrics.items()}
        write_csv_atomic(os.path.join(self.output_dir, "metrics_summary.csv"), ["n_cases", *metrics],
                    [[len(self.cases), *[f"{float(v):.6g}" for v in metrics.values()]]])
        logger.info("evaluation of %d case(s): %s", len(self.cases),
                    ", ".join(f"{k} {float(v):.4f}" for k, v in metrics.items()))
