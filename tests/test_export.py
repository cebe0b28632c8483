"""`dualref export`: TorchScript (always) and ONNX (when its packages are installed), checked with PyTorch."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from dualref import cli, export, inference
from tiny_model import HEIGHT, WIDTH, write_checkpoint, write_target

# torch >= 2.9 marks TorchScript deprecated (still supported); the loads below would warn on every call.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")

HAVE_ONNX = all(importlib.util.find_spec(name) is not None for name in export.ONNX_PACKAGES)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("model") / "checkpoint.pt")


def test_inference_model_is_the_eval_forward(model_path: Path) -> None:
    net, _ = inference.load_model(model_path)
    images = torch.randn(3, 3, HEIGHT, WIDTH)
    with torch.no_grad():
        torch.testing.assert_close(export.InferenceModel(net)(images), net(images))


def test_torchscript_export_matches_pytorch_at_any_batch_size(
    model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "model.ts"
    assert cli.main(["export", str(model_path), "--format", "torchscript", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "max abs difference" in printed and f"[B, 3, {HEIGHT}, {WIDTH}] float32" in printed
    extra = {"dualref.json": ""}
    loaded = torch.jit.load(str(out), _extra_files=extra)
    metadata = json.loads(extra["dualref.json"])
    assert (metadata["height"], metadata["width"]) == (HEIGHT, WIDTH) and metadata["mean"][0] == 0.485
    net, _ = inference.load_model(model_path)
    for batch in (1, 5):  # neither is the traced example's batch size
        images = torch.randn(batch, 3, HEIGHT, WIDTH)
        with torch.no_grad():
            difference = (loaded(images) - net(images)).abs().max()
        assert float(difference) <= 1e-4


def test_exported_model_on_real_images_equals_the_feature_extractor(model_path: Path, tmp_path: Path) -> None:
    result = export.export_checkpoint(model_path, "torchscript", tmp_path / "model.ts")
    assert result.max_abs_diff <= 1e-4 and result.check_batch != export.EXAMPLE_BATCH
    extractor = inference.FeatureExtractor(model_path)
    paths = sorted((write_target(tmp_path / "data") / "query").glob("*.jpg"))[:4]
    images = torch.stack([extractor.preprocess(p) for p in paths])
    with torch.no_grad():
        exported = torch.jit.load(str(result.path))(images)
    torch.testing.assert_close(exported, extractor(paths), rtol=0, atol=1e-5)


@pytest.mark.skipif(not HAVE_ONNX, reason="onnx/onnxruntime not installed (pip install 'dualref[onnx]')")
def test_onnx_export_matches_pytorch_with_a_dynamic_batch(model_path: Path, tmp_path: Path) -> None:
    import onnx
    import onnxruntime

    result = export.export_checkpoint(model_path, "onnx", tmp_path / "model.onnx")
    assert result.max_abs_diff <= 1e-4
    proto = onnx.load(str(result.path))
    metadata = {entry.key: entry.value for entry in proto.metadata_props}
    assert json.loads(metadata["dualref"])["width"] == WIDTH
    session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    net, _ = inference.load_model(model_path)
    images = torch.randn(7, 3, HEIGHT, WIDTH)
    (features,) = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        assert float((torch.from_numpy(features) - net(images)).abs().max()) <= 1e-4


def test_missing_onnx_package_is_a_one_line_error_naming_it(
    model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Whether or not onnx itself is installed here, onnxruntime is made to look absent: the message names
    # it (and onnx too when that is missing as well).
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a)
    )
    out = tmp_path / "model.onnx"
    assert cli.main(["export", str(model_path), "--format", "onnx", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs the package(s)" in err[0] and "dualref[onnx]" in err[0]
    missing = err[0].split("needs the package(s) ")[1].split(", not installed")[0].split(", ")
    expected = ["onnxruntime"] if real("onnx") is not None else ["onnx", "onnxruntime"]
    assert missing == expected
    assert not out.exists()


def test_export_refuses_a_difference_above_the_tolerance(model_path: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"differs from PyTorch by up to .* expected at most -1"):
        export.export_checkpoint(model_path, "torchscript", tmp_path / "m.ts", tolerance=-1.0)
    with pytest.raises(ValueError, match="export format 'tflite'"):
        export.export_checkpoint(model_path, "tflite", tmp_path / "m.tflite")
