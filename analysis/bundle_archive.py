"""Bundles shared between sites: export in the Model Zoo archive layout, fetch and verify.

Site A exports a bundle with its weights::

    python -m analysis export-bundle bundles/hcc_liver_seg --out dist

which writes ``dist/hcc_liver_seg_v<version>.zip`` and ``dist/hcc_liver_seg_v<version>.zip.sha256``.
The archive holds ``<name>/configs``, ``<name>/scripts``, ``<name>/docs``, ``<name>/LICENSE``,
``<name>/large_files.yml``, ``<name>/models/model.pt`` (the weights, byte for byte),
``<name>/models/model.ts`` (traced by MONAI's ``ckpt_export``), ``<name>/models/model.onnx`` when
the bundle has one (``python -m analysis export-onnx``; it must come from the same weights) and
``<name>/manifest.json``, the sha256 and size of every other member.

Site B fetches it, from a URL (MONAI's ``download_url`` checks the sha256) or a local path::

    python -m analysis fetch-bundle https://host/hcc_liver_seg_v0.4.0.zip --sha256 HEX --out bundles_in

Nothing is written into ``--out`` until everything holds: the archive's sha256 first, then
every member's name and type (no ``..``, absolute paths, links or devices), then every
member's sha256 against the manifest, with no member missing or unlisted. A refusal lists
every problem, names the files and leaves no temporary files behind.

The bundles themselves check their weights (and, once fetched, their configs) against the
manifest before loading anything: ``scripts/integrity.py`` in each bundle.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path, PurePosixPath

from analysis import io

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "hcc-tace-bundle-manifest/1"
#: what an exported bundle carries besides its weights (``models/`` is written by the export)
BUNDLE_PARTS = ("configs", "scripts", "docs", "LICENSE", "large_files.yml")
#: the id that holds the inference weights' path, in both bundles' inference.json
WEIGHT_ID = "ckpt_path"
#: refuse archives whose members would unpack to more than this (a zip bomb)
MAX_UNPACKED_BYTES = 8 << 30
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
# fixed member timestamps: the same bundle exports to the same bytes
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)

MANIFEST_SCHEMA = {
    "type": "object",
    "required": ["format", "name", "version", "files"],
    "properties": {
        "format": {"const": MANIFEST_FORMAT},
        "name": {"type": "string", "pattern": _NAME.pattern},
        "version": {"type": "string", "minLength": 1},
        "files": {
            "type": "object",
            "minProperties": 1,
            "additionalProperties": {
                "type": "object",
                "required": ["sha256", "size"],
                "properties": {"sha256": {"type": "string", "pattern": _HEX64.pattern},
                               "size": {"type": "integer", "minimum": 0}},
            },
        },
    },
}


class BundleExportError(ValueError):
    """A bundle cannot be exported: metadata, version or weights missing or inconsistent."""


class BundleFetchError(ValueError):
    """A fetched archive was refused; nothing was written."""


def _sha256_bytes_of(stream, chunk: int = 1 << 20) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    for block in iter(lambda: stream.read(chunk), b""):
        h.update(block)
        n += len(block)
    return h.hexdigest(), n


def bundle_integrity(bundle: Path):
    """The bundle's own ``scripts/integrity.py``, loaded under a private module name (both
    bundles call their package ``scripts``, so it is never imported as ``scripts``)."""
    path = bundle / "scripts" / "integrity.py"
    if not path.is_file():
        raise BundleExportError(f"{path}: missing; the bundle cannot check its weights before loading them")
    spec = importlib.util.spec_from_file_location(f"_integrity_{bundle.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------- export


def _read_metadata(bundle: Path) -> dict:
    path = bundle / "configs" / "metadata.json"
    if not path.is_file():
        raise BundleExportError(f"{path}: missing; a bundle needs configs/metadata.json with a version")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise BundleExportError(f"{path}: not valid JSON ({e})") from e
    version = str(meta.get("version", "")).strip() if isinstance(meta, dict) else ""
    if not version:
        raise BundleExportError(f"{path}: no 'version'; expected a semantic version such as 0.4.0")
    if not re.fullmatch(r"\d+\.\d+\.\d+", version):
        raise BundleExportError(f"{path}: version {version!r}; expected MAJOR.MINOR.PATCH")
    if version not in (meta.get("changelog") or {}):
        raise BundleExportError(f"{path}: version {version} has no changelog entry")
    return meta


def _parser(bundle: Path, configs: list[Path]):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(c) for c in configs])
    parser["bundle_root"] = str(bundle)
    return parser


def _weights_and_sizes(bundle: Path, overlay: Path | None, weights: str | None) -> tuple[Path, int, str]:
    """(weights file, the configs' feature_size, the id holding the weights path)."""
    configs = [bundle / "configs" / "inference.json"] + ([overlay] if overlay else [])
    for c in configs:
        if not c.is_file():
            raise BundleExportError(f"{c}: missing")
    parser = _parser(bundle, configs)
    weight_id = WEIGHT_ID
    if weight_id not in parser.get():
        raise BundleExportError(f"{configs[0]}: no id {WEIGHT_ID!r} names the inference weights")
    if weights is None:
        if overlay is not None and weight_id in json.loads(overlay.read_text(encoding="utf-8")):
            weights = parser.get_parsed_content(weight_id)
        else:
            weights = str(bundle / "models" / "model.pt")
    path = Path(weights)
    # a relative --weights is the bundle's own file (models/model.pt) unless it exists from here,
    # as --overlay is read (the bundle READMEs' commands run from the repository root)
    if not path.is_absolute() and not path.is_file() and (bundle / path).is_file():
        path = bundle / path
    if not path.is_file():
        raise BundleExportError(f"weights not found: {path}; train the bundle, or pass --weights FILE "
                                f"(and --overlay with the sizes they were trained at)")
    feature_size = parser.get("feature_size")
    if not isinstance(feature_size, int):
        raise BundleExportError(f"{configs[-1]}: feature_size {feature_size!r}; expected an integer")
    return path, feature_size, weight_id


def _load_state(path: Path) -> tuple[dict, str]:
    """(state dict, key in the checkpoint: 'model' or '') loaded weights-only."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with code, a truncated file: name the file
        raise BundleExportError(f"{path}: not a weights-only checkpoint ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''})") from e
    key = "model" if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict) else ""
    state = ckpt[key] if key else ckpt
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BundleExportError(f"{path}: expected a state dict of tensors (or {{'model': state dict}})")
    return state, key


def weights_feature_size(state: dict) -> int | None:
    """feature_size of a SwinUNETR-based state dict: the patch embedding's output channels."""
    for key, value in state.items():
        if key.endswith("swinViT.patch_embed.proj.weight"):
            return int(value.shape[0])
    return None


def _trace(bundle: Path, configs: list[Path], weights: Path, key_in_ckpt: str, out: Path) -> list[int]:
    """models/model.ts through MONAI's ckpt_export (in a child process: each bundle's scripts
    package is called ``scripts``); returns the traced input shape."""
    cmd = [sys.executable, "-m", "analysis.bundle_archive", "_trace", str(bundle), json.dumps([str(c) for c in configs]),
           str(weights), key_in_ckpt, str(out)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(bundle), str(Path(__file__).resolve().parent.parent),
                                                       os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise BundleExportError(f"tracing {bundle.name}'s network_def with {weights} failed:\n{tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _trace_child(bundle: str, configs_json: str, weights: str, key_in_ckpt: str, out: str) -> None:
    from monai.bundle import ckpt_export

    configs = json.loads(configs_json)
    parser = _parser(Path(bundle), [Path(c) for c in configs])
    channels = int(parser.get_parsed_content("network_def#in_channels"))
    spatial = parser.get("spatial_size") or parser.get("roi_size")
    shape = [1, channels, *[int(s) for s in spatial]]
    # ckpt_export reads the configs itself; the overlay's ids apply through config_file's list
    ckpt_export(net_id="network_def", filepath=out, ckpt_file=weights, meta_file=os.path.join(bundle, "configs", "metadata.json"),
                config_file=configs, key_in_ckpt=key_in_ckpt, use_trace=True, input_shape=shape, bundle_root=bundle)
    print(json.dumps(shape))


def _copy_onnx(bundle: Path, root: Path, model_sha: str, weights_path: Path) -> str:
    """Ship ``models/model.onnx`` (``python -m analysis export-onnx``) when the bundle has one; its
    sha256 goes into the manifest like every member's, and into large_files.yml (returned entry).
    A file exported from other weights than the ones exported here is refused."""
    src = bundle / "models" / "model.onnx"
    if not src.is_file():
        return ""
    from analysis.onnx_export import WEIGHTS_SHA_KEY, onnx_metadata

    try:
        source_sha = onnx_metadata(src).get(WEIGHTS_SHA_KEY, "")
    except Exception as e:  # noqa: BLE001 - not an ONNX file: name it
        raise BundleExportError(f"{src}: not a readable ONNX file ({type(e).__name__}: {e})") from e
    if source_sha != model_sha:
        raise BundleExportError(f"{src}: exported from weights with sha256 {source_sha or 'unknown'}, not from "
                                f"{weights_path} ({model_sha}); export it again (python -m analysis export-onnx "
                                f"--bundle {bundle} --weights {weights_path}) or remove it")
    shutil.copy2(src, root / "models" / "model.onnx")
    sha = io.file_sha256(root / "models" / "model.onnx")
    return f"  - path: \"models/model.onnx\"\n    url: \"\"\n    hash_type: \"sha256\"\n    hash_val: \"{sha}\"\n"


def _copy_tree(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)


def _manifest(root: Path, name: str, version: str) -> dict:
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel == MANIFEST:
            continue
        files[rel] = {"sha256": io.file_sha256(path), "size": path.stat().st_size}
    return {"format": MANIFEST_FORMAT, "name": name, "version": version, "files": files}


def export_bundle(bundle: str | os.PathLike, out: str | os.PathLike, weights: str | None = None,
                  overlay: str | None = None, trace: bool = True) -> Path:
    """Write ``out/<name>_v<version>.zip`` (and its ``.zip.sha256``); return the zip's path.

    ``overlay``: the config overlay whose sizes the weights were trained at (default:
    ``configs/synthetic_weights.json`` when the bundle has no ``models/model.pt``; ``"none"``:
    inference.json's own sizes). It is exported with its weights id pointing at
    ``models/model.pt``. ``weights``: default, the
    file the overlay selects, else ``models/model.pt``.
    """
    bundle = Path(bundle).resolve()
    if not (bundle / "configs").is_dir():
        raise BundleExportError(f"{bundle}: not a bundle folder (no configs/)")
    name = bundle.name
    if not _NAME.match(name):
        raise BundleExportError(f"{bundle}: bundle folder name {name!r}; expected letters, digits, '_', '-', '.'")
    meta = _read_metadata(bundle)
    version = meta["version"]
    if overlay is None and not (bundle / "models" / "model.pt").is_file() and \
            (bundle / "configs" / "synthetic_weights.json").is_file():
        overlay = str(bundle / "configs" / "synthetic_weights.json")
    if overlay is not None and str(overlay).strip().lower() in ("", "none"):
        overlay = None  # explicitly none: inference.json's own sizes
    overlay_path = None
    if overlay is not None:
        overlay_path = Path(overlay) if Path(overlay).is_absolute() or Path(overlay).is_file() else bundle / overlay
        overlay_path = overlay_path.resolve()
        if bundle / "configs" not in overlay_path.parents:
            raise BundleExportError(f"overlay {overlay}: must be a file under {bundle / 'configs'}")
    weights_path, feature_size, weight_id = _weights_and_sizes(bundle, overlay_path, weights)
    # the weights' own bundle may publish their hash: a mismatch is refused before loading
    integrity = bundle_integrity(bundle)
    try:
        integrity.verified_weights(str(weights_path))
    except integrity.IntegrityError as e:
        raise BundleExportError(str(e)) from e
    state, key_in_ckpt = _load_state(weights_path)
    found = weights_feature_size(state)
    if found is None:
        raise BundleExportError(f"{weights_path}: no swinViT.patch_embed.proj.weight; not a {name} checkpoint")
    if found != feature_size:
        raise BundleExportError(f"{weights_path}: weights have feature_size {found}, the configs "
                                f"({'inference.json' + (' + ' + overlay_path.name if overlay_path else '')}) say "
                                f"{feature_size}; pass the --overlay the weights were trained with")

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{name}_v{version}.zip"
    with tempfile.TemporaryDirectory(prefix=f".{name}.export-", dir=out) as tmp:
        root = Path(tmp) / name
        for part in BUNDLE_PARTS:
            if (bundle / part).exists():
                _copy_tree(bundle / part, root / part)
        for required in ("configs", "scripts", "LICENSE"):
            if not (root / required).exists():
                raise BundleExportError(f"{bundle / required}: missing; every exported bundle carries it")
        (root / "models").mkdir()
        shutil.copy2(weights_path, root / "models" / "model.pt")
        if overlay_path is not None:
            content = json.loads(overlay_path.read_text(encoding="utf-8"))
            content[weight_id] = "$@bundle_root + '/models/model.pt'"
            (root / "configs" / overlay_path.name).write_text(json.dumps(content, indent=4) + "\n", encoding="utf-8")
        configs = [root / "configs" / "inference.json"] + ([root / "configs" / overlay_path.name] if overlay_path else [])
        shape = None
        if trace:
            shape = _trace(root, configs, root / "models" / "model.pt", key_in_ckpt, root / "models" / "model.ts")
        model_sha = io.file_sha256(root / "models" / "model.pt")
        onnx_entry = _copy_onnx(bundle, root, model_sha, weights_path)
        overlay_note = f"configs/{overlay_path.name}" if overlay_path else None
        (root / "large_files.yml").write_text(
            "# written by python -m analysis export-bundle: the weights inside this archive.\n"
            "# A site that hosts them replaces url with its own server; hash_val stays.\n"
            "large_files:\n"
            f"  - path: \"models/model.pt\"\n    url: \"\"\n    hash_type: \"sha256\"\n    hash_val: \"{model_sha}\"\n"
            + onnx_entry, encoding="utf-8")
        manifest = _manifest(root, name, version)
        manifest.update({"feature_size": feature_size, "weights_overlay": overlay_note, "traced_input_shape": shape,
                         "weights_source": weights_path.name})
        (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        with io.atomic_path(target, suffix=".zip") as tmp_zip:
            with zipfile.ZipFile(tmp_zip, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                for path in sorted(p for p in root.rglob("*") if p.is_file()):
                    info = zipfile.ZipInfo(f"{name}/{path.relative_to(root).as_posix()}", date_time=_ZIP_TIME)
                    info.external_attr = (stat.S_IFREG | 0o644) << 16
                    info.compress_type = zipfile.ZIP_DEFLATED
                    zf.writestr(info, path.read_bytes())
    digest = io.file_sha256(target)
    io.write_text(target.with_name(target.name + ".sha256"), f"{digest}  {target.name}\n")
    log.info("exported %s %s (%d files, weights %s, feature_size %d) -> %s sha256 %s", name, version,
             len(manifest["files"]), weights_path.name, feature_size, target, digest)
    return target


# ----------------------------------------------------------------------------------------- fetch


def _member_problems(info: zipfile.ZipInfo) -> list[str]:
    name = info.filename
    problems = []
    mode = (info.external_attr >> 16) & 0xFFFF
    # the Unix file type sits in the high bits; zip writers that record none mean a plain file
    if stat.S_ISLNK(mode):
        problems.append(f"{name}: a symbolic link")
    elif stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        problems.append(f"{name}: not a regular file (mode {oct(mode)}: device, fifo or socket)")
    if "\\" in name or "\x00" in name:
        problems.append(f"{name}: backslash or NUL in the name")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        problems.append(f"{name}: an absolute path")
    if ".." in PurePosixPath(name).parts:
        problems.append(f"{name}: a '..' component (would write outside the bundle)")
    return problems


def _is_url(source: str) -> bool:
    return bool(re.match(r"^(https?|ftp)://", source))


def _obtain(source: str, staging: Path, sha256: str | None) -> Path:
    """The archive in ``staging``, its sha256 checked (when given) before it is opened."""
    archive = staging / "archive.zip"
    if _is_url(source):
        from monai.apps.utils import HashCheckError, download_url

        try:
            download_url(source, filepath=archive, hash_val=sha256, hash_type="sha256", progress=True)
        except HashCheckError as e:
            raise BundleFetchError(f"{source}: sha256 check failed, expected {sha256} ({e}); nothing written") from e
        except Exception as e:  # network errors: name the URL
            raise BundleFetchError(f"{source}: download failed ({type(e).__name__}: {e})") from e
    else:
        local = Path(source[len("file://"):] if source.startswith("file://") else source)
        if not local.is_file():
            raise BundleFetchError(f"{local}: no such archive")
        shutil.copyfile(local, archive)
    # MONAI skips the check without a hash and we keep our own for the local case: one rule for both
    actual = io.file_sha256(archive)
    if sha256 is not None and actual != sha256:
        raise BundleFetchError(f"{source}: sha256 {actual} does not match --sha256 {sha256}; the archive is "
                               f"not the one published: nothing written")
    log.info("%s: sha256 %s%s", source, actual, " (matches)" if sha256 else " (not checked: --insecure-no-hash)")
    return archive


def _verified_members(archive: Path, source: str) -> tuple[str, dict, list[zipfile.ZipInfo]]:
    """(bundle name, manifest, file members) after every check; raises listing every problem."""
    import jsonschema

    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as e:
        raise BundleFetchError(f"{source}: not a zip archive ({e})") from e
    with zf:
        infos = zf.infolist()
        problems = [p for info in infos for p in _member_problems(info)]
        names = [i.filename for i in infos]
        dupes = sorted({n for n in names if names.count(n) > 1})
        problems += [f"{n}: appears more than once" for n in dupes]
        tops = {PurePosixPath(n).parts[0] for n in names if PurePosixPath(n).parts}
        if len(tops) != 1:
            problems.append(f"{source}: expected one top folder <bundle name>/, found {sorted(tops)[:5]}")
        if problems:
            raise BundleFetchError(f"{source}: refused, nothing written: " + "; ".join(problems))
        name = tops.pop()
        if not _NAME.match(name):
            raise BundleFetchError(f"{source}: top folder {name!r} is not a bundle name")
        files = [i for i in infos if not i.is_dir()]
        if sum(i.file_size for i in files) > MAX_UNPACKED_BYTES:
            raise BundleFetchError(f"{source}: members unpack to more than {MAX_UNPACKED_BYTES >> 30} GiB; refused")
        manifest_name = f"{name}/{MANIFEST}"
        if manifest_name not in names:
            raise BundleFetchError(f"{source}: no {manifest_name}; a shared bundle lists the sha256 of every file "
                                   f"(python -m analysis export-bundle writes it)")
        try:
            manifest = json.loads(zf.read(manifest_name).decode("utf-8"))
            jsonschema.validate(manifest, MANIFEST_SCHEMA)
        except (ValueError, jsonschema.ValidationError) as e:
            message = e.message if isinstance(e, jsonschema.ValidationError) else str(e)
            raise BundleFetchError(f"{source}: {manifest_name} is not a valid manifest: {message}") from e
        if manifest["name"] != name:
            problems.append(f"{manifest_name}: name {manifest['name']!r} but the archive's folder is {name!r}")
        listed = {f"{name}/{rel}": entry for rel, entry in manifest["files"].items()}
        for rel in manifest["files"]:
            problems += [p.replace(f"{name}/{rel}", f"{manifest_name} entry {rel}")
                         for p in _member_problems(zipfile.ZipInfo(f"{name}/{rel}"))]
        members = {i.filename: i for i in files if i.filename != manifest_name}
        problems += [f"{n}: in the archive but not in the manifest" for n in sorted(set(members) - set(listed))]
        problems += [f"{n}: in the manifest but not in the archive" for n in sorted(set(listed) - set(members))]
        for n in sorted(set(members) & set(listed)):
            with zf.open(members[n]) as fh:
                digest, size = _sha256_bytes_of(fh)
            want = listed[n]
            if digest != want["sha256"] or size != want["size"]:
                problems.append(f"{n}: sha256 {digest} ({size} bytes), manifest {want['sha256']} ({want['size']} bytes)")
        if problems:
            raise BundleFetchError(f"{source}: refused, nothing written: " + "; ".join(problems))
        return name, manifest, files


def fetch_bundle(source: str, out: str | os.PathLike, sha256: str | None = None,
                 insecure_no_hash: bool = False) -> Path:
    """Fetch, verify and unpack a bundle archive into ``out/<name>``; return that folder."""
    if sha256 is not None:
        sha256 = str(sha256).strip().lower()
        if not _HEX64.match(sha256):
            raise BundleFetchError(f"--sha256 {sha256!r}: expected 64 hexadecimal digits (the archive's .zip.sha256)")
    elif not insecure_no_hash:
        raise BundleFetchError(f"{source}: no --sha256 given; pass the archive's published sha256 (its .zip.sha256 "
                               f"file), or --insecure-no-hash to fetch it unverified")
    else:
        warnings.warn(f"{source}: fetched WITHOUT a sha256 (--insecure-no-hash): the archive is only checked "
                      f"against its own manifest, which anyone can rewrite", stacklevel=2)
        log.warning("fetching %s without a sha256 (--insecure-no-hash)", source)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # staging beside out, not in it: a refusal leaves out untouched, and the final rename stays
    # on one file system
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.fetch-", dir=out.parent))
    try:
        archive = _obtain(str(source), staging, sha256)
        name, manifest, files = _verified_members(archive, str(source))
        target = out / name
        if target.exists():
            raise BundleFetchError(f"{target}: already exists; remove it or choose another --out")
        unpacked = staging / "unpacked"
        with zipfile.ZipFile(archive) as zf:
            for info in files:
                dest = unpacked / PurePosixPath(info.filename)
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        out.mkdir(parents=True, exist_ok=True)
        os.replace(unpacked / name, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("fetched %s %s (%d files verified) -> %s", name, manifest["version"], len(manifest["files"]), target)
    return target


def verify_bundle(bundle: str | os.PathLike) -> list[str]:
    """Problems of an unpacked bundle against its manifest.json: changed, missing or unlisted
    files (an empty list when every file matches)."""
    bundle = Path(bundle)
    path = bundle / MANIFEST
    if not path.is_file():
        return [f"{path}: missing; only a fetched (exported) bundle has a manifest"]
    import jsonschema

    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        jsonschema.validate(manifest, MANIFEST_SCHEMA)
    except (ValueError, jsonschema.ValidationError) as e:
        return [f"{path}: not a valid manifest ({getattr(e, 'message', e)})"]
    problems = []
    for rel, want in sorted(manifest["files"].items()):
        p = bundle / rel
        if not p.is_file():
            problems.append(f"{p}: missing")
        elif (digest := io.file_sha256(p)) != want["sha256"]:
            problems.append(f"{p}: sha256 {digest}, manifest {want['sha256']}")
    present = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    problems += [f"{bundle / rel}: not in the manifest" for rel in sorted(present - set(manifest["files"]) - {MANIFEST})]
    return problems


# ------------------------------------------------------------------------------------------- CLI


def export_bundle_cli(bundle: str, out: str = "dist", weights: str | None = None, overlay: str | None = None,
                      trace: bool = True) -> str:
    """Export a bundle with its weights as a Model Zoo archive plus manifest and sha256.

    Args:
        bundle: the bundle folder, e.g. bundles/hcc_liver_seg.
        out: folder for <name>_v<version>.zip and <name>_v<version>.zip.sha256.
        weights: the weights file (default: what the overlay selects, else models/model.pt).
        overlay: config overlay with the sizes the weights were trained at (default:
            configs/synthetic_weights.json when the bundle has no models/model.pt).
        trace: also write models/model.ts with MONAI's ckpt_export (traced).
    """
    from analysis.flags import as_bool

    try:
        target = export_bundle(bundle, out, weights=weights, overlay=overlay, trace=as_bool(trace, "trace"))
    except BundleExportError as e:
        print(f"export-bundle: {e}", file=sys.stderr)
        raise SystemExit(2)
    digest = target.with_name(target.name + ".sha256").read_text().split()[0]
    return f"{target}\nsha256 {digest}"


def fetch_bundle_cli(source: str, out: str = "bundles_fetched", sha256: str | None = None,
                     insecure_no_hash: bool = False) -> str:
    """Fetch a bundle archive (URL or local path), verify it, and unpack it into OUT/<name>.

    Args:
        source: http(s) URL, file:// URL or local path of <name>_v<version>.zip.
        out: folder the bundle is unpacked into (as OUT/<name>); nothing is written on a refusal.
        sha256: the archive's published sha256 (its .zip.sha256); required.
        insecure_no_hash: fetch without --sha256 (prints a warning; the manifest is still checked).
    """
    from analysis.flags import as_bool

    try:
        target = fetch_bundle(source, out, sha256=None if sha256 is None else str(sha256),
                              insecure_no_hash=as_bool(insecure_no_hash, "insecure_no_hash"))
    except BundleFetchError as e:
        print(f"fetch-bundle: {e}", file=sys.stderr)
        raise SystemExit(2)
    return str(target)


def verify_bundle_cli(bundle: str) -> str:
    """Check every file of a fetched bundle against its manifest.json; exit 2 listing every change.

    Args:
        bundle: the unpacked bundle folder (OUT/<name> of fetch-bundle).
    """
    problems = verify_bundle(bundle)
    if problems:
        print("verify-bundle: " + "\n  ".join([f"{bundle}: {len(problems)} problem(s)"] + problems), file=sys.stderr)
        raise SystemExit(2)
    return f"{bundle}: every file matches manifest.json"


if __name__ == "__main__" and len(sys.argv) == 7 and sys.argv[1] == "_trace":
    _trace_child(*sys.argv[2:])
