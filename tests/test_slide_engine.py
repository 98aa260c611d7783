"""The whole-slide engine as a new user meets it (real subprocesses, real files):
one Ctrl-C stops `vstain uncertainty` at once leaving nothing behind, a non-image
suffix is refused, stdout stays clean while the plan and the "wrote" line go to
stderr, and a run's calibration sets the default sampling."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, assert_one_error_line, make_tiny_dataset, run_cli
from test_uncertainty_maps import write_af
from train_helpers import micro

from vstain_cli.infer.stain import StainOptions, stain_slide
from vstain_cli.progress import NullProgress
from vstain_cli.train.loop import train
from vstain_cli.train.run_folder import CALIBRATION_FILE


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    ds = make_tiny_dataset(root / "ds")
    train(micro("tiny-diffusion", model={"attention_levels": []}, train={"steps": 1}), ds, root / "diff", device="cpu")
    return {"root": root, "diff": root / "diff", "af": write_af(root / "af.tif", h=256, w=320)}


def test_one_ctrl_c_stops_uncertainty_within_seconds_leaving_nothing(env, tmp_path):
    af = shutil.copy(env["af"], tmp_path / "af.tif")
    err = tmp_path / "stderr.txt"
    cmd = [sys.executable, "-m", "vstain_cli", "uncertainty", str(af), "-m", str(env["diff"]), "-o", "maps",
           "--samples", "40", "--steps", "50", "--region", "64", "--device", "cpu"]
    env_vars = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    with open(err, "w") as f:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env_vars, stdout=subprocess.PIPE, stderr=f, text=True)
    try:
        end = time.time() + 120
        while time.time() < end and proc.poll() is None and "plan:" not in err.read_text():
            time.sleep(0.05)
        assert proc.poll() is None, f"ended before the signal: {err.read_text()}"
        time.sleep(1.0)  # inside the region loop (sampling, writer threads started)
        proc.send_signal(signal.SIGINT)
        t0 = time.time()
        try:
            stdout, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running 20 s after one Ctrl-C; stderr:\n{err.read_text()}")
        stopped = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, (proc.returncode, err.read_text())
    assert stopped < 10, stopped
    assert stdout == ""
    assert "interrupted" in err.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["af.tif", "stderr.txt"]  # no maps, no temp folder


def test_an_output_that_is_not_a_tiff_or_zarr_is_refused(env, tmp_path):
    r = run_cli("stain", str(env["af"]), "-m", str(env["diff"]), "-o", "y.png", "--device", "cpu", cwd=tmp_path)
    assert_one_error_line(r, "y.png", "neither a TIFF")
    assert not any(tmp_path.iterdir())


def test_stain_prints_the_plan_and_the_real_thumbnail_on_stderr_and_nothing_on_stdout(env, tmp_path):
    r = run_cli("stain", str(env["af"]), "-m", str(env["diff"]), "-o", "out.tiff", "--steps", "2", "--region",
                "128", "--device", "cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    plan = next(ln for ln in r.stderr.splitlines() if "plan:" in ln)
    assert "320x256 px" in plan and "regions" in plan and "windows" in plan and "ETA" in plan, plan
    assert r.stderr.index("plan:") < r.stderr.index("wrote")
    assert str(tmp_path / "out.thumbnail.png") in " ".join(r.stderr.split()) or "out.thumbnail.png" in r.stderr
    assert (tmp_path / "out.thumbnail.png").is_file() and (tmp_path / "out.tiff").is_file()


def test_the_run_calibration_sets_the_default_sampling(env, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(env["diff"], run)
    opts = dict(region=128, device="cpu")
    plain = stain_slide(env["af"], run, tmp_path / "a.tif", StainOptions(steps=2, **opts))
    assert (plain.sampling["sampler"], plain.sampling["steps"]) == ("ddim", 2)
    (run / CALIBRATION_FILE).write_text(json.dumps({"sampler": "dpmpp-2m", "steps_effective": 3, "eta": 0.0}))
    p = NullProgress()
    cal = stain_slide(env["af"], run, tmp_path / "b.tif", StainOptions(**opts), progress=p)
    assert (cal.sampling["sampler"], cal.sampling["steps"]) == ("dpmpp-2m", 3)
    assert any("from the run calibration" in m for m in p.infos), p.infos
    flags = stain_slide(env["af"], run, tmp_path / "c.tif", StainOptions(sampler="ddim", steps=2, **opts))
    assert (flags.sampling["sampler"], flags.sampling["steps"]) == ("ddim", 2)  # the flags win
    r = run_cli("stain", "--help")
    assert "calibration.json" in " ".join(r.stdout.split())


def test_a_stuck_clean_up_after_ctrl_c_still_ends_the_process(tmp_path):
    """The watchdog: if the clean-up after a signal hangs, the process exits anyway and says where it was."""
    code = ("import os, signal, time\n"
            "import vstain_cli.cli.common as c\n"
            "c.CLEANUP_GRACE_S = 0.5\n"
            "c._signals_as_interrupt()\n"
            "try:\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    time.sleep(5)\n"
            "except KeyboardInterrupt:\n"
            "    time.sleep(60)  # a clean-up that never ends\n")
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 130 and time.time() - t0 < 20, (r.returncode, r.stderr)
    assert "clean-up did not finish within 0.5 s" in r.stderr
    assert "File \"<string>\", line 9" in r.stderr  # faulthandler: the stuck line
