"""Typed configuration: frozen dataclasses hold every default, YAML files hold only differences.

`load_config(PretrainConfig, "configs/pretrain.yaml", ["optim.lr=1e-4"])` builds the nested
dataclasses, checks every key and value against the field types, and raises ValueError naming the bad
key (with the closest valid keys) or value. The resolved config is saved into the run folder with
`save_config`. Config objects stop at the CLI and the pipelines; everything below takes plain arguments.

Defaults reproduce the authors' code (see docs/method.md), not the paper's text, where the two differ;
each such field says so. Options added for the CPU study (docs/study.md) are off by default.

Size: over 400 lines on purpose: every default of every command is in this one file, each with its
comment, next to the checks that refuse a bad value before anything is written.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

from dualref import io

# Choices owned by the modules that implement them; the config only validates against them.
from dualref.data.datasets import DATASET_NAMES
from dualref.losses.spread_out import VARIANTS as SPREAD_VARIANTS
from dualref.models.backbone import ARCHS
from dualref.training import AMP_DTYPES, SCHEDULES

TRIPLET_FEATURES = ("pooled", "bn_normalized")
MEMORY_KINDS = ("instant", "traditional", "minibatch")
MEMORY_LOSSES = ("spread_out", "invariance")
# Memory of one training batch, estimated from its pixels so that an absurd input size is refused here
# rather than by the kernel's OOM killer: ResNet-50 in float32 keeps about 4 KB per input pixel for the
# backward pass (8.6 GB for the reference's 64 x 256 x 128), the other trunks less.
TRAIN_BYTES_PER_PIXEL = 4096
MAX_BATCH_BYTES = 256 * 2**30  # more than any single accelerator or workstation holds


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; expected one of {list(choices)}")


def _check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    # NaN passes every comparison: test finiteness first (optim.lr=nan used to train on NaN).
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}={value!r} is not valid; expected a finite number {bound}")


def _check_fraction(name: str, value: float) -> None:
    """A factor in (0, 1]; NaN fails the comparison and is refused too."""
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name}={value!r} is not valid; expected 0 < value <= 1")


@dataclass(frozen=True)
class DataConfig:
    """Which images, at which size, in which batches."""

    source: str = "dukemtmc"  # labelled source data set: market1501, dukemtmc, msmt17, folder
    source_root: str = "data"  # its folder, or a parent holding it under its usual name
    target: str = "market1501"  # unlabelled target data set (its pids are read for evaluation only)
    target_root: str = "data"  # its folder, or a parent holding it under its usual name
    height: int = 256  # input height (reference: 256; CPU scale: 128)
    width: int = 128  # input width (reference: 128; CPU scale: 64)
    batch_size: int = 64  # images per training batch (reference: 64)
    num_instances: int = 4  # K images per identity / cluster in a P x K batch (reference: 4)
    random_erasing_prob: float = 0.0  # random erasing probability (reference: 0 for source, 0.5 on target)
    test_batch_size: int = 128  # images per batch for feature extraction
    num_workers: int = 2  # data-loading worker processes
    cache_images: bool = False  # keep decoded images in RAM (fast on CPU when the set fits)
    skip_unreadable: bool = False  # drop unreadable images at load time (logged) instead of failing

    def __post_init__(self) -> None:
        _check_choice("data.source", self.source, DATASET_NAMES)
        _check_choice("data.target", self.target, DATASET_NAMES)
        for name in ("height", "width", "batch_size", "num_instances", "test_batch_size"):
            _check_positive(f"data.{name}", getattr(self, name))
        _check_positive("data.num_workers", self.num_workers, allow_zero=True)
        if self.batch_size % self.num_instances:
            raise ValueError(
                f"data.batch_size={self.batch_size} is not a multiple of "
                f"data.num_instances={self.num_instances}"
            )
        if self.batch_size // self.num_instances < 2:
            raise ValueError(
                f"data.batch_size={self.batch_size} holds a single identity of data.num_instances="
                f"{self.num_instances} images; the triplet loss needs at least 2 identities per batch: "
                "expected data.batch_size >= 2 x data.num_instances"
            )
        if not 0.0 <= self.random_erasing_prob <= 1.0:
            raise ValueError(f"data.random_erasing_prob={self.random_erasing_prob!r}; expected 0..1")
        needed = self.batch_size * self.height * self.width * TRAIN_BYTES_PER_PIXEL
        if needed > MAX_BATCH_BYTES:
            raise ValueError(
                f"data.height={self.height} x data.width={self.width} with data.batch_size="
                f"{self.batch_size} needs about {needed / 2**30:,.0f} GiB for one training batch "
                f"(~{TRAIN_BYTES_PER_PIXEL // 1024} KB per input pixel); expected at most "
                f"{MAX_BATCH_BYTES // 2**30} GiB: lower data.height / data.width (reference 256 x 128) "
                "or data.batch_size"
            )


@dataclass(frozen=True)
class ModelConfig:
    """The re-ID network: backbone -> GAP -> BN neck -> bias-free classifier."""

    arch: str = "resnet50"  # resnet18/34/50/101, mobilenet_v2 (CPU scale) or tiny (tests, demo)
    pretrained: str | None = "imagenet"  # "imagenet" (torchvision weights API), a local file, or None
    last_stride: int = 1  # ResNet layer4 stride (reference: 1)
    stem_relu: bool = False  # ReLU after the ResNet stem (reference: none, a quirk inherited from MMT)
    neck_relu: bool = False  # ReLU after the BN neck (paper: yes; reference code: no)
    # Ghost BatchNorm: train-mode BN statistics over this many equal chunks of the batch. The authors'
    # 4-GPU DataParallel normalised 4 shards of 16 images (G = 4); 1 = one BN over the whole batch.
    bn_groups: int = 1

    def __post_init__(self) -> None:
        _check_choice("model.arch", self.arch, ARCHS)
        _check_positive("model.bn_groups", self.bn_groups)
        if self.last_stride not in (1, 2):
            raise ValueError(f"model.last_stride={self.last_stride!r}; expected 1 or 2")


@dataclass(frozen=True)
class OptimConfig:
    """Adam and its learning-rate schedule (a pure function of the epoch)."""

    lr: float = 3.5e-4  # base learning rate (reference: 3.5e-4)
    weight_decay: float = 5e-4  # L2 weight decay on every trainable parameter (reference: 5e-4)
    epochs: int = 80  # training epochs
    iters_per_epoch: int = 200  # iterations per epoch (reference: 200 source, 400 target)
    schedule: str = "warmup_multistep"  # warmup_multistep (source), step (target), constant
    warmup_epochs: int = 10  # linear warm-up length in epochs (warmup_multistep)
    warmup_factor: float = 0.01  # warm-up start factor (warmup_multistep)
    milestones: tuple[int, ...] = (40, 70)  # x gamma at these epochs (warmup_multistep)
    lr_decay_epochs: int = 20  # step size in epochs of the x gamma decay (step)
    gamma: float = 0.1  # decay factor
    reference_warmup_offset: bool = True  # reproduce the reference's scheduler stepped before epoch 0
    reset_each_epoch: bool = True  # fresh Adam state every epoch, as the reference's target loop did

    def __post_init__(self) -> None:
        _check_positive("optim.lr", self.lr)
        _check_positive("optim.weight_decay", self.weight_decay, allow_zero=True)
        # 0 epochs = evaluate the starting model only (adaptation: the direct-transfer row)
        _check_positive("optim.epochs", self.epochs, allow_zero=True)
        _check_positive("optim.iters_per_epoch", self.iters_per_epoch)
        _check_choice("optim.schedule", self.schedule, SCHEDULES)
        _check_positive("optim.warmup_epochs", self.warmup_epochs, allow_zero=True)
        _check_positive("optim.lr_decay_epochs", self.lr_decay_epochs)
        # A factor <= 0 makes the learning rate negative or zero: gradient ascent, or no training.
        _check_fraction("optim.warmup_factor", self.warmup_factor)
        _check_fraction("optim.gamma", self.gamma)
        if list(self.milestones) != sorted(self.milestones) or any(m < 0 for m in self.milestones):
            raise ValueError(f"optim.milestones={self.milestones!r}; expected increasing epochs >= 0")


@dataclass(frozen=True)
class ClusteringConfig:
    """Off-line stage: k-reciprocal Jaccard distance, DBSCAN, hierarchical refinement."""

    k1: int = 20  # k-reciprocal neighbourhood size (Zhong et al.: k1)
    k2: int = 6  # local query expansion size (Zhong et al.: k2)
    dbscan_rho: float = 1.6e-3  # eps = mean of the smallest rho fraction of pairwise distances (paper: rho)
    # A fixed DBSCAN eps instead of the rho rule (SpCL and Cluster Contrast use 0.6); None = the rho rule.
    dbscan_eps: float | None = None
    # Label-free cap on the rho rule: lower eps until the largest cluster holds at most this share of
    # the images (a weak source model makes the rho rule chain much of the target into one cluster).
    # 1.0 = off (the paper's rule); ignored with a fixed dbscan_eps.
    max_cluster_share: float = 1.0
    min_samples: int = 4  # DBSCAN core-point threshold
    num_subclusters: int = 2  # prototypes per cluster in the refinement (paper: R; D->M 5, M->D 2)
    device: str | None = None  # device of the neighbour search; None = the run's device

    def __post_init__(self) -> None:
        _check_positive("clustering.k1", self.k1)
        _check_positive("clustering.k2", self.k2)
        _check_positive("clustering.min_samples", self.min_samples)
        _check_positive("clustering.num_subclusters", self.num_subclusters)
        if not 0.0 < self.dbscan_rho < 1.0:
            raise ValueError(f"clustering.dbscan_rho={self.dbscan_rho!r}; expected 0 < rho < 1")
        if not 0.0 < self.max_cluster_share <= 1.0:
            share = self.max_cluster_share
            raise ValueError(f"clustering.max_cluster_share={share!r}; expected 0 < share <= 1")
        # Strictly below 1: absent pairs of the sparse Jaccard graph are at distance 1 (clustering.py).
        if self.dbscan_eps is not None and not 0.0 < self.dbscan_eps < 1.0:
            raise ValueError(
                f"clustering.dbscan_eps={self.dbscan_eps!r}; expected 0 < eps < 1 (Jaccard) or null"
            )


@dataclass(frozen=True)
class LossConfig:
    """Loss terms and weights (paper Eq. 12 as the reference code weighs it)."""

    ce_weight: float = 0.5  # weight of the cross-entropy terms (code: --lmd 0.5; not in the paper)
    refined_weight: float = 0.5  # balance of refined- vs coarse-label losses (paper: alpha)
    spread_weight: float = 0.1  # weight of the spread-out loss (paper: mu); 0 disables the memory
    label_smoothing: float = 0.1  # cross-entropy label smoothing epsilon
    triplet_margin: float | None = None  # None = soft-margin triplet (reference); 0.5 = paper's hinge
    triplet_feature: str = "bn_normalized"  # bn_normalized (Dual-Refinement) or pooled (source, baseline)
    # Multiplies the bn_normalized triplet feature. The soft-margin triplet is not scale-invariant: on
    # unit vectors its gradient is ~1/|bn| (~1/36 on MobileNetV2) of the pooled feature's, so CE drives
    # the Dual-Refinement script while the pooled triplet drives the baseline's. 1.0 = the reference.
    triplet_scale: float = 1.0
    spread_margin: float = 0.35  # margin inside the spread-out loss (paper: m)
    spread_num_neighbors: int = 6  # nearest bank entries treated as positives (paper: k)
    spread_variant: str = "reference"  # reference (code's positives/negatives) or paper
    memory: str = "instant"  # instant (trained by back-propagation), traditional (momentum), minibatch
    memory_loss: str = "spread_out"  # spread_out, or invariance (Table III's IN+TM)
    memory_momentum: float = 0.5  # update momentum of the traditional memory
    invariance_temperature: float = 0.05  # temperature of the invariance loss
    invariance_num_neighbors: int = 6  # ECN neighbourhood size k (0 = exemplar invariance only)
    # Multiplier of the instant bank's gradient; null = the reference's 1/ce_weight (2 at lambda 0.5),
    # and 1 when ce_weight is 0 (the reference then applies none).
    bank_grad_scale: float | None = None
    # mu ramps linearly from 0 over this many epochs (epoch e trains with mu * min(1, e / E)): the
    # spread-out term then starts once the clusters and the bank have moved off the source model's
    # neighbourhoods. 0 = the full mu from the first epoch (reference).
    spread_rampup_epochs: int = 0
    # Re-initialise the instant bank from every epoch's extracted features (reference: only at epoch 0,
    # so with few iterations the bank stays near the source model's features).
    bank_refresh: bool = False
    # L2 weight decay of the instant bank in Adam; null = optim.weight_decay (reference). Adam normalises
    # each entry's step, so where the decay term outweighs the bank's tiny loss gradient (~1e-6 per
    # entry) every entry steps ~lr towards 0: the rows shrink (norm ~0.15 after 200 steps, measured) and
    # their direction drifts with the decay, not the loss. 0 lets only the loss move the bank.
    bank_weight_decay: float | None = None

    def __post_init__(self) -> None:
        for name in ("ce_weight", "spread_weight", "label_smoothing", "spread_margin"):
            _check_positive(f"loss.{name}", getattr(self, name), allow_zero=True)
        if not 0.0 <= self.refined_weight <= 1.0:
            raise ValueError(f"loss.refined_weight={self.refined_weight!r}; expected 0..1")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"loss.label_smoothing={self.label_smoothing!r}; expected 0 <= epsilon < 1")
        if self.triplet_margin is not None:
            _check_positive("loss.triplet_margin", self.triplet_margin, allow_zero=True)
        _check_positive("loss.invariance_temperature", self.invariance_temperature)
        _check_positive("loss.invariance_num_neighbors", self.invariance_num_neighbors, allow_zero=True)
        _check_positive("loss.spread_num_neighbors", self.spread_num_neighbors)
        _check_choice("loss.triplet_feature", self.triplet_feature, TRIPLET_FEATURES)
        _check_choice("loss.spread_variant", self.spread_variant, SPREAD_VARIANTS)
        _check_choice("loss.memory", self.memory, MEMORY_KINDS)
        _check_choice("loss.memory_loss", self.memory_loss, MEMORY_LOSSES)
        if not 0.0 <= self.memory_momentum < 1.0:
            raise ValueError(f"loss.memory_momentum={self.memory_momentum!r}; expected 0 <= m < 1")
        _check_positive("loss.triplet_scale", self.triplet_scale)
        _check_positive("loss.spread_rampup_epochs", self.spread_rampup_epochs, allow_zero=True)
        if self.bank_grad_scale is not None:
            _check_positive("loss.bank_grad_scale", self.bank_grad_scale)
        if self.bank_weight_decay is not None:
            _check_positive("loss.bank_weight_decay", self.bank_weight_decay, allow_zero=True)

    def bank_gradient_scale(self) -> float:
        """The instant bank's gradient multiplier: `bank_grad_scale`, or the reference's 1/ce_weight."""
        if self.bank_grad_scale is not None:
            return self.bank_grad_scale
        return 1.0 / self.ce_weight if self.ce_weight > 0 else 1.0

    def spread_weight_at(self, epoch: int) -> float:
        """mu of a 0-based epoch under the ramp-up (`spread_rampup_epochs`)."""
        if self.spread_rampup_epochs == 0:
            return self.spread_weight
        return self.spread_weight * min(1.0, epoch / self.spread_rampup_epochs)


@dataclass(frozen=True)
class RunConfig:
    """Where and how a run executes."""

    run_dir: str = "runs/default"  # output folder: config, log, metrics, checkpoints, report
    seed: int = 1  # seeds every RNG; CPU runs are repeatable
    device: str = "cpu"  # cpu, cuda, cuda:1, ..., or auto (cuda when a GPU is present, else cpu)
    amp: str = "none"  # mixed precision: none, bf16 (CUDA, or a CPU with AVX512-BF16/AMX), fp16 (CUDA only)
    # Memory format of the network and its inputs: true, false, or auto (channels-last on the CPU, where it
    # is faster for every trunk measured; contiguous on CUDA).
    channels_last: bool | str = "auto"
    eval_every: int = 1  # evaluate on the test split every this many epochs (0 = only at the end)
    progress: bool = True  # progress bars with ETA
    threads: int = 0  # torch CPU threads (0 = torch's default)
    # Every this many iterations, record each loss term's gradient norm at the trunk's output
    # (adaptation; diagnostics only, the training is the same without it). 0 = off.
    diagnostics_every: int = 10

    def __post_init__(self) -> None:
        _check_choice("run.amp", self.amp, tuple(AMP_DTYPES))
        if self.amp == "fp16" and self.device == "cpu":
            raise ValueError("run.amp=fp16 is not supported with run.device=cpu; use bf16 (or none: float32)")
        if isinstance(self.channels_last, str) and self.channels_last != "auto":
            raise ValueError(f"run.channels_last={self.channels_last!r}; expected true, false or auto")
        _check_positive("run.seed", self.seed, allow_zero=True)
        _check_positive("run.diagnostics_every", self.diagnostics_every, allow_zero=True)
        _check_positive("run.eval_every", self.eval_every, allow_zero=True)
        _check_positive("run.threads", self.threads, allow_zero=True)


@dataclass(frozen=True)
class EvalConfig:
    """Options of adaptation's periodic query/gallery evaluation (all off: the standard protocol)."""

    flip: bool = False  # average each feature with its horizontally flipped image's (test-time augmentation)
    rerank: bool = False  # k-reciprocal re-ranking (Zhong et al., CVPR 2017) instead of the plain distance
    rerank_k1: int = 20  # re-ranking: k-reciprocal neighbourhood size (Zhong et al.: k1)
    rerank_k2: int = 6  # re-ranking: local query expansion size (Zhong et al.: k2)
    rerank_lambda: float = 0.3  # re-ranking: weight of the original distance (Zhong et al.: lambda)

    def __post_init__(self) -> None:
        _check_positive("evaluation.rerank_k1", self.rerank_k1)
        _check_positive("evaluation.rerank_k2", self.rerank_k2)
        if not 0.0 <= self.rerank_lambda <= 1.0:
            raise ValueError(f"evaluation.rerank_lambda={self.rerank_lambda!r}; expected 0..1")


