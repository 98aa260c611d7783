"""The FID InceptionV3, in plain PyTorch (no torchvision), for pool3 features.

Reference implementation: pytorch-fid (M. Seitzer), ``src/pytorch_fid/inception.py``:
``fid_inception_v3`` = torchvision's ``Inception3(num_classes=1008, aux_logits=False)``
with the TensorFlow-FID patches ``FIDInceptionA/C/E_1/E_2`` (average pools that do
not count padding; max pool in the last block). Module names equal the state-dict
keys of pytorch-fid's weights file ``pt_inception-2015-12-05-6726825d.pth`` (ported
from TensorFlow's ``inception-2015-12-05``), so that file loads with strict keys.

Parameter count: 23,850,960 (= torchvision's 27,161,264 for Inception3 with the
aux head and 1000 classes, minus the 3,326,696 of the aux head, plus 16,392 for the
8 extra classes of the 1008-way ``fc``). The ``fc`` layer is kept only so the file
loads strictly; FID uses the 2048-d pool3 features before it.

Preprocessing is exactly pytorch-fid's ``InceptionV3(resize_input=True,
normalize_input=True)``: input in [0, 1], ``F.interpolate(size=(299, 299),
mode="bilinear", align_corners=False)``, then ``2 * x - 1``. Nothing is downloaded:
the user passes the weights file.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vstain_cli.errors import InputError

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
N_PARAMS = 23_850_960
FEATURE_DIM = 2048


class BasicConv2d(nn.Module):
    """Conv (no bias) + BatchNorm(eps=1e-3) + ReLU, as torchvision's."""

    def __init__(self, cin: int, cout: int, **kw) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_tf(x: torch.Tensor) -> torch.Tensor:
    # FID patch: TensorFlow's average pool does not count the zero padding.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    """Inception-A (35x35) block, FID variant (pytorch-fid ``FIDInceptionA``)."""

    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (torchvision ``InceptionB``, unchanged in FID)."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, bd, bp], 1)


class FIDInceptionC(nn.Module):
    """Inception-C (17x17, factorised 7x7) block, FID variant (``FIDInceptionC``)."""

    def __init__(self, cin: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        bd = self.branch7x7dbl_3(self.branch7x7dbl_2(bd))
        bd = self.branch7x7dbl_5(self.branch7x7dbl_4(bd))
        bp = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (torchvision ``InceptionD``, unchanged in FID)."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(b7)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], 1)


class FIDInceptionE(nn.Module):
    """Inception-E (8x8) block; ``max_pool`` selects ``FIDInceptionE_2`` (Mixed_7c).

    FIDInceptionE_1 pools with a TF-style average; FIDInceptionE_2 uses a 3x3 max
    pool (a quirk of the TensorFlow graph that pytorch-fid reproduces).
    """

    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        if self.max_pool:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _avg_pool_tf(x)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, bd, bp], 1)


class FIDInceptionV3(nn.Module):
    """pytorch-fid's ``fid_inception_v3`` network; ``forward`` gives pool3 (N, 2048).

    ``forward`` takes images in [0, 1] (N, 3, H, W) and applies pytorch-fid's
    preprocessing (bilinear resize to 299x299, align_corners=False; then 2x - 1).
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # unused for FID; present so weights load strictly
        self.eval()
        self.requires_grad_(False)

    @staticmethod
    def preprocess(x: torch.Tensor) -> torch.Tensor:
        """pytorch-fid's resize_input + normalize_input: [0, 1] -> 299x299 in [-1, 1]."""
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return 2 * x - 1

    def pool3(self, x: torch.Tensor) -> torch.Tensor:
        """Network body on preprocessed input (N, 3, 299, 299) -> (N, 2048)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool3(self.preprocess(x))

    @torch.no_grad()
    def features_uint8(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 RGB (N, 3, H, W) -> pool3 features (N, 2048) float32.

        Like pytorch-fid's ImagePathDataset (PIL image -> ToTensor), pixels are
        divided by 255 before ``forward``.
        """
        dev = next(self.parameters()).device
        x = images.to(dev, non_blocking=True).float() / 255.0
        return self(x).float()


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise InputError(
            f"Inception weights file not found (FID needs pytorch-fid's {FID_WEIGHTS_NAME}; "
            "nothing is downloaded)",
            path,
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any parse failure means "not a weights file"
        raise InputError(f"not a weights file ({type(e).__name__}: {str(e).splitlines()[0][:200]})", path) from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise InputError("not a weights file (expected a dict of tensors)", path)
    return sd


def load_fid_inception(path: str | Path, device: str | torch.device = "cpu") -> FIDInceptionV3:
    """Build the FID InceptionV3 and load its weights (``.pth`` or ``.safetensors``).

    ``.pth`` files are read with ``torch.load(weights_only=True)``: no code is ever
    unpickled. BatchNorm ``num_batches_tracked`` buffers may be present or absent.
    Errors name the file and the first missing, unexpected or mis-shaped key.
    """
    path = Path(path)
    sd = _read_state_dict(path)
    model = FIDInceptionV3()
    ref = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    sd = {k.removeprefix("module."): v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    for k, v in ref.items():
        if k not in sd:
            raise InputError(f"not FID Inception weights: missing key {k!r} ({len(sd)} keys in file)", path)
        if tuple(sd[k].shape) != tuple(v.shape):
            raise InputError(
                f"not FID Inception weights: {k!r} has shape {tuple(sd[k].shape)}, "
                f"expected {tuple(v.shape)}",
                path,
            )
    extra = sorted(set(sd) - set(ref))
    if extra:
        raise InputError(f"not FID Inception weights: unexpected key {extra[0]!r}", path)
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    return model.to(device).eval()
