"""Model presets: dataclasses read from TOML, by name (``models/NAME.toml``) or path.

A preset file has top-level ``name``, ``kind`` and ``description`` and one table
per section; which sections a kind takes is in ``SECTIONS``. Unknown keys, wrong
types and out-of-range values are InputErrors naming the file.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from vstain_cli.errors import InputError

KINDS = ("diffusion", "regression", "pix2pix", "stainnet")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
KEEP = ("last", "best-val")  # which weights a run exports: the last step's, or those of its best validation


@dataclass
class UNetConfig:
    """The UNet of nets/unet.py: one down block per ``channel_mults`` entry.

    Level ``i < len(channel_mults)`` is down block ``i`` (tile / 2**i); level
    ``len(channel_mults)`` is the middle block. ``attention_levels`` get one
    attention layer each (and one in the mirrored up block with ``attention_up``).
    """

    base_channels: int = 64
    channel_mults: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4, 4])
    num_res_blocks: int = 2
    attention_levels: list[int] = field(default_factory=list)
    attention_heads: int = 1
    attention_up: bool = False
    dropout: float = 0.0

    # Keys of the UNet layout before sec. 4.1 (five downsamplings, attention after every
    # residual block): a run made with it cannot be loaded, its weights do not fit.
    RETIRED_KEYS: typing.ClassVar[dict[str, str]] = {
        "mid_attention": "written for vstain's UNet before it followed the paper's sec. 4.1 (five "
        "downsamplings, attention after every residual layer); a run made with it has weights that do not fit "
        "the current network: retrain it (in a preset, give the middle block's attention as level "
        "len(channel_mults) of attention_levels)",
    }

    def check(self) -> None:
        _positive(self, "base_channels", "num_res_blocks", "attention_heads")
        if not self.channel_mults or any(m < 1 for m in self.channel_mults):
            raise ValueError("channel_mults must be a non-empty list of positive integers")
        n = len(self.channel_mults)
        bad = [lv for lv in self.attention_levels if not 0 <= lv <= n]
        if bad:
            raise ValueError(f"attention_levels {bad} outside 0..{n} (level {n} is the middle block)")
        if len(set(self.attention_levels)) != len(self.attention_levels):
            raise ValueError("attention_levels lists a level twice")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1)")
        for lv in self.attention_levels:
            if (self.base_channels * self.channel_mults[min(lv, n - 1)]) % self.attention_heads:
                raise ValueError(f"level {lv} channels do not split into {self.attention_heads} heads")


@dataclass
class DiffusionConfig:
    """Noise process, objective and the validation sampler (diffusion/)."""

    timesteps: int = 1000
    schedule: str = "cosine"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction: str = "eps"
    loss: str = "l2"
    prior: bool = False
    prior_min_frac: float = 0.25
    prior_max_frac: float = 0.75
    prior_empty_prob: float = 0.25
    sampler: str = "ddim"
    sample_steps: int = 50

    def check(self) -> None:
        from vstain_cli.diffusion.denoiser import PREDICTIONS
        from vstain_cli.diffusion.samplers import SAMPLERS
        from vstain_cli.diffusion.schedule import SCHEDULES

        _positive(self, "timesteps", "sample_steps")
        _choice(self, "schedule", SCHEDULES)
        _choice(self, "prediction", PREDICTIONS)
        _choice(self, "loss", ("l1", "l2"))
        _choice(self, "sampler", SAMPLERS)
        if self.timesteps < 2 or self.sample_steps > self.timesteps:
            raise ValueError("need 2 <= timesteps and sample_steps <= timesteps")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError("need 0 < beta_start < beta_end < 1")
        if not 0 < self.prior_min_frac <= self.prior_max_frac <= 1 or not 0 <= self.prior_empty_prob <= 1:
            raise ValueError("prior fractions must satisfy 0 < min <= max <= 1, empty_prob in [0, 1]")

    def build_schedule(self):
        """The noise schedule these settings describe (diffusion.schedule.Schedule)."""
        from vstain_cli.diffusion.schedule import Schedule

        return Schedule.make(self.schedule, self.timesteps, self.beta_start, self.beta_end)


@dataclass
class RegressionConfig:
    """The regression baseline: the UNet without noise input."""

    loss: str = "l1"

    def check(self) -> None:
        _choice(self, "loss", ("l1", "l2"))


@dataclass
class Pix2PixConfig:
    """pix2pix after Rivenson et al. 2019 (see docs/models.md for the exact loss)."""

    lambda_adv: float = 1.0
    lambda_l1: float = 100.0
    lambda_rot: float = 50.0
    disc_channels: int = 64
    disc_layers: int = 3
    disc_lr: float | None = None

    def check(self) -> None:
        _positive(self, "disc_channels", "disc_layers")
        if min(self.lambda_adv, self.lambda_l1, self.lambda_rot) < 0:
            raise ValueError("loss weights must be >= 0")
        if self.disc_lr is not None and self.disc_lr <= 0:
            raise ValueError("disc_lr must be > 0")


@dataclass
class StainNetConfig:
    """The H&E patch classifier whose features define FSD."""

    n_classes: int = 4
    base_channels: int = 32
    depth: int = 4
    feature_dim: int = 256
    dropout: float = 0.2
    label_smoothing: float = 0.0
    hed_scale: float = 0.0  # stain augmentation (data/augment.py): HED densities x U(1 -+ hed_scale)
    hed_shift: float = 0.0  # ... + U(-+ hed_shift) log10 OD

    def check(self) -> None:
        _positive(self, "n_classes", "base_channels", "depth", "feature_dim")
        if self.n_classes < 2:
            raise ValueError("n_classes must be >= 2")
        if not 0.0 <= self.hed_scale < 1.0 or self.hed_shift < 0.0:
            raise ValueError("need 0 <= hed_scale < 1 and hed_shift >= 0")


@dataclass
class TrainConfig:
    """The training loop (train/loop.py); ``steps`` may grow on resume."""

    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    ema_decay: float = 0.9999
    grad_clip: float = 1.0
    precision: str = "auto"
    channels_last: bool = True
    checkpoint_every: int = 1000
    val_every: int = 1000
    log_every: int = 50
    val_batches: int = 4
    sample_count: int = 8
    seed: int = 0
    workers: int = 0
    keep: str = "last"   # "best-val": export the weights of the validation with the lowest val loss

    def check(self) -> None:
        _positive(self, "steps", "batch_size", "checkpoint_every", "val_every", "log_every")
        _choice(self, "precision", PRECISIONS)
        _choice(self, "keep", KEEP)
        if self.keep == "best-val" and self.val_batches == 0:
            raise ValueError('keep = "best-val" needs val_batches > 0')
        if self.lr <= 0:
            raise ValueError("lr must be > 0")
        if min(self.warmup_steps, self.val_batches, self.sample_count, self.workers, self.seed) < 0:
            raise ValueError("warmup_steps, val_batches, sample_count, workers and seed must be >= 0")
        if not 0.0 <= self.ema_decay < 1.0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("need 0 <= ema_decay < 1, grad_clip >= 0, weight_decay >= 0")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError("adam_betas must be two numbers in [0, 1)")


SECTION_TYPES: dict[str, type] = {
    "model": UNetConfig,
    "diffusion": DiffusionConfig,
    "regression": RegressionConfig,
    "pix2pix": Pix2PixConfig,
    "stainnet": StainNetConfig,
    "train": TrainConfig,
}
SECTIONS: dict[str, tuple[str, ...]] = {
    "diffusion": ("model", "diffusion", "train"),
    "regression": ("model", "regression", "train"),
    "pix2pix": ("model", "pix2pix", "train"),
    "stainnet": ("stainnet", "train"),
}


@dataclass
class Preset:
    """A fully resolved model preset."""

    name: str
    kind: str
    train: TrainConfig
    description: str = ""
    model: UNetConfig | None = None
    diffusion: DiffusionConfig | None = None
    regression: RegressionConfig | None = None
    pix2pix: Pix2PixConfig | None = None
    stainnet: StainNetConfig | None = None
    source: str = field(default="", compare=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (what config.json stores); absent sections omitted."""
        d: dict[str, Any] = {"name": self.name, "kind": self.kind, "description": self.description}
        for sec in SECTIONS[self.kind]:
            d[sec] = dataclasses.asdict(getattr(self, sec))
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> Preset:
        """Build and check a preset from plain data; InputError names ``source``."""
        data = dict(data)
        try:
            name = _typed(data.pop("name", Path(source).stem), str, "name")
            kind = _typed(data.pop("kind", None), str, "kind")
            description = _typed(data.pop("description", ""), str, "description")
            if kind not in KINDS:
                raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
            allowed = SECTIONS[kind]
            extra = sorted(set(data) - set(allowed))
            if extra:
                raise ValueError(f"unknown section(s) {extra} for kind {kind!r} (allowed: {', '.join(allowed)})")
            sections = {sec: _section(SECTION_TYPES[sec], data.get(sec, {}), sec) for sec in allowed}
            for obj in sections.values():
                obj.check()
        except ValueError as e:
            raise InputError(f"invalid preset: {e}", source) from None
        return cls(name=name, kind=kind, description=description, source=source, **sections)

    def with_train(self, **overrides: Any) -> Preset:
        """A copy with some ``train`` fields replaced (None values ignored), re-checked."""
        kw = {k: v for k, v in overrides.items() if v is not None}
        train = dataclasses.replace(self.train, **kw)
        try:
            train.check()
        except ValueError as e:
            raise InputError(f"invalid training option: {e}") from None
        return dataclasses.replace(self, train=train)


