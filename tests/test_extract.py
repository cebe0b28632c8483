"""Feature extraction: `inference.FeatureExtractor` (every input kind) and `dualref extract` (tiny model)."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dualref import checkpoint, cli, extraction, inference
from dualref.data import datasets, loaders
from tiny_model import HEIGHT, WIDTH, write_checkpoint, write_target


@pytest.fixture(scope="module")
def target_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_target(tmp_path_factory.mktemp("synth"))


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("model") / "checkpoint.pt")


@pytest.fixture(scope="module")
def query_paths(target_root: Path) -> list[Path]:
    return [s.path for s in datasets.load_dataset("market1501", target_root).query]


def _reference(model_path: Path, paths: list[Path], *, flip: bool = False) -> torch.Tensor:
    """The evaluation path: `extract_features` over `test_loader` at the checkpoint's size."""
    model, _ = inference.load_model(model_path)
    loader = loaders.test_loader(paths, height=HEIGHT, width=WIDTH, batch_size=7, num_workers=0)
    return extraction.extract_features(model, loader, torch.device("cpu"), flip=flip, progress=False)


@pytest.mark.parametrize("flip", [False, True])
def test_feature_extractor_on_paths_equals_the_evaluation_path(
    model_path: Path, query_paths: list[Path], flip: bool
) -> None:
    extractor = inference.FeatureExtractor(model_path, flip=flip, batch_size=7)
    features = extractor(query_paths)
    expected = _reference(model_path, query_paths, flip=flip)
    assert features.shape == (len(query_paths), extractor.feat_dim) and features.dtype == torch.float32
    torch.testing.assert_close(features, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(len(query_paths)))


def test_every_input_kind_gives_the_same_features(model_path: Path, query_paths: list[Path]) -> None:
    extractor = inference.FeatureExtractor(model_path, device="cpu", batch_size=4)
    paths = query_paths[:5]
    expected = extractor([str(p) for p in paths])
    pils = [Image.open(p) for p in paths]  # original size: resized as the loader resizes
    arrays = [np.asarray(image.convert("RGB")) for image in pils]
    uint8 = [torch.from_numpy(a.copy()).permute(2, 0, 1) for a in arrays]
    preprocessed = torch.stack([extractor.preprocess(p) for p in paths])  # [5, 3, H, W] float
    for given in (pils, arrays, uint8, preprocessed, list(preprocessed), [paths[0], *pils[1:]]):
        torch.testing.assert_close(extractor(given), expected, rtol=0, atol=1e-6)  # type: ignore[arg-type]
    torch.testing.assert_close(extractor(paths[0]), expected[:1], rtol=0, atol=1e-6)  # one image
    same_size = np.stack([np.asarray(image.convert("RGB").resize((WIDTH, HEIGHT))) for image in pils])
    assert extractor(same_size).shape == (5, extractor.feat_dim)  # [B, H, W, 3] batch


def test_feature_extractor_rejects_bad_input_naming_what_it_expected(
    model_path: Path, tmp_path: Path
) -> None:
    extractor = inference.FeatureExtractor(model_path)
    with pytest.raises(ValueError, match=re.escape("expected [H, W, 3] uint8")):
        extractor(np.zeros((HEIGHT, WIDTH, 3), dtype=np.float32))
    expected = f"expected an already preprocessed [3, {HEIGHT}, {WIDTH}]"
    with pytest.raises(ValueError, match=re.escape(expected)):
        extractor(torch.zeros(3, 64, 32))
    with pytest.raises(ValueError, match="no images given"):
        extractor([])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(loaders.ImageReadError, match=r"broken\.jpg"):
        extractor([broken])


def test_old_checkpoints_fall_back_to_their_config(
    model_path: Path, tmp_path: Path, query_paths: list[Path]
) -> None:
    state = checkpoint.load_checkpoint(model_path)
    for key in ("height", "width", "model_options", "normalization", "format"):
        state.pop(key)
    state["config"] = {"data": {"height": HEIGHT, "width": WIDTH}, "model": {"last_stride": 1}}
    old = tmp_path / "old.pt"
    checkpoint.save_checkpoint(old, state)
    features = inference.FeatureExtractor(old)(query_paths[:3])
    torch.testing.assert_close(features, inference.FeatureExtractor(model_path)(query_paths[:3]))
    state.pop("config")
    checkpoint.save_checkpoint(old, state)
    with pytest.raises(ValueError, match=re.escape("old.pt: checkpoint stores no input size")):
        inference.FeatureExtractor(old)


