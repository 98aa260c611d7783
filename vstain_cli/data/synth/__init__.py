"""Phantom liver slide pairs: procedural fields (fields.py) rendered to AF + H&E slides (render.py).

May import: base modules and io."""

from vstain_cli.data.synth.render import megapixels, synth

__all__ = ["megapixels", "synth"]