def _pretrain_optim() -> OptimConfig:
    # The reference's pre-training keeps one Adam for the whole run (only its target loop resets it).
    return OptimConfig(reset_each_epoch=False)


def _pretrain_loss() -> LossConfig:
    # Source training: CE + soft-margin triplet on the pre-BN pooled feature, both weight 1; no memory.
    return LossConfig(ce_weight=1.0, refined_weight=0.0, spread_weight=0.0, triplet_feature="pooled")


@dataclass(frozen=True)
class PretrainConfig:
    """Supervised source training, then direct transfer to the target (`dualref pretrain`)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=_pretrain_optim)
    loss: LossConfig = field(default_factory=_pretrain_loss)
    run: RunConfig = field(default_factory=lambda: RunConfig(run_dir="runs/pretrain", eval_every=40))
    forward_target_batches: bool = True  # reference: forward a target batch per step to adapt BN stats
    evaluate_target: bool = True  # evaluate direct transfer on the target at the end

    def __post_init__(self) -> None:
        _check_bn_groups(self.data, self.model)


# The clustering baseline (the authors' baseline script: coarse labels only, no memory, the triplet on the
# pooled feature, a constant learning rate) as overrides of the adaptation defaults, which are
# Dual-Refinement's. configs/*/baseline.yaml set exactly these (tests/test_config.py); the demo applies them.
BASELINE_OVERRIDES = (
    "loss.refined_weight=0.0",
    "loss.spread_weight=0.0",
    "loss.triplet_feature=pooled",
    "optim.schedule=constant",
)


def _adapt_optim() -> OptimConfig:
    return OptimConfig(epochs=40, iters_per_epoch=400, schedule="step", lr_decay_epochs=20)


def _adapt_data() -> DataConfig:
    return DataConfig(random_erasing_prob=0.5)


@dataclass(frozen=True)
class AdaptConfig:
    """Dual-Refinement adaptation to the unlabelled target (`dualref adapt`)."""

    source_checkpoint: str | None = None  # checkpoint of `dualref pretrain` (None: start from `model`)
    data: DataConfig = field(default_factory=_adapt_data)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=_adapt_optim)
    clustering: ClusteringConfig = field(default_factory=ClusteringConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(run_dir="runs/adapt"))
    evaluation: EvalConfig = field(default_factory=EvalConfig)  # the target evaluation's options

    def __post_init__(self) -> None:
        _check_bn_groups(self.data, self.model)


def _check_bn_groups(data: DataConfig, model: ModelConfig) -> None:
    if data.batch_size % model.bn_groups:
        raise ValueError(
            f"model.bn_groups={model.bn_groups} does not divide data.batch_size={data.batch_size}; "
            "expected equal chunks"
        )


ConfigT = TypeVar("ConfigT")


def _closest(key: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = f"; closest valid keys: {close}" if close else ""
    return f"unknown config key {key!r}{hint} (valid: {sorted(valid)})"


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert a YAML / command-line value to the field's declared type, or raise naming the key."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = typing.get_args(annotation)
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ValueError:
                continue
        raise ValueError(f"config key {key!r}: {value!r} matches none of {annotation}")
    if origin is tuple:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list | tuple):
            raise ValueError(f"config key {key!r}: expected a list, got {value!r}")
        (item_type, _ellipsis) = typing.get_args(annotation)
        return tuple(_coerce(v, item_type, key) for v in value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ValueError(f"config key {key!r}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ValueError(f"config key {key!r}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ValueError(f"config key {key!r}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, bool):
            raise ValueError(f"config key {key!r}: expected a number, got {value!r}")
        # PyYAML reads "1.6e-3" as a string (YAML 1.1 wants "1.6e-03"); accept it here.
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"config key {key!r}: expected a number, got {value!r}") from None
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"config key {key!r}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config field type {annotation!r} for {key!r}")


def _build(cls: type[ConfigT], values: Mapping[str, Any], prefix: str) -> ConfigT:
    if not isinstance(values, Mapping):
        raise ValueError(f"config section {prefix.rstrip('.') or '<root>'!r} must be a mapping")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    for key in values:
        if key not in names:
            raise ValueError(_closest(prefix + str(key), [prefix + n for n in names]))
    kwargs: dict[str, Any] = {}
    for name in names:
        if name not in values:
            continue
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            default = getattr(cls(), name)  # the section's own defaults for this parent
            merged = {**dataclasses.asdict(default), **values[name]} if isinstance(
                values[name], Mapping
            ) else values[name]
            kwargs[name] = _build(annotation, merged, f"{prefix}{name}.")  # type: ignore[arg-type]
        else:
            kwargs[name] = _coerce(values[name], annotation, prefix + name)
    return cls(**kwargs)


def _apply_override(tree: dict[str, Any], item: str, cls: type) -> None:
    if "=" not in item:
        raise ValueError(f"override {item!r} is not of the form key=value (e.g. optim.lr=3.5e-4)")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    node, node_cls = tree, cls
    for depth, part in enumerate(parts):
        names = {f.name: f for f in dataclasses.fields(node_cls)}
        prefix = ".".join(parts[:depth])
        if part not in names:
            valid = [f"{prefix}.{n}" if prefix else n for n in names]
            raise ValueError(_closest(key.strip(), valid))
        annotation = typing.get_type_hints(node_cls)[part]
        if depth == len(parts) - 1:
            if dataclasses.is_dataclass(annotation):
                raise ValueError(f"override {key!r} names a section; set one of its fields")
            try:
                node[part] = yaml.safe_load(raw) if raw.strip() else raw
            except yaml.YAMLError as err:
                problem = str(getattr(err, "problem", None) or err).strip()
                raise ValueError(
                    f"override {item!r}: the value {raw!r} is not valid YAML ({problem}); quote or fix it, "
                    "e.g. --set optim.milestones=[40,70]"
                ) from None
        else:
            if not dataclasses.is_dataclass(annotation):
                raise ValueError(f"override {key!r}: {prefix or part!r} is not a section")
            node = node.setdefault(part, {})
            node_cls = annotation  # type: ignore[assignment]


def load_config(
    cls: type[ConfigT], path: str | Path | None = None, overrides: Sequence[str] = ()
) -> ConfigT:
    """Build a config from its defaults, a YAML file of differences, and `key=value` overrides.

    Args:
        cls: PretrainConfig or AdaptConfig (any nested frozen dataclass works).
        path: YAML file holding only the differences from the defaults, or None.
        overrides: `section.field=value` strings, applied after the file; values are parsed as YAML and
            then checked against the field type.

    Returns:
        The validated, frozen config.

    Raises:
        ValueError: an unknown key (with the closest valid keys), a wrong type or an invalid value.
        FileNotFoundError: `path` does not exist.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ValueError(f"config file {path} is not valid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping, got {type(loaded).__name__}")
        tree = loaded or {}
    for item in overrides:
        _apply_override(tree, item, cls)
    return _build(cls, tree, "")


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict of a config (tuples as lists), ready for YAML or a checkpoint."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(config))


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    io.write_text(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))
