"""Open a trained run folder for inference (``stain``, ``uncertainty``, ``score``).

``load_run(path)`` reads ``config.json`` and ``weights.safetensors`` (no pickle)
and returns a ``Run``: the eval-mode network with its inference (EMA) weights,
the noise schedule, the prediction type, the AF normalisation of the training
data, and helpers to condition and translate AF tiles.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vstain_cli.data.store import normalize_af
from vstain_cli.diffusion.denoiser import Denoiser
from vstain_cli.diffusion.prior import empty_prior
from vstain_cli.diffusion.samplers import StepCallback, sample
from vstain_cli.diffusion.schedule import Schedule
from vstain_cli.errors import InputError, VstainError
from vstain_cli.infer.bundled import bundled_names, bundled_path
from vstain_cli.nets.stainnet import StainNet
from vstain_cli.provenance import read_format_json
from vstain_cli.train.checkpoint import WEIGHTS, load_weights
from vstain_cli.train.networks import build_network
from vstain_cli.train.presets import Preset
from vstain_cli.train.run_folder import CONFIG, RUN_FORMAT


@dataclass
class Run:
    """A trained model ready for inference."""

    path: Path
    config: dict[str, Any]
    preset: Preset
    kind: str
    channels: int
    tile_size: int
    step: int
    device: torch.device
    model: nn.Module
    schedule: Schedule | None = None
    prediction: str | None = None
    prior: bool = False
    classifier: StainNet | None = None
    af_low: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32), repr=False)
    af_high: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32), repr=False)
    distill: dict[str, Any] | None = None  # config.json's "distill" block of a `vstain distill` run

    @property
    def is_diffusion(self) -> bool:
        return self.kind == "diffusion"

    @property
    def network_calls(self) -> int | None:
        """Network calls per window by default: K of a distilled run, 1 of an interval or
        deterministic run, None for a diffusion run (the sampler decides)."""
        if self.distill is not None:
            return int(self.distill.get("network_calls", 1))
        return None if self.is_diffusion else 1

    @torch.no_grad()
    def interval(self, af: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised AF (B, C, H, W) -> (lower, upper) RGB in [-1, 1], lower <= upper, in one
        network call (interval runs of `vstain distill --intervals`; uncalibrated)."""
        if self.kind != "interval":
            raise VstainError(f"is a {self.kind} run; only an interval run (`vstain distill --intervals`) "
                              "gives bounds in one call", self.path)
        lo, hi = self.model(self.condition(af), bounds=True)
        return lo.float().clamp(-1.0, 1.0), hi.float().clamp(-1.0, 1.0)

    def normalize(self, af: np.ndarray) -> np.ndarray:
        """Raw AF (..., C, H, W) -> [-1, 1] with the training dataset's statistics."""
        if af.shape[-3] != self.channels:
            raise InputError(f"AF has {af.shape[-3]} channels but the model was trained on {self.channels}")
        return normalize_af(af, self.af_low, self.af_high)

    def condition(self, af: torch.Tensor) -> torch.Tensor:
        """Network conditioning for normalised AF (B, C, H, W): adds the fully
        masked prior of Diffusion-B/R."""
        af = af.to(self.device)
        return torch.cat([af, empty_prior(af)], dim=1) if self.prior else af

    @property
    def denoiser(self) -> Denoiser:
        """The network with its prediction parameterisation, as samplers call it (diffusion runs)."""
        return Denoiser(self.model, self.prediction or "eps")

    def canvas_denoiser(self, net) -> Denoiser:
        """Another raw network of this run's parameterisation (e.g. a window-fusing canvas model)."""
        return Denoiser(net, self.prediction or "eps")

    @torch.no_grad()
    def translate(
        self,
        af: torch.Tensor,
        *,
        sampler: str = "ddim",
        steps: int | None = None,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        callback: StepCallback | None = None,
    ) -> torch.Tensor:
        """Normalised AF (B, C, H, W) -> RGB in [-1, 1] (one sample for diffusion)."""
        if self.kind == "stainnet":
            raise VstainError("a StainNet run classifies H&E; it does not stain AF", self.path)
        cond = self.condition(af)
        if not self.is_diffusion:
            return self.model(cond).float().clamp(-1.0, 1.0)
        dev = generator.device if generator is not None else self.device
        x_T = torch.randn((af.shape[0], 3, *af.shape[-2:]), generator=generator, device=dev).to(self.device)
        return sample(self.denoiser, x_T, self.schedule, cond, sampler=sampler, steps=steps,
                      eta=eta, generator=generator, callback=callback)


