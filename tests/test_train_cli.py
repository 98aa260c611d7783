"""``vstain train``: CLI errors, kill -9 + resume, and a 2-process gloo DDP run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_helpers import micro_dict, write_preset
from typer.testing import CliRunner

from vstain_cli.cli.main import app
from vstain_cli.train.run_folder import read_metrics

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "PYTHONPATH": str(REPO)}


def _vstain(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vstain_cli", *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=120)


def _one_error_line(result, needle: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.output


def test_cli_errors_are_one_line(tiny_dataset, tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["train", "--preset", "nope", "--data", str(tiny_dataset), "--out", str(tmp_path / "r")])
    _one_error_line(r, "diffusion-b, diffusion-br")
    r = runner.invoke(app, ["train", "--preset", "tiny-regression", "--data", str(tmp_path / "missing")])
    _one_error_line(r, "dataset folder not found")
    r = runner.invoke(app, ["train", "--preset", "tiny-regression", "--data", str(tiny_dataset),
                            "--precision", "fp8", "--out", str(tmp_path / "r")])
    _one_error_line(r, "precision")
    r = runner.invoke(app, ["train", "--preset", "tiny-regression", "--data", str(tiny_dataset),
                            "--device", "tpu", "--out", str(tmp_path / "r")])
    _one_error_line(r, "unknown device")
    if not torch.cuda.is_available():
        r = runner.invoke(app, ["train", "--preset", "tiny-regression", "--data", str(tiny_dataset),
                                "--device", "cuda", "--out", str(tmp_path / "r")])
        _one_error_line(r, "no CUDA GPU")


def test_cli_trains_and_refuses_a_different_config(tiny_dataset, tmp_path):
    preset = write_preset(tmp_path / "micro.toml", micro_dict("tiny-regression"))
    runner = CliRunner()
    args = ["train", "--preset", str(preset), "--data", str(tiny_dataset), "--out", str(tmp_path / "run"),
            "--steps", "2", "--device", "cpu", "--seed", "3"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "trained to step 2" in r.output and "weights" in r.output
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["preset"]["train"]["seed"] == 3 and cfg["runtime"]["precision"] == "fp32"
    r = runner.invoke(app, [*args, "--lr", "0.1"])
    _one_error_line(r, "different config (preset.train.lr)")
    r = runner.invoke(app, [*args, "--no-resume"])
    _one_error_line(r, "--force to start over")
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and "already trained to step 2" in r.output


def test_cli_names_the_exported_best_step(tiny_dataset, tmp_path):
    preset = write_preset(tmp_path / "micro.toml", micro_dict(
        "tiny-regression", train={"keep": "best-val", "val_every": 1, "steps": 3}))
    args = ["train", "--preset", str(preset), "--data", str(tiny_dataset), "--out", str(tmp_path / "run"),
            "--device", "cpu"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    best = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert best["split"] == "end" and f"exported the weights of step {best['best_step']}" in r.output
    config = (tmp_path / "run" / "config.json").read_bytes()
    r = CliRunner().invoke(app, args)
    assert "already trained to step 3" in r.output and f"step {best['best_step']}" in r.output
    assert (tmp_path / "run" / "config.json").read_bytes() == config


def _wait_for(pred, timeout: float, proc: subprocess.Popen) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.communicate()}")
        time.sleep(0.05)
    raise AssertionError("timed out")


@pytest.mark.slow
def test_kill_9_then_resume_continues_from_checkpoint(tiny_dataset, tmp_path):
    preset = write_preset(tmp_path / "micro.toml", micro_dict(
        "tiny-diffusion", train={"checkpoint_every": 3, "val_every": 1000, "log_every": 1, "sample_count": 0}))
    out = tmp_path / "run"
    args = ["train", "--preset", str(preset), "--data", str(tiny_dataset), "--out", str(out), "--device", "cpu"]
    proc = subprocess.Popen([sys.executable, "-m", "vstain_cli", *args, "--steps", "100000"], cwd=tmp_path,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # Kill mid-way between checkpoints: after the metrics pass the second checkpoint.
        def past_second_checkpoint() -> bool:
            try:
                return any(r["step"] >= 7 for r in read_metrics(out))
            except ValueError:
                return False

        _wait_for(past_second_checkpoint, 90, proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    state = torch.load(out / "state.pt", weights_only=True)
    k = state["step"]
    assert k >= 6 and k % 3 == 0
    assert max(r["step"] for r in read_metrics(out)) >= k
    r = _vstain(*args, "--steps", str(k + 2), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"resumed at step {k}" in r.stderr and f"trained to step {k + 2}" in r.stdout
    steps = [m["step"] for m in read_metrics(out) if m["split"] == "train"]
    assert steps == list(range(1, k + 3))  # lost lines dropped, no duplicates
    assert torch.load(out / "state.pt", weights_only=True)["step"] == k + 2


@pytest.mark.slow
def test_torchrun_two_process_gloo(tiny_dataset, tmp_path):
    preset = write_preset(tmp_path / "micro.toml", micro_dict("tiny-diffusion"))
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "vstain_cli", "train", "--preset", str(preset), "--data", str(tiny_dataset),
           "--out", str(out), "--device", "cpu", "--steps", "2"]
    r = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("trained to step 2") == 1  # only rank 0 reports
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["runtime"]["world_size"] == 2
    recs = read_metrics(out)
    assert [m["step"] for m in recs if m["split"] == "train"] == [1, 2]  # only rank 0 writes
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["world_size"] == 2 and state["step"] == 2
    assert (out / "samples" / "step-2.png").exists()
