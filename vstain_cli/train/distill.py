"""``vstain distill``: a trained diffusion run made cheap to sample, as a new run folder.

Two methods (docs/models.md, "Distillation"):

- ``progressive`` (Salimans & Ho 2022, alg. 2): a student initialised from the
  teacher learns to take in ONE deterministic DDIM step what the teacher takes
  in TWO; each phase halves the step count (16 -> 8 -> 4 ...), the student of
  one phase is the teacher of the next. The result is sampled with DDIM (eta 0)
  on its K-step grid; it stays a sampler (x_T decides the sample).
- ``conffusion`` (Horwitz & Hoshen 2022): the teacher's UNet, given the AF and
  x_t = 0 at a fixed timestep, is fine-tuned with two extra output channels into
  a network that predicts the 5 % and 95 % quantiles of H&E per pixel (pinball
  loss against real H&E), i.e. an interval in one network call.

Both run through the training loop of loop.py (atomic checkpoints, SIGINT /
SIGTERM checkpoint-and-stop, exact resume). A distilled run's config.json keeps
the teacher's preset (with the distillation's own ``train`` section), its
``kind`` ("diffusion" or "interval") and a ``distill`` block: method, teacher,
K, phases and the timestep grid. ``student_network`` rebuilds its network for
``infer/run.load_run``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vstain_cli import progress as prog
from vstain_cli import seeding
from vstain_cli.data.store import DatasetInfo, open_dataset
from vstain_cli.diffusion.denoiser import Denoiser, to_x0_eps, training_target
from vstain_cli.diffusion.prior import empty_prior
from vstain_cli.diffusion.samplers import sample, timesteps
from vstain_cli.diffusion.schedule import Schedule
from vstain_cli.errors import InputError
from vstain_cli.nets.unet import UNet
from vstain_cli.progress import NullProgress, Progress
from vstain_cli.provenance import fingerprint, read_format_json, record
from vstain_cli.train import checkpoint, run_folder
from vstain_cli.train.distributed import Dist
from vstain_cli.train.ema import EMA
from vstain_cli.train.loop import TrainResult, _Loop, check_dataset, open_run_folder
from vstain_cli.train.networks import build_network, cond_channels
from vstain_cli.train.objectives import Batch, Objective, _adam
from vstain_cli.train.precision import Amp, resolve_precision
from vstain_cli.train.presets import Preset

PROGRESSIVE, CONFFUSION = "progressive", "conffusion"
INTERVAL_KIND = "interval"                 # the run kind of a conffusion run
STEP_CHOICES = (1, 2, 4, 8)                # --steps K
DEFAULT_TEACHER_STEPS = 16                 # DDIM steps of an undistilled teacher (phase 1 halves them)
QUANTILES = (0.05, 0.95)                   # the interval run's lower and upper quantile
INITIAL_HALFWIDTH = 0.25                   # of a new interval head, in [-1, 1] units (32 grey levels)
LOG_HALFWIDTH_RANGE = (-8.0, 2.0)          # clamp of the predicted log half-width


@dataclass
class DistillOptions:
    """Settings of one ``vstain distill`` (``steps`` and ``teacher_steps`` apply to progressive only)."""

    intervals: bool = False
    steps: int = 4                       # K: network calls per window of the result
    teacher_steps: int | None = None     # None: 16 for a diffusion teacher, K of a distilled teacher
    phase_steps: int = 500               # optimizer steps per halving phase (or of the interval fine-tune)
    batch_size: int = 16
    lr: float = 2e-4
    ema_decay: float = 0.99
    seed: int = 0
    quantiles: tuple[float, float] = QUANTILES
    checkpoint_every: int = 100
    log_every: int = 25
    val_batches: int = 2
    sample_count: int = 6

    @property
    def method(self) -> str:
        return CONFFUSION if self.intervals else PROGRESSIVE

    def check(self) -> None:
        """InputError naming the flag for a value out of range."""
        if not self.intervals and self.steps not in STEP_CHOICES:
            raise InputError(f"--steps must be one of {', '.join(map(str, STEP_CHOICES))}, got {self.steps}")
        for name in ("phase_steps", "batch_size", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or not 0.0 <= self.ema_decay < 1.0:
            raise InputError("need --lr > 0 and 0 <= ema decay < 1")
        lo, hi = self.quantiles
        if not 0.0 < lo < hi < 1.0:
            raise InputError(f"quantiles must satisfy 0 < lower < upper < 1, got {self.quantiles}")


@dataclass(frozen=True)
class Phase:
    """One halving phase: steps [start, end) of the run train a ``student_steps`` sampler on a
    ``teacher_steps`` teacher (an interval fine-tune is a single phase with zero steps)."""

    index: int
    teacher_steps: int
    student_steps: int
    start: int
    end: int

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def phase_plan(teacher_steps: int, steps: int, phase_steps: int) -> list[Phase]:
    """Phases halving ``teacher_steps`` down to ``steps`` (ValueError unless a power-of-two ratio)."""
    ratio = teacher_steps // steps if steps > 0 else 0
    if steps < 1 or ratio < 2 or ratio * steps != teacher_steps or ratio & (ratio - 1):
        raise ValueError(f"the teacher's {teacher_steps} steps must be {steps} times a power of two >= 2")
    phases, n, start = [], teacher_steps, 0
    while n > steps:
        phases.append(Phase(len(phases) + 1, n, n // 2, start, start + phase_steps))
        n //= 2
        start += phase_steps
    return phases


# ----------------------------------------------------------------------------- networks of a distilled run


def respaced_schedule(schedule: Schedule, grid: list[int]) -> Schedule:
    """The schedule of ``schedule`` seen at the timesteps ``grid`` only (Nichol & Dhariwal 2021 sec. 4):
    index j of the result is the j-th smallest grid timestep; abar is kept exactly, betas follow."""
    ac = schedule.alphas_cumprod[np.sort(np.asarray(grid, np.int64))]
    betas = 1.0 - ac / np.concatenate([[1.0], ac[:-1]])
    return Schedule(f"{schedule.name}@{len(grid)}", betas)


class RespacedNet(nn.Module):
    """A network of the full T-step schedule called with indices of a respaced one:
    ``forward(x, j, cond) = net(x, grid[j], cond)``."""

    def __init__(self, net: nn.Module, grid: list[int]):
        super().__init__()
        self.net = net
        self.register_buffer("grid", torch.tensor(sorted(grid), dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        j = torch.as_tensor(t, device=self.grid.device).round().long().clamp(0, len(self.grid) - 1)
        return self.net(x, self.grid[j].reshape(-1), cond)


def interval_timestep(schedule: Schedule, prediction: str) -> int:
    """The timestep the interval network is called at with x_t = 0: the last (x0 is the conditional
    mean there) for v and x0 prediction; for eps, where abar is nearest 1/2 (x0 = -eps, well scaled)."""
    if prediction == "eps":
        return int(np.argmin(np.abs(schedule.alphas_cumprod - 0.5)))
    return schedule.T - 1


class IntervalNet(nn.Module):
    """A 6-output UNet giving per-pixel bounds in one call (Conffusion, Horwitz & Hoshen 2022).

    Channels 0-2 are read as the teacher's parameterisation at (x_t = 0, t) and give the
    centre c = x0(out, 0, abar_t); channels 3-5 are the log half-width s;
    lower = c - exp(s), upper = c + exp(s), so lower <= upper always. [-1, 1] units, unclipped.
    ``forward(cond)`` returns the centre (the midpoint): the run stains like a regression run.
    """

    def __init__(self, unet: UNet, timestep: int, abar: float, prediction: str):
        super().__init__()
        self.unet, self.timestep, self.abar, self.prediction = unet, int(timestep), float(abar), prediction

    def bounds(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, h, w = cond.shape
        x = torch.zeros((b, 3, h, w), dtype=cond.dtype, device=cond.device)
        t = torch.full((b,), float(self.timestep), device=cond.device)
        out = self.unet(x, t, cond).float()
        center, _ = to_x0_eps(out[:, :3], x.float(), torch.tensor(self.abar, device=cond.device), self.prediction)
        half = out[:, 3:].clamp(*LOG_HALFWIDTH_RANGE).exp()
        return center - half, center + half

    def forward(self, cond: torch.Tensor, bounds: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The midpoint (B, 3, H, W), or (lower, upper) with ``bounds`` (the call DDP sees in training)."""
        lo, hi = self.bounds(cond)
        return (lo, hi) if bounds else 0.5 * (lo + hi)


