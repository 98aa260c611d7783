"""Phantom liver slide pairs: tissue layout (histology.py), H&E stains (stains.py),
autofluorescence (af.py), noise primitives (fields.py), orchestration (render.py).

May import: base modules and io."""

from vstain_cli.data.synth.render import megapixels, synth
from vstain_cli.data.synth.version import PHANTOM_VERSION

__all__ = ["PHANTOM_VERSION", "megapixels", "synth"]