def _positive(obj: Any, *names: str) -> None:
    for n in names:
        if getattr(obj, n) <= 0:
            raise ValueError(f"{n} must be > 0")


def _choice(obj: Any, name: str, choices: tuple[str, ...]) -> None:
    if getattr(obj, name) not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {getattr(obj, name)!r}")


def _typed(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against a simple annotation (int, float, str, bool, list[x], x | None)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _typed(value, inner, where)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} must be a list")
        return [_typed(v, inner, f"{where}[]") for v in value]
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (str, bool) and isinstance(value, tp):
        return value
    raise ValueError(f"{where} must be {getattr(tp, '__name__', tp)}, got {value!r}")


def _section(cls: type, table: Any, name: str) -> Any:
    if not isinstance(table, dict):
        raise ValueError(f"[{name}] must be a table")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    retired = getattr(cls, "RETIRED_KEYS", {})
    old = sorted(set(table) & set(retired))
    if old:
        raise ValueError(f"[{name}] {old[0]}: {retired[old[0]]}")
    unknown = sorted(set(table) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in [{name}] (known: {', '.join(sorted(known))})")
    return cls(**{k: _typed(v, hints[k], f"{name}.{k}") for k, v in table.items()})


def list_presets() -> list[str]:
    """Names of the bundled presets."""
    root = importlib.resources.files("vstain_cli.presets")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".toml"))


def load_preset(name_or_path: str | Path) -> Preset:
    """Load a bundled preset by name, or a TOML file by path."""
    text_src = str(name_or_path)
    path = Path(text_src)
    if path.suffix == ".toml" or path.exists() or "/" in text_src:
        try:
            text = path.read_text()
        except OSError as e:
            raise InputError(f"cannot read preset ({e.strerror or e})", path) from None
        source = str(path)
    else:
        res = importlib.resources.files("vstain_cli.presets") / f"{text_src}.toml"
        if not res.is_file():
            raise InputError(f"unknown preset {text_src!r}; available: {', '.join(list_presets())}")
        text = res.read_text()
        source = f"models/{text_src}.toml"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"invalid TOML ({e})", source) from None
    return Preset.from_dict(data, source)
