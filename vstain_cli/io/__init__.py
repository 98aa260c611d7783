"""Slide readers, pyramid writer, tissue masks and tile grids (numpy only, no torch)."""
