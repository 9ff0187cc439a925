"""Fold checkpoints (resume, best models) and initialisation from a pretrained checkpoint."""

from __future__ import annotations

import copy
import glob
import logging
import os
import re
from collections.abc import Sequence

import torch
from ignite.engine import Engine, Events

from scripts.flags import as_bool
from scripts.integrity import file_sha256, verified_weights
from scripts.io import save_weights

log = logging.getLogger(__name__)

#: hcc_liver_seg's input layers: 1 input channel (the image) in the segmentation network; their
#: (out, in, k, k, k) weights become ProgSwin-UNETR's in_channels wide
INPUT_LAYERS = ("swinViT.patch_embed.proj.weight", "encoder1.layer.conv1.conv.weight", "encoder1.layer.conv3.conv.weight")
#: the output layer (3 segmentation classes -> 4 risk classes) is not copied: newly initialised
OUTPUT_PREFIX = "out."
#: Swin attention's learned relative position bias, ((2w - 1)^3, heads) for a window of w voxels
BIAS_TABLE = "relative_position_bias_table"
#: its index buffer, (w^3, w^3): fixed by the window size, never learned, so never copied
BIAS_INDEX = "relative_position_index"
#: ProgSwin-UNETR's head keys (Eq. 6 ``swin.out``; the hidden-layer and region-pooling variants add
#: ``classifier``, region pooling also its pooled vector's scaler ``pooled_mean``/``pooled_scale``)
HEAD_PREFIXES = ("swin." + OUTPUT_PREFIX, "classifier.", "pooled_")


class CheckpointMismatchError(ValueError):
    """A pretrained checkpoint does not fit the network (feature_size, depths, channels)."""


def epoch_checkpoints(fold_dir: str) -> list[str]:
    """``checkpoint_epoch=N.pt`` files (CheckpointSaver's interval files) in ``fold_dir``, highest
    N first."""
    found = []
    for path in glob.glob(os.path.join(fold_dir, "*epoch=*.pt")):
        m = re.search(r"epoch=(\d+)\.pt$", path)
        if m:
            found.append((int(m.group(1)), path))
    return [path for _, path in sorted(found, reverse=True)]


def newest_readable(paths: Sequence[str]) -> str:
    """The first of ``paths`` (newest first) that ``torch.load(weights_only=True)`` reads whole.

    A checkpoint cut short (a copy or a save interrupted by a crash, a full disk) is skipped with
    a warning naming it, so a resumed run continues from the latest good state instead of
    failing on, or loading, a corrupt one; when none reads, the error names every file.
    """
    problems = []
    for path in paths:
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            problems.append(f"{path} ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})")
            log.warning("skipping unreadable checkpoint %s", problems[-1])
            continue
        return path
    raise ValueError("resume requested but no checkpoint can be read: " + "; ".join(problems))


def resume_checkpoint(ckpt_dir: str, resume=True) -> str | None:
    """The checkpoint a run resumes from (the ``resume_from`` id of both bundles): None when
    ``resume`` is false; else the newest ``checkpoint_epoch=<n>.pt`` in ``ckpt_dir``, and
    resuming with none there is an error naming the folder, never a silent fresh start."""
    if not as_bool(resume, "resume"):
        return None
    found = epoch_checkpoints(ckpt_dir)
    if not found:
        raise FileNotFoundError(f"resume requested but no checkpoint_epoch=<n>.pt checkpoint in {ckpt_dir}: train "
                                f"once without --resume, or point --ckpt_dir at the folder holding it")
    path = newest_readable(found)
    log.info("resuming from %s", path)
    return path


def best_model_path(ckpt_dir: str, fold: int) -> str:
    return os.path.join(ckpt_dir, f"fold{int(fold)}", "model.pt")


