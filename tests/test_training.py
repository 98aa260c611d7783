"""The training loop: every kind, overfitting, exact resume, checkpoints, bad input."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from conftest import make_tiny_dataset
from train_helpers import micro

from vstain_cli.data.loader import PatchDataset
from vstain_cli.data.store import open_dataset
from vstain_cli.errors import InputError, OutputExistsError, VstainError
from vstain_cli.progress import NullProgress
from vstain_cli.seeding import derive_seed
from vstain_cli.train import checkpoint, run_folder
from vstain_cli.train.loop import train
from vstain_cli.train.objectives import DiffusionObjective, build_objective
from vstain_cli.train.precision import Amp, resolve_precision

torch.set_num_threads(1)
CPU = torch.device("cpu")
KINDS = ["tiny-diffusion", "tiny-diffusion-br", "tiny-diffusion-l", "tiny-regression", "tiny-pix2pix", "tiny-stainnet"]


@pytest.mark.parametrize("name", KINDS)
def test_every_kind_trains_and_writes_a_run(tiny_dataset, tmp_path, name):
    p = micro(name, diffusion={"prediction": "eps"}) if name == "tiny-diffusion-l" else micro(name)
    out = tmp_path / "run"
    progress = NullProgress()
    res = train(p, tiny_dataset, out, device="cpu", progress=progress)
    assert res.step == 4 and res.start_step == 0 and res.weights == out / "weights.safetensors"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["preset"]["name"] == p.name and cfg["channels"] == 4 and cfg["kind"] == p.kind
    assert cfg["dataset"]["patches"]["train"] == 24 and "provenance" in cfg
    assert cfg["dataset"]["af_normalization"]["low"] == [900.0] * 4
    recs = run_folder.read_metrics(out)
    train_steps = [r["step"] for r in recs if r["split"] == "train"]
    assert train_steps == [1, 2, 3, 4]
    val = [r for r in recs if r["split"] == "val"]
    assert [r["step"] for r in val] == [2, 4] and all(np.isfinite(r["loss"]) for r in val)
    if p.kind == "stainnet":
        assert len(val[-1]["confusion"]) == 4 and 0 <= val[-1]["accuracy"] <= 1
        assert not (out / "samples").exists()
    else:
        assert sorted(f.name for f in (out / "samples").iterdir()) == ["step-2.png", "step-4.png"]
    tensors, meta = checkpoint.load_weights(out / "weights.safetensors")
    assert meta["kind"] == p.kind and meta["step"] == "4"
    state = torch.load(out / "state.pt", weights_only=True)  # plain tensors and containers only
    assert state["step"] == 4 and state["channels"] == 4
    if p.kind == "pix2pix":
        assert set(state["objective"]["nets"]) == {"net", "d_cond", "d_uncond"}
        assert not any(k.startswith("d_") for k in tensors)  # weights: the generator only
    if p.kind == "diffusion":  # weights are the EMA weights
        ema = state["objective"]["ema"]
        assert all(torch.equal(tensors[k], ema[k]) for k in tensors)
        assert not all(torch.equal(tensors[k], state["objective"]["nets"]["net"][k]) for k in tensors)
    # the tiny dataset's splits lack labels (a StainNet is told so); nothing else is wrong
    assert not [w for w in progress.warnings if "split has no slide with label" not in w]


def _first_batch(dataset):
    """Two 16 px crops of fixed training patches."""
    info = open_dataset(dataset)
    b = PatchDataset(info, "train").batch([(0, 0), (7, 0)])
    return {k: v[..., :16, :16] if v.ndim == 4 else v for k, v in b.items()}


@pytest.mark.parametrize("name", ["tiny-diffusion", "tiny-regression"])
def test_overfits_one_fixed_batch(tiny_dataset, name):
    # Same batch, same noise and timesteps every step: the loss must collapse.
    p = micro(name, train={"lr": 1e-2, "warmup_steps": 0, "grad_clip": 0.0})
    torch.manual_seed(0)
    obj = build_objective(p, 4, CPU, Amp("fp32", CPU))
    batch = _first_batch(tiny_dataset)
    losses = [obj.train_step(batch, torch.Generator().manual_seed(0))["loss"] for _ in range(80)]
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def _state(out):
    return torch.load(out / "state.pt", weights_only=True)


def _assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            if k != "rng":
                _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("name", ["tiny-diffusion-br", "tiny-pix2pix"])
def test_resume_continues_exactly(tiny_dataset, tmp_path, name):
    p = micro(name, model={"dropout": 0.1})
    # DataLoader workers change nothing either (the batch order is drawn from (seed, step)).
    workers = 2 if name == "tiny-pix2pix" else 0
    train(p.with_train(steps=4, workers=workers), tiny_dataset, tmp_path / "straight", device="cpu")
    train(p.with_train(steps=2), tiny_dataset, tmp_path / "split", device="cpu")
    res = train(p.with_train(steps=4), tiny_dataset, tmp_path / "split", device="cpu")
    assert res.start_step == 2 and res.step == 4
    straight, split = _state(tmp_path / "straight"), _state(tmp_path / "split")
    assert straight.pop("elapsed_s") > 0 and split.pop("elapsed_s") > 0  # wall time: the one thing that differs
    _assert_same(straight, split)
    # metrics continue without duplicates
    steps = [r["step"] for r in run_folder.read_metrics(tmp_path / "split") if r["split"] == "train"]
    assert steps == [1, 2, 3, 4]
    again = train(p.with_train(steps=4), tiny_dataset, tmp_path / "split", device="cpu")
    assert again.start_step == again.step == 4  # nothing left to do


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_dataset, tmp_path, monkeypatch):
    p = micro("tiny-diffusion", train={"steps": 6})
    real = DiffusionObjective.train_step
    calls = {"n": 0}

    def flaky(self, batch, gen):
        calls["n"] += 1
        logs = real(self, batch, gen)
        return {**logs, "loss": float("nan")} if calls["n"] == 3 else logs

    monkeypatch.setattr(DiffusionObjective, "train_step", flaky)
    out = tmp_path / "run"
    with pytest.raises(InputError) as e:
        train(p, tiny_dataset, out, device="cpu")
    msg = str(e.value)
    assert "nan" in msg and "step 3" in msg and "checkpoint (step 2) is kept" in msg and str(out) in msg
    assert _state(out)["step"] == 2


def test_run_folder_rules(tiny_dataset, tmp_path):
    p = micro("tiny-regression", train={"steps": 2})
    out = tmp_path / "run"
    train(p, tiny_dataset, out, device="cpu")
    with pytest.raises(InputError, match=r"different config \(preset.train.lr\)"):
        train(p.with_train(lr=0.5), tiny_dataset, out, device="cpu")
    with pytest.raises(OutputExistsError, match="--resume"):
        train(p, tiny_dataset, out, device="cpu", resume=False)
    res = train(p.with_train(lr=0.5), tiny_dataset, out, device="cpu", force=True)
    assert res.start_step == 0 and json.loads((out / "config.json").read_text())["preset"]["train"]["lr"] == 0.5
    assert [r["step"] for r in run_folder.read_metrics(out) if r["split"] == "train"] == [1, 2]
    # a dataset with another channel count cannot resume this run
    other = make_tiny_dataset(tmp_path / "six", channels=6)
    with pytest.raises(InputError, match="trained on 4 AF channels but the dataset has 6"):
        train(p.with_train(lr=0.5, steps=4), other, out, device="cpu")
    # a corrupt config.json is named
    (out / "config.json").write_text("{not json")
    with pytest.raises(InputError, match="config.json"):
        train(p, tiny_dataset, out, device="cpu")


def test_bad_datasets(tmp_path):
    p = micro("tiny-stainnet")
    with pytest.raises(InputError, match="dataset folder not found"):
        train(p, tmp_path / "nope", tmp_path / "run", device="cpu")
    ds = make_tiny_dataset(tmp_path / "ds")
    (ds / "dataset.json").write_text("{")
    with pytest.raises(InputError, match="corrupt dataset.json"):
        train(p, ds, tmp_path / "run", device="cpu")
    ds = make_tiny_dataset(tmp_path / "ds5", slides={"a": (5, "train"), "b": (1, "val")})
    with pytest.raises(InputError, match=r"labels \[5\] outside 0..3"):
        train(p, ds, tmp_path / "run", device="cpu")
    ds = make_tiny_dataset(tmp_path / "noval", slides={"a": (1, "val")})
    with pytest.raises(InputError, match="no patches in the train split"):
        train(p, ds, tmp_path / "run", device="cpu")
    ds = make_tiny_dataset(tmp_path / "trunc")
    np.save(ds / "slides" / "s0" / "af.npy", np.zeros((2, 4, 32, 32), np.uint16))
    with pytest.raises(InputError, match="patch arrays have shapes"):
        train(micro("tiny-regression"), ds, tmp_path / "run2", device="cpu")


def test_state_loading_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "state.pt"
    with open(bad, "wb") as f:
        pickle.dump({"format": checkpoint.STATE_FORMAT, "x": Evil()}, f, protocol=2)
    with pytest.raises(InputError, match="corrupt training state"):
        checkpoint.load_state(bad)
    (tmp_path / "w.safetensors").write_bytes(b"garbage")
    with pytest.raises(InputError, match="corrupt weights"):
        checkpoint.load_weights(tmp_path / "w.safetensors")


def test_precision_and_device_rules():
    assert resolve_precision("auto", CPU) == ("fp32", [])
    prec, warns = resolve_precision("bf16", CPU)
    assert prec == "bf16" and "80x slower" in warns[0]
    with pytest.raises(VstainError, match="fp16"):
        resolve_precision("fp16", CPU)


def test_derive_seed():
    assert derive_seed(0, 1) == derive_seed(0, 1) != derive_seed(0, 2)
    assert 0 <= derive_seed(5, 6, 7) < 2**63


def test_keep_best_val_exports_the_lowest_val_loss(tiny_dataset, tmp_path):
    # lr 0.5 makes the L1 regression jump around: the best validation is rarely the last one
    p = micro("tiny-regression", train={"steps": 8, "val_every": 1, "checkpoint_every": 3, "lr": 0.5,
                                        "warmup_steps": 0, "grad_clip": 0.0, "keep": "best-val"})
    out = tmp_path / "run"
    res = train(p, tiny_dataset, out, device="cpu")
    val = [r for r in run_folder.read_metrics(out) if r["split"] == "val"]
    best = min(val, key=lambda r: (r["loss"], r["step"]))
    assert res.best_step == best["step"] and res.best_val_loss == pytest.approx(best["loss"])
    end = run_folder.end_record(out)
    assert end["best_step"] == best["step"] and end["step"] == 8 and val[-1]["best_step"] == best["step"]
    assert end["elapsed_s"] > 0
    tensors, meta = checkpoint.load_weights(out / "weights.safetensors")
    assert meta["step"] == "8" and meta["best_step"] == str(best["step"]) and meta["keep"] == "best-val"
    # the exported weights are the best step's: a run that stops there has the same inference weights
    stop = train(p.with_train(steps=best["step"]), tiny_dataset, tmp_path / "stop", device="cpu")
    assert stop.best_step == best["step"]
    same, _ = checkpoint.load_weights(tmp_path / "stop" / "weights.safetensors")
    assert all(torch.equal(tensors[k], same[k]) for k in tensors)
    assert best["step"] < 8  # (seeded: the loss diverges after step 4), so the last weights differ from them
    last = _state(out)["objective"]["nets"]["net"]
    assert not all(torch.equal(tensors[k], last[k]) for k in tensors)
    # a resume across the best step keeps it (the best weights live in state.pt too)
    train(p.with_train(steps=4), tiny_dataset, tmp_path / "split", device="cpu")
    again = train(p, tiny_dataset, tmp_path / "split", device="cpu")
    assert again.best_step == best["step"]
    resumed, _ = checkpoint.load_weights(tmp_path / "split" / "weights.safetensors")
    assert all(torch.equal(tensors[k], resumed[k]) for k in tensors)


def test_a_finished_run_keeps_its_config_and_a_resume_is_logged(tiny_dataset, tmp_path, monkeypatch):
    p = micro("tiny-regression", train={"steps": 2})
    out = tmp_path / "run"
    monkeypatch.setattr("sys.argv", ["vstain", "train", "--first"])
    train(p, tiny_dataset, out, device="cpu")
    before = (out / "config.json").read_bytes()
    monkeypatch.setattr("sys.argv", ["vstain", "train", "--second"])
    res = train(p, tiny_dataset, out, device="cpu")
    assert res.start_step == res.step == 2
    assert (out / "config.json").read_bytes() == before  # names the command that trained it
    assert json.loads(before)["provenance"]["command"] == "vstain train --first"
    assert run_folder.resumes(out) == []
    monkeypatch.setattr("sys.argv", ["vstain", "train", "--third"])
    train(p.with_train(steps=4), tiny_dataset, out, device="cpu")
    assert (out / "config.json").read_bytes() == before
    (r,) = run_folder.resumes(out)
    assert r["step"] == 2 and r["steps"] == 4 and r["command"] == "vstain train --third" and r["time"]


def test_a_run_made_before_keep_existed_still_resumes(tiny_dataset, tmp_path):
    p = micro("tiny-regression", train={"steps": 2})
    out = tmp_path / "run"
    train(p, tiny_dataset, out, device="cpu")
    cfg = json.loads((out / "config.json").read_text())
    del cfg["preset"]["train"]["keep"]
    (out / "config.json").write_text(json.dumps(cfg))
    assert train(p.with_train(steps=3), tiny_dataset, out, device="cpu").start_step == 2
    with pytest.raises(InputError, match="preset.train.keep"):
        train(micro("tiny-regression", train={"steps": 4, "keep": "best-val"}), tiny_dataset, out, device="cpu")
