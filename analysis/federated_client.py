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

This module imports monai only; FLARE is not needed to import it.
"""

from __future__ import annotations

import os
import sys

import torch
from monai.fl.client import MonaiAlgo
from monai.fl.utils.constants import ExtraItems
from monai.networks.utils import get_state_dict

#: where a round's local weights land, in the site's ckpt_dir
LOCAL_MODEL = "local_model.pt"


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
        super().initialize(extra)

    def train(self, data, extra=None):
        super().train(data, extra)
        ckpt_dir = self.train_kwargs["ckpt_dir"]
        os.makedirs(ckpt_dir, exist_ok=True)
        weights = {k: v.detach().cpu() for k, v in get_state_dict(self.trainer.network).items()}
        torch.save(weights, os.path.join(ckpt_dir, LOCAL_MODEL))
