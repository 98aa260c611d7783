"""``vstain score`` as a real subprocess on tiny PNG folders."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_metrics import he_like_tiles
from test_scoring import write_pngs

REPO = Path(__file__).resolve().parents[1]


def vstain(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    # one thread: robust timing when the CI cores are shared (see test_inception.py)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "vstain_cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("score")
    real = he_like_tiles(8, size=32, seed=1)
    rng = np.random.default_rng(0)
    noisy = np.clip(real + rng.normal(0, 10, real.shape), 0, 255).astype(np.uint8)
    names = [f"s6_{i:06d}" for i in range(8)]
    write_pngs(root / "real", real, names)
    write_pngs(root / "noisy", noisy[::-1], names[::-1])  # written in another order: pairs by name
    write_pngs(root / "small", he_like_tiles(8, size=16), names)
    np.save(root / "blur.npy", real.transpose(0, 2, 3, 1) // 2 + 60)
    return root


def test_score_folders_writes_json_report_and_table(sets, tmp_path):
    r = vstain("score", "--real", str(sets / "real"), "--fake", str(sets / "noisy"), "--fake", str(sets / "blur.npy"),
               "--name", "noisy", "--name", "dim", "--boot", "200", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "noisy" in r.stdout and "L2" in r.stdout and "SSIM" in r.stdout  # the rich table
    res = json.loads((tmp_path / "out" / "score.json").read_text())
    m = res["models"]["noisy"]["metrics"]
    assert res["n_real"] == 8 and res["models"]["noisy"]["paired"]
    assert 5 < m["L1"]["value"] < m["L2"]["value"] < 12
    assert m["L1"]["lo"] <= m["L1"]["value"] <= m["L1"]["hi"]
    assert res["models"]["dim"]["metrics"]["L1"]["value"] > 20
    assert "FSD skipped" in " ".join(res["notes"]) and res["provenance"]["config"]["n_boot"] == 200
    html = (tmp_path / "out" / "report.html").read_text()
    assert re.search(r'<img src="data:image/png;base64,[A-Za-z0-9+/]+=*"', html)
    assert "by sorted order" in r.stderr  # .npy rows have no tile names
    csv = (tmp_path / "out" / "per_image.csv").read_text().splitlines()
    assert csv[0] == "model,tile,L1,L2,PSNR,SSIM" and len(csv) == 1 + 16
    # outputs exist: refused without --force, one line, exit 2
    again = vstain("score", "--real", str(sets / "real"), "--fake", str(sets / "noisy"), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert again.returncode == 2 and "--force" in again.stderr and "Traceback" not in again.stderr


def test_score_with_inception_weights(sets, tmp_path):
    import torch

    from vstain_cli.nets.inception import FIDInceptionV3

    torch.manual_seed(0)
    weights = tmp_path / "fid.pth"
    torch.save(FIDInceptionV3().state_dict(), weights)
    r = vstain("score", "--real", str(sets / "real"), "--fake", str(sets / "noisy"), "--n", "3", "--fd-boot", "10",
               "--inception-weights", str(weights), "--out", str(tmp_path / "o"), "--grid-rows", "3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "o" / "score.json").read_text())
    fid = res["models"]["noisy"]["metrics"]["FID"]
    assert fid["value"] > 0 and fid["lo"] <= fid["hi"] and res["n_real"] == 3
    # 3 tiles for 2048-d features: warned, saying how many are needed
    assert "2049" in r.stderr and any("2049" in w for w in res["warnings"])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--fake", "small"], "16x16 but real tiles are 32x32"),
        (["--fake", "noisy", "--stainnet", "runs/nope"], "StainNet run folder not found"),
        (["--fake", "noisy", "--inception-weights", "bad.pth"], "has shape"),
        (["--fake", "noisy", "--inception-weights", "missing.pth"], "not found"),
        (["--fake", "nowhere"], "nowhere: image set not found"),
        ([], "at least one --fake"),
    ],
)
def test_bad_input_one_line_exit_2(sets, extra, message):
    import torch

    if not (sets / "bad.pth").exists():
        torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1)}, sets / "bad.pth")
        sd = {k: v for k, v in __import__("vstain_cli.nets.inception", fromlist=["x"]).FIDInceptionV3().state_dict().items()}
        sd["Conv2d_1a_3x3.conv.weight"] = torch.zeros(32, 3, 5, 5)
        torch.save(sd, sets / "bad.pth")
    r = vstain("score", "--real", "real", *extra, "--out", "o", cwd=sets)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) <= 3


def make_run(folder: Path, preset_name: str, data: Path) -> Path:
    """A run folder as ``vstain train`` writes it, with random-init weights (no training)."""
    import torch
    from train_helpers import micro

    from vstain_cli.data.store import open_dataset
    from vstain_cli.train import checkpoint, run_folder
    from vstain_cli.train.networks import build_network

    preset, info = micro(preset_name), open_dataset(data)
    torch.manual_seed(0)
    net = build_network(preset, info.channels)
    folder.mkdir(parents=True)
    run_folder.write_config(folder, run_folder.run_config(preset, info, world_size=1, device="cpu", precision="fp32"))
    checkpoint.save_weights(folder / checkpoint.WEIGHTS, net.state_dict(), {"kind": preset.kind, "step": 0})
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny dataset with micro StainNet and diffusion run folders."""
    from conftest import make_tiny_dataset

    root = tmp_path_factory.mktemp("runs")
    data = make_tiny_dataset(root / "dataset")
    make_run(root / "stainnet", "tiny-stainnet", data)
    make_run(root / "diff", "tiny-diffusion", data)
    return root


def test_score_model_runs_with_stainnet(trained, tmp_path):
    from vstain_cli.score import scoring

    r = vstain("score", "--data", str(trained / "dataset"), "--model", str(trained / "diff"), "--name", "B",
               "--stainnet", str(trained / "stainnet"), "--steps", "2", "--seed", "3", "--n", "6", "--boot", "100",
               "--fd-boot", "10", "--grid-rows", "2", "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "o" / "score.json").read_text())
    m = res["models"]["B"]
    assert m["paired"] and m["n"] == 6 and {"FSD", "L1", "L2", "PSNR", "SSIM"} <= set(m["metrics"])
    pick = scoring.select_tiles(12, 6, seed=3)
    assert res["tiles"] == [f"s{6 + i // 6}_{i % 6:06d}" for i in pick]
    html = (tmp_path / "o" / "report.html").read_text()
    assert "AF (false colour)" in html
    assert m["sampling"] == {"protocol": "fast", "sampler": "ddim", "steps": 2, "eta": 0.0}
    assert "B: sampled with DDIM-2, eta 0" in r.stderr and "DDIM-2, eta 0" in html
    # the saved samples are the model's output for those tiles with that seed, bit for bit
    saved = np.load(tmp_path / "o" / "samples-B.npy")
    import torch

    real = scoring.load_images(trained / "dataset", "test").take(pick)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        again = scoring.sample_run_tiles(trained / "diff", real, "cpu", steps=2, seed=3, batch_size=64)
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(saved, again)
    # a StainNet given as a model to score is refused in one line
    bad = vstain("score", "--data", str(trained / "dataset"), "--model", str(trained / "stainnet"),
                 "--out", str(tmp_path / "o2"), cwd=tmp_path)
    assert bad.returncode == 2 and "--stainnet" in bad.stderr and "Traceback" not in bad.stderr
