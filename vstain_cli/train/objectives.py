"""What one training step means for each model kind; the loop (loop.py) is shared.

An Objective owns its networks, optimizers and (optional) EMA, and knows how to
take a step, validate, predict a sample grid and export inference weights.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vstain_cli.data.augment import hed_jitter
from vstain_cli.data.loader import dihedral
from vstain_cli.diffusion.denoiser import Denoiser
from vstain_cli.diffusion.losses import diffusion_loss, pixel_loss
from vstain_cli.diffusion.prior import empty_prior, random_rect_prior
from vstain_cli.diffusion.samplers import sample
from vstain_cli.train.ema import EMA
from vstain_cli.train.networks import build_discriminators, build_network
from vstain_cli.train.precision import Amp
from vstain_cli.train.presets import Preset

Batch = dict[str, torch.Tensor]


def _adam(params, lr: float, preset: Preset) -> torch.optim.Optimizer:
    t = preset.train
    opt = torch.optim.AdamW(params, lr=lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay)
    for g in opt.param_groups:
        g["base_lr"] = lr
    return opt


class Objective:
    """Base: one main network ``net`` (+ EMA), one optimizer."""

    kind = ""
    fields: tuple[str, ...] = ("af", "he")

    def __init__(self, preset: Preset, channels: int, device: torch.device, amp: Amp):
        self.preset, self.channels, self.device, self.amp = preset, channels, device, amp
        self.channels_last = preset.train.channels_last and preset.kind != "stainnet"
        self.nets: dict[str, nn.Module] = {"net": self._to(build_network(preset, channels))}
        self.optimizers: dict[str, torch.optim.Optimizer] = {
            "net": _adam(self.nets["net"].parameters(), preset.train.lr, preset)
        }
        decay = preset.train.ema_decay
        self.ema = EMA(self.nets["net"], decay) if decay > 0 and preset.kind != "stainnet" else None
        self.train_nets: dict[str, nn.Module] = dict(self.nets)

    def _to(self, m: nn.Module) -> nn.Module:
        m = m.to(self.device)
        return m.to(memory_format=torch.channels_last) if self.channels_last else m

    def _in(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x

    def wrap(self, wrapper: Callable[[nn.Module], nn.Module]) -> None:
        """Wrap the trained networks (e.g. in DistributedDataParallel)."""
        self.train_nets = {k: wrapper(m) for k, m in self.nets.items()}

    @property
    def inference_net(self) -> nn.Module:
        """The network predictions are made with: EMA weights when kept."""
        return self.ema.model if self.ema is not None else self.nets["net"]

    def train(self, mode: bool = True) -> None:
        for m in self.nets.values():
            m.train(mode)

    def after_step(self, step: int) -> None:
        if self.ema is not None:
            self.ema.update(self.nets["net"], step)

    def export(self) -> dict[str, torch.Tensor]:
        """Inference weights (weights.safetensors)."""
        return {k: v.detach().cpu().contiguous() for k, v in self.inference_net.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "nets": {k: m.state_dict() for k, m in self.nets.items()},
            "ema": self.ema.model.state_dict() if self.ema is not None else None,
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "amp": self.amp.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, m in self.nets.items():
            m.load_state_dict(state["nets"][k])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.model.load_state_dict(state["ema"])
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        self.amp.load_state_dict(state.get("amp") or {})

    # Per kind -----------------------------------------------------------------
    def train_step(self, batch: Batch, gen: torch.Generator) -> dict[str, float]:
        raise NotImplementedError

    @torch.no_grad()
    def val_step(self, batch: Batch, gen: torch.Generator) -> dict[str, float]:
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, batch: Batch, gen: torch.Generator) -> torch.Tensor | None:
        """RGB predictions in [-1, 1] for a sample grid (None: no images)."""
        return None


class DiffusionObjective(Objective):
    """Conditional DDPM (Palette/SR3): AF (+ masked prior) concatenated to x_t."""

    kind = "diffusion"

    def __init__(self, preset: Preset, channels: int, device: torch.device, amp: Amp):
        super().__init__(preset, channels, device, amp)
        self.schedule = preset.diffusion.build_schedule()

    def _cond(self, af: torch.Tensor, he: torch.Tensor | None, gen: torch.Generator | None) -> torch.Tensor:
        d = self.preset.diffusion
        if not d.prior:
            return af
        if he is None:  # inference: fully masked prior
            return torch.cat([af, empty_prior(af)], dim=1)
        prior = random_rect_prior(he, gen, d.prior_min_frac, d.prior_max_frac, d.prior_empty_prob)
        return torch.cat([af, self._in(prior)], dim=1)

    def _loss(self, net: nn.Module, batch: Batch, gen: torch.Generator) -> torch.Tensor:
        d = self.preset.diffusion
        af, he = self._in(batch["af"]), self._in(batch["he"])
        cond = self._cond(af, he, gen)
        with self.amp.autocast():
            return diffusion_loss(Denoiser(net, d.prediction), he, cond, self.schedule, loss=d.loss, generator=gen)

    def train_step(self, batch: Batch, gen: torch.Generator) -> dict[str, float]:
        loss = self._loss(self.train_nets["net"], batch, gen)
        norm = self.amp.step(loss, self.optimizers["net"], self.nets["net"].parameters(), self.preset.train.grad_clip)
        return {"loss": float(loss.detach()), "grad_norm": norm}

    @torch.no_grad()
    def val_step(self, batch: Batch, gen: torch.Generator) -> dict[str, float]:
        return {"loss": float(self._loss(self.inference_net, batch, gen))}

    @torch.no_grad()
    def predict(self, batch: Batch, gen: torch.Generator) -> torch.Tensor:
        d = self.preset.diffusion
        af = self._in(batch["af"])
        cond = self._cond(af, None, None)
        x_T = torch.randn((af.shape[0], 3, *af.shape[-2:]), generator=gen, device=gen.device).to(self.device)
        net = self.inference_net

        def model(x, t, c):
            with self.amp.autocast():
                return net(self._in(x), t, c).float()

        return sample(Denoiser(model, d.prediction), x_T, self.schedule, cond, sampler=d.sampler,
                      steps=d.sample_steps, generator=gen)


class RegressionObjective(Objective):
    """The UNet without noise input, trained with L1 (or L2) to the target."""

    kind = "regression"

    def _loss(self, net: nn.Module, batch: Batch) -> torch.Tensor:
        af, he = self._in(batch["af"]), self._in(batch["he"])
        with self.amp.autocast():
            pred = net(af)
        return pixel_loss(pred.float(), he, self.preset.regression.loss)

    def train_step(self, batch: Batch, gen: torch.Generator) -> dict[str, float]:
        loss = self._loss(self.train_nets["net"], batch)
        norm = self.amp.step(loss, self.optimizers["net"], self.nets["net"].parameters(), self.preset.train.grad_clip)
        return {"loss": float(loss.detach()), "grad_norm": norm}

    @torch.no_grad()
    def val_step(self, batch: Batch, gen: torch.Generator) -> dict[str, float]:
        return {"loss": float(self._loss(self.inference_net, batch))}

    @torch.no_grad()
    def predict(self, batch: Batch, gen: torch.Generator) -> torch.Tensor:
        with self.amp.autocast():
            return self.inference_net(self._in(batch["af"])).float().clamp(-1, 1)


class Pix2PixObjective(RegressionObjective):
    """pix2pix after Rivenson et al. 2019 with a least-squares GAN (Mao et al. 2017).

    D_c sees (AF, RGB), D_u sees RGB. With G(x) the generator, y the target and R
    a random quarter turn (k in 1..3, per step):
      L_D = 1/2 [(D(real) - 1)^2 + D(fake)^2] for each of D_c, D_u
      L_G = l_adv/2 [(D_c(x, G(x)) - 1)^2 + (D_u(G(x)) - 1)^2]
            + l_1 |G(x) - y| + l_rot |R^-1 G(R x) - y|
    The rotated L1 asks for the same stain of a rotated input (rotation
    equivariance), which tissue has; see docs/models.md.
    """

    kind = "pix2pix"

    def __init__(self, preset: Preset, channels: int, device: torch.device, amp: Amp):
        super().__init__(preset, channels, device, amp)
        d_cond, d_uncond = build_discriminators(preset, channels)
        self.nets["d_cond"] = self._to(d_cond)
        self.nets["d_uncond"] = self._to(d_uncond)
        params = list(self.nets["d_cond"].parameters()) + list(self.nets["d_uncond"].parameters())
        self.optimizers["disc"] = _adam(params, preset.pix2pix.disc_lr or preset.train.lr, preset)
        self.train_nets = dict(self.nets)

    def train_step(self, batch: Batch, gen: torch.Generator) -> dict[str, float]:
        p, clip = self.preset.pix2pix, self.preset.train.grad_clip
        af, he = self._in(batch["af"]), self._in(batch["he"])
        k = int(torch.randint(1, 4, (1,), generator=gen, device=gen.device))
        b = af.shape[0]
        with self.amp.autocast():
            both = self.train_nets["net"](torch.cat([af, self._in(dihedral(af, k))], dim=0)).float()
        fake, fake_rot = both[:b], dihedral(both[b:], k, inverse=True)

        # Discriminators: one forward each over [real; fake] (one DDP pass).
        with self.amp.autocast():
            real_fake = torch.cat([he, fake.detach()], dim=0)
            dc = self.train_nets["d_cond"](torch.cat([torch.cat([af, af], 0), real_fake], dim=1)).float()
            du = self.train_nets["d_uncond"](real_fake).float()
        d_loss = 0.5 * sum(
            F.mse_loss(s[:b], torch.ones_like(s[:b])) + F.mse_loss(s[b:], torch.zeros_like(s[b:])) for s in (dc, du)
        )
        d_params = [q for k_ in ("d_cond", "d_uncond") for q in self.nets[k_].parameters()]
        self.amp.step(d_loss, self.optimizers["disc"], d_params, clip)

        # Generator: frozen (unwrapped) discriminators, gradients reach G only.
        for q in d_params:
            q.requires_grad_(False)
        try:
            with self.amp.autocast():
                sc = self.nets["d_cond"](torch.cat([af, fake], dim=1)).float()
                su = self.nets["d_uncond"](fake).float()
            adv = 0.5 * (F.mse_loss(sc, torch.ones_like(sc)) + F.mse_loss(su, torch.ones_like(su)))
            l1 = F.l1_loss(fake, he)
            l1_rot = F.l1_loss(fake_rot, he)
            g_loss = p.lambda_adv * adv + p.lambda_l1 * l1 + p.lambda_rot * l1_rot
            norm = self.amp.step(g_loss, self.optimizers["net"], self.nets["net"].parameters(), clip)
        finally:
            for q in d_params:
                q.requires_grad_(True)
        logs = {"loss": g_loss, "d_loss": d_loss, "adv": adv, "l1": l1, "l1_rot": l1_rot}
        return {"grad_norm": norm, **{k: float(v.detach()) for k, v in logs.items()}}

    @torch.no_grad()
    def val_step(self, batch: Batch, gen: torch.Generator) -> dict[str, float]:
        af, he = self._in(batch["af"]), self._in(batch["he"])
        with self.amp.autocast():
            pred = self.inference_net(af).float()
        return {"loss": float(F.l1_loss(pred, he))}


class StainNetObjective(Objective):
    """Cross-entropy classification of real H&E patches into slide labels.

    Training patches get H&E stain augmentation (``data/augment.hed_jitter``,
    ``[stainnet] hed_scale/hed_shift``), so the classifier, and the FSD features
    it defines, separate slides by tissue rather than by their stain colour.
    """

    kind = "stainnet"
    fields = ("he", "label")

    def _logits(self, net: nn.Module, batch: Batch, gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self._in(batch["he"]), batch["label"].to(self.device)
        if gen is not None:
            s = self.preset.stainnet
            x = hed_jitter(x, s.hed_scale, s.hed_shift, gen)
        with self.amp.autocast():
            return net(x).float(), y

    def train_step(self, batch: Batch, gen: torch.Generator) -> dict[str, float]:
        logits, y = self._logits(self.train_nets["net"], batch, gen)
        loss = F.cross_entropy(logits, y, label_smoothing=self.preset.stainnet.label_smoothing)
        norm = self.amp.step(loss, self.optimizers["net"], self.nets["net"].parameters(), self.preset.train.grad_clip)
        acc = float((logits.argmax(1) == y).float().mean())
        return {"loss": float(loss.detach()), "grad_norm": norm, "accuracy": acc}

    @torch.no_grad()
    def val_step(self, batch: Batch, gen: torch.Generator) -> dict[str, Any]:
        logits, y = self._logits(self.inference_net, batch)
        n = self.preset.stainnet.n_classes
        pred = logits.argmax(1)
        conf = np.zeros((n, n), np.int64)
        np.add.at(conf, (y.cpu().numpy(), pred.cpu().numpy()), 1)
        return {"loss": float(F.cross_entropy(logits, y)), "confusion": conf}


OBJECTIVES: dict[str, type[Objective]] = {
    "diffusion": DiffusionObjective,
    "regression": RegressionObjective,
    "pix2pix": Pix2PixObjective,
    "stainnet": StainNetObjective,
}


def build_objective(preset: Preset, channels: int, device: torch.device, amp: Amp) -> Objective:
    """The Objective for a preset's kind."""
    return OBJECTIVES[preset.kind](preset, channels, device, amp)
