"""Slide readers, the pyramid writer, tissue masks, tile grids and image files (numpy only, no torch).

May import: the base modules only (errors, progress, provenance, runtime, seeding)."""
