"""Channels-last and bf16 autocast on the CPU (issue 23): the same numbers as float32 within stated
tolerances, float32 where float32 is promised, and checkpoints that do not care about the layout.

Tolerances are absolute, on losses of order 1 (observed on this CPU, 3 epochs of the tiny network:
channels-last 4e-5, bf16 4e-3; the tolerances leave 2.5x). Channels-last changes only the order of
oneDNN's float32 sums; bf16 keeps 8 bits of mantissa in the convolutions and matrix products.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tiny_pretrain
import tiny_training
from dualref import checkpoint, cli, extraction, inference, steps, training
from dualref.config import LossConfig, RunConfig
from dualref.memory_bank import InstantMemoryBank
from dualref.models import ReidNet

CPU = torch.device("cpu")
FLOAT32_ATOL = 1e-4  # channels-last against contiguous, float32
BF16_ATOL = 1e-2  # bf16 autocast against float32


def _needs_bf16() -> None:
    if not training.cpu_supports_bf16():
        pytest.skip("this CPU has no native bfloat16 (AVX512-BF16 / AMX): run.amp=bf16 runs float32 here")


def _source_losses(amp: str, channels_last: bool, epochs: int) -> tuple[list[dict[str, float]], ReidNet]:
    """Per-epoch loss means of source training from one seeded start, under the given numerics."""
    return tiny_training.source_epochs(CPU, amp, channels_last, lr=1e-3, num_batches=4, epochs=epochs)


def _assert_close_losses(got: list[dict[str, float]], expected: list[dict[str, float]], atol: float) -> None:
    for got_epoch, expected_epoch in zip(got, expected, strict=True):
        for term in ("ce", "triplet", "total"):
            close = pytest.approx(expected_epoch[term], rel=0, abs=atol)
            assert got_epoch[term] == close, (term, got, expected)


def test_channels_last_source_training_matches_float32() -> None:
    expected, reference = _source_losses("none", False, epochs=3)
    got, model = _source_losses("none", True, epochs=3)
    _assert_close_losses(got, expected, FLOAT32_ATOL)
    assert training.is_channels_last(model) and not training.is_channels_last(reference)


def test_bf16_source_training_matches_float32_and_keeps_float32_state() -> None:
    _needs_bf16()
    expected, _ = _source_losses("none", False, epochs=3)
    for channels_last in (False, True):
        got, model = _source_losses("bf16", channels_last, epochs=3)
        _assert_close_losses(got, expected, BF16_ATOL)
        # Autocast never casts the weights, BatchNorm's running statistics or the optimizer's moments.
        assert all(t.dtype == torch.float32 for t in model.state_dict().values() if t.is_floating_point())
    # And bf16 does compute in bf16: the first epoch's losses are not float32's bit for bit.
    assert abs(got[0]["total"] - expected[0]["total"]) > 10 * FLOAT32_ATOL


def test_bf16_dual_refinement_step_keeps_the_bank_in_float32() -> None:
    """The full objective under bf16: losses within tolerance of float32; bank and its step float32."""
    _needs_bf16()
    results = {}
    for amp in ("none", "bf16"):
        torch.manual_seed(0)
        model = training.place_model(ReidNet("tiny", num_classes=4), CPU, True)
        memory = InstantMemoryBank(64, model.feat_dim)
        memory.init_from(torch.nn.functional.normalize(torch.randn(64, model.feat_dim), dim=1))
        optimizer = training.build_adam([*model.parameters(), memory.weight], lr=1e-3, weight_decay=0.0)
        stats = steps.train_target_epoch(
            model,
            tiny_training.identity_batches(4, seed=1),
            optimizer,
            (torch.arange(64) // 4) % 4,
            memory=memory,
            loss=LossConfig(ce_weight=0.5, refined_weight=0.5, spread_weight=0.5),
            device=CPU,
            amp_dtype=training.resolve_amp(amp, CPU),
            channels_last=True,
            progress=False,
        )
        assert memory.weight.dtype == torch.float32
        results[amp] = (dict(stats.means), memory.bank().detach().clone())
    for term in ("ce_coarse", "triplet_coarse", "ce_refined", "triplet_refined", "memory", "total"):
        assert results["bf16"][0][term] == pytest.approx(results["none"][0][term], rel=0, abs=BF16_ATOL), term
    torch.testing.assert_close(results["bf16"][1], results["none"][1], rtol=0, atol=2e-2)


def test_bf16_extraction_is_float32_output_close_to_float32() -> None:
    _needs_bf16()
    torch.manual_seed(0)
    model = training.place_model(ReidNet("tiny", num_classes=4), CPU, True).eval()
    batches = tiny_training.identity_batches(2, seed=2)
    expected = extraction.extract_features(model, batches, CPU, progress=False)
    got = extraction.extract_features(model, batches, CPU, progress=False, amp_dtype=torch.bfloat16)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    difference = (got - expected).abs().max()
    assert 0 < difference < 2e-2  # unit rows: bf16's ~3 significant digits, and not float32 itself


def test_channels_last_checkpoint_loads_into_a_contiguous_model(tmp_path: Path) -> None:
    """The state dict of a channels-last run gives a contiguous model with identical features."""
    _, trained = _source_losses("none", True, epochs=1)  # weights moved by Adam, in channels-last
    state = {"kind": "pretrain", "arch": "tiny", "num_classes": 4, "model": trained.state_dict()}
    checkpoint.save_checkpoint(tmp_path / "cl.pt", {**state, "height": 64, "width": 32})
    loaded, _ = inference.load_model(tmp_path / "cl.pt")
    assert not training.is_channels_last(loaded)
    contiguous = ReidNet("tiny", num_classes=4)
    contiguous.load_state_dict({k: v.contiguous() for k, v in trained.state_dict().items()})
    batches = tiny_training.identity_batches(2, seed=3)
    got = extraction.extract_features(loaded, batches, CPU, progress=False)
    expected = extraction.extract_features(contiguous.eval(), batches, CPU, progress=False)
    assert torch.equal(got, expected)
    in_channels_last = extraction.extract_features(trained, batches, CPU, progress=False)
    torch.testing.assert_close(in_channels_last, expected, rtol=0, atol=1e-5)


def test_resolve_channels_last_and_amp() -> None:
    assert training.resolve_channels_last("auto", CPU) is True
    assert training.resolve_channels_last("auto", torch.device("cuda")) is False
    assert training.resolve_channels_last(False, CPU) is False
    assert training.resolve_amp("none", CPU) is None
    with pytest.raises(ValueError, match="fp16 is not supported on the CPU"):
        training.resolve_amp("fp16", CPU)
    assert training.numerics_name(torch.bfloat16, True) == "bfloat16 autocast, channels-last"
    assert training.numerics_name(None, False) == "float32, contiguous"


@pytest.mark.parametrize("command", ["pretrain", "adapt"])
def test_fp16_on_cpu_is_refused_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    with pytest.raises(ValueError, match=r"run.amp=fp16 is not supported with run.device=cpu"):
        RunConfig(device="cpu", amp="fp16")
    with pytest.raises(ValueError, match=r"run.channels_last='sometimes'; expected true, false or auto"):
        RunConfig(channels_last="sometimes")
    if torch.cuda.is_available():
        pytest.skip("run.device=auto picks the GPU here, where fp16 is allowed")
    run_dir = tmp_path / "run"
    argv = [command, "--set", "run.amp=fp16", "--set", "run.device=auto", "--set", f"run.run_dir={run_dir}"]
    assert cli.main(argv) == 2
    assert "run.amp=fp16 is not supported on the CPU" in capsys.readouterr().err
    assert not run_dir.exists()


class _Probe(nn.Module):
    """A conv net whose autocast output is wrong in a chosen way (the faults `check_autocast` catches)."""

    def __init__(self, fault: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fault = fault
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = F.normalize(self.conv(x).flatten(1).float(), dim=1)
        if not torch.is_autocast_enabled(x.device.type):
            return features
        self.calls += 1
        if self.fault == "wrong":
            return features.flip(1)  # a repeatable, wrong vector
        if self.fault == "varying":
            return F.normalize(features + 1e-3 * self.calls, dim=1)  # nearly right, never the same twice
        return features


FAULTS = [("wrong", r"cosine to float32 -?0\.\d{3}, repeatable"), ("varying", "not repeatable")]


@pytest.mark.parametrize(("fault", "message"), FAULTS)
def test_check_autocast_refuses_a_wrong_or_varying_autocast(fault: str, message: str) -> None:
    probe = _Probe(fault).train()
    state = torch.random.get_rng_state()
    with pytest.raises(ValueError, match=rf"bfloat16 autocast computes this network wrongly .*{message}"):
        training.check_autocast(probe, torch.bfloat16, CPU, (16, 8))
    assert probe.training  # its mode is kept
    assert torch.equal(torch.random.get_rng_state(), state)  # the run's RNG stream is untouched
    training.check_autocast(_Probe("none"), torch.bfloat16, CPU, (16, 8))  # a healthy one passes
    training.check_autocast(_Probe("wrong"), None, CPU, (16, 8))  # float32: nothing to check


def test_a_refused_autocast_writes_no_run_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise ValueError("bf16 autocast computes this network wrongly (test)")

    monkeypatch.setattr(training, "check_autocast", refuse)
    run_dir = tmp_path / "run"
    sets = tiny_pretrain.overrides(tiny_pretrain.write_domains(tmp_path / "data"), run_dir, "run.amp=bf16")
    assert cli.main(["pretrain", *(arg for item in sets for arg in ("--set", item))]) == 2
    assert not run_dir.exists()


def test_the_numerics_probe_leaves_the_run_rng_alone() -> None:
    """The probe network of `common.check_numerics` is initialised off the run's random stream."""
    from dualref.config import ModelConfig
    from dualref.pipelines import common

    torch.manual_seed(5)
    state = torch.random.get_rng_state()
    common.check_numerics(ModelConfig(arch="tiny", pretrained=None), (64, 32), CPU, torch.bfloat16, True)
    assert torch.equal(torch.random.get_rng_state(), state)
