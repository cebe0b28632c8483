"""Convolutional trunks of the re-ID network: torchvision ResNets, MobileNetV2 and a tiny test net.

A trunk maps images [B, 3, H, W] to a feature map [B, C, h, w]; pooling and the neck live in
`reid_net.py`. Parameter names follow torchvision (``conv1.*``, ``layer4.*``, ``features.*``), so
torchvision state dicts load into the trunks directly, minus their classification heads.

Reference quirks (docs/method.md §2), both the default here:

* **Last stride 1**: the first block of the last stage does not downsample, so a 256x128 input gives
  a 16x8 map instead of 8x4. For ResNets this is ``layer4[0]`` (its strided conv and its downsample
  shortcut). The same option is applied to MobileNetV2 (the depthwise conv of ``features[14]``, its
  last stride-2 block) and to the tiny net (its last stage); ``last_stride=2`` keeps the usual strides.
* **No ReLU after the ResNet stem**: the reference chains conv1, bn1, maxpool, layer1.. and omits
  torchvision's ReLU after bn1 (inherited from MMT). ``stem_relu=True`` restores it. MobileNetV2's stem
  is a Conv-BN-ReLU6 block inside ``features[0]`` and is kept as torchvision builds it (the quirk is a
  ResNet one); ``stem_relu`` must then stay False. The tiny net always has its stem ReLU.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torchvision.models as tvm
from torch import Tensor, nn

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2", "tiny")

# Keys of a torchvision classification model that are not part of a trunk.
HEAD_PREFIXES = ("fc.", "classifier.")



class Trunk(nn.Module):
    """Base of the trunks: maps [B, 3, H, W] images to a [B, out_channels, h, w] feature map."""

    out_channels: int


_RESNETS = {
    "resnet18": (tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (tvm.resnet34, tvm.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V1),
    "resnet101": (tvm.resnet101, tvm.ResNet101_Weights.IMAGENET1K_V1),
}


class ResNetTrunk(Trunk):
    """torchvision ResNet without its pooling and classifier; optional stem ReLU (reference: none)."""

    def __init__(self, net: tvm.ResNet, *, stem_relu: bool) -> None:
        super().__init__()
        self.conv1 = net.conv1
        self.bn1 = net.bn1
        self.maxpool = net.maxpool
        self.layer1 = net.layer1
        self.layer2 = net.layer2
        self.layer3 = net.layer3
        self.layer4 = net.layer4
        self.stem_relu = stem_relu
        last_block = net.layer4[-1]
        self.out_channels: int = (
            last_block.bn3.num_features
            if isinstance(last_block, tvm.resnet.Bottleneck)
            else last_block.bn2.num_features
        )

    def forward(self, x: Tensor) -> Tensor:
        """[B, 3, H, W] images -> [B, C, H/16 or H/32, ...] feature map."""
        x = self.bn1(self.conv1(x))
        if self.stem_relu:
            x = torch.relu(x)
        x = self.maxpool(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class MobileNetV2Trunk(Trunk):
    """torchvision MobileNetV2 ``features`` (ends with the 1x1 conv to 1280 channels + BN + ReLU6)."""

    def __init__(self, net: tvm.MobileNetV2) -> None:
        super().__init__()
        self.features = net.features
        self.out_channels: int = net.last_channel

    def forward(self, x: Tensor) -> Tensor:
        """[B, 3, H, W] images -> [B, 1280, h, w] feature map."""
        return self.features(x)


def _conv_bn(in_channels: int, out_channels: int, stride: int, kernel_size: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            bias=False,
        ),
        nn.BatchNorm2d(out_channels),
    )


class TinyBlock(nn.Module):
    """Basic residual block: two 3x3 conv-BN with a ReLU between, projected shortcut when needed."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv_bn(in_channels, out_channels, stride),
            nn.ReLU(inplace=True),
            _conv_bn(out_channels, out_channels, 1),
        )
        self.shortcut: nn.Module = (
            _conv_bn(in_channels, out_channels, stride, kernel_size=1)
            if stride != 1 or in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class TinyTrunk(Trunk):
    """A small ResNet-like net for tests, the demo and CPU smoke runs (about 1.2 M parameters).

    Stem conv 3x3 stride 2 (32 channels) + BN + ReLU, then four stages of one basic block each with
    widths 32-64-128-256 and strides 2-2-2-``last_stride``: total stride 16 (last_stride 1) or 32.
    A 128x64 input gives an 8x4 map; a 64x32 input 4x2.
    """

    def __init__(self, *, last_stride: int) -> None:
        super().__init__()
        widths = (32, 64, 128, 256)
        strides = (2, 2, 2, last_stride)
        self.stem = nn.Sequential(_conv_bn(3, widths[0], 2), nn.ReLU(inplace=True))
        blocks = []
        in_channels = widths[0]
        for width, stride in zip(widths, strides, strict=True):
            blocks.append(TinyBlock(in_channels, width, stride))
            in_channels = width
        self.stages = nn.Sequential(*blocks)
        self.out_channels: int = widths[-1]
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        """[B, 3, H, W] images -> [B, 256, H/16 or H/32, ...] feature map."""
        return self.stages(self.stem(x))


def _set_resnet_last_stride(net: tvm.ResNet, last_stride: int) -> None:
    block = net.layer4[0]
    # torchvision's Bottleneck (ResNet v1.5) strides its 3x3 conv2; BasicBlock strides conv1.
    strided = block.conv2 if isinstance(block, tvm.resnet.Bottleneck) else block.conv1
    strided.stride = (last_stride, last_stride)
    if block.downsample is not None:
        block.downsample[0].stride = (last_stride, last_stride)


def _set_mobilenet_last_stride(net: tvm.MobileNetV2, last_stride: int) -> None:
    # features[14] is the last inverted-residual block with stride 2 (96 -> 160 channels); its stride
    # sits in the depthwise 3x3 conv, conv[1][0]. It has no residual shortcut, so nothing else changes.
    depthwise = net.features[14].conv[1][0]
    depthwise.stride = (last_stride, last_stride)


def build_backbone(
    arch: str,
    *,
    pretrained: str | Path | None = None,
    last_stride: int = 1,
    stem_relu: bool = False,
) -> Trunk:
    """Build a trunk by name, optionally with ImageNet weights.

    Args:
        arch: One of `ARCHS`.
        pretrained: None (random init), "imagenet" (torchvision's weights API; downloads on first
            use), or the path of a local state-dict file in torchvision's key layout (see
            `load_backbone_weights`).
        last_stride: Stride of the last downsampling stage, 1 (reference) or 2.
        stem_relu: Apply torchvision's ReLU after the ResNet stem (reference: False). Only valid for
            ResNets.

    Returns:
        A `Trunk` (``out_channels`` attribute) mapping [B, 3, H, W] to [B, out_channels, h, w].
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    if last_stride not in (1, 2):
        raise ValueError(f"last_stride must be 1 or 2, got {last_stride!r}")
    if stem_relu and not arch.startswith("resnet"):
        raise ValueError(
            f"stem_relu=True only applies to ResNets (their reference stem lacks the ReLU); "
            f"arch {arch!r} keeps its own stem"
        )
    imagenet = isinstance(pretrained, str) and pretrained == "imagenet"
    trunk: Trunk
    if arch in _RESNETS:
        constructor, weights = _RESNETS[arch]
        resnet = constructor(weights=weights if imagenet else None)
        _set_resnet_last_stride(resnet, last_stride)
        trunk = ResNetTrunk(resnet, stem_relu=stem_relu)
    elif arch == "mobilenet_v2":
        mobilenet = tvm.mobilenet_v2(
            weights=tvm.MobileNet_V2_Weights.IMAGENET1K_V1 if imagenet else None
        )
        _set_mobilenet_last_stride(mobilenet, last_stride)
        trunk = MobileNetV2Trunk(mobilenet)
    else:
        if imagenet:
            raise ValueError("arch 'tiny' has no ImageNet weights; use pretrained=None or a file path")
        trunk = TinyTrunk(last_stride=last_stride)
    if pretrained is not None and not imagenet:
        load_backbone_weights(trunk, pretrained)
    return trunk


def load_backbone_weights(trunk: nn.Module, path: str | Path) -> None:
    """Load a local state-dict file into a trunk, with a strict check of the trunk's keys.

    Classification-head keys (``fc.*``, ``classifier.*``) in the file are ignored, so a full
    torchvision model's state dict and a trunk-only one both load. Every other key must match the
    trunk exactly (``num_batches_tracked`` buffers may be absent, as in older files).

    Args:
        trunk: The module to fill (e.g. from `build_backbone`).
        path: A file written by ``torch.save(state_dict)``.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: The file is not a state dict, or keys are missing, unexpected or of another shape.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    state = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES)}
    expected = trunk.state_dict()
    missing = sorted(
        k for k in expected.keys() - state.keys() if not k.endswith("num_batches_tracked")
    )
    unexpected = sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match the {type(trunk).__name__} trunk: "
            f"missing keys {_abbreviate(missing)}, unexpected keys {_abbreviate(unexpected)}"
        )
    wrong_shape = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if v.shape != expected[k].shape
    ]
    if wrong_shape:
        raise ValueError(f"{path} has tensors of the wrong shape: {_abbreviate(wrong_shape)}")
    trunk.load_state_dict(state, strict=False)


def _abbreviate(items: list[str], limit: int = 8) -> str:
    if len(items) <= limit:
        return str(items)
    return f"{items[:limit]} ... ({len(items)} in all)"
