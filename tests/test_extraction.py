"""extract_features: dataset order, flip averaging, normalisation, mode restore, coverage checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from dualref.extraction import extract_features
from dualref.models import ReidNet


class _Images(Dataset[tuple[Tensor, int, int, int]]):
    def __init__(self, num_items: int) -> None:
        self.images = torch.randn(num_items, 3, 16, 8, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, int, int, int]:
        return self.images[index], index % 3, 0, index


class _LinearProbe(nn.Module):
    """Eval-mode output: an un-normalised linear map of the flattened image (records its calls)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3 * 16 * 8, 5)
        self.grad_enabled: list[bool] = []

    def forward(self, x: Tensor) -> Tensor:
        self.grad_enabled.append(torch.is_grad_enabled())
        return self.proj(x.flatten(1))


def test_rows_in_dataset_order_and_normalised(device: torch.device) -> None:
    torch.manual_seed(0)
    dataset = _Images(10)
    loader = DataLoader(dataset, batch_size=4, shuffle=True)  # rows arrive out of order
    model = _LinearProbe().to(device).train()
    features = extract_features(model, loader, device, progress=False)
    assert features.dtype == torch.float32 and features.device.type == "cpu"
    expected = F.normalize(model.proj(dataset.images.flatten(1).to(device)), dim=1).cpu()
    torch.testing.assert_close(features, expected.detach())
    assert model.training, "previous mode restored"
    assert model.grad_enabled and not any(model.grad_enabled)


def test_flip_averages_image_and_mirror(device: torch.device) -> None:
    torch.manual_seed(0)
    dataset = _Images(6)
    model = _LinearProbe().to(device)
    features = extract_features(model, DataLoader(dataset, batch_size=4), device, flip=True)
    images = dataset.images.to(device)
    with torch.no_grad():
        mean = model(images) + model(images.flip(3))
    torch.testing.assert_close(features, F.normalize(mean, dim=1).cpu())
    plain = extract_features(model, DataLoader(dataset, batch_size=4), device, progress=False)
    assert not torch.allclose(features, plain)


def test_reid_net_eval_features_and_mode_restored(device: torch.device) -> None:
    torch.manual_seed(0)
    model = ReidNet("tiny", num_classes=3).to(device).eval()
    dataset = _Images(5)
    features = extract_features(model, DataLoader(dataset, batch_size=2), device, progress=False)
    with torch.no_grad():
        expected = model(dataset.images.to(device)).cpu()
    # On CUDA, cuDNN may run float32 convolutions in TF32: agreement to ~1e-4 there.
    tolerance = 1e-5 if device.type == "cpu" else 1e-3
    torch.testing.assert_close(features, expected, atol=tolerance, rtol=tolerance)
    assert not model.training
    # bf16 autocast: float32 unit rows, ~3 significant digits (tests/test_cpu_numerics.py on the CPU).
    again = extract_features(
        model, DataLoader(dataset, batch_size=2), device, amp_dtype=torch.bfloat16, progress=False
    )
    assert again.dtype == torch.float32
    torch.testing.assert_close(again, features, atol=2e-2, rtol=0)


def test_incomplete_coverage_is_an_error(device: torch.device) -> None:
    model = _LinearProbe().to(device).train()
    loader = DataLoader(_Images(10), batch_size=4, drop_last=True)  # item 8 and 9 never seen
    with pytest.raises(ValueError, match=r"missing e\.g\. \[8, 9\]"):
        extract_features(model, loader, device, progress=False)
    assert model.training, "mode restored after an error too"


def test_model_with_record_output_rejected(device: torch.device) -> None:
    class _Pair(nn.Module):
        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            return x, x

    with pytest.raises(ValueError, match="tuple"):
        extract_features(_Pair(), DataLoader(_Images(2), batch_size=2), device, progress=False)
