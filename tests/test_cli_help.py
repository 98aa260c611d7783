"""Every command's --help is clean, every parse error is one line with exit 2, the global flags
(--debug, --quiet, --log-json) work before or after the command, and progress reaches logs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from conftest import assert_one_error_line, assert_one_error_result, run_cli
from train_helpers import micro_dict, write_preset
from typer.testing import CliRunner

from vstain_cli.cli.main import app

REPO = Path(__file__).resolve().parents[1]
COMMANDS = sorted(typer.main.get_command(app).commands)


def test_every_command_is_walked():
    assert {"synth", "tile", "train", "calibrate", "stain", "uncertainty", "score", "demo"} <= set(COMMANDS)


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_is_clean(command):
    args = [command, "--help"] if command else ["--help"]
    r = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    text = r.output
    usage = next(ln for ln in text.splitlines() if "Usage:" in ln)
    assert "{" not in usage and "}" not in usage, usage                      # no {out}
    assert not re.search(r"<(bool|path|int|float|str|text|list\[[^\]]*\])>", text), text  # no <bool>, <list[Path]>
    for flag in ("--debug", "--quiet", "--log-json"):
        assert flag in text, (flag, text)


def test_train_help_lists_presets_and_tile_help_names_no_fixed_size():
    r = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    for name in ("tiny-diffusion", "diffusion-b", "regression", "pix2pix", "stainnet"):
        assert f"{name} (" in r.output, name
    r = CliRunner().invoke(app, ["tile", "--help"], env={"COLUMNS": "200"})
    assert "128x128" not in r.output and "--size" in r.output


PARSE_ERRORS = [
    (["train", "--preset", "x", "--data", "y", "--steps", "0"], "--steps"),
    (["stain", "a.tif", "-m", "m", "-o", "o.tif", "--steps", "0"], "--steps"),
    (["tile", "pairs.csv", "-o", "d", "--size", "big"], "--size"),
    (["score", "--out", "s", "--bogus"], "--bogus"),
    (["train", "--data", "y"], "--preset"),
    (["calibrate", "-m", "m", "-d", "d", "--samples", "many"], "--samples"),
    (["nosuchcommand"], "nosuchcommand"),
]


@pytest.mark.parametrize("args,needle", PARSE_ERRORS)
def test_parse_errors_are_one_line_exit_2(args, needle):
    assert_one_error_result(CliRunner().invoke(app, args), needle)


def test_parse_error_in_a_real_process(tmp_path):
    assert_one_error_line(run_cli("train", "--preset", "x", "--data", "y", "--steps", "0", cwd=tmp_path), "--steps")
    assert_one_error_line(run_cli("stain", "a.tif", "-m", "m", "-o", "o.tif", "--steps", "0", cwd=tmp_path),
                          "--steps")


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_anywhere_keeps_the_exit_code(tmp_path, where):
    args = ["train", "--preset", "nope", "--data", str(tmp_path)]
    args = ["--debug", *args] if where == "before" else [*args, "--debug"]
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "Traceback" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: unknown preset 'nope'")


def _train_env(interval: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "VSTAIN_PROGRESS_INTERVAL": interval}


def test_train_into_a_log_writes_progress_lines(tiny_dataset, tmp_path):
    preset = write_preset(tmp_path / "micro.toml", micro_dict(
        "tiny-diffusion", train={"checkpoint_every": 1000, "val_every": 8, "log_every": 2, "sample_count": 2}))
    out = tmp_path / ("a-long-folder-name-" * 6) / "run"
    cmd = [sys.executable, "-m", "vstain_cli", "train", "--preset", str(preset), "--data", str(tiny_dataset),
           "--out", str(out), "--device", "cpu", "--steps", "16"]
    r = subprocess.run(cmd, cwd=tmp_path, env=_train_env("0.2"), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()  # progress goes to stderr, results to stdout
    ticks = [ln for ln in lines if re.match(r"\d\d:\d\d:\d\d training micro-diffusion: \d+/16 ", ln)]
    assert len(ticks) >= 3, r.stderr
    assert any(" loss " in ln and " lr " in ln and " eta " in ln and "/s" in ln for ln in ticks), r.stderr
    assert any("[validation]" in ln for ln in ticks) and any("[sample grid]" in ln for ln in ticks), r.stderr
    assert any("done 16/16" in ln for ln in lines), r.stderr
    assert any(str(out) in ln for ln in lines + r.stdout.splitlines()), r.stdout  # long paths stay on one line
    assert "starting at step 0" in r.stderr

    r = subprocess.run([*cmd[:-1], "20", "--log-json"], cwd=tmp_path, env=_train_env("0.2"), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    events = [json.loads(ln) for ln in r.stderr.splitlines()]  # stderr is JSON only
    kinds = {e["event"] for e in events}
    assert {"info", "start", "finish"} <= kinds, kinds
    fin = next(e for e in events if e["event"] == "finish")
    assert fin["task"] == "train" and fin["done"] == fin["total"] == 4 and "loss" in fin and "lr" in fin
    assert any("resumed at step 16" in e.get("message", "") for e in events)
    assert "trained to step 20" in r.stdout

    r = subprocess.run([*cmd[:-1], "22", "--quiet"], cwd=tmp_path, env=_train_env("0.01"), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().splitlines() == [r.stdout.strip()], r.stdout
    assert "trained to step 22" in r.stdout and r.stderr == "", (r.stdout, r.stderr)


@pytest.mark.slow
def test_demo_into_a_log_shows_progress_at_a_steady_interval(tmp_path):
    cmd = [sys.executable, "-m", "vstain_cli", "demo", "d", "--slides", "4", "--size", "128", "128", "--channels", "3",
           "--diffusion-steps", "6", "--baseline-steps", "4", "--samples", "2", "--sample-steps", "2",
           "--device", "cpu"]
    r = subprocess.run(cmd, cwd=tmp_path, env=_train_env("5"), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    stamps = [ln[:8] for ln in r.stderr.splitlines() if re.match(r"\d\d:\d\d:\d\d ", ln)]
    secs = [int(h) * 3600 + int(m) * 60 + int(s) for h, m, s in (t.split(":") for t in stamps)]
    gaps = [(b - a) % 86400 for a, b in zip(secs, secs[1:])]
    assert len(secs) > 20 and max(gaps) <= 15, (max(gaps), r.stdout)  # interval 5 s: a line at least every ~5 s
    for stage in ("synth", "tile", "train diffusion", "calibrate", "stain diffusion", "uncertainty", "score"):
        assert f"== {stage}:" in r.stderr, stage
    assert "regressi…" not in r.stdout  # tables are not cut in a log
