"""Preemption: SIGTERM/SIGINT make `vstain train` checkpoint the current step, and the rerun continues
exactly where it stopped (real subprocesses, real signals)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import micro_dict, write_preset

from vstain_cli.train.run_folder import read_metrics

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "PYTHONPATH": str(REPO)}


def _cmd(preset: Path, data: Path, out: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "vstain_cli", "train", "--preset", str(preset), "--data", str(data),
            "--out", str(out), "--device", "cpu", "--steps", str(steps)]


def _interrupt_after(cmd: list[str], out: Path, step: int, signum: int, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``cmd``, send ``signum`` once metrics.jsonl shows ``step``; return the finished process."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        end = time.time() + 120
        while time.time() < end and proc.poll() is None:
            try:
                if any(r["step"] >= step for r in read_metrics(out)):
                    break
            except ValueError:  # a half-written line
                pass
            time.sleep(0.02)
        assert proc.poll() is None, f"training ended before the signal: {proc.communicate()}"
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _preset(tmp_path: Path) -> Path:
    # checkpoints every 1000 steps: all kept work comes from the signal handler
    return write_preset(tmp_path / "micro.toml", micro_dict(
        "tiny-diffusion", train={"checkpoint_every": 1000, "val_every": 1000, "log_every": 1, "sample_count": 0}))


def test_sigterm_checkpoints_the_current_step_and_the_rerun_resumes_there(tiny_dataset, tmp_path):
    preset, out = _preset(tmp_path), tmp_path / "run"
    r = _interrupt_after(_cmd(preset, tiny_dataset, out, 10_000), out, random.randint(2, 8), signal.SIGTERM, tmp_path)
    assert r.returncode == 128 + signal.SIGTERM, (r.returncode, r.stderr)
    k = torch.load(out / "state.pt", weights_only=True)["step"]
    assert 2 <= k < 1000 and f"stopped at step {k} of 10000" in r.stderr
    kept = {p.name for p in out.iterdir()}  # atomic writes: no temporary files left
    assert kept <= {"config.json", "metrics.jsonl", "state.pt", "weights.safetensors", "samples"}, kept
    r = subprocess.run(_cmd(preset, tiny_dataset, out, k + 1), cwd=tmp_path, env=_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"resumed at step {k}" in r.stderr and f"trained to step {k + 1}" in r.stdout, r.stdout
    assert [m["step"] for m in read_metrics(out) if m["split"] == "train"] == list(range(1, k + 2))


@pytest.mark.slow
def test_sigterm_then_sigint_then_rerun_matches_an_uninterrupted_run(tiny_dataset, tmp_path):
    preset = _preset(tmp_path)
    out, ref = tmp_path / "run", tmp_path / "ref"
    rng = random.Random()
    first = rng.randint(2, 6)

    r = _interrupt_after(_cmd(preset, tiny_dataset, out, 10_000), out, first, signal.SIGTERM, tmp_path)
    assert r.returncode == 128 + signal.SIGTERM, (r.returncode, r.stderr)
    k1 = torch.load(out / "state.pt", weights_only=True)["step"]
    assert first <= k1 < 1000
    assert f"stopped at step {k1} of 10000" in r.stderr and "SIGTERM" in r.stderr, r.stderr
    # messages and the stop line on stderr (stdout holds results only, and an interrupted run has none)
    assert "no checkpoint" in r.stderr and "starting at step 0" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and r.stdout.strip() == "", (r.stdout, r.stderr)

    r = _interrupt_after(_cmd(preset, tiny_dataset, out, 10_000), out, k1 + 2, signal.SIGINT, tmp_path)
    assert r.returncode == 128 + signal.SIGINT, (r.returncode, r.stderr)
    assert f"resumed at step {k1}" in r.stderr, r.stderr
    k2 = torch.load(out / "state.pt", weights_only=True)["step"]
    assert k2 >= k1 + 2 and f"stopped at step {k2}" in r.stderr

    total = k2 + 2
    r = subprocess.run(_cmd(preset, tiny_dataset, out, total), cwd=tmp_path, env=_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"resumed at step {k2}" in r.stdout and f"trained to step {total}" in r.stdout, r.stdout
    steps = [m["step"] for m in read_metrics(out) if m["split"] == "train"]
    assert steps == list(range(1, total + 1))  # nothing lost, nothing twice

    r = subprocess.run(_cmd(preset, tiny_dataset, ref, total), cwd=tmp_path, env=_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got, want = load_file(out / "weights.safetensors"), load_file(ref / "weights.safetensors")
    assert got.keys() == want.keys()
    worst = max(float((got[k].float() - want[k].float()).abs().max()) for k in want)
    assert worst == 0.0, f"interrupted run differs from the uninterrupted one by {worst}"
