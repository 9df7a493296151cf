"""ArcFace face-recognition backbones: insightface ``arcface_torch`` IResNet (iresnet18/34/50/100/200).

Module and parameter names follow ``recognition/arcface_torch/backbones/iresnet.py`` exactly, so
the published ``backbone.pth`` state dicts (e.g. ``ms1mv3_arcface_r50_fp16/backbone.pth`` from the
arcface_torch model zoo) load with ``strict=True``. The network maps an aligned RGB face of
112x112 pixels in [-1, 1] (``(x / 255 - 0.5) / 0.5``) to a ``num_features``-d embedding; faces
are compared by the cosine of their embeddings. Inference only: the reference's training-time
pieces (dropout before ``fc``, fp16 autocast, gradient checkpointing) hold no weights and are
left out; in eval mode they change nothing.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["IRESNET_LAYERS", "IBasicBlock", "IResNet", "iresnet", "load_iresnet"]

IRESNET_LAYERS: dict[str, tuple[int, int, int, int]] = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
    "iresnet200": (6, 26, 60, 6),
}
"""Blocks per stage of each arcface_torch IResNet (its ``get_model`` names them r18 ... r200)."""

_EPS = 1e-05  # BatchNorm eps of the reference


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Pre-activation residual block: BN, conv3x3, BN, PReLU, conv3x3 (stride), BN, + shortcut."""

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=_EPS)
        self.conv1 = _conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=_EPS)
        self.prelu = nn.PReLU(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=_EPS)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class IResNet(nn.Module):
    """arcface_torch IResNet: a 3x3 stem, four stride-2 stages of :class:`IBasicBlock` (64, 128,
    256, 512 channels), then BN, flatten, ``fc`` to ``num_features`` and a BatchNorm1d
    (``features``). Takes ``[N, 3, 112, 112]`` faces in [-1, 1] (the 7x7 map after four stride-2
    stages is what ``fc`` expects) and returns unnormalised embeddings ``[N, num_features]``.
    """

    fc_scale = 7 * 7

    def __init__(self, layers: tuple[int, int, int, int], num_features: int = 512) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes, eps=_EPS)
        self.prelu = nn.PReLU(self.inplanes)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1])
        self.layer3 = self._make_layer(256, layers[2])
        self.layer4 = self._make_layer(512, layers[3])
        self.bn2 = nn.BatchNorm2d(512, eps=_EPS)
        self.fc = nn.Linear(512 * self.fc_scale, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=_EPS)
        # The reference's initialisation (what a random-init test model gets).
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0, 0.1)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)

    def _make_layer(self, planes: int, blocks: int) -> nn.Sequential:
        downsample = nn.Sequential(
            nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=2, bias=False),
            nn.BatchNorm2d(planes, eps=_EPS),
        )
        stage = [IBasicBlock(self.inplanes, planes, stride=2, downsample=downsample)]
        self.inplanes = planes
        stage += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def forward(self, x: Tensor) -> Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.bn2(x), 1)
        return self.features(self.fc(x))


def iresnet(arch: str, num_features: int = 512) -> IResNet:
    """A random-init IResNet named in :data:`IRESNET_LAYERS` (``iresnet50``: 43.59 M parameters)."""
    if arch not in IRESNET_LAYERS:
        raise ValueError(f"unknown ArcFace arch {arch!r}; choose one of {sorted(IRESNET_LAYERS)}")
    return IResNet(IRESNET_LAYERS[arch], num_features)


def load_iresnet(checkpoint: str | Path, arch: str = "iresnet50") -> IResNet:
    """The ``arch`` IResNet in eval mode with the state dict at ``checkpoint`` (strict keys, on CPU).

    The file is read with ``torch.load(weights_only=True)`` (tensors only, no pickled code); an
    arcface_torch ``backbone.pth`` is such a plain state dict. ``num_features`` comes from the
    file's ``fc.weight``.
    """
    state_dict = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, dict) or "fc.weight" not in state_dict:
        raise ValueError(
            f"{checkpoint} is not an arcface_torch IResNet state dict (no 'fc.weight'); "
            "expected a backbone.pth from the arcface_torch model zoo"
        )
    model = iresnet(arch, num_features=state_dict["fc.weight"].shape[0])
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{checkpoint} does not match arch {arch!r}: {exc}") from exc
    return model.eval()
