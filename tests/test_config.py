"""Tests of dualref.config: defaults, YAML differences, checked overrides, round trip."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from dualref.config import (
    BASELINE_OVERRIDES,
    AdaptConfig,
    DataConfig,
    LossConfig,
    PretrainConfig,
    config_to_dict,
    load_config,
    save_config,
)


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_reproduce_the_reference_recipe() -> None:
    cfg = load_config(PretrainConfig)
    assert cfg == PretrainConfig()
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.epochs) == (3.5e-4, 5e-4, 80)
    assert (cfg.optim.warmup_epochs, cfg.optim.milestones) == (10, (40, 70))
    assert (cfg.data.batch_size, cfg.data.num_instances, cfg.data.height, cfg.data.width) == (
        64,
        4,
        256,
        128,
    )
    # Source training: CE + soft-margin triplet on the pooled feature, both weight 1.
    assert (cfg.loss.ce_weight, cfg.loss.triplet_margin, cfg.loss.triplet_feature) == (
        1.0,
        None,
        "pooled",
    )
    assert cfg.forward_target_batches is True and cfg.run.eval_every == 40


def test_unknown_key_names_the_closest_valid_keys(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=re.escape("unknown config key 'optim.lrr'")) as info:
        load_config(PretrainConfig, None, ["optim.lrr=0.1"])
    assert "closest valid keys: ['optim.lr'" in str(info.value)
    path = write_yaml(tmp_path / "c.yaml", "optim:\n  weight_decy: 0.1\n")
    with pytest.raises(ValueError, match=re.escape("'optim.weight_decy'")) as info:
        load_config(PretrainConfig, path)
    assert "optim.weight_decay" in str(info.value)
    with pytest.raises(ValueError, match=re.escape("'dta'")) as info:
        load_config(PretrainConfig, write_yaml(tmp_path / "d.yaml", "dta:\n  height: 1\n"))
    assert "'data'" in str(info.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.epochs=ten", "'optim.epochs': expected an integer"),
        ("optim.epochs=2.5", "'optim.epochs': expected an integer"),
        ("optim.lr=fast", "'optim.lr': expected a number"),
        ("optim.lr=true", "'optim.lr': expected a number"),
        ("data.cache_images=maybe", "'data.cache_images': expected true/false"),
        ("optim.milestones=abc", "'optim.milestones'"),
        ("model.arch=resnet7", "model.arch='resnet7' is not valid"),
        ("data.batch_size=30", "not a multiple of data.num_instances=4"),
        ("optim=3", "names a section"),
        ("optim.lr", "not of the form key=value"),
    ],
)
def test_wrong_types_and_values_are_named(override: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(PretrainConfig, None, [override])


def test_yaml_float_strings_and_numbers(tmp_path: Path) -> None:
    # PyYAML (YAML 1.1) reads "2e-3" (no dot) and "3.5e4" (unsigned exponent) as *strings*;
    # the loader must still make them floats.
    assert yaml.safe_load("x: 2e-3")["x"] == "2e-3"
    assert yaml.safe_load("x: 3.5e4")["x"] == "3.5e4"
    path = write_yaml(tmp_path / "c.yaml", "clustering:\n  dbscan_rho: 2e-3\noptim:\n  lr: 3.5e4\n")
    cfg = load_config(AdaptConfig, path)
    assert cfg.clustering.dbscan_rho == pytest.approx(2e-3)
    assert isinstance(cfg.clustering.dbscan_rho, float)
    assert cfg.optim.lr == pytest.approx(3.5e4)
    path = write_yaml(tmp_path / "d.yaml", "clustering:\n  dbscan_rho: 1.6e-3\n")
    assert load_config(AdaptConfig, path).clustering.dbscan_rho == pytest.approx(1.6e-3)
    cfg = load_config(AdaptConfig, None, ["clustering.dbscan_rho=2e-3", "optim.lr=1"])
    assert cfg.clustering.dbscan_rho == pytest.approx(2e-3)
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)  # an int is widened


def test_tuple_fields_from_yaml_and_overrides(tmp_path: Path) -> None:
    cfg = load_config(PretrainConfig, write_yaml(tmp_path / "c.yaml", "optim:\n  milestones: [8, 11]\n"))
    assert cfg.optim.milestones == (8, 11)
    assert load_config(PretrainConfig, None, ["optim.milestones=[3,5]"]).optim.milestones == (3, 5)
    assert load_config(PretrainConfig, None, ["optim.milestones=7"]).optim.milestones == (7,)
    assert load_config(PretrainConfig, None, ["optim.milestones=[]"]).optim.milestones == ()
    with pytest.raises(ValueError, match="increasing"):
        load_config(PretrainConfig, None, ["optim.milestones=[9,3]"])


def test_none_values(tmp_path: Path) -> None:
    cfg = load_config(PretrainConfig, None, ["model.pretrained=null", "loss.triplet_margin=0.5"])
    assert cfg.model.pretrained is None and cfg.loss.triplet_margin == 0.5
    cfg = load_config(PretrainConfig, None, ["model.pretrained=None", "loss.triplet_margin=none"])
    assert cfg.model.pretrained is None and cfg.loss.triplet_margin is None
    path = write_yaml(tmp_path / "c.yaml", "model:\n  pretrained: ~\n")
    assert load_config(PretrainConfig, path).model.pretrained is None
    path = write_yaml(tmp_path / "d.yaml", "model:\n  pretrained: ../w/m.pth\n")
    assert load_config(PretrainConfig, path).model.pretrained == "../w/m.pth"


def test_nested_section_defaults_of_the_parent_are_kept(tmp_path: Path) -> None:
    # PretrainConfig's loss section has its own defaults (ce_weight 1, pooled feature, no memory):
    # setting one field of it must not fall back to LossConfig's adaptation defaults.
    path = write_yaml(tmp_path / "c.yaml", "loss:\n  label_smoothing: 0.2\nrun:\n  seed: 3\n")
    cfg = load_config(PretrainConfig, path)
    assert cfg.loss.label_smoothing == 0.2
    assert (cfg.loss.ce_weight, cfg.loss.spread_weight, cfg.loss.triplet_feature) == (
        1.0,
        0.0,
        "pooled",
    )
    assert cfg.run.seed == 3 and cfg.run.eval_every == 40 and cfg.run.run_dir == "runs/pretrain"
    adapt = load_config(AdaptConfig, None, ["data.height=128"])
    assert adapt.data.random_erasing_prob == 0.5 and adapt.data.height == 128
    assert adapt.optim.schedule == "step" and adapt.optim.iters_per_epoch == 400


def test_overrides_apply_after_the_file(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "c.yaml", "optim:\n  lr: 0.1\n  epochs: 5\n")
    cfg = load_config(PretrainConfig, path, ["optim.lr=0.2"])
    assert (cfg.optim.lr, cfg.optim.epochs) == (0.2, 5)


def test_missing_or_malformed_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape("absent.yaml")):
        load_config(PretrainConfig, tmp_path / "absent.yaml")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_config(PretrainConfig, write_yaml(tmp_path / "list.yaml", "- 1\n- 2\n"))
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(PretrainConfig, write_yaml(tmp_path / "bad.yaml", "optim: [1, \n"))
    with pytest.raises(ValueError, match="'optim' must be a mapping"):
        load_config(PretrainConfig, write_yaml(tmp_path / "flat.yaml", "optim: 3\n"))
    assert load_config(PretrainConfig, write_yaml(tmp_path / "empty.yaml", "")) == PretrainConfig()


@pytest.mark.parametrize("cls", [PretrainConfig, AdaptConfig])
def test_save_load_round_trip(tmp_path: Path, cls: type) -> None:
    original = load_config(
        cls,
        None,
        [
            "optim.milestones=[4,9]",
            "optim.lr=1.6e-3",
            "model.pretrained=null",
            "loss.triplet_margin=0.5",
            "data.cache_images=true",
            "run.run_dir=somewhere/else",
        ],
    )
    path = tmp_path / "out" / "config.yaml"
    save_config(original, path)
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temp file left
    reloaded = load_config(cls, path)
    assert reloaded == original
    assert config_to_dict(reloaded) == config_to_dict(original)
    assert config_to_dict(original)["optim"]["milestones"] == [4, 9]  # tuples as lists


def test_configs_are_frozen() -> None:
    cfg = PretrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0  # type: ignore[misc]
    with pytest.raises(ValueError, match=re.escape("data.batch_size=0")):
        DataConfig(batch_size=0)


CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRETRAIN_CONFIGS = sorted(CONFIGS.glob("**/*pretrain*.yaml"))
STUDY_FILES = sorted([*CONFIGS.glob("**/*.study.yaml"), *CONFIGS.glob("**/*.search.yaml")])
ADAPT_CONFIGS = sorted(set(CONFIGS.glob("**/*.yaml")) - set(PRETRAIN_CONFIGS) - set(STUDY_FILES))


@pytest.mark.parametrize("path", PRETRAIN_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_pretrain_configs_load(path: Path) -> None:
    cfg = load_config(PretrainConfig, path)
    assert cfg.data.batch_size % cfg.data.num_instances == 0


@pytest.mark.parametrize("path", ADAPT_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_adaptation_configs_load(path: Path) -> None:
    cfg = load_config(AdaptConfig, path)
    assert cfg.data.source != cfg.data.target
    assert cfg.source_checkpoint is not None and cfg.run.run_dir.startswith("runs/")



BASELINE_CONFIGS = sorted(CONFIGS.glob("**/baseline.yaml"))


@pytest.mark.parametrize("path", BASELINE_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_baselines_are_the_baseline_overrides(path: Path) -> None:
    """Every baseline.yaml is the adaptation defaults plus exactly `BASELINE_OVERRIDES` in loss.* and
    optim.schedule (the demo applies the same tuple), and the full method's file is the defaults there."""
    expected = load_config(AdaptConfig, None, BASELINE_OVERRIDES)
    baseline, full = load_config(AdaptConfig, path), load_config(AdaptConfig, path.parent / "full.yaml")
    assert baseline.loss == expected.loss and baseline.optim.schedule == expected.optim.schedule
    assert full.loss == AdaptConfig().loss and full.optim.schedule == AdaptConfig().optim.schedule
    assert len(BASELINE_CONFIGS) == 4


