"""The inference backend: PyTorch (``torch``, the default) or ONNX Runtime (``onnxruntime``).

``python -m monai.bundle run --config_file configs/inference.json --backend onnxruntime`` runs the
same pre- and post-processing, inferer and evaluator; only ``network`` changes: an
:class:`OnnxRuntimeNetwork`, a small ``nn.Module`` whose forward runs an ONNX Runtime session on
the tensor it is given. The checkpoint loader does not run then. The ONNX file
(``models/model.onnx`` by default, id ``onnx_path``) is written by
``python -m analysis export-onnx --bundle BUNDLE`` and is checked against the sha256 its bundle
publishes (manifest.json of a fetched bundle, else large_files.yml) before a session opens it.

The same file lives in both bundles (each must run alone, zipped); a test keeps them identical.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

logger = logging.getLogger(__name__)

#: the values of the ``backend`` id
BACKENDS = ("torch", "onnxruntime")


def backend_id(value) -> str:
    """``backend`` text from the command line or a config: ``torch`` or ``onnxruntime``."""
    text = str(value).strip().lower()
    if text not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)}; got {value!r}")
    return text


def is_torch(backend) -> bool:
    """True for the PyTorch backend (the configs' ``_disabled_`` of the ONNX network)."""
    return backend_id(backend) == "torch"


def verified_onnx(path: str, bundle_root: str | None = None, trust_configs=False) -> str:
    """``path`` after checking its sha256 against the sha256 its bundle publishes for it (as
    ``scripts.integrity.verified_weights`` does for weights; an ONNX file holds no pickle, so it
    is not test-loaded with torch)."""
    from scripts import integrity

    path = str(path)
    integrity.verify_configs(bundle_root, trust_configs)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no ONNX model; write it with `python -m analysis export-onnx --bundle "
                                f"<this bundle> [--overlay configs/<sizes>.json]`, or pass --onnx_path FILE")
    owner = integrity.owning_bundle(path)
    expected, source = None, "no manifest.json or large_files.yml"
    if owner is not None:
        rel = os.path.relpath(os.path.realpath(path), os.path.realpath(owner)).replace(os.sep, "/")
        hashes = integrity.manifest_hashes(owner)
        source = os.path.join(owner, integrity.MANIFEST)
        if hashes is None:
            hashes, source = integrity.large_files_hashes(owner), os.path.join(owner, integrity.LARGE_FILES)
        expected = hashes.get(rel)
    if expected is None:
        logger.info("%s: not listed in %s; opening it without a published sha256", path, source)
        return path
    actual = integrity.file_sha256(path)
    if actual != expected:
        raise integrity.IntegrityError(f"{path}: sha256 {actual} does not match {source}'s {expected}; the file is "
                                       f"not the one the bundle publishes: refusing to open it")
    logger.info("%s: sha256 matches %s", path, source)
    return path


def session_options(threads: int | None = None, optimization: str = "all"):
    """ONNX Runtime session options: graph optimisations (``all``, ``extended``, ``basic``,
    ``none``) and intra-op threads (None: the cores this process may use)."""
    import onnxruntime as ort

    levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
    key = str(optimization).strip().lower()
    if key not in levels:
        raise ValueError(f"onnx_optimization: expected one of {list(levels)}; got {optimization!r}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = levels[key]
    if threads is None or int(threads) <= 0:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    return opts


class OnnxRuntimeNetwork(nn.Module):
    """A network whose forward runs an ONNX Runtime session: float32 in, float32 out, on the
    input's device. The session opens at construction, after the sha256 check.

    Args:
        path: the ONNX file (``python -m analysis export-onnx``).
        bundle_root: the running bundle (its manifest/large_files.yml publish the sha256).
        trust_configs: as for the weights (``scripts.integrity``).
        threads: intra-op threads; None or 0: the cores this process may use.
        optimization: graph optimisation level, ``all`` by default.
        providers: ONNX Runtime execution providers; default CPU.
    """

    def __init__(self, path: str, bundle_root: str | None = None, trust_configs=False, threads: int | None = None,
                 optimization: str = "all", providers: list[str] | None = None) -> None:
        super().__init__()
        import onnxruntime as ort

        self.path = verified_onnx(path, bundle_root, trust_configs)
        self.session = ort.InferenceSession(self.path, sess_options=session_options(threads, optimization),
                                            providers=list(providers or ["CPUExecutionProvider"]))
        self.input_name = self.session.get_inputs()[0].name
        self.input_shape = list(self.session.get_inputs()[0].shape)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs:
            raise ValueError(f"{self.path}: the ONNX network takes the input tensor only (got extra arguments "
                             f"{list(kwargs) or len(args)}); a per-voxel map for sliding windows is not exported: "
                             f"use whole-volume inference (sliding_window false) or --backend torch")
        x = x.as_tensor() if hasattr(x, "as_tensor") else x  # a MetaTensor's data
        fixed = [s for s in self.input_shape[1:] if isinstance(s, int)]
        if len(fixed) == x.ndim - 1 and list(x.shape[1:]) != fixed:
            raise ValueError(f"{self.path}: exported for input (batch, {', '.join(map(str, fixed))}); got "
                             f"{tuple(x.shape)}: export it again at these sizes (python -m analysis export-onnx)")
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        out = self.session.run(None, {self.input_name: array})[0]
        return torch.from_numpy(out).to(x.device)
