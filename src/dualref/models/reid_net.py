"""ReidNet: trunk -> global average pooling -> BatchNorm neck (frozen bias) -> bias-free classifier.

docs/method.md §2. In training the network returns a `ReidOutput` (the pre-BN pooled feature
for the source triplet loss, the BN-neck feature, and logits on the un-normalised BN-neck feature);
in evaluation it returns the L2-normalised BN-neck feature. The paper's "BN followed by ReLU" is
``neck_relu=True``; the reference code has no ReLU there (the default).

Ghost BatchNorm (``bn_groups=G``): in train mode every BatchNorm layer normalises G equal consecutive
chunks of the batch with their own statistics, which is what the authors' 4-GPU `nn.DataParallel` did
(each GPU's replica saw 16 of the 64 images). As with DataParallel, the running statistics follow the
first chunk only (the replica on the first GPU shares the module's buffers; the others' updates are lost).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dualref.models.backbone import build_backbone

CLASSIFIER_PREFIX = "classifier."


class ReidOutput(NamedTuple):
    """Training-mode output of `ReidNet`."""

    pooled: Tensor  # [B, D] global-average-pooled trunk feature, before the BN neck
    bn: Tensor  # [B, D] BN-neck output (after the optional neck ReLU), not normalised
    logits: Tensor  # [B, C] classifier scores computed from `bn`


class ReidNet(nn.Module):
    """Re-ID network of the reference: trunk, GAP, BN neck with frozen bias, bias-free classifier.

    Args:
        arch: Trunk name, one of `dualref.models.backbone.ARCHS`.
        num_classes: Classifier outputs C (source identities, or target clusters).
        pretrained: None, "imagenet" or a local state-dict path (see `build_backbone`).
        last_stride: 1 (reference) or 2; see `build_backbone`.
        stem_relu: Restore the ReLU after the ResNet stem (reference: False).
        neck_relu: Apply a ReLU after the BN neck, as the paper describes (reference: False).
        bn_groups: G of ghost BatchNorm (1: ordinary BatchNorm over the whole batch).

    Attributes:
        feat_dim: D, the feature dimension (2048 for resnet50, 1280 for mobilenet_v2, 256 for tiny).
        num_classes: Current number of classifier outputs.
    """

    def __init__(
        self,
        arch: str,
        num_classes: int,
        *,
        pretrained: str | Path | None = None,
        last_stride: int = 1,
        stem_relu: bool = False,
        neck_relu: bool = False,
        bn_groups: int = 1,
    ) -> None:
        super().__init__()
        _check_num_classes(num_classes)
        self.arch = arch
        # The constructor's options, stored in checkpoints so inference can rebuild the network.
        self.options = {
            "last_stride": last_stride,
            "stem_relu": stem_relu,
            "neck_relu": neck_relu,
            "bn_groups": bn_groups,
        }
        self.backbone = build_backbone(
            arch, pretrained=pretrained, last_stride=last_stride, stem_relu=stem_relu
        )
        self.feat_dim: int = self.backbone.out_channels
        self.neck = nn.BatchNorm1d(self.feat_dim)
        nn.init.ones_(self.neck.weight)
        nn.init.zeros_(self.neck.bias)
        # The reference freezes the neck's shift so that the BN feature stays centred (BNNeck).
        self.neck.bias.requires_grad_(False)
        self.neck_relu = neck_relu
        self.num_classes = num_classes
        self.classifier = _new_classifier(self.feat_dim, num_classes, self.neck.weight)
        if bn_groups > 1:
            convert_ghost_batchnorm(self, bn_groups)

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Pooled and BN-neck features.

        Args:
            x: [B, 3, H, W] images (any memory format).

        Returns:
            pooled [B, D] (pre-BN GAP feature) and bn [B, D] (BN neck, then the optional ReLU).
        """
        pooled = F.adaptive_avg_pool2d(self.backbone(x), 1).flatten(1)  # [B, D]
        bn = self.neck(pooled)
        if self.neck_relu:
            bn = F.relu(bn)
        return pooled, bn

    def forward(self, x: Tensor) -> ReidOutput | Tensor:
        """Train mode: `ReidOutput`; eval mode: [B, D] L2-normalised BN-neck features."""
        pooled, bn = self.forward_features(x)
        if not self.training:
            return F.normalize(bn, dim=1)
        return ReidOutput(pooled=pooled, bn=bn, logits=self.classifier(bn))

    def reset_classifier(self, num_classes: int, weight: Tensor | None = None) -> None:
        """Replace the classifier by a new bias-free one with `num_classes` outputs.

        The new layer lives on the old one's device and dtype. Optimizers holding the old parameter
        must be rebuilt (the reference creates a fresh Adam every epoch anyway).

        Args:
            num_classes: New number of outputs C.
            weight: Optional [C, D] initial rows (e.g. L2-normalised cluster centroids); otherwise
                normal init with std 0.001.
        """
        _check_num_classes(num_classes)
        old = self.classifier.weight
        if weight is not None and tuple(weight.shape) != (num_classes, self.feat_dim):
            raise ValueError(
                f"classifier weight has shape {tuple(weight.shape)}; "
                f"expected ({num_classes}, {self.feat_dim})"
            )
        self.classifier = _new_classifier(self.feat_dim, num_classes, old)
        if weight is not None:
            with torch.no_grad():
                self.classifier.weight.copy_(weight)
        self.num_classes = num_classes


