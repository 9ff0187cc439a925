"""Ignite handlers the configs attach: stop on a NaN loss, and a per-case progress log."""

from __future__ import annotations

import logging
import math
import time

import torch
from ignite.engine import Engine, Events

logger = logging.getLogger("hcc_liver_seg")


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
