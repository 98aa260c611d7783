"""Seamless whole-slide inference on a region canvas.

Four pieces, each usable on its own:

* windows: ``window_grid`` and ``feather_weights`` cut a canvas into overlapping
  model-sized windows and weight them;
* ``CanvasDenoiser`` turns a window network ``net(x_t, t, cond)`` into a model of
  the same signature for a canvas of any size, fusing the overlapping window
  predictions at every sampler step (MultiDiffusion, Bar-Tal et al. 2023, eq. 3-5),
  so one shared noise canvas is denoised jointly; ``blend_predictions`` does the
  same once for deterministic models (regression, pix2pix);
* regions: ``region_plan`` splits a slide into streaming regions (sampled with a
  margin of context) and ``RegionBlender`` (``blend_regions`` for a stream of regions) feather-blends them into finished strips
  of rows, in order, with memory bounded by about two region rows x slide width;
  ``noise_canvas`` gives every slide pixel its own counter-based Gaussian noise, so
  overlapping margins of neighbouring regions start from the same x_T;
* ``seam_ratio`` measures what is left of the seams.

See docs/stitching.md for the formulas and the choices made.
"""

from vstain_cli.infer.stitch.noise import noise_canvas, region_generator
from vstain_cli.infer.stitch.regions import Region, RegionBlender, blend_regions, region_plan
from vstain_cli.infer.stitch.seams import seam_ratio, seam_ratio_axes, seam_steps
from vstain_cli.infer.stitch.windows import (
    CanvasDenoiser,
    blend_predictions,
    constant_fill,
    feather_weights,
    window_grid,
)

__all__ = [
    "CanvasDenoiser", "Region", "RegionBlender", "blend_predictions", "blend_regions", "constant_fill", "feather_weights",
    "noise_canvas", "region_generator", "region_plan", "seam_ratio", "seam_ratio_axes", "seam_steps",
    "window_grid",
]