def load_trunk_and_neck(model: ReidNet, state_dict: Mapping[str, Tensor]) -> None:
    """Copy every parameter and buffer except the classifier from `state_dict` into `model`.

    Adaptation starts from a source checkpoint whose classifier has another size; the target model's
    classifier keeps its own initialisation. Any other difference is an error.

    Args:
        model: The network to fill.
        state_dict: A `ReidNet.state_dict()` of the same arch (classifier keys ignored).

    Raises:
        ValueError: Keys missing, unexpected, or of a different shape (names listed).
    """
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(CLASSIFIER_PREFIX)}
    given = {k: v for k, v in state_dict.items() if not k.startswith(CLASSIFIER_PREFIX)}
    missing = sorted(own.keys() - given.keys())
    unexpected = sorted(given.keys() - own.keys())
    wrong_shape = sorted(
        f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in given.items()
        if k in own and v.shape != own[k].shape
    )
    if missing or unexpected or wrong_shape:
        raise ValueError(
            "state dict does not match the network outside the classifier: "
            f"missing {missing[:8]}, unexpected {unexpected[:8]}, wrong shape {wrong_shape[:8]} "
            f"({len(missing)}, {len(unexpected)}, {len(wrong_shape)} in all)"
        )
    result = model.load_state_dict(given, strict=False)
    assert all(k.startswith(CLASSIFIER_PREFIX) for k in result.missing_keys), result


def _check_num_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")


def _new_classifier(feat_dim: int, num_classes: int, like: Tensor) -> nn.Linear:
    classifier = nn.Linear(feat_dim, num_classes, bias=False, device=like.device, dtype=like.dtype)
    nn.init.normal_(classifier.weight, std=0.001)
    return classifier


class GhostBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose train-mode statistics come from `groups` equal consecutive chunks of the batch.

    Equal to `groups`-GPU `nn.DataParallel` (each replica normalises its own shard). The running
    statistics are updated from the first chunk only, as DataParallel's first replica does. Same
    parameters, buffers and state-dict keys as the BatchNorm it replaces; eval mode is unchanged.
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, groups: int) -> None:
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        self.groups = groups
        self._dims = 2 if isinstance(bn, nn.BatchNorm1d) else 4
        self.load_state_dict(bn.state_dict())
        if bn.affine:
            self.weight.requires_grad_(bn.weight.requires_grad)
            self.bias.requires_grad_(bn.bias.requires_grad)
        self.to(device=bn.weight.device if bn.affine else None)

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != self._dims:
            raise ValueError(f"expected {self._dims}-D input to ghost BatchNorm, got {input.dim()}-D")

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or self.groups == 1:
            return super().forward(input)
        if input.shape[0] % self.groups:
            raise ValueError(
                f"batch of {input.shape[0]} images cannot be split into model.bn_groups={self.groups} "
                "equal chunks; expected a batch size divisible by it"
            )
        chunks = input.chunk(self.groups, dim=0)
        out = [super().forward(chunks[0])]  # updates the running statistics
        for chunk in chunks[1:]:
            out.append(
                F.batch_norm(chunk, None, None, self.weight, self.bias, True, 0.0, self.eps)
            )
        return torch.cat(out, dim=0)


def convert_ghost_batchnorm(module: nn.Module, groups: int) -> nn.Module:
    """Replace every BatchNorm1d/2d inside `module` by a `GhostBatchNorm` over `groups` chunks, in place."""
    if groups < 1:
        raise ValueError(f"bn_groups={groups!r}; expected >= 1")
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm1d | nn.BatchNorm2d):
            setattr(module, name, GhostBatchNorm(child, groups))
        else:
            convert_ghost_batchnorm(child, groups)
    return module
