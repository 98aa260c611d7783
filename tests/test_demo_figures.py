"""bench/demo_figures.py replaces exactly its block in docs/benchmarks.md."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("demo_figures", REPO / "bench" / "demo_figures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_block_is_replaced_between_the_markers(tmp_path):
    m = _module()
    assert m.START in m.DOC.read_text() and m.END in m.DOC.read_text()
    doc = tmp_path / "b.md"
    doc.write_text(f"# head\n{m.START}\nold 5 min\n{m.END}\ntail\n")
    m.write_block("new 7 min", doc)
    assert doc.read_text() == f"# head\n{m.START}\nnew 7 min\n{m.END}\ntail\n"
    doc.write_text("no markers\n")
    with pytest.raises(SystemExit):
        m.write_block("x", doc)


def test_figures_table_from_a_demo_result(tmp_path):
    from vstain_cli.demo import DemoResult

    m = _module()
    metric = {"value": 17.25, "lo": 16.5, "hi": 18.0}
    res = DemoResult(tmp_path, seconds={"synth": 12.4, "train diffusion": 100.0},
                     score={"models": {"regression": {"metrics": {"L1": metric}}}},
                     calibration={"lam": 3.291, "alpha": 0.1, "delta": 0.1, "test_coverage": {"coverage": 0.96}})
    text = m.figures(res, wall=346.0, cpu=660.0)
    assert "**5 min 46 s** wall, 11 min of CPU" in text
    # columns: FSD, PFD, L1, L2, PSNR, SSIM, grade accuracy, slides right
    assert "| synth | 12 |" in text and "| regression | - | - | 17.2 [16.5, 18.0] | - | - | - | – | – |" in text
    assert "lambda 3.29" in text and "coverage 0.960" in text


def test_figures_show_grade_agreement_and_the_cheap_runs(tmp_path):
    from vstain_cli.demo import DemoResult

    m = _module()
    iv = {"value": 0.5, "lo": 0.4, "hi": 0.6}
    grade = {"tile_accuracy": iv, "real_tile_accuracy": {"value": 0.625}, "slides_correct": 7,
             "real_slides_correct": 9, "slides": 12}
    res = DemoResult(tmp_path, seconds={}, bundled=True, fresh_phantom=True,
                     score={"settings": {"n_slides": 12},
                            "models": {"diffusion": {"metrics": {"PFD": iv}, "grade": grade}}},
                     comparison=["diffusion-4step vs diffusion: FSD x1.14"])
    text = m.figures(res, wall=60.0, cpu=None)
    assert "another seed" in text and "resample the 12 test slides" in text
    assert "| diffusion | - | 0.50 [0.40, 0.60] | - | - | - | - | 0.500 [0.400, 0.600] (0.625) | 7/12 (9/12) |" in text
    assert "- diffusion-4step vs diffusion: FSD x1.14" in text