def test_fixed_dbscan_eps_is_checked() -> None:
    assert load_config(AdaptConfig, None, ["clustering.dbscan_eps=0.6"]).clustering.dbscan_eps == 0.6
    assert load_config(AdaptConfig, None, []).clustering.dbscan_eps is None  # default: the rho rule
    for bad in ("0", "1.5", "-0.1"):
        message = f"clustering.dbscan_eps={float(bad)!r}; expected 0 < eps"
        with pytest.raises(ValueError, match=re.escape(message)):
            load_config(AdaptConfig, None, [f"clustering.dbscan_eps={bad}"])


def test_bank_gradient_scale_defaults_to_the_reference_inverse_lambda() -> None:
    assert LossConfig().bank_gradient_scale() == 2.0  # lambda 0.5
    assert LossConfig(ce_weight=0.25).bank_gradient_scale() == 4.0
    assert LossConfig(ce_weight=0.0).bank_gradient_scale() == 1.0  # the reference then applies none
    assert LossConfig(bank_grad_scale=1.5).bank_gradient_scale() == 1.5


def test_spread_weight_ramp_up() -> None:
    assert [LossConfig(spread_weight=0.1).spread_weight_at(e) for e in (0, 5)] == [0.1, 0.1]
    ramp = LossConfig(spread_weight=0.1, spread_rampup_epochs=4)
    assert [ramp.spread_weight_at(e) for e in range(6)] == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1, 0.1])


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["model.bn_groups=3"], "model.bn_groups=3"),  # 64 images cannot be split into 3 equal chunks
        (["model.bn_groups=0"], "model.bn_groups"),
        (["clustering.max_cluster_share=0"], "clustering.max_cluster_share"),
        (["loss.triplet_scale=0"], "loss.triplet_scale"),
        (["loss.spread_rampup_epochs=-1"], "loss.spread_rampup_epochs"),
        (["loss.bank_grad_scale=-2"], "loss.bank_grad_scale"),
        (["run.diagnostics_every=-1"], "run.diagnostics_every"),
    ],
)
def test_study_options_are_validated(overrides: list[str], key: str) -> None:
    with pytest.raises(ValueError, match=key):
        load_config(AdaptConfig, None, overrides)