def _interval_unet(preset: Preset, channels: int) -> UNet:
    m = preset.model
    return UNet(in_channels=cond_channels(preset, channels) + 3, out_channels=6, base_channels=m.base_channels,
                channel_mults=m.channel_mults, num_res_blocks=m.num_res_blocks, attention_levels=m.attention_levels,
                attention_heads=m.attention_heads, attention_up=m.attention_up, dropout=m.dropout,
                time_embedding=True)


def build_interval_net(preset: Preset, channels: int) -> IntervalNet:
    """An untrained IntervalNet of a diffusion preset's layout."""
    d = preset.diffusion
    schedule = d.build_schedule()
    t = interval_timestep(schedule, d.prediction)
    return IntervalNet(_interval_unet(preset, channels), t, float(schedule.alphas_cumprod[t]), d.prediction)


def interval_from_teacher(teacher: nn.Module, preset: Preset, channels: int) -> IntervalNet:
    """An IntervalNet whose centre is the teacher at (x_t = 0, t) and whose half-width is
    INITIAL_HALFWIDTH everywhere: every weight copied but the head's three new channels."""
    net = build_interval_net(preset, channels)
    src = teacher.state_dict()
    dst = net.unet.state_dict()
    for k, v in src.items():
        if k.startswith("out_conv."):
            dst[k] = torch.zeros_like(dst[k])
            dst[k][:3] = v
        else:
            dst[k] = v.clone()
    dst["out_conv.bias"][3:] = math.log(INITIAL_HALFWIDTH)
    net.unet.load_state_dict(dst)
    return net


