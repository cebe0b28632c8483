"""`dualref release` (weights-only file + card) on the tiny model, and every model released in `models/`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from dualref import checkpoint, cli, inference
from dualref.models.reid_net import ReidNet, load_trunk_and_neck
from dualref.pipelines import release
from tiny_model import HEIGHT, WIDTH, write_checkpoint, write_target

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"
CARDS = sorted(MODELS.glob("*.json"))


@pytest.fixture(scope="module")
def target_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_target(tmp_path_factory.mktemp("target"))


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("run") / "checkpoint.pt"
    write_checkpoint(path)
    state = checkpoint.load_checkpoint(path)  # give it the training state a release must drop
    state["optimizer"] = {"state": {}, "param_groups": []}
    state["rng"] = {"torch": torch.get_rng_state()}
    state["config"] = {"optim": {"iters_per_epoch": 7}, "data": {"source": "synthetic"}}
    checkpoint.save_checkpoint(path, state)
    return path


def _evaluate(
    path: Path, target_root: Path, out: Path, capsys: pytest.CaptureFixture[str]
) -> dict[str, Any]:
    """`dualref evaluate PATH` on the synthetic target; its results file goes to `out` (never beside a
    released model in the repository)."""
    argv = ["evaluate", str(path), "--dataset", "market1501", "--root", str(target_root), "--workers", "0"]
    assert cli.main([*argv, "--out", str(out), "--device", "cpu"]) == 0
    capsys.readouterr()
    return json.loads(out.read_text())


def test_release_keeps_rounded_weights_and_a_card_that_matches_the_file(
    model_path: Path, target_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "models" / "tiny.pt"
    argv = ["release", str(model_path), "--out", str(out), "--device", "cpu", "--workers", "0"]
    assert cli.main([*argv, "--evaluate", f"market1501={target_root}", "--command", "trained by hand"]) == 0
    assert "released" in capsys.readouterr().out

    original = checkpoint.load_checkpoint(model_path)
    released = checkpoint.load_checkpoint(out)
    assert "optimizer" not in released and "rng" not in released
    assert released["model"].keys() == original["model"].keys()
    for key, value in original["model"].items():
        if value.is_floating_point():
            assert released["model"][key].dtype == torch.float16
            assert torch.equal(released["model"][key], value.half()), key
        else:
            assert torch.equal(released["model"][key], value), key

    card = json.loads(out.with_suffix(".json").read_text())
    assert card["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert card["bytes"] == out.stat().st_size
    assert (card["architecture"], card["input_size"]) == ("tiny", {"height": HEIGHT, "width": WIDTH})
    assert card["normalization"]["mean"] == list(inference.IMAGENET_MEAN)
    assert (card["epochs"], card["iterations"], card["command"]) == (1, 7, "trained by hand")
    assert card["config"] == original["config"] and card["dataset"] == "synthetic"
    assert release.check_release(out.with_suffix(".json")) == out

    # The card's scores are what `dualref evaluate` says of the released file and of the original.
    scores = card["evaluation"]["market1501"]
    assert scores["role"] == "direct transfer"
    for name, path in (("released", out), ("full_precision", model_path)):
        expected = _evaluate(path, target_root, tmp_path / f"{name}_results.json", capsys)
        got = scores if name == "released" else scores["full_precision"]
        keys = ("mAP", "rank1", "mINP")
        assert {k: got[k] for k in keys} == {k: expected[k] for k in keys}


def test_float32_release_evaluates_exactly_as_the_original(
    model_path: Path, target_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tiny32.pt"
    argv = ["release", str(model_path), "--out", str(out), "--weights", "float32", "--device", "cpu"]
    assert cli.main([*argv, "--workers", "0", "--evaluate", f"market1501={target_root}"]) == 0
    scores = json.loads(out.with_suffix(".json").read_text())["evaluation"]["market1501"]
    assert {k: scores[k] for k in ("mAP", "rank1", "rank5", "rank10", "mINP")} == scores["full_precision"]


def test_released_weights_start_an_adaptation_as_their_float32_values(
    model_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "tiny.pt"
    release.run_release(model_path, out, device=torch.device("cpu"), progress=False)
    model = ReidNet("tiny", 3)  # another number of classes: the target's
    load_trunk_and_neck(model, checkpoint.load_checkpoint(out)["model"])
    original = checkpoint.load_checkpoint(model_path)["model"]
    for key, value in model.state_dict().items():
        if not key.startswith("classifier"):
            expected = original[key].half().float() if original[key].is_floating_point() else original[key]
            assert value.dtype == original[key].dtype and torch.equal(value, expected), key


def test_a_damaged_release_or_bad_arguments_are_refused(model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiny.pt"
    release.run_release(model_path, out, device=torch.device("cpu"), progress=False)
    data = bytearray(out.read_bytes())
    data[-20] ^= 0xFF
    out.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"SHA-256 \w+ differs from its card"):
        release.check_release(out.with_suffix(".json"))
    with pytest.raises(ValueError, match=r"expected a \.pt name"):
        release.run_release(model_path, tmp_path / "tiny.bin", device=torch.device("cpu"))
    with pytest.raises(ValueError, match="expected DATASET=ROOT"):
        release.Evaluation.parse("market1501")
    optimizer_only = tmp_path / "other.pt"
    checkpoint.save_checkpoint(optimizer_only, {"kind": "pretrain", "optimizer": {}})
    with pytest.raises(ValueError, match=r"other.pt: lacks \['model', 'arch', 'num_classes'\]"):
        release.run_release(optimizer_only, tmp_path / "x.pt", device=torch.device("cpu"))


def test_a_failed_evaluation_keeps_the_earlier_release_and_its_card(
    model_path: Path, target_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "tiny.pt"
    release.run_release(model_path, out, device=torch.device("cpu"), progress=False)
    before = (out.read_bytes(), out.with_suffix(".json").read_text())
    missing = release.Evaluation("market1501", str(tmp_path / "no_such_folder"))
    cpu = torch.device("cpu")
    with pytest.raises(FileNotFoundError):
        release.run_release(model_path, out, evaluations=[missing], device=cpu, progress=False)
    assert (out.read_bytes(), out.with_suffix(".json").read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.json", "tiny.pt"]  # no pending file left


# --- the models kept in the repository ---------------------------------------------------------------


@pytest.mark.parametrize("card_path", CARDS, ids=[p.stem for p in CARDS])
def test_released_model_matches_its_card_and_evaluates(
    card_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = release.check_release(card_path)
    card = release.read_card(card_path)
    for key in ("architecture", "input_size", "normalization", "config", "command", "code", "dataset"):
        assert card[key], key
    roles = {scores["role"] for scores in card["evaluation"].values()}
    assert roles == {"source", "direct transfer"}, card_path
    state = checkpoint.load_checkpoint(path)
    size = (card["input_size"]["height"], card["input_size"]["width"])
    assert (state["arch"], inference.input_size(state)) == (card["architecture"], size)
    assert card["iterations"] == state["epoch"] * state["config"]["optim"]["iters_per_epoch"]
    # `dualref evaluate` loads it (on a small synthetic data set at the model's input size).
    target = write_target(tmp_path / "target")
    results = _evaluate(path, target, tmp_path / "results.json", capsys)
    assert results["options"]["height"] == size[0] and 0.0 < results["mAP"] <= 1.0


def test_every_models_path_in_a_config_is_a_released_model() -> None:
    referenced = {}
    for config in sorted((REPO / "configs").rglob("*.yaml")):
        value = (yaml.safe_load(config.read_text()) or {}).get("source_checkpoint")
        if isinstance(value, str) and value.startswith("models/"):
            referenced[config] = REPO / value
    for config, path in referenced.items():
        assert path.with_suffix(".json") in CARDS, f"{config}: {path} has no card in models/"
