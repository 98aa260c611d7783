"""Tissue masks and the patch grid."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SHARED_SVS

from vstain_cli.io.grid import patch_grid, tissue_mask_af, tissue_mask_he
from vstain_cli.io.slides import open_he


def test_real_he_slide_mask_finds_tissue_and_excludes_glass():
    with open_he(SHARED_SVS) as slide:
        thumb, ds = slide.thumbnail(512)
    mask = tissue_mask_he(thumb)
    # the section covers about a third of this region; glass on the left and right
    assert 0.2 < mask.mean() < 0.5
    left_glass = mask[:, : mask.shape[1] // 8]
    assert left_glass.mean() < 0.05
    # glass is bright and unsaturated, tissue is where the mask is
    glass_px = thumb[~mask].astype(float)
    tissue_px = thumb[mask].astype(float)
    assert glass_px.mean() > tissue_px.mean() + 20
    patches = patch_grid(mask, ds, slide.width, slide.height, 128, 128, 0.5)
    assert 80 < len(patches) < 250


def test_blank_glass_has_no_tissue():
    rng = np.random.default_rng(0)
    glass = np.clip(240 + rng.normal(0, 3, (200, 200, 3)), 0, 255).astype(np.uint8)
    assert tissue_mask_he(glass).sum() == 0


def test_he_mask_on_a_drawn_section():
    img = np.full((200, 300, 3), 242, np.uint8)
    yy, xx = np.mgrid[0:200, 0:300]
    section = (yy - 100) ** 2 / 70**2 + (xx - 150) ** 2 / 110**2 < 1
    img[section] = (200, 90, 170)
    mask = tissue_mask_he(img)
    assert (mask == section).mean() > 0.98


def test_af_mask_intensity_above_background():
    rng = np.random.default_rng(0)
    af = rng.normal(200, 10, (120, 160, 6)).clip(0)
    af[30:90, 40:120] += 1500
    mask = tissue_mask_af(af.astype(np.uint16))
    assert mask[35:85, 45:115].all() and not mask[:20].any()


@pytest.mark.parametrize("downsample", [4.0, 8.0, 16.0])
def test_patch_grid_fraction_is_exact_for_block_masks(downsample):
    w = h = 1024
    mask = np.zeros((int(h / downsample), int(w / downsample)), bool)
    mask[: mask.shape[0] // 2] = True  # top half is tissue
    patches = patch_grid(mask, downsample, w, h, 128, 64, 0.5)
    ys = sorted({p.y for p in patches})
    assert ys[-1] == 512 - 64  # the patch straddling the border at half tissue is kept
    fr = {p.y: p.tissue_fraction for p in patches}
    assert fr[0] == pytest.approx(1.0) and fr[448] == pytest.approx(0.5)
    assert len({p.x for p in patches}) == (1024 - 128) // 64 + 1


def test_patch_grid_empty_and_small():
    assert patch_grid(np.zeros((8, 8), bool), 16, 128, 128, 128, 128, 0.5) == []
    assert patch_grid(np.ones((8, 8), bool), 16, 100, 100, 128, 128, 0.5) == []


def test_af_mask_without_contrast_is_all_tissue_or_all_glass():
    rng = np.random.default_rng(1)
    tissue = rng.normal(3000, 50, (64, 64, 4)).astype(np.uint16)
    glass = rng.normal(180, 14, (64, 64, 4)).astype(np.uint16)
    assert tissue_mask_af(tissue).all()
    assert not tissue_mask_af(glass).any()
