"""One training loop for every model kind: data order, AMP, warm-up, EMA, DDP,
validation, sample grids, atomic checkpoints and exact resume.

Every random draw of step ``s`` on rank ``r`` comes from generators seeded by
(seed, s, r): the batch (data.StepBatchSampler), the noise/timesteps/prior of
the loss, and the global torch RNG (dropout). A run resumed from a checkpoint at
step s therefore continues exactly as the uninterrupted run would have.

With ``[train] keep = "best-val"`` the exported weights are those of the
validation with the lowest val loss (kept in the training state too, so a
resume keeps them); ``weights.safetensors`` records ``best_step`` and
``best_val_loss`` in its metadata and metrics.jsonl a ``best`` line. A resume
appends a ``resume`` line (step, time, command) to metrics.jsonl; config.json
is written when a run starts and never rewritten for a finished run.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from vstain_cli import progress as prog
from vstain_cli import seeding
from vstain_cli.data.loader import PatchDataset, StepBatchSampler, spread_indices
from vstain_cli.data.store import DatasetInfo, open_dataset
from vstain_cli.errors import InputError
from vstain_cli.io.images import sample_grid, write_png
from vstain_cli.progress import Interrupted, NullProgress, Progress, StopFlag, stop_on_signals
from vstain_cli.provenance import ensure_writable_dir
from vstain_cli.train import checkpoint, run_folder
from vstain_cli.train.distributed import Dist
from vstain_cli.train.objectives import Objective, build_objective
from vstain_cli.train.precision import Amp, resolve_precision
from vstain_cli.train.presets import Preset


@dataclass
class TrainResult:
    """What a call to ``train`` did."""

    out: Path
    step: int
    start_step: int
    val: dict[str, Any] = field(default_factory=dict)
    weights: Path | None = None
    best_step: int | None = None        # keep = "best-val": the step whose weights were exported
    best_val_loss: float | None = None


def check_dataset(info: DatasetInfo, preset: Preset) -> None:
    """Refuse datasets a preset cannot train on (InputError naming dataset.json)."""
    meta = info.root / "dataset.json"
    if not info.patch_keys("train"):
        raise InputError("dataset has no patches in the train split", meta)
    if preset.kind == "stainnet":
        n = preset.stainnet.n_classes
        bad = sorted({e.label for e in info.slides.values() if not 0 <= e.label < n})
        if bad:
            raise InputError(f"slide labels {bad} outside 0..{n - 1} (preset has n_classes = {n})", meta)


def missing_labels(info: DatasetInfo) -> dict[str, list[int]]:
    """Per split with patches: the labels present in another split but absent from it."""
    by_split: dict[str, set[int]] = {}
    for e in info.slides.values():
        if e.n:
            by_split.setdefault(e.split, set()).add(e.label)
    every = set().union(*by_split.values()) if by_split else set()
    return {s: sorted(every - labels) for s, labels in sorted(by_split.items()) if every - labels}


def open_run_folder(out: Path, config: dict[str, Any], dist: Dist, warnings: list[str], progress: Progress, *,
                    resume: bool, force: bool) -> str:
    """Start or resume the run folder ``out`` ("fresh" or "resume", ``run_folder.plan``); rank 0 writes.

    A fresh run gets its config.json once; a resume keeps the config (and provenance) it started with.
    """
    mode = run_folder.plan(out, config, resume=resume, force=force)
    dist.barrier()  # every rank has read the folder before rank 0 changes it
    if dist.is_main:
        ensure_writable_dir(out)
        for w in warnings:
            progress.warn(w)
        if mode == "fresh":
            run_folder.clear(out)
            run_folder.write_config(out, config)
    return mode


def train(
    preset: Preset,
    data: str | Path,
    out: str | Path,
    *,
    device: str = "auto",
    resume: bool = True,
    force: bool = False,
    progress: Progress | None = None,
) -> TrainResult:
    """Train ``preset`` on the dataset folder ``data`` into the run folder ``out``.

    Resumes from ``out/state.pt`` when the folder holds the same config (only
    ``train.steps``/``precision``/``workers`` may differ). Under ``torchrun``
    (WORLD_SIZE > 1) runs DDP; only rank 0 writes. Raises InputError for bad
    input, a mismatched run folder or a non-finite loss.
    """
    progress = progress or NullProgress()
    out = Path(out)
    info = open_dataset(data)
    check_dataset(info, preset)
    dist = Dist.from_env(device)  # InputError for an unusable --device
    try:
        return _train(preset, info, out, dist, resume=resume, force=force, progress=progress)
    finally:
        dist.close()


def _train(preset: Preset, info: DatasetInfo, out: Path, dist: Dist, *, resume: bool, force: bool,
           progress: Progress) -> TrainResult:
    t = preset.train
    if t.batch_size % dist.world_size:
        raise InputError(f"batch size {t.batch_size} does not split evenly over {dist.world_size} processes")
    precision, warnings = resolve_precision(t.precision, dist.device)
    config = run_folder.run_config(preset, info, world_size=dist.world_size, device=str(dist.device),
                               precision=precision)
    mode = open_run_folder(out, config, dist, warnings, progress, resume=resume, force=force)
    if dist.is_main:
        if preset.kind == "stainnet":
            for split, labels in missing_labels(info).items():
                progress.warn(f"the {split} split has no slide with label(s) {labels}: StainNet cannot learn or "
                              f"be checked on them there; re-tile with another --split-seed or add slides")

    amp = Amp(precision, dist.device)
    seeding.seed_torch(seeding.train_seed(t.seed, 0, 0, seeding.INIT))  # weight initialisation
    obj = build_objective(preset, info.channels, dist.device, amp)
    start = 0
    if mode == "resume":
        state = checkpoint.load_state(out / checkpoint.STATE, map_location=dist.device)
        if state.get("channels") != info.channels:
            raise InputError(
                f"checkpoint has {state.get('channels')} AF channels but the dataset has {info.channels}",
                out / checkpoint.STATE,
            )
        try:
            obj.load_state_dict(state["objective"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise InputError(f"training state does not fit the preset ({e})", out / checkpoint.STATE) from None
        checkpoint.set_rng_state(state.get("rng", {}))
        start = int(state["step"])
        best, elapsed = state.get("best"), float(state.get("elapsed_s", 0.0))
        if start >= t.steps:  # finished: report it, touch nothing (config.json names the command that trained it)
            result = TrainResult(out=out, step=start, start_step=start, weights=out / checkpoint.WEIGHTS)
            if best:
                result.best_step, result.best_val_loss = int(best["step"]), float(best["value"])
            return result
        if dist.is_main:
            run_folder.truncate_metrics(out, start)
            run_folder.record_resume(out, config, start)
    else:
        best, elapsed = None, 0.0
    if dist.is_main:
        if mode == "resume":
            prog.info(progress, f"{preset.name}: resumed at step {start} from {out / checkpoint.STATE}")
        else:
            prog.info(progress, f"{preset.name}: no checkpoint in {out}, starting at step 0")
    dist.barrier()
    obj.wrap(dist.wrap)

    result = TrainResult(out=out, step=start, start_step=start)
    loop = _Loop(preset, info, out, dist, obj, progress, start, best, elapsed)
    loop.run()
    result.step, result.val, result.weights = t.steps, loop.last_val, out / checkpoint.WEIGHTS
    if loop.best is not None:
        result.best_step, result.best_val_loss = loop.best["step"], loop.best["value"]
    return result


class _Loop:
    """The step loop with its logging, validation and checkpoint cadence."""

    def __init__(self, preset: Preset, info: DatasetInfo, out: Path, dist: Dist, obj: Objective,
                 progress: Progress, start: int, best: dict[str, Any] | None = None, elapsed: float = 0.0):
        self.preset, self.info, self.out, self.dist, self.obj = preset, info, out, dist, obj
        self.progress, self.start = progress, start
        self.t = preset.train
        # keep = "best-val": {"step", "value" (val loss), "weights" (exported tensors)} of the best validation so far
        self.best: dict[str, Any] | None = best if self.t.keep == "best-val" else None
        # wall seconds spent training up to the last checkpoint (kept across resumes; lost work is not counted)
        self.elapsed0, self.t0 = elapsed, time.perf_counter()
        self.last_ckpt = start
        self.last_val: dict[str, Any] = {}
        self.train_set = PatchDataset(info, "train", obj.fields)
        self.val_set = PatchDataset(info, "val", obj.fields)

    def elapsed(self) -> float:
        """Wall seconds this run has trained (this process and the resumed ones before it)."""
        return self.elapsed0 + time.perf_counter() - self.t0

    def _loader(self) -> DataLoader:
        t, d = self.t, self.dist
        sampler = StepBatchSampler(len(self.train_set), t.batch_size, self.start, t.steps, seed=t.seed,
                                   rank=d.rank, world_size=d.world_size)
        return DataLoader(self.train_set, batch_sampler=sampler, num_workers=t.workers,
                          pin_memory=d.device.type == "cuda", persistent_workers=False)

    def _set_lr(self, step: int) -> float:
        warm = self.t.warmup_steps
        factor = min(1.0, (step + 1) / warm) if warm > 0 else 1.0  # linear warm-up, then constant
        for opt in self.obj.optimizers.values():
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * factor
        return self.t.lr * factor

    def run(self) -> None:
        """Train to ``steps``; on SIGINT/SIGTERM checkpoint the current step and raise Interrupted."""
        with stop_on_signals() as stop:
            self._run(stop)

    def _run(self, stop: StopFlag) -> None:
        t, d = self.t, self.dist
        title = f"training {self.preset.name}" + (f" from step {self.start}" if self.start else "")
        self.progress.start("train", title, t.steps - self.start)
        self.obj.train(True)
        acc: dict[str, float] = {}
        n_acc, t_log = 0, time.perf_counter()
        for step, batch in zip(range(self.start, t.steps), self._loader(), strict=True):
            lr = self._set_lr(step)
            seeding.seed_torch(seeding.train_seed(t.seed, step, d.rank, seeding.TRAIN_DROPOUT))  # dropout etc.
            logs = self.obj.train_step(batch, seeding.torch_generator(
                seeding.train_seed(t.seed, step, d.rank, seeding.TRAIN_NOISE), d.device))
            self.obj.amp.update()
            self._check_finite(step, logs)
            self.obj.after_step(step)
            for k, v in logs.items():
                acc[k] = acc.get(k, 0.0) + v
            n_acc += 1
            done = step + 1
            self.progress.advance("train")
            last = done == t.steps
            if done % t.log_every == 0 or last:
                dt = time.perf_counter() - t_log
                rec = {"step": done, "split": "train", "lr": lr,
                       **{k: v / n_acc for k, v in acc.items()},
                       "images_per_s": n_acc * t.batch_size / max(dt, 1e-9), "elapsed_s": self.elapsed()}
                self._log(rec)
                prog.update(self.progress, "train", loss=rec["loss"], lr=lr)
                acc, n_acc, t_log = {}, 0, time.perf_counter()
            if done % t.val_every == 0 or last:
                self._validate(done)
            stopping = not last and self._stop_requested(stop)  # once per step: every rank agrees
            if done % t.checkpoint_every == 0 or last or stopping:
                self._checkpoint(done)
            if stopping:
                raise Interrupted(f"{signal.Signals(stop.signum).name}: training stopped at step {done} of "
                                  f"{t.steps}; checkpoint written to {self.out / checkpoint.STATE}; rerun the same "
                                  f"command to resume", stop.signum)
        self.progress.finish("train")

    def _stop_requested(self, stop: StopFlag) -> bool:
        """True on every rank when any rank got SIGINT/SIGTERM."""
        d = self.dist
        if d.active:
            flag = d.all_reduce_sum(torch.tensor([float(bool(stop))], device=d.device))
            if float(flag) > 0 and not stop:
                stop.signum = signal.SIGTERM
        return bool(stop)

    def _check_finite(self, step: int, logs: dict[str, float]) -> None:
        d = self.dist
        bad = not math.isfinite(logs["loss"])
        if self.obj.amp.scaler is None:  # fp16 skips non-finite gradient steps itself
            bad = bad or not math.isfinite(logs.get("grad_norm", 0.0))
        flag = d.all_reduce_sum(torch.tensor([float(bad)], device=d.device))
        if float(flag) > 0:
            kept = (f"the last good checkpoint (step {self.last_ckpt}) is kept" if self.last_ckpt
                    else "no checkpoint had been written yet")
            raise InputError(
                f"training stopped: the loss became {logs['loss']} (or its gradient non-finite) at step "
                f"{step + 1}; {kept}. Try a lower --lr, or check the dataset for NaN/inf values",
                self.out,
            )

    def _log(self, rec: dict[str, Any]) -> None:
        if self.dist.is_main:
            run_folder.append_metrics(self.out, rec)

    @torch.no_grad()
    def _validate(self, step: int) -> None:
        """Validation loss on a fixed subset of val (rank 0) and a sample grid PNG."""
        d = self.dist
        if d.is_main:
            self.obj.train(False)
            try:
                prog.update(self.progress, "train", phase="validation")
                self.last_val = self._val_metrics(step)
                if self.last_val:
                    self._keep_best(step)
                    best = {"best_step": self.best["step"]} if self.best is not None else {}
                    self._log({"step": step, "split": "val", **self.last_val, **best})
                    self._check_chance(step)
                prog.update(self.progress, "train", phase="sample grid")
                self._sample_grid(step)
            finally:
                prog.update(self.progress, "train", phase=None)
                self.obj.train(True)
        d.barrier()

    def _val_metrics(self, step: int) -> dict[str, Any]:
        t = self.t
        n = len(self.val_set)
        if n == 0 or t.val_batches == 0:
            return {}
        idx = spread_indices(n, t.val_batches * t.batch_size)
        gen = seeding.torch_generator(seeding.derive_seed(t.seed, seeding.VALIDATION), self.dist.device)  # same noise every time
        totals: dict[str, Any] = {}
        count = 0
        for i in range(0, len(idx), t.batch_size):
            chunk = idx[i : i + t.batch_size]
            r = self.obj.val_step(self.val_set.batch(chunk), gen)
            for k, v in r.items():
                totals[k] = totals.get(k, 0) + (v * len(chunk) if k != "confusion" else v)
            count += len(chunk)
        out: dict[str, Any] = {k: (v / count if k != "confusion" else v) for k, v in totals.items()}
        if "confusion" in out:
            conf = out.pop("confusion")
            out["accuracy"] = float(np.trace(conf) / max(conf.sum(), 1))
            out["confusion"] = conf.tolist()  # rows: true label, columns: predicted
        out["patches"] = count
        return out

    def _keep_best(self, step: int) -> None:
        """keep = "best-val": remember the exported weights when val loss is the lowest so far (ties: earlier)."""
        if self.t.keep != "best-val":
            return
        value = float(self.last_val["loss"])
        if self.best is None or value < float(self.best["value"]):
            weights = {k: v.clone() for k, v in self.obj.export().items()}  # export() may share the live storage
            self.best = {"step": step, "value": value, "weights": weights}

    def _check_chance(self, step: int) -> None:
        """At the last step, warn when a StainNet's validation accuracy is at or below chance."""
        acc = self.last_val.get("accuracy")
        if acc is None or self.preset.kind != "stainnet" or step != self.t.steps:
            return
        chance = 1.0 / self.preset.stainnet.n_classes
        if acc <= chance + 1e-9:
            self.progress.warn(f"StainNet validation accuracy {acc:.3f} is at or below chance ({chance:.3f}): "
                               f"FSD computed with it means little (train longer, or check that every split "
                               f"holds every label)")

    def _sample_grid(self, step: int) -> None:
        t = self.t
        ds = self.val_set if len(self.val_set) else self.train_set
        if t.sample_count == 0 or "af" not in self.obj.fields:
            return
        batch = ds.batch(spread_indices(len(ds), t.sample_count))
        pred = self.obj.predict(batch, seeding.torch_generator(seeding.derive_seed(t.seed, seeding.VALIDATION, 1),
                                                                 self.dist.device))
        if pred is None:
            return
        pred = pred.float().cpu()
        real = batch["he"]
        l1 = float((pred - real).abs().mean()) * 127.5  # on the 0-255 scale, as the paper reports
        self._log({"step": step, "split": "val_samples", "l1_255": l1, "n": int(real.shape[0])})
        self.last_val["sample_l1_255"] = l1
        grid = sample_grid(batch["af"].numpy(), real.numpy(), pred.numpy())
        write_png(self.out / run_folder.SAMPLES / f"step-{step}.png", grid)

    def _checkpoint(self, step: int) -> None:
        d = self.dist
        prog.update(self.progress, "train", phase="checkpoint")
        if d.is_main:
            meta = {"format": "vstain-weights", "kind": self.preset.kind, "preset": self.preset.name,
                    "step": step, "channels": self.info.channels,
                    "ema": self.obj.ema is not None, "keep": self.t.keep}
            weights = self.obj.export()
            if self.best is not None:  # the best validation's weights; ``step`` stays the step trained to
                weights = self.best["weights"]
                meta.update(best_step=self.best["step"], best_val_loss=self.best["value"])
            checkpoint.save_weights(self.out / checkpoint.WEIGHTS, weights, meta)
            checkpoint.save_state(self.out / checkpoint.STATE, {
                "step": step,
                "kind": self.preset.kind,
                "channels": self.info.channels,
                "world_size": d.world_size,
                "objective": self.obj.state_dict(),
                "rng": checkpoint.rng_state(),
                "best": self.best,
                "elapsed_s": self.elapsed(),
            })
            if step == self.t.steps:
                best = {} if self.best is None else {"metric": "val_loss", "value": self.best["value"],
                                                     "best_step": self.best["step"]}
                self._log({"step": step, "split": "end", "elapsed_s": self.elapsed(), **best})
        self.last_ckpt = step
        prog.update(self.progress, "train", phase=None)
        d.barrier()
