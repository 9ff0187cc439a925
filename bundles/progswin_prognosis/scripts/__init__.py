"""Bundle-local code for progswin_prognosis: only what the JSON configs cannot say.

Self-contained on purpose: nothing here imports the project's ``analysis`` package, so the
bundle can be zipped and run alone. ``$import scripts`` in a config makes every module below
usable in its expressions; the drivers (cross_validate, gradcam) are imported where used.
"""

from . import checkpoints, data, flags, handlers, inferers, integrity, io, metrics, net, transforms, warmup  # noqa: F401
