"""The tissue mask of a whole AF slide, from a thumbnail, looked up at level-0 boxes."""

from __future__ import annotations

import numpy as np

from vstain_cli.io.grid import tissue_mask_af
from vstain_cli.io.slides import TiffSlide

MASK_PX_PER_WINDOW = 8  # thumbnail pixels per model window side


class SlideMask:
    """A tissue mask on an AF thumbnail, looked up at level-0 boxes."""

    def __init__(self, slide: TiffSlide, tile: int):
        """``tile``: the model's window size; the thumbnail has MASK_PX_PER_WINDOW pixels per window."""
        target = max(64, int(np.ceil(max(slide.width, slide.height) * MASK_PX_PER_WINDOW / tile)))
        total, self.downsample = slide.thumbnail(target, channel_sum=True)
        full = float(np.iinfo(slide.dtype).max) if np.issubdtype(slide.dtype, np.integer) else 0.0
        self.mask = tissue_mask_af(total, full_scale=full, channels=slide.channels)
        self._soft: np.ndarray | None = None

    @property
    def empty(self) -> bool:
        return not bool(self.mask.any())

    def box(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """The mask at level-0 resolution over a box (nearest neighbour)."""
        ys = np.minimum((np.arange(y0, y1) / self.downsample).astype(int), self.mask.shape[0] - 1)
        xs = np.minimum((np.arange(x0, x1) / self.downsample).astype(int), self.mask.shape[1] - 1)
        return self.mask[ys[:, None], xs[None, :]]

    def soft_box(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """A feathered tissue weight in [0, 1] over a box: 1 on tissue, 0 on glass.

        The thumbnail mask, dilated by one thumbnail pixel and blurred, is
        interpolated bilinearly to level 0, so the section's edge fades to white
        glass smoothly instead of following the window grid.
        """
        if self._soft is None:
            from scipy.ndimage import binary_dilation, gaussian_filter

            self._soft = gaussian_filter(binary_dilation(self.mask).astype(np.float32), 1.0)
        s = self._soft
        fy = np.clip((np.arange(y0, y1) + 0.5) / self.downsample - 0.5, 0, s.shape[0] - 1)
        fx = np.clip((np.arange(x0, x1) + 0.5) / self.downsample - 0.5, 0, s.shape[1] - 1)
        iy, ix = np.floor(fy).astype(int), np.floor(fx).astype(int)
        iy1, ix1 = np.minimum(iy + 1, s.shape[0] - 1), np.minimum(ix + 1, s.shape[1] - 1)
        wy, wx = (fy - iy)[:, None], (fx - ix)[None, :]
        top = s[iy][:, ix] * (1 - wx) + s[iy][:, ix1] * wx
        bottom = s[iy1][:, ix] * (1 - wx) + s[iy1][:, ix1] * wx
        return np.clip((top * (1 - wy) + bottom * wy - 0.1) / 0.5, 0.0, 1.0).astype(np.float32)
