"""Trunks: output shapes and strides, the reference quirks, local weight files with strict key checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision.models as tvm
from torch import nn

from dualref.models import build_backbone, load_backbone_weights
from dualref.models.backbone import MobileNetV2Trunk, ResNetTrunk

SHARED_WEIGHTS = Path(__file__).resolve().parents[2].parent / "shared" / "weights"


@pytest.mark.parametrize(
    ("arch", "last_stride", "channels", "map_size"),
    [
        ("tiny", 1, 256, (4, 2)),
        ("tiny", 2, 256, (2, 1)),
        ("resnet18", 1, 512, (4, 2)),
        ("resnet18", 2, 512, (2, 1)),
        ("mobilenet_v2", 1, 1280, (4, 2)),
        ("mobilenet_v2", 2, 1280, (2, 1)),
    ],
)
def test_output_channels_and_last_stride(
    arch: str, last_stride: int, channels: int, map_size: tuple[int, int]
) -> None:
    # 64x32 input: total stride 16 with last stride 1, 32 with last stride 2.
    trunk = build_backbone(arch, last_stride=last_stride).eval()
    with torch.no_grad():
        out = trunk(torch.randn(1, 3, 64, 32))
    assert trunk.out_channels == channels
    assert tuple(out.shape) == (1, channels, *map_size)


def test_bottleneck_last_stride_sits_in_conv2_and_shortcut() -> None:
    # torchvision's Bottleneck (ResNet v1.5) strides conv2, not conv1.
    trunk = build_backbone("resnet50", last_stride=1)
    assert isinstance(trunk, ResNetTrunk) and trunk.out_channels == 2048
    block = trunk.layer4[0]
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (1, 1)
    assert block.downsample[0].stride == (1, 1)
    assert build_backbone("resnet50", last_stride=2).layer4[0].conv2.stride == (2, 2)


def test_resnet_stem_has_no_relu_by_default() -> None:
    trunk = build_backbone("resnet18")
    assert isinstance(trunk, ResNetTrunk)
    stem_out = {}
    trunk.maxpool.register_forward_hook(lambda _m, inputs, _o: stem_out.update(x=inputs[0]))
    trunk.eval()(torch.randn(2, 3, 64, 32))
    assert (stem_out["x"] < 0).any(), "reference stem: bn1 output reaches maxpool without a ReLU"
    trunk.stem_relu = True
    trunk(torch.randn(2, 3, 64, 32))
    assert (stem_out["x"] >= 0).all()


def test_stem_relu_rejected_outside_resnets() -> None:
    with pytest.raises(ValueError, match="stem_relu"):
        build_backbone("mobilenet_v2", stem_relu=True)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"arch": "vgg16"}, "vgg16"), ({"arch": "tiny", "last_stride": 3}, "last_stride")],
)
def test_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_backbone(**kwargs)  # type: ignore[arg-type]


def test_tiny_has_no_imagenet_weights() -> None:
    with pytest.raises(ValueError, match="tiny"):
        build_backbone("tiny", pretrained="imagenet")


def _mobilenet_file(tmp_path: Path, with_classifier: bool) -> tuple[Path, dict[str, torch.Tensor]]:
    state = tvm.mobilenet_v2(weights=None).state_dict()
    if not with_classifier:
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    path = tmp_path / "mnv2.pth"
    torch.save(state, path)
    return path, state


@pytest.mark.parametrize("with_classifier", [True, False])
def test_local_file_loads_trunk(tmp_path: Path, with_classifier: bool) -> None:
    path, state = _mobilenet_file(tmp_path, with_classifier)
    trunk = build_backbone("mobilenet_v2", pretrained=path)
    assert isinstance(trunk, MobileNetV2Trunk)
    loaded = trunk.state_dict()
    for key in ("features.0.0.weight", "features.18.1.running_var"):
        torch.testing.assert_close(loaded[key], state[key], rtol=0, atol=0)


def test_missing_and_unexpected_keys_are_named(tmp_path: Path) -> None:
    path, state = _mobilenet_file(tmp_path, with_classifier=True)
    del state["features.3.conv.0.0.weight"]
    state["features.99.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"features\.3\.conv\.0\.0\.weight.*features\.99\.weight"):
        build_backbone("mobilenet_v2", pretrained=path)


def test_wrong_shape_is_named(tmp_path: Path) -> None:
    path, state = _mobilenet_file(tmp_path, with_classifier=False)
    state["features.0.0.weight"] = torch.zeros(1, 1, 1, 1)
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"features\.0\.0\.weight"):
        load_backbone_weights(build_backbone("mobilenet_v2"), path)


def test_arch_mismatch_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "r18.pth"
    torch.save(tvm.resnet18(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match="missing keys"):
        build_backbone("mobilenet_v2", pretrained=path)


def test_resnet_file_loads_with_fc_keys(tmp_path: Path) -> None:
    net = tvm.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(net.state_dict(), path)
    trunk = build_backbone("resnet18", pretrained=path)
    torch.testing.assert_close(trunk.state_dict()["layer4.1.conv2.weight"], net.layer4[1].conv2.weight)


def test_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.pth"):
        build_backbone("mobilenet_v2", pretrained=tmp_path / "nope.pth")


def test_non_state_dict_file_rejected(tmp_path: Path) -> None:
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match="state dict"):
        load_backbone_weights(nn.Linear(2, 2), path)


def test_shared_imagenet_mobilenet_file_loads() -> None:
    path = SHARED_WEIGHTS / "mobilenet_v2_imagenet.pth"
    if not path.is_file():
        pytest.skip(f"shared weights not available: {path} is absent")
    trunk = build_backbone("mobilenet_v2", pretrained=path)
    # ImageNet BN statistics are not the fresh-init ones (mean 0, var 1).
    assert not torch.allclose(trunk.state_dict()["features.0.1.running_var"], torch.ones(32))
