"""A bundle's network as ONNX, for ONNX Runtime inference (``--backend onnxruntime``).

    python -m analysis export-onnx --bundle bundles/progswin_prognosis --overlay configs/synthetic_weights.json

builds the bundle's ``network_def`` from ``configs/inference.json`` (+ the overlay with the sizes the
weights were trained at), loads the weights the configs select (or ``--weights FILE``) after the
bundle's own sha256 check (``scripts/integrity.py::verified_weights``) with
``torch.load(weights_only=True)``, exports the whole network (ProgSwin-UNETR with its head,
region pooling included; SwinUNETR for segmentation) with a free batch axis at the configs' input
size (prognosis: ``spatial_size``, segmentation: one ``roi_size`` window), checks that ONNX Runtime
gives PyTorch's output on a random input within :data:`ATOL` + :data:`RTOL` x |output|, and writes
``models/model.onnx`` (atomically). The file's metadata carry the bundle, its version and the sha256
of the weights, which ``export-bundle`` compares before it ships the file.

The exporter is torch's TorchScript-based one (``dynamo=False``, seconds for a 64^3 network); where
it loses a shape (SwinUNETR with a 32-voxel side: window padding of a 1-voxel bottleneck) the
``torch.export``-based one (``dynamo=True``, needs ``onnxscript``, ~40 s at 64x64x32) takes over.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from analysis import io

log = logging.getLogger(__name__)

#: the default ONNX opset
OPSET = 17
#: ONNX Runtime vs PyTorch (fp32, CPU): |ort - torch| <= ATOL + RTOL * |torch| element-wise
ATOL = 1e-4
RTOL = 1e-3
#: the id that holds the inference weights' path (as analysis.bundle_archive)
WEIGHT_ID = "ckpt_path"
#: metadata key holding the sha256 of the weights an ONNX file was exported from
WEIGHTS_SHA_KEY = "source_weights_sha256"


class OnnxExportError(ValueError):
    """The network cannot be exported, or ONNX Runtime disagrees with PyTorch."""


@contextlib.contextmanager
def bundle_scripts(bundle: Path):
    """``import scripts`` resolves to ``bundle``'s package inside the block (both bundles call
    their package ``scripts``); the previous modules and sys.path come back afterwards."""
    bundle = Path(bundle).resolve()
    saved = {k: sys.modules.pop(k) for k in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]}
    path = list(sys.path)
    sys.path.insert(0, str(bundle))
    try:
        yield
    finally:
        for k in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
            del sys.modules[k]
        sys.modules.update(saved)
        sys.path[:] = path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def example_input(shape, seed: int = 0, image_channels: int | None = None):
    """A random input: normal images and, after ``image_channels``, binary masks (ProgSwinUNETR's
    label channels, which region pooling reads as regions)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    if image_channels is not None and shape[1] > image_channels:
        x[:, image_channels:] = (torch.rand(shape[0], shape[1] - image_channels, *shape[2:], generator=g) > 0.6).float()
    return x


def export_network(network, example, out: str | os.PathLike, opset: int = OPSET, dynamic_batch: bool = True,
                   metadata: dict | None = None) -> Path:
    """Export ``network`` (eval mode, fp32, CPU) traced at ``example``'s shape to ``out``; input
    ``image``, output ``pred``, the batch axis free when ``dynamic_batch``."""
    import onnx
    import torch

    network = network.eval()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    axes = {"image": {0: "batch"}, "pred": {0: "batch"}} if dynamic_batch else None
    with io.atomic_path(out, suffix=".onnx") as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(network, (example,), str(tmp), input_names=["image"], output_names=["pred"],
                              dynamic_axes=axes, opset_version=int(opset), do_constant_folding=True, dynamo=False)
            exporter = "torchscript"
        except Exception as e:  # noqa: BLE001 - e.g. a window padding that leaves a shape unknown
            # (SwinUNETR at a 32-voxel side): torch.export's exporter keeps every shape
            log.info("TorchScript-based ONNX export failed (%s: %s); exporting with torch.export (dynamo)",
                     type(e).__name__, str(e).splitlines()[0][:200])
            shapes = ({0: torch.export.Dim("batch", max=4096)},) if dynamic_batch else None
            torch.onnx.export(network, (example,), str(tmp), input_names=["image"], output_names=["pred"],
                              dynamic_shapes=shapes, opset_version=max(int(opset), 18), dynamo=True, verbose=False)
            exporter = "dynamo"
        # saved again with the metadata; the dynamo exporter may keep the weights in a side file
        # (tmp.data), which the load reads back: one self-contained file
        model = onnx.load(str(tmp))
        for key, value in {**(metadata or {}), "exporter": exporter}.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = str(key), value if isinstance(value, str) else json.dumps(value)
        onnx.save(model, str(tmp))
        for side in tmp.parent.glob(tmp.name + ".data"):
            side.unlink()
    return out