def test_extract_command_writes_every_split(
    model_path: Path, target_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "features"
    argv = ["extract", str(model_path), "--dataset", "market1501", "--root", str(target_root)]
    assert cli.main([*argv, "--split", "all", "--out", str(out), "--workers", "0", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    splits = datasets.load_dataset("market1501", target_root)
    for name in ("train", "query", "gallery"):
        samples = getattr(splits, name)
        assert f"{name}: {len(samples)} x 256 features" in printed
        folder = out / name
        features = np.load(folder / "features.npy")
        assert features.dtype == np.float32 and features.shape == (len(samples), 256)
        np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5)
        assert (folder / "paths.txt").read_text().splitlines() == [str(s.path) for s in samples]
        assert np.load(folder / "pids.npy").tolist() == [s.pid for s in samples]
        assert np.load(folder / "camids.npy").tolist() == [s.camid for s in samples]
        assert json.loads((folder / "meta.json").read_text())["num_images"] == len(samples)
        for file in folder.iterdir():
            assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~_umask(), file
    query = np.load(out / "query" / "features.npy")
    expected = _reference(model_path, [s.path for s in splits.query]).numpy()
    np.testing.assert_allclose(query, expected, atol=1e-6)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_extract_command_on_an_image_folder(
    model_path: Path, query_paths: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    for number, path in enumerate(query_paths[:6]):
        shutil.copy(path, images / ("sub" if number % 2 else ".") / f"person{number}.jpg")
    out = tmp_path / "out"
    assert cli.main(["extract", str(model_path), str(images), "--out", str(out), "--workers", "0"]) == 0
    assert "images: 6 x 256 features" in capsys.readouterr().out
    assert np.load(out / "features.npy").shape == (6, 256)
    assert not (out / "pids.npy").exists() and not (out / "camids.npy").exists()  # unknown for a folder
    assert len((out / "paths.txt").read_text().splitlines()) == 6

    (images / "broken.jpg").write_bytes(b"not an image")
    assert cli.main(["extract", str(model_path), str(images), "--out", str(out), "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot read image" in err[0] and "broken.jpg" in err[0]
    assert "--skip-unreadable" in err[0]
    argv = ["extract", str(model_path), str(images), "--out", str(out), "--workers", "0", "--skip-unreadable"]
    assert cli.main(argv) == 0
    assert np.load(out / "features.npy").shape == (6, 256)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("empty_folder", "no images under"),
        ("wrong_kind", "expected a checkpoint of dualref pretrain/adapt"),
        ("not_a_checkpoint", "is not a dualref checkpoint"),
        ("both_sources", "give either IMAGES_DIR or both --dataset and --root"),
    ],
)
def test_extract_bad_input_is_one_line_naming_it(
    model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], setup: str, message: str
) -> None:
    images, ckpt = tmp_path / "images", model_path
    images.mkdir()
    extra: list[str] = []
    if setup != "empty_folder":
        Image.new("RGB", (WIDTH, HEIGHT)).save(images / "a.jpg")
    if setup == "wrong_kind":
        ckpt = tmp_path / "study.pt"
        checkpoint.save_checkpoint(ckpt, {"kind": "study", "rows": []})
    if setup == "not_a_checkpoint":
        ckpt = tmp_path / "weights.pt"
        torch.save({"state_dict": {}}, ckpt)
    if setup == "both_sources":
        extra = ["--dataset", "market1501", "--root", str(tmp_path)]
    assert cli.main(["extract", str(ckpt), str(images), "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dualref: error: ") and message in err[0], err
    named = {"empty_folder": "images", "wrong_kind": "study.pt", "not_a_checkpoint": "weights.pt"}
    assert setup not in named or named[setup] in err[0]


def test_extract_numerics_flags(model_path: Path, target_root: Path, tmp_path: Path) -> None:
    """--channels-last and --amp reach the network and meta.json; fp16 on the CPU is refused before the
    output folder exists. (bf16's numbers: tests/test_cpu_numerics.py.)"""
    argv = ["extract", str(model_path), "--dataset", "market1501", "--root", str(target_root)]
    argv += ["--split", "query", "--workers", "0", "--device", "cpu", "--out"]
    assert cli.main([*argv, str(tmp_path / "contiguous"), "--channels-last", "false"]) == 0
    meta = json.loads((tmp_path / "contiguous" / "meta.json").read_text())
    assert meta["numerics"] == "float32, contiguous"
    paths = [Path(p) for p in (tmp_path / "contiguous" / "paths.txt").read_text().splitlines()]
    features = torch.from_numpy(np.load(tmp_path / "contiguous" / "features.npy"))
    torch.testing.assert_close(features, _reference(model_path, paths), rtol=0, atol=1e-6)
    assert cli.main([*argv, str(tmp_path / "auto")]) == 0
    assert json.loads((tmp_path / "auto" / "meta.json").read_text())["numerics"] == "float32, channels-last"
    assert cli.main([*argv, str(tmp_path / "fp16"), "--amp", "fp16"]) == 2
    assert not (tmp_path / "fp16").exists()


def test_an_unreadable_image_in_a_loader_worker_is_one_line(
    model_path: Path, query_paths: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """DataLoader re-raises a worker's error with the worker's traceback in its message: one line stays."""
    folder = tmp_path / "images"
    folder.mkdir()
    for path in query_paths[:4]:
        shutil.copy(path, folder / path.name)
    broken = folder / query_paths[1].name
    broken.write_bytes(b"not a jpeg")
    argv = ["extract", str(model_path), str(folder), "--out", str(tmp_path / "out"), "--workers", "2"]
    assert cli.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"dualref: error: cannot read image {broken}: ")
    assert "--skip-unreadable" in lines[0] and "Traceback" not in lines[0]
