"""Fold checkpoints: the latest training state (resume) and the best models (inference)."""

from __future__ import annotations

import copy
import glob
import os
import re
from collections.abc import Sequence

import torch


def latest_checkpoint(fold_dir: str) -> str | None:
    """``checkpoint_epoch=N.pt`` with the highest N in ``fold_dir`` (CheckpointSaver's interval
    files), or None when training has not saved one yet."""
    found = []
    for path in glob.glob(os.path.join(fold_dir, "*epoch=*.pt")):
        m = re.search(r"epoch=(\d+)\.pt$", path)
        if m:
            found.append((int(m.group(1)), path))
    return max(found)[1] if found else None


def best_model_path(ckpt_dir: str, fold: int) -> str:
    return os.path.join(ckpt_dir, f"fold{int(fold)}", "model.pt")


def load_state(path: str, map_location="cpu") -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model weights not found: {path} (train this fold first, "
                                f"or point ckpt_dir/load_path at existing weights)")
    state = torch.load(path, map_location=map_location, weights_only=True)
    return state.get("model", state) if isinstance(state, dict) else state


def load_fold_networks(network: torch.nn.Module, ckpt_dir: str, folds: Sequence[int], device) -> list:
    """One copy of ``network`` per fold, each with that fold's best weights, in eval mode."""
    nets = []
    for k in folds:
        net = copy.deepcopy(network)
        net.load_state_dict(load_state(best_model_path(ckpt_dir, k)))
        nets.append(net.to(device).eval())
    return nets
