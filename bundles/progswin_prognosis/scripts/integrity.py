"""Weights and configs checked against their published sha256 before anything is loaded.

A bundle shared between sites lists the sha256 of each weights file in ``large_files.yml``
(the Model Zoo's place for it); a bundle fetched with ``python -m analysis fetch-bundle`` also
carries ``manifest.json``, the sha256 of every file in the archive. Before a config loads
weights it passes their path through :func:`verified_weights`:

- a file listed in its bundle's manifest (or, without one, in large_files.yml with a hash) whose
  sha256 differs is refused, naming the file and both hashes;
- with a manifest, every config file it lists must still match it: configs run ``$``
  expressions, so an edited config in a fetched bundle is refused unless ``trust_configs`` is
  set (the user's explicit decision to run the changed code);
- a file listed nowhere (weights a site trained itself) is loaded as is; loading is
  ``weights_only=True`` everywhere in any case.

The same file lives in both bundles (each must run alone, zipped); a test keeps them identical.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
#: analysis.bundle_archive's manifest format (a study folder's manifest.json is another file)
MANIFEST_FORMAT = "hcc-tace-bundle-manifest/1"
LARGE_FILES = "large_files.yml"


class IntegrityError(ValueError):
    """A file's sha256 does not match the one the bundle publishes for it."""


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _as_bool(value) -> bool:
    # command-line values arrive as strings: "false" must mean false (same sets as flags.as_bool)
    if isinstance(value, bool) or value is None:
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", "none", ""):
        return False
    raise ValueError(f"trust_configs: expected true/false (or 1/0); got {value!r}")


def _relative(path: str, bundle_root: str) -> str | None:
    """``path`` relative to ``bundle_root`` with '/' separators, or None when outside it."""
    path, root = os.path.realpath(path), os.path.realpath(bundle_root)
    if not path.startswith(root.rstrip(os.sep) + os.sep):
        return None
    return os.path.relpath(path, root).replace(os.sep, "/")


def manifest_hashes(bundle_root: str) -> dict[str, str] | None:
    """``{relative path: sha256}`` from the bundle's manifest.json, or None when it has none."""
    path = os.path.join(bundle_root, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            content = json.load(fh)
        if content.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"format {content.get('format')!r}, expected {MANIFEST_FORMAT!r}")
        return {str(name): str(entry["sha256"]).lower() for name, entry in content["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise IntegrityError(f"{path}: not a readable bundle manifest ({type(e).__name__}: {e}); expected "
                             f"{{'files': {{path: {{'sha256': hex}}}}}}") from e


def large_files_hashes(bundle_root: str) -> dict[str, str]:
    """``{relative path: sha256}`` of large_files.yml's entries that carry a sha256."""
    path = os.path.join(bundle_root, LARGE_FILES)
    if not os.path.isfile(path):
        return {}
    import yaml

    with open(path, encoding="utf-8") as fh:
        content = yaml.safe_load(fh) or {}
    found = {}
    for entry in content.get("large_files", []) or []:
        if not isinstance(entry, dict) or not entry.get("hash_val"):
            continue
        if str(entry.get("hash_type", "sha256")).lower() != "sha256":
            raise IntegrityError(f"{path}: {entry.get('path')}: hash_type {entry.get('hash_type')!r}; "
                                 f"expected sha256")
        found[str(entry["path"]).lstrip("./")] = str(entry["hash_val"]).lower()
    return found


def verify_configs(bundle_root: str, trust_configs=False) -> None:
    """Refuse configs that differ from the manifest (when there is one) unless ``trust_configs``.
    ``bundle_root`` None checks nothing (a caller that only loads weights)."""
    if bundle_root is None:
        return
    hashes = manifest_hashes(bundle_root)
    if hashes is None:
        return
    changed = []
    for name, expected in sorted(hashes.items()):
        if not name.startswith("configs/"):
            continue
        path = os.path.join(bundle_root, name)
        actual = file_sha256(path) if os.path.isfile(path) else "missing"
        if actual != expected:
            changed.append(f"{path} (sha256 {actual}, manifest {expected})")
    if not changed:
        return
    if _as_bool(trust_configs):
        logger.warning("trust_configs is set: running configs that differ from %s: %s",
                       os.path.join(bundle_root, MANIFEST), "; ".join(changed))
        return
    raise IntegrityError(f"configs differ from the bundle's manifest ({os.path.join(bundle_root, MANIFEST)}): "
                         f"{'; '.join(changed)}. Configs run code: fetch the bundle again, or pass "
                         f"--trust_configs true if you made and trust these changes")


def owning_bundle(path: str, levels: int = 3) -> str | None:
    """The nearest bundle folder above ``path`` (at most ``levels`` up: models/fold0/model.pt is
    two): one with configs/ and a manifest.json or large_files.yml; None when there is none."""
    folder = os.path.dirname(os.path.abspath(path))
    for _ in range(levels):
        if os.path.isdir(os.path.join(folder, "configs")) and (
                os.path.isfile(os.path.join(folder, MANIFEST)) or os.path.isfile(os.path.join(folder, LARGE_FILES))):
            return folder
        folder = os.path.dirname(folder)
    return None


def verified_weights(path: str | None, bundle_root: str | None = None, trust_configs=False) -> str | None:
    """``path`` after checking its sha256 against the sha256 its bundle publishes for it.

    ``path`` is a weights file, or a bundle folder (a fetched bundle given as ``pretrained``),
    which stands for its ``models/model.pt``. The published hash comes from the manifest.json
    of the bundle the file lies in or, without one, from its large_files.yml. ``None`` passes
    through (no weights to load). Raises :class:`IntegrityError` naming the file and both hashes
    on a mismatch, and refuses edited configs of the running bundle (``bundle_root``) when it
    has a manifest (see the module doc).
    """
    if path is None or str(path).strip().lower() in ("", "none", "null"):
        return None
    path = str(path)
    verify_configs(bundle_root, trust_configs)
    if os.path.isdir(path):
        path = os.path.join(path, "models", "model.pt")
    if not os.path.isfile(path):
        # nothing to verify yet: configs resolve their handlers before a run (check_properties,
        # a train run that writes the file first), and the loader names a file still missing
        logger.info("%s: not present yet; checked when it exists", path)
        return path
    owner = owning_bundle(path)
    expected, source = None, "no manifest.json or large_files.yml"
    if owner is not None:
        rel = _relative(path, owner)
        hashes = manifest_hashes(owner)
        source = os.path.join(owner, MANIFEST)
        if hashes is None:
            hashes, source = large_files_hashes(owner), os.path.join(owner, LARGE_FILES)
        expected = hashes.get(rel)
    if expected is None:
        logger.info("%s: not listed in %s; loading it weights-only without a published sha256", path, source)
    else:
        actual = file_sha256(path)
        if actual != expected:
            raise IntegrityError(f"{path}: sha256 {actual} does not match {source}'s {expected}; the file is "
                                 f"not the one the bundle publishes: refusing to load it")
        logger.info("%s: sha256 matches %s", path, source)
    check_weights_only(path)
    return path


def check_weights_only(path: str) -> None:
    """Refuse a file that ``torch.load(weights_only=True)`` cannot read (a pickle holding code,
    a truncated file) with a message naming it, before a loader meets it; its code never runs."""
    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise IntegrityError(f"{path}: not a weights-only checkpoint ({type(e).__name__}: {first[:200]}); a file "
                             f"that holds code is refused and its code is not run") from e
