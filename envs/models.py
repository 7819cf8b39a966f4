"""Model zoo: CIFAR-style networks and torchvision's ImageNet models by name.

* ``resnet18``: ResNet-18 with a 3x3 stride-1 stem and no max-pool (the usual CIFAR adaptation), BasicBlocks
  [2, 2, 2, 2]; 11.17M parameters for 3-channel input and 10 classes.
* ``resnet20`` / ``resnet56``: He et al. 2016's CIFAR ResNets (16-32-64 channels, 3n+... layers). Deviation: the
  down-sampling shortcut is a 1x1 projection (option B) instead of the parameter-free zero-padding (option A),
  because zero-padding is not a prunable op; this adds 2,752 parameters (0.272M and 0.856M in all).
* ``vgg16_bn``: VGG-16 with BatchNorm and one linear classifier (the CIFAR variant, 14.7M parameters); max-pools
  use ``ceil_mode`` so that 28x28 inputs survive five halvings.
* ``mobilenetv2``: torchvision's MobileNetV2 with CIFAR strides (stem stride 1, second stage stride 1), 2.24M.
* ``tv:<name>``: any torchvision classification model, e.g. ``tv:resnet50`` (random init; never downloaded).

Every model takes ``in_channels`` (1 for Fashion-MNIST) and ``num_classes``; ``width`` scales the channel counts
(tests use small widths).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

ZOO = ("resnet18", "resnet20", "resnet56", "vgg16_bn", "mobilenetv2")


def _ch(c: int, width: float) -> int:
    return max(4, int(round(c * width)))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu2(out + identity)


class CifarResNet(nn.Module):
    """ResNet for small images: 3x3 stem, no max-pool, global average pooling, one linear layer."""

    def __init__(
        self,
        stage_channels: list[int],
        blocks: list[int],
        num_classes: int = 10,
        in_channels: int = 3,
    ):
        super().__init__()
        c0 = stage_channels[0]
        self.conv1 = nn.Conv2d(in_channels, c0, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c0)
        self.relu = nn.ReLU(inplace=True)
        layers = []
        in_planes = c0
        for i, (c, n) in enumerate(zip(stage_channels, blocks)):
            stage = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                stage.append(BasicBlock(in_planes, c, stride))
                in_planes = c
            layers.append(nn.Sequential(*stage))
        self.num_stages = len(layers)
        for i, layer in enumerate(layers):  # torchvision-style names: layer1, layer2, ...
            setattr(self, f"layer{i + 1}", layer)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _resnet18(num_classes: int, in_channels: int, width: float) -> nn.Module:
    return CifarResNet([_ch(c, width) for c in (64, 128, 256, 512)], [2, 2, 2, 2], num_classes, in_channels)


def _cifar_resnet(depth: int) -> Callable[[int, int, float], nn.Module]:
    n = (depth - 2) // 6

    def build(num_classes: int, in_channels: int, width: float) -> nn.Module:
        return CifarResNet([_ch(c, width) for c in (16, 32, 64)], [n, n, n], num_classes, in_channels)

    return build


class VGG(nn.Module):
    CFG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for v in self.CFG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            else:
                c = _ch(int(v), width)
                layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
                c_in = c
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _vgg16_bn(num_classes: int, in_channels: int, width: float) -> nn.Module:
    return VGG(num_classes, in_channels, width)


def _mobilenetv2(num_classes: int, in_channels: int, width: float) -> nn.Module:
    from torchvision.models import MobileNetV2

    setting = [
        [1, 16, 1, 1], [6, 24, 2, 1], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]
    ]
    model = MobileNetV2(num_classes=num_classes, width_mult=width, inverted_residual_setting=setting)
    stem = model.features[0][0]
    model.features[0][0] = nn.Conv2d(in_channels, stem.out_channels, 3, 1, 1, bias=False)
    nn.init.kaiming_normal_(model.features[0][0].weight, mode="fan_out")
    return model


_BUILDERS: dict[str, Callable[[int, int, float], nn.Module]] = {
    "resnet18": _resnet18,
    "resnet20": _cifar_resnet(20),
    "resnet56": _cifar_resnet(56),
    "vgg16_bn": _vgg16_bn,
    "mobilenetv2": _mobilenetv2,
}


def known_models() -> list[str]:
    import torchvision

    return list(ZOO) + [f"tv:{n}" for n in torchvision.models.list_models(module=torchvision.models)]


def build_model(name: str, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    """Build a zoo model (random init). Unknown names raise ValueError listing the known ones."""
    if not (isinstance(width, (int, float)) and 0 < width <= 4):
        raise ValueError(f"width={width!r} must be a number in (0, 4]")
    if int(num_classes) < 2:
        raise ValueError(f"num_classes={num_classes!r} must be >= 2")
    if int(in_channels) < 1:
        raise ValueError(f"in_channels={in_channels!r} must be >= 1")
    if name in _BUILDERS:
        return _BUILDERS[name](int(num_classes), int(in_channels), float(width))
    if name.startswith("tv:"):
        import torchvision

        tv_name = name[3:]
        if tv_name in torchvision.models.list_models(module=torchvision.models):
            model = torchvision.models.get_model(tv_name, weights=None, num_classes=int(num_classes))
            if in_channels != 3:
                _replace_first_conv(model, int(in_channels))
            return model
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(ZOO)}, or 'tv:<name>' for torchvision's "
                     f"classification models ({', '.join(known_models()[len(ZOO):][:8])}, ...)")


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    for parent in model.modules():
        for cname, child in parent.named_children():
            if isinstance(child, nn.Conv2d) and child.in_channels == 3:
                new = nn.Conv2d(in_channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                                bias=child.bias is not None)
                setattr(parent, cname, new)
                return


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