def load_state(path: str, map_location="cpu") -> dict:
    """The model state dict of a checkpoint file (a bare state dict or CheckpointSaver's
    ``{"model": ...}``), loaded with ``weights_only=True``: a file that holds code is refused.
    A file whose bundle publishes its sha256 (manifest.json, large_files.yml) is checked first."""
    if not os.path.isfile(path) and not os.path.isdir(path):
        raise FileNotFoundError(f"model weights not found: {path} (train this fold first, "
                                f"or point ckpt_dir/load_path at existing weights)")
    path = verified_weights(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle payloads, truncated files: name the file, not torch's internals
        raise ValueError(f"{path}: not a weights-only checkpoint torch can read ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from e
    state = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors (or {{'model': state dict}})")
    return state


def load_fold_networks(network: torch.nn.Module, ckpt_dir: str, folds: Sequence[int], device) -> list:
    """One copy of ``network`` per fold, each with that fold's best weights, in eval mode."""
    nets = []
    for k in folds:
        net = copy.deepcopy(network)
        net.load_state_dict(load_state(best_model_path(ckpt_dir, k)))
        nets.append(net.to(device).eval())
    return nets


def checkpoint_kind(state: dict) -> str:
    """``"progswin"`` (keys under ``swin.``), ``"segmentation"`` (a bare hcc_liver_seg SwinUNETR,
    keys under ``swinViT.``), else an error."""
    if any(k.startswith("swin.") for k in state):
        return "progswin"
    if any(k.startswith("swinViT.") for k in state):
        return "segmentation"
    raise CheckpointMismatchError(
        f"neither a ProgSwin-UNETR (keys 'swin.*') nor an hcc_liver_seg (keys 'swinViT.*') checkpoint; "
        f"first keys: {list(state)[:3]}")


def resize_bias_table(table: torch.Tensor, side: int) -> torch.Tensor:
    """A Swin relative position bias table ((2w - 1)^3, heads) resampled to ``side`` = 2w' - 1
    per axis, trilinear with the corners kept: the table is a smooth function of the 3-D offset
    between two tokens, and the Swin Transformer's authors fine-tune at a new window size by
    interpolating it the same way (bicubic, in 2-D). Offsets present in both windows keep
    nearly their learned bias."""
    n, heads = table.shape
    old = round(n ** (1 / 3))
    if old ** 3 != n:
        raise CheckpointMismatchError(f"relative position bias table of shape {tuple(table.shape)} is not "
                                      f"((2w - 1)^3, heads)")
    grid = table.detach().float().T.reshape(1, heads, old, old, old)
    resized = torch.nn.functional.interpolate(grid, size=(side,) * 3, mode="trilinear", align_corners=True)
    return resized.reshape(heads, side ** 3).T.to(table.dtype)


def map_segmentation_state(seg_state: dict, target_state: dict, n_images: int = 3) -> tuple[dict, list[str]]:
    """ProgSwin-UNETR tensors from an hcc_liver_seg SwinUNETR state dict.

    - every encoder and decoder tensor is copied (``k`` -> ``swin.k``);
    - the 1-channel input layers (patch embedding, encoder1's convolutions) get ``w / n_images``
      on each image channel, so the first layer's response to ``n_images`` identical images (and
      all-zero mask channels) is the segmentation network's response to that image; the mask
      channels after them keep the network's own random initialisation, so the label maps
      reach the features from the first step (zero weights would hide them from a head-only
      warm-up, whose backbone does not move);
    - the output layer (``out.*``: 3 segmentation classes) is left out: the 4-class head
      (``swin.out``, and ``classifier`` in the hidden-layer variant) keeps its own new
      initialisation;
    - a segmentation network with another Swin window (hcc_liver_seg's 7 for the CPU recipe's
      4): each attention's bias table is resampled by :func:`resize_bias_table`, and the
      network keeps its own relative position index (a function of the window, not learned).

    Returns (state to load with strict=False, the keys left at their initialisation). A shape
    that differs for any other reason (feature_size, depths, heads) is an error naming the key
    and both shapes.
    """
    mapped, problems = {}, []
    for key, value in seg_state.items():
        if key.startswith(OUTPUT_PREFIX):
            continue
        target_key = "swin." + key
        if target_key not in target_state:
            problems.append(f"{key} {tuple(value.shape)} has no counterpart in the network "
                            f"(Swin depths or layers differ)")
            continue
        want = target_state[target_key].shape
        if key in INPUT_LAYERS and value.ndim >= 2 and value.shape[1] == 1 and value.shape[0] == want[0] \
                and value.shape[2:] == want[2:]:
            widened = target_state[target_key].detach().clone().to(value.dtype)
            widened[:, :n_images] = value / n_images
            value = widened
        if value.shape != want and key.endswith(BIAS_INDEX):
            continue  # the target's own index, listed as kept at initialisation
        if value.shape != want and key.endswith(BIAS_TABLE) and value.shape[1] == want[1]:
            value = resize_bias_table(value, round(want[0] ** (1 / 3)))
        if value.shape != want:
            problems.append(f"{key}: checkpoint {tuple(value.shape)} vs network {tuple(want)}")
            continue
        mapped[target_key] = value
    missing = [k for k in target_state if k not in mapped and not k.startswith(HEAD_PREFIXES)
               and not (k.endswith(BIAS_INDEX) and k[len("swin."):] in seg_state)]
    problems += [f"{k} {tuple(target_state[k].shape)}: not in the checkpoint" for k in missing]
    if problems:
        raise CheckpointMismatchError(_mismatch_message("segmentation", seg_state, target_state, problems))
    fresh = [k for k in target_state if k not in mapped]
    return mapped, fresh


def _feature_size(state: dict, prefix: str) -> int | None:
    w = state.get(prefix + "swinViT.patch_embed.proj.weight")
    return int(w.shape[0]) if w is not None else None


def _mismatch_message(kind: str, source: dict, target: dict, problems: list[str]) -> str:
    src_fs = _feature_size(source, "" if kind == "segmentation" else "swin.")
    dst_fs = _feature_size(target, "swin.")
    head = f"pretrained {kind} checkpoint does not fit the network"
    if src_fs and dst_fs and src_fs != dst_fs:
        head += f" (checkpoint feature_size {src_fs}, network feature_size {dst_fs})"
    more = f" ... and {len(problems) - 5} more" if len(problems) > 5 else ""
    return head + ": " + "; ".join(problems[:5]) + more


def load_pretrained(network: torch.nn.Module, path: str, map_location="cpu") -> str:
    """Initialise ``network`` (a ProgSwinUNETR, or DDP around one) from ``path``.

    An hcc_liver_seg checkpoint is mapped by :func:`map_segmentation_state`; a ProgSwin-UNETR
    checkpoint (another site's model, for fine-tuning) must match exactly. Loading is
    ``weights_only=True``. Returns the checkpoint kind.
    """
    net = getattr(network, "module", network)
    state = load_state(path, map_location=map_location)
    target = net.state_dict()
    kind = checkpoint_kind(state)
    if kind == "segmentation":
        n_images = 3
        mapped, fresh = map_segmentation_state(state, target, n_images=n_images)
        net.load_state_dict(mapped, strict=False)
        log.info("initialised from hcc_liver_seg checkpoint %s: %d tensors copied (input layers spread "
                 "over %d images), new: %s", path, len(mapped), n_images, ", ".join(fresh))
        return kind
    _require_exact_fit(state, target)
    net.load_state_dict(state)
    log.info("initialised from ProgSwin-UNETR checkpoint %s (%d tensors)", path, len(state))
    return kind


def _require_exact_fit(state: dict, target: dict) -> None:
    problems = [f"{k}: checkpoint {tuple(v.shape)} vs network {tuple(target[k].shape)}"
                for k, v in state.items() if k in target and v.shape != target[k].shape]
    problems += [f"{k}: not in the network" for k in state if k not in target]
    problems += [f"{k}: not in the checkpoint" for k in target if k not in state]
    if problems:
        raise CheckpointMismatchError(_mismatch_message("ProgSwin-UNETR", state, target, problems))


def share_model(network: torch.nn.Module, source: str, target: str, overwrite=False) -> str:
    """Put a trained model where Model Zoo tooling looks for it (``models/model.pt``).

    ``source`` (a fold's ``models/fold{k}/model.pt``, or train_all.json's ``models/all/model.pt``)
    is read weights-only, its sha256 checked when its bundle publishes one, and loaded strictly
    into ``network`` (the configs' ``network_def`` with the size ids it was trained with), so a
    file that does not fit the configs is refused here rather than at another site. It is
    written atomically to ``target`` as a bare state dict. An existing ``target`` is replaced
    only with ``overwrite``. Returns the sha256 to publish (large_files.yml, or the manifest of
    ``python -m analysis export-bundle``).
    """
    state = load_state(str(source))
    net = getattr(network, "module", network)
    try:
        _require_exact_fit(state, net.state_dict())
    except CheckpointMismatchError as e:
        raise CheckpointMismatchError(f"{source}: {e}; run this with the size ids (feature_size, window_size, "
                                      f"mask_channels, pooling, ... or their overlay) it was trained with") from e
    same = os.path.exists(target) and os.path.samefile(source, target)
    if os.path.exists(target) and not same and not as_bool(overwrite, "overwrite"):
        raise FileExistsError(f"{target} exists: pass --overwrite true to replace it with {source}")
    if not same:
        save_weights(str(target), state)
    digest = file_sha256(str(target))
    log.info("shared model %s (from %s), sha256 %s: list it in large_files.yml (path, url, hash_type sha256, "
             "hash_val) before another site fetches it", target, source, digest)
    return digest


class PretrainedLoader:
    """Ignite handler: load ``pretrained`` into the network when a fresh training run starts.

    Attach it after the resume CheckpointLoader: a resumed run (epoch > 0 once the checkpoint
    is loaded) continues from its own weights and does not reload the pretrained ones.
    """

    def __init__(self, network: torch.nn.Module, load_path: str | None = None, map_location="cpu") -> None:
        self.network, self.load_path, self.map_location = network, load_path, map_location

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if not self.load_path:
            return
        if engine.state.epoch > 0:
            log.info("resumed at epoch %d: pretrained %s not reloaded", engine.state.epoch, self.load_path)
            return
        load_pretrained(self.network, str(self.load_path), map_location=self.map_location)


#: ``model_selection`` id: which weights a fold keeps as ``model.pt``
MODEL_SELECTION = ("best_val_auc", "last_epoch")


def best_val_filename(model_selection: str) -> str:
    """Where the validation's best-AUC model goes: ``model.pt`` when it is the fold's model (the
    paper), else ``best_val_model.pt`` (kept for reference; ``model.pt`` is the last epoch's, so
    out-of-fold predictions involve no choice made on the held-out fold)."""
    if model_selection not in MODEL_SELECTION:
        raise ValueError(f"model_selection: expected one of {list(MODEL_SELECTION)}; got {model_selection!r}")
    return "model.pt" if model_selection == "best_val_auc" else "best_val_model.pt"
