"""Ghost BatchNorm (model.bn_groups): equal to running each chunk on its own replica, as DataParallel did."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dualref.models.reid_net import GhostBatchNorm, ReidNet, convert_ghost_batchnorm


def test_ghost_bn_normalises_each_chunk_with_its_own_statistics() -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
    ghost = GhostBatchNorm(copy.deepcopy(bn), groups=4)
    x = torch.randn(8, 3, 5, 4) * 3 + 1
    expected = torch.cat([copy.deepcopy(bn)(chunk) for chunk in x.chunk(4)])
    torch.testing.assert_close(ghost(x), expected)
    # Running statistics follow the first chunk only (DataParallel's first replica owns the buffers).
    first = copy.deepcopy(bn)
    first(x[:2])
    torch.testing.assert_close(ghost.running_mean, first.running_mean)
    torch.testing.assert_close(ghost.running_var, first.running_var)
    assert ghost.state_dict().keys() == bn.state_dict().keys()
    ghost.eval()
    torch.testing.assert_close(ghost(x), first.eval()(x))  # eval mode: the ordinary running-stats BN


def test_ghost_bn_reidnet_equals_per_chunk_replicas_in_output_and_gradient() -> None:
    torch.manual_seed(0)
    plain = ReidNet("tiny", num_classes=5)
    ghost = copy.deepcopy(plain)
    convert_ghost_batchnorm(ghost, 2)
    assert sum(isinstance(m, GhostBatchNorm) for m in ghost.modules()) == sum(
        isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d) for m in plain.modules()
    )
    assert not ghost.neck.bias.requires_grad  # the frozen BN-neck shift stays frozen
    x = torch.randn(8, 3, 32, 16)
    out = ghost.train()(x)
    replicas = [copy.deepcopy(plain).train() for _ in range(2)]
    pieces = [replica(chunk) for replica, chunk in zip(replicas, x.chunk(2), strict=True)]
    torch.testing.assert_close(out.logits, torch.cat([p.logits for p in pieces]))
    torch.testing.assert_close(out.pooled, torch.cat([p.pooled for p in pieces]))
    # The gradient of a loss over the whole batch is the sum of the replicas' gradients (DataParallel's
    # reduce), parameter by parameter.
    out.logits.square().sum().backward()
    sum(p.logits.square().sum() for p in pieces).backward()
    for (name, param), *others in zip(
        ghost.named_parameters(), *(r.parameters() for r in replicas), strict=True
    ):
        if param.grad is None:
            continue
        total = sum(o.grad for o in others if o.grad is not None)
        torch.testing.assert_close(param.grad, total, msg=name)


def test_bn_groups_option_and_errors() -> None:
    model = ReidNet("tiny", num_classes=3, bn_groups=4)
    assert model.options["bn_groups"] == 4
    assert isinstance(model.neck, GhostBatchNorm)
    with pytest.raises(ValueError, match="bn_groups=4"):
        model.train()(torch.randn(6, 3, 32, 16))
    with pytest.raises(ValueError, match="bn_groups"):
        convert_ghost_batchnorm(nn.Sequential(nn.BatchNorm1d(2)), 0)
