"""ReidNet: train/eval outputs, BN neck and classifier init, classifier reset, state transfer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dualref.models import ReidNet, ReidOutput, load_trunk_and_neck


def _images(batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 3, 64, 32, generator=torch.Generator().manual_seed(0))


def test_train_mode_returns_record_with_shapes() -> None:
    torch.manual_seed(0)
    model = ReidNet("tiny", num_classes=7).train()
    out = model(_images())
    assert isinstance(out, ReidOutput)
    assert tuple(out.pooled.shape) == (4, 256) and tuple(out.bn.shape) == (4, 256)
    assert tuple(out.logits.shape) == (4, 7)
    # Classifier is bias-free and reads the un-normalised BN output.
    torch.testing.assert_close(out.logits, out.bn @ model.classifier.weight.T)
    # Train-mode BN neck with weight 1, bias 0 standardises each dimension over the batch.
    torch.testing.assert_close(out.bn.mean(0), torch.zeros(256), atol=1e-5, rtol=0)
    assert model.feat_dim == 256 and model.num_classes == 7


def test_eval_mode_returns_normalised_bn_feature() -> None:
    torch.manual_seed(0)
    model = ReidNet("tiny", num_classes=3)
    model.train()(_images(8))  # move the running statistics away from their init
    model.eval()
    features = model(_images())
    assert isinstance(features, torch.Tensor)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(4))
    _, bn = model.forward_features(_images())
    torch.testing.assert_close(features, F.normalize(bn, dim=1))


def test_neck_and_classifier_initialisation() -> None:
    torch.manual_seed(0)
    model = ReidNet("tiny", num_classes=500)
    assert torch.equal(model.neck.weight, torch.ones(256))
    assert torch.equal(model.neck.bias, torch.zeros(256))
    assert not model.neck.bias.requires_grad and model.neck.weight.requires_grad
    assert model.classifier.bias is None
    std = model.classifier.weight.std().item()
    assert 0.0009 < std < 0.0011, std  # 128 000 N(0, 0.001) draws


def test_neck_relu_variant() -> None:
    torch.manual_seed(0)
    plain = ReidNet("tiny", num_classes=3).train()
    assert (plain(_images()).bn < 0).any()
    relu = ReidNet("tiny", num_classes=3, neck_relu=True).train()
    assert (relu(_images()).bn >= 0).all()


def test_frozen_bias_gets_no_gradient() -> None:
    torch.manual_seed(0)
    model = ReidNet("tiny", num_classes=3).train()
    out = model(_images())
    (out.logits.sum() + out.bn.pow(2).sum()).backward()
    assert model.neck.bias.grad is None
    assert model.neck.weight.grad is not None


def test_reset_classifier_with_and_without_weight() -> None:
    torch.manual_seed(0)
    model = ReidNet("tiny", num_classes=3).to(torch.float64)
    centroids = F.normalize(torch.randn(5, 256, dtype=torch.float64), dim=1)
    model.reset_classifier(5, weight=centroids)
    assert model.num_classes == 5
    assert model.classifier.weight.dtype == torch.float64
    torch.testing.assert_close(model.classifier.weight.detach(), centroids)
    assert model.classifier.weight.requires_grad
    model.reset_classifier(2)
    assert tuple(model.classifier.weight.shape) == (2, 256) and model.classifier.bias is None
    with pytest.raises(ValueError, match=r"\(4, 256\)"):
        model.reset_classifier(4, weight=centroids)
    with pytest.raises(ValueError, match="num_classes"):
        model.reset_classifier(0)


def test_load_trunk_and_neck_skips_classifier_only() -> None:
    torch.manual_seed(0)
    source = ReidNet("tiny", num_classes=10).train()
    source(_images())  # non-trivial running statistics
    target = ReidNet("tiny", num_classes=4)
    classifier_before = target.classifier.weight.detach().clone()
    load_trunk_and_neck(target, source.state_dict())
    for key, value in source.state_dict().items():
        if not key.startswith("classifier."):
            assert torch.equal(target.state_dict()[key], value), key
    assert torch.equal(target.classifier.weight, classifier_before)


def test_load_trunk_and_neck_rejects_other_arch() -> None:
    source = ReidNet("tiny", num_classes=4)
    target = ReidNet("mobilenet_v2", num_classes=4)
    with pytest.raises(ValueError, match="missing"):
        load_trunk_and_neck(target, source.state_dict())
    wrong = dict(source.state_dict())
    wrong["neck.weight"] = torch.ones(3)
    with pytest.raises(ValueError, match=r"neck\.weight"):
        load_trunk_and_neck(ReidNet("tiny", num_classes=2), wrong)


def test_channels_last_gives_same_output() -> None:
    torch.manual_seed(0)
    model = ReidNet("tiny", num_classes=3).eval()
    images = _images()
    expected = model(images)
    model = model.to(memory_format=torch.channels_last)
    got = model(images.to(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_bad_num_classes() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        ReidNet("tiny", num_classes=0)
