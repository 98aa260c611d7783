"""H&E stain augmentation: per-image jitter of hematoxylin, eosin and DAB optical densities.

After Tellez et al. 2018 (*IEEE TMI* 37:2126) and 2019 (*Med Image Anal* 58:101544,
"HED" augmentation): the RGB image is unmixed into stain densities by colour
deconvolution (Ruifrok & Johnston 2001, the matrices of ``skimage.color``),
each density channel c is scaled and shifted, s_c' = a_c s_c + b_c with
a_c ~ U(1 - scale, 1 + scale), b_c ~ U(-shift, shift), and the image is
remixed (Beer-Lambert). A classifier trained this way cannot tell slides apart
by their stain colour and has to use the tissue.

Densities here are log10 optical densities (OD = -log10(I / 255)) in the
stain basis, so ``shift`` is in OD units (tissue H&E densities are ~0.1-1.2).
"""

from __future__ import annotations

import numpy as np
import torch

# Ruifrok & Johnston 2001 stain OD vectors (rows: H, E, DAB), as skimage.color.rgb_from_hed.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
RGB_FROM_HED = RGB_FROM_HED / np.linalg.norm(RGB_FROM_HED, axis=1, keepdims=True)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
_MIN_I = 1.0 / 255.0


def hed_jitter(x: torch.Tensor, scale: float, shift: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Stain-jittered copy of RGB images ``x`` (B, 3, H, W) in [-1, 1]; one (a, b) per image and stain.

    ``scale`` and ``shift`` of 0 return ``x`` unchanged. Draws only from ``generator``.
    """
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected RGB images (B, 3, H, W), got {tuple(x.shape)}")
    if scale < 0 or shift < 0 or scale >= 1:
        raise ValueError("need 0 <= scale < 1 and shift >= 0")
    if scale == 0 and shift == 0:
        return x
    b = x.shape[0]
    dev = generator.device if generator is not None else x.device
    a = 1.0 + scale * (2.0 * torch.rand((b, 3), generator=generator, device=dev) - 1.0)
    c = shift * (2.0 * torch.rand((b, 3), generator=generator, device=dev) - 1.0)
    a, c = a.to(x.device), c.to(x.device)
    xf = x.float()
    od = -torch.log10(((xf + 1.0) * 0.5).clamp_min(_MIN_I))  # (B, 3, H, W)
    to_hed = torch.as_tensor(HED_FROM_RGB, dtype=xf.dtype, device=x.device)
    to_rgb = torch.as_tensor(RGB_FROM_HED, dtype=xf.dtype, device=x.device)
    hed = torch.einsum("bchw,cs->bshw", od, to_hed)
    hed = hed * a[:, :, None, None] + c[:, :, None, None]
    od2 = torch.einsum("bshw,sc->bchw", hed, to_rgb)
    rgb = torch.pow(10.0, -od2).clamp(0.0, 1.0)
    return (rgb * 2.0 - 1.0).to(x.dtype)
