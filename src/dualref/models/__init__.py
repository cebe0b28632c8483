"""Re-ID network: torchvision trunks, BN neck and classifier."""

from dualref.models.backbone import ARCHS, build_backbone, load_backbone_weights
from dualref.models.reid_net import ReidNet, ReidOutput, load_trunk_and_neck

__all__ = [
    "ARCHS",
    "ReidNet",
    "ReidOutput",
    "build_backbone",
    "load_backbone_weights",
    "load_trunk_and_neck",
]
