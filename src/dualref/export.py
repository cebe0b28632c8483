"""Export the inference model (`dualref export`): images -> L2-normalised features, TorchScript or ONNX.

The exported model takes ``[B, 3, H, W]`` float32 images, RGB, already normalised with the checkpoint's
mean and std (the evaluation path's preprocessing: `inference.FeatureExtractor.preprocess`), at the
checkpoint's input size, any batch size B, and returns ``[B, D]`` L2-normalised BN-neck features. The
input size and normalisation are stored in the file (TorchScript extra file ``dualref.json``, ONNX
metadata ``dualref``). After writing, the file is loaded back and run on a random batch of another batch
size than the example it was traced with; the largest absolute difference to PyTorch is reported.

`ReidNet.forward` returns a NamedTuple or a Tensor by mode, which `torch.jit.script` cannot type; the
eval path is wrapped in `InferenceModel`, whose forward returns the feature only, and traced.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io as bytes_io
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dualref import inference, io
from dualref.models.reid_net import ReidNet

FORMATS = ("torchscript", "onnx")
ONNX_PACKAGES = ("onnx", "onnxruntime")
ONNX_OPSET = 17
METADATA_KEY = "dualref"
EXAMPLE_BATCH, CHECK_BATCH = 2, 3  # traced with one batch size, checked with another


class InferenceModel(nn.Module):
    """The eval path of a `ReidNet`: ``[B, 3, H, W]`` normalised images -> ``[B, D]`` unit-length features."""

    def __init__(self, net: ReidNet) -> None:
        super().__init__()
        self.net = net.eval()

    def forward(self, images: Tensor) -> Tensor:
        _, bn = self.net.forward_features(images)  # BN neck (with the optional ReLU), as ReidNet's eval
        return F.normalize(bn, dim=1)


@dataclass(frozen=True)
class ExportResult:
    """What was written and how well the exported model matches PyTorch."""

    path: Path
    format: str
    height: int
    width: int
    feat_dim: int
    metadata: dict[str, Any]
    check_batch: int  # batch size of the check (differs from the traced example's)
    max_abs_diff: float  # largest |exported - PyTorch| over the check batch's features


def export_checkpoint(
    checkpoint_path: str | Path, fmt: str, out: str | Path, *, tolerance: float = 1e-4, seed: int = 0
) -> ExportResult:
    """Export a checkpoint's inference model and check the exported file against PyTorch.

    Args:
        checkpoint_path: checkpoint of `dualref pretrain` or `dualref adapt`.
        fmt: "torchscript" or "onnx" (needs the packages onnx and onnxruntime: `pip install 'dualref[onnx]'`).
        out: the file to write.
        tolerance: largest accepted absolute difference of the check (float32).
        seed: of the random example and check batches.

    Raises:
        ValueError: unknown format, missing package, or a check difference above `tolerance`.
    """
    if fmt not in FORMATS:
        raise ValueError(f"export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
        if missing:
            raise ValueError(
                f"export format 'onnx' needs the package(s) {', '.join(missing)}, not installed here; "
                "install them with: pip install 'dualref[onnx]' (or pip install onnx onnxruntime)"
            )
    net, state = inference.load_model(checkpoint_path)
    try:
        height, width = inference.input_size(state)
        mean, std = inference.normalization(state)
    except ValueError as err:
        raise ValueError(f"{checkpoint_path}: {err}") from None
    model = InferenceModel(net).float().eval()
    metadata = {
        "input": f"[B, 3, {height}, {width}] float32 RGB, (x / 255 - mean) / std",
        "output": f"[B, {net.feat_dim}] float32, L2-normalised",
        "height": height,
        "width": width,
        "mean": list(mean),
        "std": list(std),
        "arch": net.arch,
        "checkpoint": str(checkpoint_path),
        "checkpoint_kind": state.get("kind"),
        "checkpoint_epoch": state.get("epoch"),
    }
    generator = torch.Generator().manual_seed(seed)
    example = torch.randn(EXAMPLE_BATCH, 3, height, width, generator=generator)
    check = torch.randn(CHECK_BATCH, 3, height, width, generator=generator)
    out = Path(out)
    if fmt == "torchscript":
        traced = _trace(model, example)
        extra = {f"{METADATA_KEY}.json": json.dumps(metadata)}
        with _quiet_deprecations():
            io.write_bytes(out, lambda handle: torch.jit.save(traced, handle, _extra_files=extra))
        exported = _run_torchscript(out, check)
    else:
        data = _onnx_bytes(model, example, metadata)
        io.write_bytes(out, lambda handle: handle.write(data))
        exported = _run_onnx(out, check)
    with torch.no_grad():
        expected = model(check)
    diff = float((exported - expected).abs().max())
    if not diff <= tolerance:
        raise ValueError(
            f"{out}: the exported model differs from PyTorch by up to {diff:.3g} on a batch of "
            f"{CHECK_BATCH}; expected at most {tolerance:g}"
        )
    return ExportResult(out, fmt, height, width, net.feat_dim, metadata, CHECK_BATCH, diff)


@contextlib.contextmanager
def _quiet_deprecations() -> Iterator[None]:
    # torch >= 2.9 flags TorchScript tracing and the TorchScript-based ONNX exporter as deprecated; both
    # still work and are what a dependency-free .pt / a plain ONNX file need, so the noise is muted here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*(legacy TorchScript-based ONNX|will be removed).*")
        yield


def _trace(model: nn.Module, example: Tensor) -> torch.jit.ScriptModule:
    with _quiet_deprecations(), torch.no_grad():
        return torch.jit.trace(model, example)


def _run_torchscript(path: Path, images: Tensor) -> Tensor:
    with _quiet_deprecations(), torch.no_grad():
        loaded = torch.jit.load(str(path), map_location="cpu")
        return loaded(images)


def _onnx_bytes(model: nn.Module, example: Tensor, metadata: dict[str, Any]) -> bytes:
    import onnx

    buffer = bytes_io.BytesIO()
    with _quiet_deprecations():
        torch.onnx.export(
            model,
            (example,),
            buffer,  # type: ignore[arg-type]  # a file object works; the stub says path only
            input_names=["images"],
            output_names=["features"],
            dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}},
            opset_version=ONNX_OPSET,
            dynamo=False,  # the TorchScript-based exporter: no onnxscript dependency
        )
    proto = onnx.load_from_string(buffer.getvalue())
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
    onnx.checker.check_model(proto)
    return bytes(proto.SerializeToString())


def _run_onnx(path: Path, images: Tensor) -> Tensor:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (features,) = session.run(["features"], {"images": images.numpy()})
    return torch.from_numpy(features)