def onnx_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata_props of an ONNX file (export-onnx writes the bundle, version, weights' sha256)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def max_difference(path: str | os.PathLike, network, example, threads: int | None = None) -> tuple[float, float]:
    """(max |ort - torch|, max |torch|) of the ONNX file against ``network`` on ``example``."""
    import numpy as np
    import onnxruntime as ort
    import torch

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = int(threads)
    session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = network.eval()(example).numpy()
    got = session.run(None, {session.get_inputs()[0].name: example.numpy()})[0]
    if got.shape != ref.shape:
        raise OnnxExportError(f"{path}: ONNX Runtime output shape {got.shape}, PyTorch {ref.shape}")
    excess = np.abs(got - ref) - (ATOL + RTOL * np.abs(ref))
    return float(np.max(np.abs(got - ref))), float(np.max(excess))


def _resolve_weights(bundle: Path, parser, weights: str | None) -> Path:
    if weights is None:
        weights = parser.get_parsed_content(WEIGHT_ID)
    path = Path(str(weights))
    # a relative --weights is the bundle's own file unless it exists from here (as export-bundle)
    if not path.is_absolute() and not path.is_file() and (bundle / path).is_file():
        path = bundle / path
    if not path.is_file():
        raise OnnxExportError(f"weights not found: {path}; train the bundle, or pass --weights FILE (and --overlay "
                              f"with the sizes they were trained at)")
    return path


def _overlay_path(bundle: Path, overlay: str | None) -> Path | None:
    if overlay is None or str(overlay).strip().lower() in ("", "none"):
        return None
    path = Path(overlay)
    path = path if path.is_absolute() or path.is_file() else bundle / path
    if not path.is_file():
        raise OnnxExportError(f"overlay {overlay}: no such file (looked for {path})")
    return path.resolve()


def export_bundle_onnx(bundle: str | os.PathLike, out: str | os.PathLike | None = None, overlay: str | None = None,
                       weights: str | None = None, opset: int = OPSET, check: bool = True, random_weights: bool = False,
                       overrides: dict | None = None) -> Path:
    """Export ``bundle``'s inference network with its weights to ``out`` (default
    ``<bundle>/models/model.onnx``); see the module doc. ``random_weights``: no weights are read
    (speed measurements); ``overrides``: config ids to set (e.g. ``{"network_def#depths": [1, 1, 1, 1]}``)."""
    import torch
    from monai.bundle import ConfigParser

    bundle = Path(bundle).resolve()
    if not (bundle / "configs" / "inference.json").is_file():
        raise OnnxExportError(f"{bundle}: not a bundle folder (no configs/inference.json)")
    meta = json.loads((bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))
    overlay_path = _overlay_path(bundle, overlay)
    out = Path(out) if out is not None else bundle / "models" / "model.onnx"
    if not out.is_absolute() and not out.parent.is_dir() and (bundle / out.parent).is_dir():
        out = bundle / out  # models/model.onnx of the bundle, as --weights
    with bundle_scripts(bundle):
        parser = ConfigParser()
        parser.read_config([str(bundle / "configs" / "inference.json")] + ([str(overlay_path)] if overlay_path else []))
        parser.update({"bundle_root": str(bundle), "device": "$torch.device('cpu')", "backend": "torch",
                       **(overrides or {})})
        network = parser.get_parsed_content("network_def", instantiate=True)
        channels = int(parser.get_parsed_content("network_def#in_channels"))
        spatial = parser.get("spatial_size") or parser.get("roi_size")
        shape = [1, channels, *[int(s) for s in spatial]]
        info = {"bundle": bundle.name, "bundle_version": str(meta.get("version")), "input_shape": shape,
                "overlay": overlay_path.name if overlay_path else "", "torch": torch.__version__, "opset": int(opset)}
        if random_weights:
            info.update({"weights": "random", WEIGHTS_SHA_KEY: ""})
        else:
            path = _resolve_weights(bundle, parser, weights)
            from scripts import integrity

            try:
                integrity.verified_weights(str(path), str(bundle))
            except integrity.IntegrityError as e:
                raise OnnxExportError(str(e)) from e
            ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
            state = ckpt["model"] if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict) else ckpt
            try:
                network.load_state_dict(state, strict=True)
            except RuntimeError as e:
                raise OnnxExportError(f"{path}: does not fit the configs' network_def (pass the --overlay the weights "
                                      f"were trained with): {str(e).splitlines()[0]}") from e
            info.update({"weights": path.name, WEIGHTS_SHA_KEY: _sha256(path)})
        network = network.float().eval()
        example = example_input(shape, image_channels=getattr(network, "image_channels", None))
        export_network(network, example, out, opset=opset, metadata=info)
        if check:
            diff, excess = max_difference(out, network, example)
            if excess > 0:
                out.unlink()
                raise OnnxExportError(f"{out}: ONNX Runtime differs from PyTorch by up to {diff:.3g} (tolerance "
                                      f"{ATOL} + {RTOL} x |output|); the file was removed")
            log.info("%s: ONNX Runtime matches PyTorch (max |difference| %.3g)", out, diff)
    log.info("exported %s %s (%s) -> %s", bundle.name, meta.get("version"), info["weights"], out)
    return out


def export_onnx_cli(bundle: str, out: str | None = None, overlay: str | None = None, weights: str | None = None,
                    opset: int = OPSET, check: bool = True) -> str:
    """Export a bundle's network with its weights to ONNX (models/model.onnx) for --backend onnxruntime.

    Args:
        bundle: the bundle folder, e.g. bundles/progswin_prognosis.
        out: the ONNX file to write (default: BUNDLE/models/model.onnx).
        overlay: config overlay with the sizes the weights were trained at, e.g. configs/synthetic_weights.json.
        weights: the weights file (default: the configs' ckpt_path); sha256-checked, loaded weights-only.
        opset: the ONNX opset to export with.
        check: compare ONNX Runtime with PyTorch on a random input and refuse a difference above the tolerance.
    """
    from analysis.flags import as_bool

    try:
        path = export_bundle_onnx(bundle, out, overlay=overlay, weights=weights, opset=int(opset),
                                  check=as_bool(check, "check"))
    except (OnnxExportError, FileNotFoundError) as e:
        print(f"export-onnx: {e}", file=sys.stderr)
        raise SystemExit(2)
    return f"{path}\nsha256 {_sha256(path)}"
