"""predictions.csv writer (docs/contracts.md, "Prediction files") as an ignite handler."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch
from ignite.engine import Engine, Events

from scripts.io import write_csv

log = logging.getLogger(__name__)


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


class PredictionWriter:
    """Collects softmax probabilities per patient and writes predictions.csv when the run ends.

    Columns: patient_id, fold, prob_0..prob_{C-1}, pred_class, label (empty for unlabelled).
    Rows are sorted by patient_id; the file is written atomically.

    Args:
        output_file: CSV path.
        fold: value of the ``fold`` column: the fold model that produced the rows, -1 = ensemble.
        pred_key / patient_key / label_key: where the engine's decollated output and batch hold them.
    """

    def __init__(self, output_file: str, fold: int = -1, pred_key: str = "pred",
                 patient_key: str = "patient_id", label_key: str = "label") -> None:
        self.output_file = output_file
        self.fold = int(fold)
        self.pred_key, self.patient_key, self.label_key = pred_key, patient_key, label_key
        self.rows: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda e: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _collect(self, engine: Engine) -> None:
        batch, output = engine.state.batch, engine.state.output
        if isinstance(output, dict):  # decollate=False: one dict of batched tensors
            raise ValueError("PredictionWriter needs the evaluator's decollate=True (per-sample outputs)")
        for item, out in zip(batch, output):
            prob = torch.as_tensor(out[self.pred_key]).detach().float().cpu().reshape(-1).numpy()
            if not np.isclose(prob.sum(), 1.0, atol=1e-4):
                raise ValueError(f"patient {item[self.patient_key]}: probabilities sum to {prob.sum():.6f}, "
                                 f"not 1: postprocessing must apply softmax before PredictionWriter")
            label = item.get(self.label_key)
            label = int(torch.as_tensor(label).item()) if label is not None else -1
            row = {"patient_id": str(item[self.patient_key]), "fold": self.fold}
            row.update({f"prob_{k}": float(v) for k, v in enumerate(prob)})
            row["pred_class"] = int(np.argmax(prob))
            row["label"] = label if label >= 0 else None
            self.rows.append(row)

    def _write(self, engine: Engine) -> None:
        frame = pd.DataFrame(self.rows)
        dup = frame["patient_id"][frame["patient_id"].duplicated()].tolist()
        if dup:
            raise ValueError(f"patient(s) {dup} predicted more than once: the dataset lists them twice")
        frame = frame.sort_values("patient_id").reset_index(drop=True)
        frame["label"] = frame["label"].astype("Int64")
        write_csv(self.output_file, frame)
        log.info("wrote %d prediction(s) to %s", len(frame), self.output_file)


class LearningCurve:
    """Per epoch: mean training loss, training accuracy, validation macro AUC and accuracy
    (epochs with validation) -> ``learning_curve.csv`` and ``.png``, rewritten after every epoch
    so an interrupted run keeps its curve; a resumed run continues the file of its earlier epochs.

    Args:
        output_file: the PNG path (the CSV goes beside it).
        evaluator: the validation engine whose metrics are read after it ran.
    """

    def __init__(self, output_file: str, evaluator: Engine | None = None) -> None:
        self.output_file, self.evaluator = output_file, evaluator
        self.losses: list[float] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self.losses.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._loss)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)

    def _loss(self, engine: Engine) -> None:
        from monai.handlers import from_engine

        self.losses.append(float(from_engine(["loss"], first=True)(engine.state.output)))

    def _epoch(self, engine: Engine) -> None:
        import os

        epoch = int(engine.state.epoch)
        row = {"epoch": epoch, "train_loss": float(np.mean(self.losses)) if self.losses else np.nan,
               "train_accuracy": float(engine.state.metrics.get("train_accuracy", np.nan))}
        ev = self.evaluator
        validated = ev is not None and getattr(ev.state, "epoch", None) == epoch
        row["val_macro_auc"] = float(ev.state.metrics.get("val_macro_auc", np.nan)) if validated else np.nan
        row["val_accuracy"] = float(ev.state.metrics.get("val_accuracy", np.nan)) if validated else np.nan
        csv = os.path.splitext(self.output_file)[0] + ".csv"
        earlier = pd.read_csv(csv) if os.path.isfile(csv) else pd.DataFrame(columns=list(row))
        curve = pd.concat([earlier[earlier["epoch"] < epoch], pd.DataFrame([row])], ignore_index=True)
        self._save(curve)

    def _save(self, curve: pd.DataFrame) -> None:
        import os

        import matplotlib.pyplot as plt

        from scripts.io import save_figure

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(curve["epoch"], curve["train_loss"], "C0-o", ms=3, label="training loss")
        ax.set(xlabel="epoch", ylabel="cross-entropy", title="end-to-end training")
        ax2 = ax.twinx()
        ax2.plot(curve["epoch"], curve["train_accuracy"], "C1--", label="training accuracy")
        val = curve.dropna(subset=["val_macro_auc"])
        ax2.plot(val["epoch"], val["val_macro_auc"], "C2-s", ms=3, label="validation macro AUC")
        ax2.set(ylim=(0, 1.02), ylabel="accuracy / AUC")
        fig.legend(loc="lower left", fontsize=8)
        os.makedirs(os.path.dirname(self.output_file) or ".", exist_ok=True)
        save_figure(self.output_file, fig, curve)
