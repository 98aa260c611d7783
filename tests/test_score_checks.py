"""``vstain score``'s checks of what it reports: a StainNet at chance, --n beyond the set, defaults as values."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_dataset
from train_helpers import micro

from vstain_cli.progress import NullProgress
from vstain_cli.score.pipeline import EvaluateOptions, evaluate, stainnet_check
from vstain_cli.train.loop import train
from vstain_cli.uq.intervals import Calibration

# the train split holds labels 0 and 1 only, val and test 2 and 3: the StainNet cannot be right there
SPLIT_LABELS = {"s0": (0, "train"), "s1": (1, "train"), "s4": (2, "val"), "s5": (3, "val"),
                "s6": (2, "test"), "s7": (3, "test")}


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checks")
    data = make_tiny_dataset(root / "dataset", slides=SPLIT_LABELS)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    p = NullProgress()
    try:
        train(micro("tiny-stainnet", train={"steps": 10, "lr": 1e-2, "val_every": 10, "checkpoint_every": 10}),
              data, root / "stainnet", device="cpu", progress=p)
    finally:
        torch.set_num_threads(n)
    assert any("at or below chance" in w for w in p.warnings)  # train says so too
    from vstain_cli.score.scoring import load_images

    np.save(root / "test.npy", load_images(data, "test").images)  # the same tiles without slide labels
    return {"root": root, "data": data, "stainnet": root / "stainnet", "npy": root / "test.npy"}


def _score(env, out: Path, stainnet: Path, **kw):
    opts = dict(real=env["data"], fakes=[env["data"]], names=["same"], stainnet=stainnet, n_boot=20, fd_boot=10,
                grid_rows=0, device="cpu", out_dir=out)
    return evaluate(EvaluateOptions(**{**opts, **kw}))


def test_stainnet_at_chance_is_flagged_and_n_beyond_the_set_is_said(env, tmp_path):
    val = [r for r in map(json.loads, (env["stainnet"] / "metrics.jsonl").read_text().splitlines())
           if r["split"] == "val"]
    acc = val[-1]["accuracy"]
    assert acc <= 0.25
    rec = stainnet_check(env["stainnet"])
    assert rec["val_accuracy"] == acc and rec["chance"] == 0.25 and rec["at_chance"] is True
    assert rec["val_step"] == 10 and rec["n_classes"] == 4

    res = _score(env, tmp_path / "o", env["stainnet"], n=1000)
    saved = json.loads(res.paths["score.json"].read_text())
    assert saved["stainnet"]["at_chance"] is True and saved["stainnet"]["val_accuracy"] == acc
    assert saved["stainnet"]["chance"] == 0.25
    assert "FSD" in saved["models"]["same"]["metrics"]
    # the paper's task on the scored real test tiles: accuracy and a 4x4 confusion matrix (rows: true label)
    test = saved["stainnet"]["test"]
    conf = test["confusion"]
    assert test["split"] == "test" and len(conf) == 4 and sum(map(sum, conf)) == test["patches"] == 12
    assert sum(conf[0]) == sum(conf[1]) == 0 and sum(conf[2]) == sum(conf[3]) == 6  # test slides hold labels 2, 3
    assert test["accuracy"] == (conf[2][2] + conf[3][3]) / 12 <= 0.25  # never trained on them
    chance = [w for w in saved["warnings"] if "at or below chance" in w]
    assert len(chance) == 1 and "StainNet stainnet: accuracy" in chance[0] and "FSD means little" in chance[0]
    assert "scored real test tiles" in chance[0]
    assert chance[0] in res.warnings
    html = res.paths["report.html"].read_text()
    assert "<div class=warn>StainNet stainnet: accuracy" in html
    assert "StainNet on the real test tiles" in html
    # --n beyond the set: how many were used, as a warning (and in score.json)
    n_warn = "--n 1000 is more than the 12 real tiles: scoring all 12"
    assert n_warn in res.warnings and n_warn in saved["warnings"] and saved["n_real"] == 12


def test_stainnet_above_chance_or_unchecked(env, tmp_path):
    good = tmp_path / "good"
    shutil.copytree(env["stainnet"], good)
    lines = (good / "metrics.jsonl").read_text().splitlines()
    recs = [json.loads(ln) for ln in lines]
    for r in recs:
        if r["split"] == "val":
            r["accuracy"] = 0.9
    (good / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    # tiles without slide labels (a .npy): the run's validation accuracy decides
    res = _score(env, tmp_path / "o", good, real=env["npy"], fakes=[env["npy"]])
    assert "test" not in res.results["stainnet"]
    assert res.results["stainnet"]["at_chance"] is False and res.results["stainnet"]["val_accuracy"] == 0.9
    assert not any("chance" in w for w in res.results["warnings"])
    html = res.paths["report.html"].read_text()
    assert "class=warn>StainNet" not in html and "validation accuracy 0.900 (chance 0.250)" in html

    (good / "metrics.jsonl").unlink()  # nothing logged: unknown, said as a note
    res = _score(env, tmp_path / "o2", good, real=env["npy"], fakes=[env["npy"]])
    assert res.results["stainnet"]["at_chance"] is None and res.results["stainnet"]["val_accuracy"] is None
    assert any("no validation accuracy" in n for n in res.notes)


def test_mismatch_prints_default_steps_as_their_value(env, tmp_path):
    """A calibration made with DDIM-5, scored without --steps: "steps 5 -> 50", never "-> None"."""
    from test_score_cli import make_run

    run = make_run(tmp_path / "diff", "tiny-diffusion", env["data"])
    cal = Calibration(lam=1.3, alpha=0.1, delta=0.1, risk=0.08, ucb=0.095, n=50, samples=2)
    (run / "calibration.json").write_text(json.dumps({**cal.to_dict(), "sampler": "ddim", "steps_effective": 5,
                                                       "eta": 0.0, "model_step": 0}))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = evaluate(EvaluateOptions(data=env["data"], models=[run], names=["B"], n=2, n_boot=20, grid_rows=1,
                                       uncertainty_rows=1, uncertainty_samples=2, device="cpu",
                                       out_dir=tmp_path / "o"))
    finally:
        torch.set_num_threads(n)
    u = res.results["uncertainty"]["B"]
    assert u["sampling"]["steps"] == 50 and res.results["models"]["B"]["sampling"]["steps"] == 50
    assert "made differently (steps 5 -> 50)" in u["calibration_mismatch"]
    assert not any("None" in w for w in res.warnings)