@dataclass
class Student:
    """What ``load_run`` needs of a distilled run: its kind, eval network, schedule (progressive)."""

    kind: str
    model: nn.Module
    schedule: Schedule | None
    steps: int


def student_network(cfg: dict[str, Any], preset: Preset, channels: int, tensors: dict[str, torch.Tensor],
                    meta: dict[str, str], path: Path) -> Student:
    """Rebuild a distilled run's network from its config and weights; InputError names the bad file."""
    d = cfg.get("distill")
    cfg_path, weights = path / run_folder.CONFIG, path / run_folder.WEIGHTS
    try:
        method, total = str(d["method"]), int(d["train_steps"])
        grid = [int(t) for t in d.get("timesteps", [])]
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"corrupt distill block in run config ({e})", cfg_path) from None
    step = int(meta.get("step", 0))
    if step < total:
        raise InputError(f"distillation unfinished (step {step} of {total}); rerun the same `vstain distill` "
                         "to finish it", weights)
    if method == PROGRESSIVE:
        net, schedule = build_network(preset, channels), preset.diffusion.build_schedule()
        if not grid or sorted(set(grid)) != sorted(grid) or min(grid) < 0 or max(grid) >= schedule.T:
            raise InputError("corrupt distill block in run config (bad timesteps)", cfg_path)
    elif method == CONFFUSION:
        net, schedule = build_interval_net(preset, channels), None
    else:
        raise InputError(f"unknown distillation method {method!r}", cfg_path)
    target = net.unet if isinstance(net, IntervalNet) else net
    try:
        target.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise InputError(f"weights do not fit the run's config ({first[1].strip() if len(first) > 1 else e})",
                         weights) from None
    if method == CONFFUSION:
        return Student(INTERVAL_KIND, net, None, 1)
    return Student("diffusion", RespacedNet(net, grid), respaced_schedule(schedule, grid), len(grid))


# ----------------------------------------------------------------------------- the teacher


@dataclass
class Teacher:
    """A diffusion run folder read for distillation (no infer/ import: train sits below it)."""

    path: Path
    config: dict[str, Any]
    preset: Preset
    channels: int
    tile_size: int
    af_low: np.ndarray
    af_high: np.ndarray
    tensors: dict[str, torch.Tensor] = field(repr=False)
    step: int
    steps: int | None            # K of a distilled teacher, None for a diffusion run