def resolve_run(model: str | Path | Run, device: str = "auto") -> Run:
    """``model`` itself when already loaded, else the run folder loaded on the named device."""
    if isinstance(model, Run):
        return model
    from vstain_cli.runtime import resolve_device

    return load_run(model, resolve_device(device))


def _read_config(path: Path) -> dict[str, Any]:
    cfg_path = path / CONFIG
    if not path.is_dir():
        names = bundled_names()
        hint = f", or name a bundled run: {', '.join(names)}" if names else ""
        raise InputError(f"run folder not found (train one with `vstain train`{hint})", path)
    return read_format_json(cfg_path, RUN_FORMAT, missing=("not a vstain run (no config.json)", path),
                            corrupt="corrupt run config", wrong="not a vstain run config (format field missing)")


def load_run(path: str | Path, device: str | torch.device = "cpu") -> Run:
    """Load a run folder written by ``vstain train`` (or a bundled run by name); errors name the bad file."""
    path = bundled_path(path) or Path(path)
    cfg = _read_config(path)
    cfg_path = path / CONFIG
    try:
        preset = Preset.from_dict(cfg["preset"], source=str(cfg_path))
        channels = int(cfg["channels"])
        tile = int(cfg["tile_size"])
        norm = cfg["dataset"]["af_normalization"]
        low, high = np.asarray(norm["low"], np.float32), np.asarray(norm["high"], np.float32)
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"corrupt run config (bad or missing field {e})", cfg_path) from None
    if low.shape != (channels,) or high.shape != (channels,):
        raise InputError("corrupt run config (normalisation does not match channels)", cfg_path)

    tensors, meta = load_weights(path / WEIGHTS)
    if isinstance(cfg.get("distill"), dict):
        return _load_distilled(path, cfg, preset, channels, tile, low, high, tensors, meta, torch.device(device))
    if meta.get("kind", preset.kind) != preset.kind:
        raise InputError(f"weights are for a {meta.get('kind')} model, config says {preset.kind}", path / WEIGHTS)
    net = build_network(preset, channels)
    try:
        net.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise InputError(f"weights do not fit the run's config ({first[1].strip() if len(first) > 1 else e})",
                         path / WEIGHTS) from None
    dev = torch.device(device)
    net = net.to(dev).eval().requires_grad_(False)
    run = Run(
        path=path, config=cfg, preset=preset, kind=preset.kind, channels=channels, tile_size=tile,
        step=int(meta.get("step", 0)), device=dev, model=net, af_low=low, af_high=high,
    )
    if preset.kind == "diffusion":
        run.schedule = preset.diffusion.build_schedule()
        run.prediction = preset.diffusion.prediction
        run.prior = preset.diffusion.prior
    if preset.kind == "stainnet":
        run.classifier = net  # type: ignore[assignment]
    return run


def _load_distilled(path: Path, cfg: dict[str, Any], preset: Preset, channels: int, tile: int, low: np.ndarray,
                    high: np.ndarray, tensors: dict[str, torch.Tensor], meta: dict[str, str],
                    dev: torch.device) -> Run:
    """A `vstain distill` run: a K-step diffusion run on its respaced schedule, or an interval run."""
    from vstain_cli.train.distill import student_network

    student = student_network(cfg, preset, channels, tensors, meta, path)
    net = student.model.to(dev).eval().requires_grad_(False)
    run = Run(path=path, config=cfg, preset=preset, kind=student.kind, channels=channels, tile_size=tile,
              step=int(meta.get("step", 0)), device=dev, model=net, af_low=low, af_high=high,
              distill=cfg["distill"], prior=preset.diffusion.prior, prediction=preset.diffusion.prediction)
    run.schedule = student.schedule
    return run
