"""`vstain distill`: progressive distillation to a K-step sampler and the one-call interval run
(micro presets on a tiny dataset the test writes; real run folders read back by load_run)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import assert_one_error_line, make_tiny_dataset, run_cli
from safetensors.torch import load_file
from train_helpers import micro

from vstain_cli.errors import InputError
from vstain_cli.infer.run import load_run
from vstain_cli.progress import Interrupted, NullProgress
from vstain_cli.train import checkpoint, run_folder
from vstain_cli.train.distill import DistillOptions, distill, phase_plan
from vstain_cli.train.loop import train

FAST = dict(batch_size=4, checkpoint_every=100, log_every=1, val_batches=1, sample_count=2)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(dataset, a micro diffusion run trained 4 steps on it)."""
    root = tmp_path_factory.mktemp("distill")
    data = make_tiny_dataset(root / "dataset")
    train(micro("tiny-diffusion"), data, root / "teacher", device="cpu")
    return data, root / "teacher"


def _af(seed: int = 0) -> torch.Tensor:
    return torch.rand((3, 4, 32, 32), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_phase_plan_halves_the_steps():
    p = phase_plan(16, 4, 10)
    assert [(x.teacher_steps, x.student_steps, x.start, x.end) for x in p] == [(16, 8, 0, 10), (8, 4, 10, 20)]
    for bad in ((12, 4), (4, 4), (16, 3)):
        with pytest.raises(ValueError):
            phase_plan(*bad, 10)


@pytest.mark.parametrize("k", [1, 2])
def test_distilled_run_samples_with_k_calls_and_stays_a_sampler(teacher, tmp_path, k):
    data, t = teacher
    res = distill(t, tmp_path / "d", DistillOptions(steps=k, teacher_steps=4 * k, phase_steps=2, **FAST),
                  device="cpu")
    assert res.step == 4  # two phases of 2 steps: 4k -> 2k -> k
    cfg = json.loads((tmp_path / "d" / run_folder.CONFIG).read_text())
    d = cfg["distill"]
    assert cfg["kind"] == "diffusion" and d["method"] == "progressive" and d["steps"] == k
    assert [(p["teacher_steps"], p["student_steps"]) for p in d["phases"]] == [(4 * k, 2 * k), (2 * k, k)]
    assert d["teacher"]["weights"]["sha256_head_tail"] and cfg["provenance"]["inputs"]["teacher"]["path"] == str(t)

    run = load_run(tmp_path / "d")
    assert run.is_diffusion and run.network_calls == k and run.schedule.T == k
    calls = []
    run.model.register_forward_hook(lambda *a: calls.append(1))
    af = _af()
    a = run.translate(af, generator=torch.Generator().manual_seed(0))  # the default sampler and steps
    assert len(calls) == k
    b = run.translate(af, generator=torch.Generator().manual_seed(1))
    a2 = run.translate(af, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, a2)  # deterministic given x_T ...
    assert (a - b).abs().mean() > 1e-3  # ... and x_T decides the sample: a different seed, another sample
    assert a.min() >= -1 and a.max() <= 1
    # the student learnt something: its weights moved away from the teacher's
    moved = load_file(str(tmp_path / "d" / checkpoint.WEIGHTS))
    orig = load_file(str(t / checkpoint.WEIGHTS))
    assert any(not torch.equal(moved[n], orig[n]) for n in orig)


def test_distilled_run_can_be_distilled_further(teacher, tmp_path):
    data, t = teacher
    distill(t, tmp_path / "d2", DistillOptions(steps=2, teacher_steps=4, phase_steps=1, **FAST), device="cpu")
    with pytest.raises(InputError, match="2-step distilled run"):
        distill(tmp_path / "d2", tmp_path / "x", DistillOptions(steps=1, teacher_steps=8, phase_steps=1, **FAST),
                device="cpu")
    distill(tmp_path / "d2", tmp_path / "d1", DistillOptions(steps=1, phase_steps=1, **FAST), device="cpu")
    cfg = json.loads((tmp_path / "d1" / run_folder.CONFIG).read_text())["distill"]
    assert cfg["teacher_steps"] == 2 and cfg["teacher"]["steps"] == 2
    assert load_run(tmp_path / "d1").network_calls == 1


def test_interval_run_gives_ordered_bounds_in_one_call(teacher, tmp_path):
    data, t = teacher
    distill(t, tmp_path / "iv", DistillOptions(intervals=True, phase_steps=3, **FAST), device="cpu")
    run = load_run(tmp_path / "iv")
    assert run.kind == "interval" and not run.is_diffusion and run.network_calls == 1
    calls = []
    run.model.unet.register_forward_hook(lambda *a: calls.append(1))
    lo, hi = run.interval(_af(3))
    assert len(calls) == 1
    assert lo.shape == hi.shape == (3, 3, 32, 32)
    assert (lo <= hi).all() and lo.min() >= -1 and hi.max() <= 1 and (hi - lo).mean() > 0
    mid = run.translate(_af(3))  # stain sees the midpoint
    assert torch.allclose(mid, ((lo + hi) / 2).clamp(-1, 1), atol=1e-5)
    val = [r for r in run_folder.read_metrics(tmp_path / "iv") if r["split"] == "val"]
    assert val and 0 <= val[-1]["coverage"] <= 1 and val[-1]["width_255"] > 0
    with pytest.raises(InputError, match="is an interval run"):
        distill(tmp_path / "iv", tmp_path / "x", DistillOptions(steps=1, **FAST), device="cpu")
    diffusion_run = load_run(t)
    with pytest.raises(Exception, match="only an interval run"):
        diffusion_run.interval(_af())


class _SignalAt(NullProgress):
    """Sends this process SIGTERM after training step ``n`` (the loop's own signal handling takes over)."""

    def __init__(self, n: int):
        super().__init__()
        self.n, self.done = n, 0

    def advance(self, key: str, n: int = 1) -> None:
        if key == "train":
            self.done += n
            if self.done == self.n:
                os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize("intervals,stop", [(False, 2), (False, 3), (True, 2)])
def test_distill_resume_after_sigterm_continues_exactly(teacher, tmp_path, intervals, stop):
    data, t = teacher
    o = DistillOptions(intervals=intervals, steps=1, teacher_steps=4, phase_steps=2 if not intervals else 4, **FAST)
    distill(t, tmp_path / "straight", o, device="cpu")
    with pytest.raises(Interrupted, match=f"stopped at step {stop} of 4"):
        distill(t, tmp_path / "split", o, device="cpu", progress=_SignalAt(stop))
    with pytest.raises(InputError, match=f"distillation unfinished \\(step {stop} of 4\\)"):
        load_run(tmp_path / "split")
    res = distill(t, tmp_path / "split", o, device="cpu")
    assert res.start_step == stop and res.step == 4
    for name in (checkpoint.WEIGHTS,):
        a, b = load_file(str(tmp_path / "straight" / name)), load_file(str(tmp_path / "split" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = checkpoint.load_state(tmp_path / "straight" / checkpoint.STATE)["objective"]
    sb = checkpoint.load_state(tmp_path / "split" / checkpoint.STATE)["objective"]
    for k in sa["nets"]["net"]:
        assert torch.equal(sa["nets"]["net"][k], sb["nets"]["net"][k])
    steps = [r["step"] for r in run_folder.read_metrics(tmp_path / "split") if r["split"] == "train"]
    assert steps == [1, 2, 3, 4]
    again = distill(t, tmp_path / "split", o, device="cpu")
    assert again.start_step == again.step == 4


def test_refusals_name_the_file(teacher, tmp_path):
    data, t = teacher
    other = make_tiny_dataset(tmp_path / "ds5", channels=5)
    with pytest.raises(InputError, match="5 AF channels but the teacher was trained on 4") as e:
        distill(t, tmp_path / "x", DistillOptions(steps=1, teacher_steps=2, phase_steps=1, **FAST), data=other,
                device="cpu")
    assert "dataset.json" in str(e.value)
    with pytest.raises(InputError, match="--steps"):
        distill(t, tmp_path / "x", DistillOptions(steps=3, **FAST), device="cpu")
    distill(t, tmp_path / "d", DistillOptions(steps=1, teacher_steps=2, phase_steps=1, **FAST), device="cpu")
    with pytest.raises(InputError, match="different config"):  # another K into the same folder
        distill(t, tmp_path / "d", DistillOptions(steps=1, teacher_steps=4, phase_steps=1, **FAST), device="cpu")


def test_cli_distills_and_reports_errors_in_one_line(teacher, tmp_path):
    data, t = teacher
    r = run_cli("distill", "--model", str(t), "--out", str(tmp_path / "d"), "--steps", "1", "--teacher-steps", "2",
                "--phase-steps", "2", "--batch-size", "4", "--device", "cpu", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "1-step sampler distilled" in r.stdout and load_run(tmp_path / "d").network_calls == 1
    assert_one_error_line(run_cli("distill", "--model", str(tmp_path / "nope"), cwd=tmp_path), "nope",
                          "teacher run folder not found")
    assert_one_error_line(run_cli("distill", "--model", str(t), "--steps", "3", "--device", "cpu", cwd=tmp_path),
                          "--steps must be one of 1, 2, 4, 8")