def read_teacher(path: str | Path) -> Teacher:
    """Read a diffusion run (or a finished progressive-distilled one); InputError names the file."""
    path = Path(path)
    cfg_path = path / run_folder.CONFIG
    if not path.is_dir():
        raise InputError("teacher run folder not found", path)
    cfg = read_format_json(cfg_path, run_folder.RUN_FORMAT, missing=("not a vstain run (no config.json)", path),
                           corrupt="corrupt run config", wrong="not a vstain run config (format field missing)")
    kind = cfg.get("kind")
    if kind != "diffusion":
        raise InputError(f"is {'an' if str(kind)[:1] in 'aeiou' else 'a'} {kind} run; distil a diffusion run", path)
    try:
        preset = Preset.from_dict(cfg["preset"], source=str(cfg_path))
        channels, tile = int(cfg["channels"]), int(cfg["tile_size"])
        norm = cfg["dataset"]["af_normalization"]
        low, high = np.asarray(norm["low"], np.float32), np.asarray(norm["high"], np.float32)
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"corrupt run config (bad or missing field {e})", cfg_path) from None
    tensors, meta = checkpoint.load_weights(path / run_folder.WEIGHTS)
    step = int(meta.get("step", 0))
    steps = None
    d = cfg.get("distill")
    if isinstance(d, dict):
        student_network(cfg, preset, channels, tensors, meta, path)  # finished and loadable, or InputError
        steps = len(d["timesteps"])
    else:
        try:
            build_network(preset, channels).load_state_dict(tensors, strict=True)
        except RuntimeError:
            raise InputError("weights do not fit the run's config", path / run_folder.WEIGHTS) from None
    return Teacher(path, cfg, preset, channels, tile, low, high, tensors, step, steps)


# ----------------------------------------------------------------------------- objectives


