"""Bundle-local code for hcc_liver_seg: only what the JSON configs cannot say.

Self-contained on purpose (MONAI, torch, numpy, nibabel only): the bundle is shared zipped alone.
``$import scripts`` in a config makes every module below usable in its expressions.
"""

from . import checks, flags, handlers, integrity, metrics, transforms, writer  # noqa: F401
