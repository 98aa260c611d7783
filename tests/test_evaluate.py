"""``evaluate``: ``vstain score`` from Python, and the report's uncertainty panel."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_metrics import he_like_tiles
from test_scoring import write_pngs

from vstain_cli.errors import InputError, OutputExistsError
from vstain_cli.provenance import write_json
from vstain_cli.score.pipeline import (
    NO_CALIBRATION,
    EvaluateOptions,
    draw_samples,
    evaluate,
    grid_pick,
    interval_panel,
)
from vstain_cli.uq import intervals as uncertainty
from vstain_cli.uq.intervals import Calibration


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sets")
    real = he_like_tiles(6, size=32, seed=1)
    noisy = np.clip(real + np.random.default_rng(0).normal(0, 10, real.shape), 0, 255).astype(np.uint8)
    names = [f"t{i}" for i in range(6)]
    write_pngs(root / "real", real, names)
    write_pngs(root / "noisy", noisy[::-1], names[::-1])
    np.save(root / "dim.npy", real // 2 + 60)
    return root


@pytest.fixture(scope="module")
def diff_run(tmp_path_factory) -> Path:
    """The tiny dataset and a micro diffusion run trained for 2 steps on it."""
    from conftest import make_tiny_dataset
    from train_helpers import micro

    from vstain_cli.train.loop import train

    root = tmp_path_factory.mktemp("evaluate")
    data = make_tiny_dataset(root / "dataset")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(micro("tiny-diffusion", train={"steps": 2}), data, root / "diff", device="cpu")
    finally:
        torch.set_num_threads(n)
    return root


def _calibrated(root: Path, folder: str, lam: float = 1.32, **meta) -> Path:
    """A copy of the micro run with a hand-written calibration.json."""
    run = root / folder
    if not run.exists():
        shutil.copytree(root / "diff", run)
    cal = Calibration(lam=lam, alpha=0.1, delta=0.1, risk=0.08, ucb=0.095, n=200, samples=4)
    if meta:
        write_json(run / "calibration.json", {**cal.to_dict(), **meta})
    else:
        cal.to_json(run / "calibration.json")
    return run


def test_evaluate_folders_from_python(sets, tmp_path):
    opts = EvaluateOptions(real=str(sets / "real"), fakes=[sets / "noisy", str(sets / "dim.npy")], n_boot=50,
                           grid_rows=2, out_dir=tmp_path / "o")
    res = evaluate(opts)
    assert set(res.paths) == {"score.json", "report.html", "per_image.csv"}
    assert all(p.is_file() for p in res.paths.values())
    assert res.results == json.loads(res.paths["score.json"].read_text())
    m = res.results["models"]
    assert m["noisy"]["paired"] and 5 < m["noisy"]["metrics"]["L1"]["value"] < 12
    assert m["dim"]["metrics"]["L1"]["value"] > 20
    assert res.results["tiles"] == [f"t{i}" for i in range(6)]
    assert res.notes[:2] == ["FID skipped: no --inception-weights file given",
                             "FSD skipped: no --stainnet run given (PFD, grade agreement and the noise check "
                             "need it too)"]
    # folders: the tiles' slides are unknown, so the intervals fall back to tiles, and say so
    assert "intervals are tile-level" in res.notes[2] and len(res.notes) == 3
    assert res.results["settings"]["intervals"] == "tiles" and m["noisy"]["intervals"] == "tiles"
    assert "slides" not in res.results and "tile-level (the tiles&#x27; slides are unknown" in \
        res.paths["report.html"].read_text()
    assert res.results["notes"] == res.notes and "uncertainty" not in res.results
    assert any("by sorted order" in w for w in res.warnings)  # .npy rows have no names
    assert res.per_image["noisy"]["L1"].shape == (6,)
    assert "Uncertainty" not in res.paths["report.html"].read_text()
    with pytest.raises(OutputExistsError, match="--force"):
        evaluate(opts)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "at least one --fake"),
        ({"fakes": ["noisy"], "names": ["a", "b"]}, "2 --name for 1 --fake/--model"),
        ({"fakes": ["noisy"], "out_dir": None}, "output folder"),
        ({"fakes": ["noisy"], "uncertainty_samples": 1}, "uncertainty_samples must be at least 2"),
        ({"models": ["runs/nope"], "data": "real"}, "run folder not found"),
    ],
)
def test_bad_options_raise_before_writing(sets, tmp_path, monkeypatch, kwargs, message):
    monkeypatch.chdir(sets)
    with pytest.raises(InputError, match=message):
        evaluate(EvaluateOptions(**{"real": "real", "out_dir": tmp_path / "o", **kwargs}))
    assert not (tmp_path / "o").exists()


def test_core_imports_neither_typer_nor_rich():
    code = ("import sys, vstain_cli.score.pipeline, vstain_cli.score.report, vstain_cli.score.scoring; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'typer', 'rich'}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_interval_panel_coverage_follows_lambda():
    rng = np.random.default_rng(0)
    samples = rng.normal(0.0, 0.1, (200, 2, 3, 8, 8)).astype(np.float32)
    real = np.clip(np.rint((rng.normal(0.0, 0.1, (2, 3, 8, 8)) + 1) * 127.5), 0, 255).astype(np.uint8)
    cov = {}
    for lam in (0.0, 1.0, 5.0):
        cal = Calibration(lam=lam, alpha=0.1, delta=0.1, risk=0.1, ucb=0.1, n=10)
        cols, rec = interval_panel(samples, real, cal, "B")
        cov[lam] = rec["coverage"]
        assert rec["coverage"] == pytest.approx(np.mean(rec["coverage_per_tile"]))
    assert cov[0.0] < 0.05 and 0.8 < cov[1.0] < 0.97 and cov[5.0] == 1.0  # 5-95 %: ~90 % inside at lambda 1
    assert set(cols) == {"B mean", "B lower", "B upper", "B width"}
    assert cols["B lower"].shape == (2, 3, 8, 8) and cols["B lower"].dtype == np.uint8
    assert cols["B width"].shape == (2, 8, 8)
    assert (cols["B lower"] <= cols["B mean"]).all() and (cols["B mean"] <= cols["B upper"]).all()
    # width at lambda 5: 10 x the 1.645-sigma half-width = 3.29 (> 2), clipped to the displayable range 0-255
    assert 0 < cols["B width"].max() <= 255.0
    assert rec["mean_width_255"] == pytest.approx(cols["B width"].mean())


def test_uncertainty_panel_for_calibrated_diffusion_run(diff_run, tmp_path):
    from vstain_cli.data.store import he_to_unit
    from vstain_cli.infer.run import load_run
    from vstain_cli.score.scoring import load_images

    run_dir = _calibrated(diff_run, "calibrated")
    opts = EvaluateOptions(data=diff_run / "dataset", models=[run_dir], names=["B"], steps=2, seed=3, n_boot=50,
                           grid_rows=4, uncertainty_rows=2, device="cpu", out_dir=tmp_path / "o")
    res = evaluate(opts)
    u = res.results["uncertainty"]["B"]
    # no --uncertainty-samples: the calibration's own count (4)
    assert u["lam"] == 1.32 and u["samples"] == 4 and u["n"] == 2 and u["nominal_coverage"] == pytest.approx(0.9)
    assert u["interval"] == "multiplicative" and u["calibration_mismatch"] is None
    sampling = {"protocol": "fast", "sampler": "ddim", "steps": 2, "eta": 0.0}
    assert u["sampling"] == sampling and res.results["models"]["B"]["sampling"] == sampling
    saved = json.loads(res.paths["score.json"].read_text())
    assert saved["models"]["B"]["sampling"] == sampling and saved["provenance"]["config"]["protocol"] == "fast"
    assert 0.0 <= u["coverage"] <= 1.0 and len(u["coverage_per_tile"]) == 2
    assert u["calibration"].endswith("calibration.json")
    html = res.paths["report.html"].read_text()
    assert "<h2>Uncertainty</h2>" in html and "B width" in html and "B lower" in html and "&lambda; = 1.32" in html
    assert "<th>sampling</th>" in html and "DDIM-2, eta 0" in html and "(multiplicative)" in html
    assert not any("uncertainty panel skipped" in n for n in res.notes)
    # the panel's tiles are the first example tiles, and its coverage is reproducible from the run
    assert u["tiles"] == [res.results["tiles"][i] for i in grid_pick(len(res.results["tiles"]), 4, 3)[:2]]
    real = load_images(diff_run / "dataset", "test")
    rows = [real.names.index(t) for t in u["tiles"]]
    run = load_run(run_dir, "cpu")
    samples = draw_samples(run, real.af(rows), 4, steps=2, seed=3)
    iv = uncertainty.credible_interval(samples, 1.32, form="multiplicative")
    assert u["coverage"] == pytest.approx(uncertainty.coverage(he_to_unit(real.images[rows]), iv.lower, iv.upper))


def test_no_calibration_note_and_bad_calibration(diff_run, tmp_path):
    res = evaluate(EvaluateOptions(data=diff_run / "dataset", models=[diff_run / "diff"], steps=2, n=4, n_boot=50,
                                   grid_rows=2, uncertainty_samples=2, device="cpu", out_dir=tmp_path / "a"))
    assert NO_CALIBRATION == "uncertainty panel skipped: no calibration.json (run `vstain calibrate`)"
    assert NO_CALIBRATION in res.notes and NO_CALIBRATION in res.results["notes"]
    assert "uncertainty" not in res.results and "<h2>Uncertainty</h2>" not in res.paths["report.html"].read_text()
    # made with another sampler and sample count: panel drawn, with a loud warning (score.json and report)
    mismatched = _calibrated(diff_run, "mismatched", sampler="ddpm")
    res = evaluate(EvaluateOptions(data=diff_run / "dataset", models=[mismatched], steps=2, n=4, n_boot=50,
                                   grid_rows=2, uncertainty_samples=2, device="cpu", out_dir=tmp_path / "b"))
    u = res.results["uncertainty"]["mismatched"]
    assert "made differently (sampler ddpm -> ddim, samples 4 -> 2)" in u["calibration_mismatch"]
    assert any("made differently (sampler ddpm -> ddim, samples 4 -> 2)" in w for w in res.warnings)
    assert any("made differently" in w for w in json.loads(res.paths["score.json"].read_text())["warnings"])
    html = res.paths["report.html"].read_text()
    assert "class=warn>mismatched: calibration.json was made differently" in html
    assert "not calibrated for these settings" in html
    # a corrupt calibration.json fails up front, naming the file, before anything is written
    (mismatched / "calibration.json").write_text("{")
    with pytest.raises(InputError, match="corrupt calibration file"):
        evaluate(EvaluateOptions(data=diff_run / "dataset", models=[mismatched], out_dir=tmp_path / "c"))
    assert not (tmp_path / "c" / "score.json").exists()


def test_paper_protocol_samples_ddpm_with_T_steps(diff_run, tmp_path):
    res = evaluate(EvaluateOptions(data=diff_run / "dataset", models=[diff_run / "diff"], names=["B"],
                                   protocol="paper", n=2, n_boot=20, grid_rows=0, device="cpu",
                                   out_dir=tmp_path / "p"))
    rec = {"protocol": "paper", "sampler": "ddpm", "steps": 1000, "eta": 1.0}  # the micro run's T
    assert res.results["models"]["B"]["sampling"] == rec
    assert "DDPM-1000, eta 1 (paper)" in res.paths["report.html"].read_text()
    with pytest.raises(InputError, match="--protocol paper runs the model's T steps; drop --steps 2"):
        evaluate(EvaluateOptions(data=diff_run / "dataset", models=[diff_run / "diff"], protocol="paper", steps=2,
                                 out_dir=tmp_path / "q"))
    assert not (tmp_path / "q").exists()