def _per_sample(values: np.ndarray, idx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[idx] as (B, 1, 1, 1) tensors of ``like``'s dtype and device."""
    v = torch.as_tensor(values, dtype=torch.float64)[idx.cpu()]
    return v.to(device=like.device, dtype=like.dtype).reshape(-1, 1, 1, 1)


class _DistillBase(Objective):
    """Shared set-up: one trained network ``net`` with EMA, the frozen teacher, empty-prior conditioning."""

    fields = ("af", "he")

    def __init__(self, preset: Preset, channels: int, device: torch.device, amp: Amp, net: nn.Module):
        self.preset, self.channels, self.device, self.amp = preset, channels, device, amp
        self.channels_last = False
        self.nets = {"net": net.to(device)}
        self.optimizers = {"net": _adam(self.nets["net"].parameters(), preset.train.lr, preset)}
        self.ema = EMA(self.nets["net"], preset.train.ema_decay)
        self.train_nets = dict(self.nets)
        self.prediction = preset.diffusion.prediction

    def _cond(self, af: torch.Tensor) -> torch.Tensor:
        af = self._in(af)
        return torch.cat([af, empty_prior(af)], dim=1) if self.preset.diffusion.prior else af


class ProgressiveObjective(_DistillBase):
    """Progressive distillation, Salimans & Ho 2022 alg. 2, with a DDIM (eta 0) teacher.

    For a student of N steps on the grid t_0 > ... > t_{N-1} (``samplers.timesteps``) and
    i ~ U{0..N-1}: z_t = alpha_t x + sigma_t eps (x: real H&E of the train split); the
    teacher takes two DDIM steps t -> t' -> t'' (t' the midpoint of its 2N-step grid, t''
    = t_{i+1}, or the clean image after the last one); the student's target is
    x~ = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t),
    eps~ = (z_t - alpha_t x~)/sigma_t, and it regresses the target of its parameterisation
    (v for the demo runs: "SNR + 1" weighting of the x-error, sec. 4). Each phase starts
    from the previous phase's EMA student, which becomes its teacher.
    """

    kind = "diffusion"

    def __init__(self, preset: Preset, channels: int, device: torch.device, amp: Amp, teacher: Teacher,
                 phases: list[Phase]):
        student = build_network(preset, channels)
        student.load_state_dict(teacher.tensors)
        super().__init__(preset, channels, device, amp, student)
        self.teacher = build_network(preset, channels).to(device).eval().requires_grad_(False)
        self.teacher.load_state_dict(teacher.tensors)
        self.schedule = preset.diffusion.build_schedule()
        self.phases = phases
        self.phase_index = 0    # the phase whose teacher is loaded
        self.next_step = 0      # the step train_step takes next

    @property
    def phase(self) -> Phase:
        return self.phases[self.phase_index]

    def _phase_of(self, step: int) -> int:
        return next((i for i, p in enumerate(self.phases) if step < p.end), len(self.phases) - 1)

    def _advance(self, index: int) -> None:
        """Start phase ``index``: the EMA student becomes teacher and student; fresh optimizer."""
        weights = self.ema.model.state_dict()
        self.teacher.load_state_dict(weights)
        self.nets["net"].load_state_dict(weights)
        self.optimizers["net"] = _adam(self.nets["net"].parameters(), self.preset.train.lr, self.preset)
        self.phase_index = index

    def _grids(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """abar at each student step's start t, the teacher's midpoint t' and the end t'' (1: clean)."""
        T, p = self.schedule.T, self.phase
        ac = self.schedule.alphas_cumprod
        fine = timesteps(T, p.teacher_steps)
        coarse = timesteps(T, p.student_steps)
        if fine[::2] != coarse:
            raise ValueError(f"the {p.teacher_steps}-step grid does not contain the {p.student_steps}-step grid")
        t = np.asarray(coarse, np.int64)
        mid = ac[np.asarray(fine[1::2], np.int64)]
        end = np.concatenate([ac[t[1:]], [1.0]])
        return t, ac[t], mid, end

    def _teacher_step(self, z: torch.Tensor, t: torch.Tensor, a: torch.Tensor, a_next: torch.Tensor,
                      cond: torch.Tensor) -> torch.Tensor:
        """One DDIM step (Song et al. 2021 eq. 12, eta 0) per sample, x0 clipped as the samplers clip."""
        with self.amp.autocast():
            out = self.teacher(z, t, cond).float()
        x0, _ = to_x0_eps(out, z, a, self.prediction)
        x0 = x0.clamp(-1.0, 1.0)
        eps = (z - a.sqrt() * x0) / (1.0 - a).sqrt()
        return a_next.sqrt() * x0 + (1.0 - a_next).sqrt() * eps

    def _loss(self, net: nn.Module, batch: Batch, gen: torch.Generator) -> torch.Tensor:
        x, cond = self._in(batch["he"]), self._cond(batch["af"])
        grid, a_grid, a_mid_grid, a_end_grid = self._grids()
        dev = gen.device
        i = torch.randint(0, len(grid), (x.shape[0],), generator=gen, device=dev).cpu()
        noise = torch.randn(x.shape, generator=gen, device=dev, dtype=torch.float32).to(x.device)
        a, a_mid, a_end = (_per_sample(v, i, x) for v in (a_grid, a_mid_grid, a_end_grid))
        t = torch.as_tensor(grid, dtype=torch.float32)[i].to(x.device)
        mid_t = torch.as_tensor(timesteps(self.schedule.T, self.phase.teacher_steps)[1::2], dtype=torch.float32)
        z = a.sqrt() * x + (1.0 - a).sqrt() * noise
        with torch.no_grad():
            z_mid = self._teacher_step(z, t, a, a_mid, cond)
            z_end = self._teacher_step(z_mid, mid_t[i].to(x.device), a_mid, a_end, cond)
            # Salimans & Ho 2022 alg. 2: the x~ whose one DDIM step from z_t lands on z_t''
            ratio = (1.0 - a_end).sqrt() / (1.0 - a).sqrt()
            x_tilde = (z_end - ratio * z) / (a_end.sqrt() - ratio * a.sqrt())
            eps_tilde = (z - a.sqrt() * x_tilde) / (1.0 - a).sqrt()
            target = training_target(x_tilde, eps_tilde, a, self.prediction)
        with self.amp.autocast():
            pred = net(z, t, cond).float()
        return F.mse_loss(pred, target.float())

    def train_step(self, batch: Batch, gen: torch.Generator) -> dict[str, float]:
        index = self._phase_of(self.next_step)
        if index != self.phase_index:
            self._advance(index)
        loss = self._loss(self.train_nets["net"], batch, gen)
        norm = self.amp.step(loss, self.optimizers["net"], self.nets["net"].parameters(), self.preset.train.grad_clip)
        return {"loss": float(loss.detach()), "grad_norm": norm, "student_steps": float(self.phase.student_steps)}

    def after_step(self, step: int) -> None:
        self.ema.update(self.nets["net"], step - self.phase.start)  # EMA warm-up restarts each phase
        self.next_step = step + 1

    @torch.no_grad()
    def val_step(self, batch: Batch, gen: torch.Generator) -> dict[str, float]:
        return {"loss": float(self._loss(self.inference_net, batch, gen))}

    @torch.no_grad()
    def predict(self, batch: Batch, gen: torch.Generator) -> torch.Tensor:
        """DDIM samples of the EMA student on its current grid."""
        cond = self._cond(batch["af"])
        x_T = torch.randn((cond.shape[0], 3, *cond.shape[-2:]), generator=gen, device=gen.device).to(self.device)
        grid = timesteps(self.schedule.T, self.phase.student_steps)
        net = RespacedNet(self.inference_net, grid).to(self.device)
        return sample(Denoiser(net, self.prediction), x_T, respaced_schedule(self.schedule, grid), cond,
                      sampler="ddim", steps=len(grid), eta=0.0)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "teacher": self.teacher.state_dict(), "phase_index": self.phase_index,
                "next_step": self.next_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.phase_index = int(state["phase_index"])
        self.next_step = int(state["next_step"])
        self.teacher.load_state_dict(state["teacher"])
        super().load_state_dict(state)


def pinball(pred: torch.Tensor, y: torch.Tensor, q: float) -> torch.Tensor:
    """Mean quantile (pinball) loss, Koenker & Bassett 1978: max(q (y - p), (q - 1)(y - p))."""
    d = y - pred
    return torch.maximum(q * d, (q - 1.0) * d).mean()


class IntervalObjective(_DistillBase):
    """Conffusion fine-tune (Horwitz & Hoshen 2022): pinball(lower, y; q_lo) + pinball(upper, y; q_hi)
    against real H&E y, with the IntervalNet initialised from the teacher."""

    kind = INTERVAL_KIND

    def __init__(self, preset: Preset, channels: int, device: torch.device, amp: Amp, teacher: Teacher,
                 quantiles: tuple[float, float]):
        t = build_network(preset, channels)
        t.load_state_dict(teacher.tensors)
        super().__init__(preset, channels, device, amp, interval_from_teacher(t, preset, channels))
        self.quantiles = quantiles

    def _bounds(self, net: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cond, y = self._cond(batch["af"]), self._in(batch["he"])
        with self.amp.autocast():
            lo, hi = net(cond, bounds=True)
        return lo.float(), hi.float(), y

    def _loss(self, lo: torch.Tensor, hi: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return pinball(lo, y, self.quantiles[0]) + pinball(hi, y, self.quantiles[1])

    def train_step(self, batch: Batch, gen: torch.Generator) -> dict[str, float]:
        lo, hi, y = self._bounds(self.train_nets["net"], batch)
        loss = self._loss(lo, hi, y)
        norm = self.amp.step(loss, self.optimizers["net"], self.nets["net"].parameters(), self.preset.train.grad_clip)
        return {"loss": float(loss.detach()), "grad_norm": norm}

    @torch.no_grad()
    def val_step(self, batch: Batch, gen: torch.Generator) -> dict[str, float]:
        lo, hi, y = self._bounds(self.inference_net, batch)
        lo, hi = lo.clamp(-1, 1), hi.clamp(-1, 1)
        inside = ((y >= lo) & (y <= hi)).float().mean()
        return {"loss": float(self._loss(lo, hi, y)), "coverage": float(inside),
                "width_255": float((hi - lo).mean()) * 127.5}

    @torch.no_grad()
    def predict(self, batch: Batch, gen: torch.Generator) -> torch.Tensor:
        lo, hi, _ = self._bounds(self.inference_net, batch)
        return (0.5 * (lo + hi)).clamp(-1, 1)

    def export(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.inference_net.unet.state_dict().items()}


# ----------------------------------------------------------------------------- the command


def distill_preset(teacher: Teacher, options: DistillOptions, total: int, student_steps: int | None) -> Preset:
    """The teacher's preset with the distillation's ``train`` section (what the loop runs and config.json keeps)."""
    p, o = teacher.preset, options
    name = f"{p.name}-intervals" if o.intervals else f"{p.name}-distill{student_steps}"
    desc = (f"Conffusion interval fine-tune of {p.name}" if o.intervals
            else f"{p.name} progressively distilled to {student_steps} DDIM steps")
    train = dataclasses.replace(p.train, steps=total, batch_size=o.batch_size, lr=o.lr, warmup_steps=0,
                                ema_decay=o.ema_decay, checkpoint_every=o.checkpoint_every,
                                val_every=o.phase_steps, log_every=o.log_every, val_batches=o.val_batches,
                                sample_count=o.sample_count, seed=o.seed, workers=0,
                                # the last EMA student: val losses of different phases (K) are not comparable
                                keep="last")
    diffusion = p.diffusion
    if not o.intervals:
        diffusion = dataclasses.replace(diffusion, sampler="ddim", sample_steps=student_steps)
    try:
        train.check()
    except ValueError as e:
        raise InputError(f"invalid distillation option: {e}") from None
    return dataclasses.replace(p, name=name, description=desc, train=train, diffusion=diffusion,
                               source=f"distilled from {teacher.path}")


def _plan(teacher: Teacher, options: DistillOptions) -> tuple[list[Phase], int, int | None]:
    """(phases, total steps, K) of a distillation; InputError for impossible step counts."""
    o = options
    if o.intervals:
        return [Phase(1, 0, 0, 0, o.phase_steps)], o.phase_steps, None
    T = teacher.preset.diffusion.timesteps
    n0 = o.teacher_steps if o.teacher_steps is not None else (teacher.steps or DEFAULT_TEACHER_STEPS)
    if teacher.steps is not None and n0 != teacher.steps:
        raise InputError(f"--teacher-steps {n0}: the teacher is a {teacher.steps}-step distilled run", teacher.path)
    if not 2 <= n0 <= T:
        raise InputError(f"--teacher-steps must be between 2 and the teacher's {T} timesteps, got {n0}")
    try:
        phases = phase_plan(n0, o.steps, o.phase_steps)
    except ValueError as e:
        raise InputError(f"--steps {o.steps}: {e}") from None
    return phases, phases[-1].end, o.steps


def distill_config(teacher: Teacher, options: DistillOptions, preset: Preset, phases: list[Phase],
                   info: DatasetInfo, dist: Dist, precision: str) -> dict[str, Any]:
    """config.json of a distilled run (a resume must match it but for provenance)."""
    o = options
    runtime = {"device": str(dist.device), "precision": precision, "world_size": dist.world_size}
    block: dict[str, Any] = {
        "method": o.method,
        "teacher": {"preset": teacher.preset.name, "kind": "diffusion", "step": teacher.step,
                    "steps": teacher.steps, "weights": fingerprint(teacher.path / run_folder.WEIGHTS)},
        "train_steps": phases[-1].end,
        "phase_steps": o.phase_steps,
        "batch_size": o.batch_size, "lr": o.lr, "ema_decay": o.ema_decay, "seed": o.seed,
    }
    if o.intervals:
        d = preset.diffusion
        t = interval_timestep(d.build_schedule(), d.prediction)
        block.update({"quantiles": list(o.quantiles), "timestep": t, "network_calls": 1,
                      "output": "lower = c - exp(s), upper = c + exp(s); [-1, 1]",
                      "loss": "pinball (quantile) loss against real H&E of the train split"})
    else:
        T = preset.diffusion.timesteps
        block.update({"steps": o.steps, "teacher_steps": phases[0].teacher_steps, "network_calls": o.steps,
                      "sampler": "ddim", "eta": 0.0, "timesteps": timesteps(T, o.steps),
                      "phases": [p.to_dict() for p in phases],
                      "loss": f"{preset.diffusion.prediction}-MSE to the two-DDIM-step teacher target"})
    inputs = {"teacher": {"path": str(teacher.path), **fingerprint(teacher.path / run_folder.CONFIG)},
              "teacher weights": fingerprint(teacher.path / run_folder.WEIGHTS),
              "dataset.json": fingerprint(info.root / "dataset.json")}
    return {
        "format": run_folder.RUN_FORMAT,
        "format_version": 1,
        "preset": preset.to_dict(),
        "preset_source": teacher.config.get("preset_source", ""),
        "kind": INTERVAL_KIND if o.intervals else "diffusion",
        "channels": teacher.channels,
        "tile_size": teacher.tile_size,
        "dataset": {**info.fingerprint(), "af_normalization": {"low": teacher.af_low.tolist(),
                                                                "high": teacher.af_high.tolist()}},
        "distill": block,
        "runtime": runtime,
        "provenance": record(runtime, inputs),
    }


def open_distill_dataset(teacher: Teacher, data: str | Path | None) -> DatasetInfo:
    """The dataset to distil on (default: the teacher's), read with the teacher's AF normalisation."""
    root = data if data is not None else teacher.config.get("dataset", {}).get("root")
    if root is None:
        raise InputError("the teacher's config names no dataset; pass --data", teacher.path / run_folder.CONFIG)
    info = open_dataset(root)
    meta = info.root / "dataset.json"
    if info.channels != teacher.channels:
        raise InputError(f"dataset has {info.channels} AF channels but the teacher was trained on "
                         f"{teacher.channels}", meta)
    if info.tile_size != teacher.tile_size:
        raise InputError(f"dataset has {info.tile_size} px tiles but the teacher was trained on "
                         f"{teacher.tile_size} px", meta)
    return dataclasses.replace(info, af_low=teacher.af_low, af_high=teacher.af_high)


def distill(
    teacher: str | Path,
    out: str | Path,
    options: DistillOptions | None = None,
    *,
    data: str | Path | None = None,
    device: str = "auto",
    resume: bool = True,
    force: bool = False,
    progress: Progress | None = None,
) -> TrainResult:
    """Distil the diffusion run folder ``teacher`` into the run folder ``out``.

    Progressive (``options.steps`` = K network calls per window) or, with
    ``options.intervals``, the one-call interval run. Trains on the train split of
    ``data`` (default: the teacher's dataset). Resumes from ``out/state.pt`` when the
    folder holds the same config; SIGINT/SIGTERM checkpoint and raise Interrupted.
    """
    options = options or DistillOptions()
    options.check()
    progress = progress or NullProgress()
    out = Path(out)
    t = read_teacher(teacher)
    phases, total, k = _plan(t, options)
    info = open_distill_dataset(t, data)
    preset = distill_preset(t, options, total, k)
    check_dataset(info, preset)
    dist = Dist.from_env(device)  # InputError for an unusable --device
    try:
        return _distill(t, options, preset, phases, info, out, dist, resume=resume, force=force, progress=progress)
    finally:
        dist.close()


def _distill(teacher: Teacher, options: DistillOptions, preset: Preset, phases: list[Phase], info: DatasetInfo,
             out: Path, dist: Dist, *, resume: bool, force: bool, progress: Progress) -> TrainResult:
    if preset.train.batch_size % dist.world_size:
        raise InputError(f"batch size {preset.train.batch_size} does not split evenly over {dist.world_size} "
                         "processes")
    precision, warnings = resolve_precision(preset.train.precision, dist.device)
    config = distill_config(teacher, options, preset, phases, info, dist, precision)
    mode = open_run_folder(out, config, dist, warnings, progress, resume=resume, force=force)
    amp = Amp(precision, dist.device)
    seeding.seed_torch(seeding.train_seed(options.seed, 0, 0, seeding.INIT))
    if options.intervals:
        obj: Objective = IntervalObjective(preset, info.channels, dist.device, amp, teacher, options.quantiles)
    else:
        obj = ProgressiveObjective(preset, info.channels, dist.device, amp, teacher, phases)
    start = 0
    if mode == "resume":
        state = checkpoint.load_state(out / checkpoint.STATE, map_location=dist.device)
        try:
            obj.load_state_dict(state["objective"])
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise InputError(f"distillation state does not fit the run ({e})", out / checkpoint.STATE) from None
        checkpoint.set_rng_state(state.get("rng", {}))
        start = int(state["step"])
        if dist.is_main:
            run_folder.truncate_metrics(out, start)
    if dist.is_main:
        what = "interval fine-tune" if options.intervals else (
            f"progressive distillation {phases[0].teacher_steps} -> {options.steps} steps in {len(phases)} phases")
        where = f"resumed at step {start}" if mode == "resume" else "starting at step 0"
        prog.info(progress, f"{preset.name}: {what} of {preset.train.steps} steps, {where}")
    dist.barrier()
    obj.wrap(dist.wrap)
    result = TrainResult(out=out, step=start, start_step=start)
    if start >= preset.train.steps:
        result.weights = out / checkpoint.WEIGHTS
        return result
    loop = _Loop(preset, info, out, dist, obj, progress, start)
    loop.run()
    result.step, result.val, result.weights = preset.train.steps, loop.last_val, out / checkpoint.WEIGHTS
    return result
