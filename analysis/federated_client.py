"""MONAI FL client of the federated jobs (``python -m analysis federated-job``).

:class:`BundleAlgo` is monai.fl's :class:`~monai.fl.client.MonaiAlgo`, which runs a bundle's own
``configs/train.json`` as one FL client (NVIDIA FLARE runs it through monai_nvflare's
``ClientAlgoExecutor``), with three things MonaiAlgo leaves to ``monai.bundle run``:

- the bundle folder goes on ``sys.path`` so its ``scripts`` package resolves (``monai.bundle run``
  does this in ``ConfigWorkflow.run``, which MonaiAlgo never calls: it runs the trainer itself);
- the site's checkpoints and logs (``ckpt_dir``, ``output_dir``) default to the site's FLARE app
  folder, never the shared bundle's ``models/``;
- after each round the site's local weights (before averaging) are written to
  ``<ckpt_dir>/local_model.pt``, a flat state_dict, so a site can compare its own model with
  the global one. They stay on the site; what FLARE sends is the weight difference.

and two things that make a federated run train like a centralised one of ``rounds x local_epochs``
epochs:

- the learning-rate schedule spans the whole job. MonaiAlgo sets the config's ``max_epochs`` to
  ``local_epochs``, which shrinks a warm-up/cosine schedule to one round (with one local epoch:
  every round at the warm-up's 0.1 x rate, then the cosine's end). BundleAlgo keeps the job's
  ``max_epochs`` (``federated-job`` writes ``rounds x local_epochs``);
- the site's own training state carries from round to round: after each round the trainer's epoch
  and iteration, the optimizer's state and the LR schedule's are saved to
  ``<ckpt_dir>/fl_round_state.pt``, and a client process that starts at epoch 0 with that file
  present resumes from it. FLARE's simulator with fewer threads than sites (``-t 1``) starts each
  round in a fresh process; a provisioned client keeps its process and needs no file, but writes it
  all the same (a restarted client resumes). The file lives in the job's app folder, so a new job
  starts fresh;
- a config's first-round handlers that ``monai.bundle run`` attaches in its ``run`` list are
  attached too: ProgSwin-UNETR's head warm-up (``train#head_warmup``) fits each site's head on its
  own patients before the first local epoch (it skips itself at epoch > 0, so later rounds keep the
  averaged head).

This module imports monai only; FLARE is not needed to import it.
"""

from __future__ import annotations

import logging
import os
import sys

import torch
from monai.fl.client import MonaiAlgo
from monai.fl.utils.constants import ExtraItems
from monai.networks.utils import get_state_dict

#: where a round's local weights land, in the site's ckpt_dir
LOCAL_MODEL = "local_model.pt"
#: the site's training state between rounds (trainer epoch/iteration, optimizer, LR schedule)
ROUND_STATE = "fl_round_state.pt"
#: train-config items that ``monai.bundle run`` attaches in ``run`` and a federated client needs too
FIRST_ROUND_HANDLERS = ("train#head_warmup",)

log = logging.getLogger(__name__)


def bundle_on_path(bundle_root: str) -> None:
    """Put ``bundle_root`` first on sys.path and forget a ``scripts`` package of another bundle."""
    bundle_root = os.path.abspath(bundle_root)
    for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
        file = getattr(sys.modules[name], "__file__", None) or ""
        if not os.path.abspath(file).startswith(bundle_root + os.sep):
            del sys.modules[name]
    if bundle_root in sys.path:
        sys.path.remove(bundle_root)
    sys.path.insert(0, bundle_root)


class BundleAlgo(MonaiAlgo):
    """MonaiAlgo for this project's bundles; arguments as MonaiAlgo's (``bundle_root`` may be absolute:
    a site points it at its installed bundle folder, no copy of the configs travels with the job)."""

    def initialize(self, extra=None):
        extra = {} if extra is None else extra
        app_root = extra.get(ExtraItems.APP_ROOT, "") or os.getcwd()
        bundle_root = os.path.join(app_root, self.bundle_root)
        bundle_on_path(bundle_root)
        site_models = os.path.join(app_root, "models")
        for kwargs, ckpt in ((self.train_kwargs, site_models), (self.eval_kwargs, site_models + "_global_eval")):
            kwargs.setdefault("bundle_root", bundle_root)
            kwargs.setdefault("ckpt_dir", ckpt)
            kwargs.setdefault("output_dir", os.path.join(app_root, "eval"))
        # MonaiAlgo.initialize writes local_epochs into the config's max_epochs, the schedule's length
        local_epochs = self.local_epochs
        self.local_epochs = int(self.train_kwargs.get("max_epochs", local_epochs))
        try:
            super().initialize(extra)
        finally:
            self.local_epochs = local_epochs
        if self.trainer is not None:
            parser = self.train_workflow.parser
            for item in FIRST_ROUND_HANDLERS:
                if item in parser:
                    parser.get_parsed_content(item).attach(self.trainer)

    def _lr_scheduler(self):
        parser = self.train_workflow.parser
        return parser.get_parsed_content("lr_scheduler") if "lr_scheduler" in parser else None

    def _round_state_file(self) -> str:
        return os.path.join(self.train_kwargs["ckpt_dir"], ROUND_STATE)

    def _restore_round_state(self) -> None:
        """A fresh client process of a running job picks up where the site's last round ended."""
        path = self._round_state_file()
        if self.trainer.state.epoch > 0 or not os.path.isfile(path):
            return
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a round cut short while saving: start the schedule afresh, loudly
            log.warning("%s does not read (%s): this round starts at epoch 0", path, err)
            return
        total = int(self.train_kwargs.get("max_epochs", 0)) or None
        if total is not None and state["epoch"] >= total:
            log.warning("%s is at epoch %d of a %d-epoch job (a finished run's?): not resumed", path,
                        state["epoch"], total)
            return
        self.trainer.state.epoch, self.trainer.state.iteration = int(state["epoch"]), int(state["iteration"])
        self.trainer.optimizer.load_state_dict(state["optimizer"])
        scheduler = self._lr_scheduler()
        if scheduler is not None and "lr_scheduler" in state:
            scheduler.load_state_dict(state["lr_scheduler"])
        log.info("resumed the site's training state at epoch %d (%s)", self.trainer.state.epoch, path)

    def _save_round_state(self, ckpt_dir: str) -> None:
        state = {"epoch": self.trainer.state.epoch, "iteration": self.trainer.state.iteration,
                 "optimizer": self.trainer.optimizer.state_dict()}
        scheduler = self._lr_scheduler()
        if scheduler is not None:
            state["lr_scheduler"] = scheduler.state_dict()
        _save_atomic(state, os.path.join(ckpt_dir, ROUND_STATE))

    def train(self, data, extra=None):
        if self.trainer is not None:
            self._restore_round_state()
        super().train(data, extra)
        ckpt_dir = self.train_kwargs["ckpt_dir"]
        os.makedirs(ckpt_dir, exist_ok=True)
        weights = {k: v.detach().cpu() for k, v in get_state_dict(self.trainer.network).items()}
        _save_atomic(weights, os.path.join(ckpt_dir, LOCAL_MODEL))
        self._save_round_state(ckpt_dir)


def _save_atomic(obj, path: str) -> None:
    """torch.save to a temporary file, then rename: a killed client never leaves half a file."""
    tmp = f"{path}.partial"
    torch.save(obj, tmp)
    os.replace(tmp, path)
