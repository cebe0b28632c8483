"""Shared test fixtures.

DUALREF_TEST_DEVICE selects the device of device-aware tests (default cpu). Tests that need the real data sets
under ../shared/data are skipped, with the reason shown in the summary (-ra), when they are absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

DEVICE = torch.device(os.environ.get("DUALREF_TEST_DEVICE", "cpu"))
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SHARED_WEIGHTS = Path(__file__).resolve().parents[1].parent / "shared" / "weights"

# One thread: the suite also runs data-loader workers, and an oversubscribed 2-core machine runs
# multi-threaded small ops many times slower.
torch.set_num_threads(1)


@pytest.fixture
def device() -> torch.device:
    return DEVICE


def shared_dataset(name: str) -> Path:
    """Path of a real data set under ../shared/data, or skip the test loudly."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real data not available: {path} is absent (tests on real data skipped)")
    return path
