"""Every config key of the method changes training, and the keys that must not change it do not (issue 14).

Table-driven: for each key of `loss.*`, `clustering.*`, `model.*` and `optim.*` (src/dualref/config.py), a
real adaptation on the tiny synthetic target (tests/tiny_adapt.py: 1 epoch of 2 iterations unless the row
says 2 epochs) is run with the key changed, and its losses and final weights (network and memory) are
compared with the same run without the change. CPU runs repeat bit for bit, so "changes" means the weights
differ and "no change" means identical losses and weights; where a key's formula says which way or how far
it moves what the run logs (the learning rate, mu, eps, the cluster profile, which loss terms are zero),
`EXPECTED` checks that too, and every `loss.*` run's logged total must be the objective of its logged
terms under that run's weights. A key that only acts in some settings is tried
in them (`base`), and a key that only acts after the first epoch gets two. A test also checks that the
table names every field of the four sections, so a new key has to be added here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from dualref import training
from dualref.config import (
    ClusteringConfig,
    DataConfig,
    EvalConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
)
from dualref.models.backbone import build_backbone
from dualref.pipelines import adapt, common
from tiny_adapt import Outcome, outcome, quiet_pipeline, same_training, tiny_config, write_target

# Shorter than the wiring tests' runs: one epoch of two iterations (two, so that what happens after the
# first update, such as a traditional memory's momentum, reaches the second loss).
BASE = ("optim.epochs=1", "optim.iters_per_epoch=2")
WARMUP = ("optim.schedule=warmup_multistep",)
TWO_EPOCHS_DECAY = ("optim.lr_decay_epochs=1",)
TRADITIONAL = ("loss.memory=traditional",)
INVARIANCE = ("loss.memory=traditional", "loss.memory_loss=invariance")
AT_64X32 = ("data.height=64", "data.width=32")
EVALUATED = ("run.eval_every=1",)
RERANKED = (*EVALUATED, "evaluation.rerank=true")
# The data itself (which target, where): not a training knob, so no row.
DATA_IDENTITY = {"data.target", "data.target_root"}


@dataclass(frozen=True)
class Row:
    key: str
    value: str  # YAML; "{tiny_weights}" is replaced by a trunk weights file
    changes: bool  # True: training must change; False: it must stay bit-identical
    why: str  # the value's effect on the tiny set-up
    base: tuple[str, ...] = ()  # settings in which the key acts (both runs)
    epochs: int = 1

    @property
    def id(self) -> str:
        return f"{self.key}={self.value}" + ("" if self.epochs == 1 else " (2 epochs)")


ROWS = [
    # loss.*: the objective's weights and terms
    Row("loss.ce_weight", "1.0", True, "lambda 0.5 -> 1 (paper): CE weight, and the bank scale 1/lambda"),
    Row("loss.refined_weight", "0.0", True, "alpha 0.5 -> 0: refined terms off (refined != coarse here)"),
    Row("loss.refined_weight", "1.0", True, "alpha 0.5 -> 1: coarse terms off"),
    Row("loss.spread_weight", "0.5", True, "mu 0.1 -> 0.5"),
    Row("loss.spread_weight", "0.0", True, "mu 0: no memory at all"),
    Row("loss.label_smoothing", "0.0", True, "plain CE targets"),
    Row("loss.triplet_margin", "0.5", True, "hinge at 0.5 instead of the soft margin"),
    Row("loss.triplet_feature", "pooled", True, "the triplet sees the pooled feature"),
    Row("loss.triplet_scale", "4.0", True, "the normalised BN feature x 4 in the triplet"),
    Row("loss.spread_margin", "0.0", True, "m 0.35 -> 0"),
    Row("loss.spread_num_neighbors", "2", True, "k 6 -> 2 positives"),
    Row("loss.spread_variant", "paper", True, "self never a negative, no entry dropped"),
    Row("loss.memory", "traditional", True, "momentum memory instead of the trainable bank"),
    Row("loss.memory", "minibatch", True, "the batch as its own bank"),
    Row("loss.memory_loss", "invariance", True, "ECN invariance loss instead of spread-out"),
    Row("loss.memory_momentum", "0.9", True, "the second iteration sees other rows", TRADITIONAL),
    Row("loss.invariance_temperature", "0.1", True, "temperature 0.05 -> 0.1", INVARIANCE),
    Row("loss.invariance_num_neighbors", "0", True, "exemplar invariance only", INVARIANCE),
    Row("loss.bank_grad_scale", "1.0", True, "bank gradient x 1 instead of x 1/lambda = 2 (vs weight decay)"),
    Row("loss.bank_grad_scale", "2.0", False, "null already means 1/lambda = 2 at lambda 0.5"),
    Row("loss.spread_rampup_epochs", "2", True, "mu at epoch 0 is 0.1 min(1, 0/2) = 0"),
    Row("loss.bank_refresh", "true", True, "the bank re-initialised from the epoch-1 features", epochs=2),
    Row("loss.bank_weight_decay", "0.0", True, "no L2 decay on the bank: only the loss moves it"),
    Row("loss.bank_weight_decay", "0.0005", False, "the same decay as optim.weight_decay, in its own group"),
    # clustering.*: the off-line stage
    Row("clustering.k1", "6", True, "smaller k-reciprocal sets: other Jaccard distances and clusters"),
    Row("clustering.k2", "2", True, "smaller query expansion: other Jaccard distances and clusters"),
    Row("clustering.dbscan_rho", "0.1", True, "a larger eps (rho rule)"),
    Row("clustering.dbscan_eps", "0.4", True, "a fixed eps instead of the rho rule's 0.48"),
    Row("clustering.max_cluster_share", "0.1", True, "the largest cluster (20 %) forces a lower eps"),
    Row("clustering.min_samples", "6", True, "fewer core points"),
    Row("clustering.num_subclusters", "4", True, "R 2 -> 4 prototypes: other refined labels"),
    Row("clustering.device", "cpu", False, "the run's device already (null = run.device = cpu)"),
    # model.*
    Row("model.arch", "mobilenet_v2", True, "another trunk"),
    Row("model.pretrained", "{tiny_weights}", True, "trunk weights from a file instead of a random init"),
    Row("model.last_stride", "2", True, "a 1x1 instead of a 2x1 final map"),
    Row("model.stem_relu", "true", True, "ReLU after the ResNet stem", ("model.arch=resnet18",)),
    Row("model.neck_relu", "true", True, "ReLU after the BN neck"),
    Row("model.bn_groups", "2", True, "ghost BatchNorm over two halves of the batch"),
    # optim.*
    Row("optim.lr", "1e-3", True, "larger steps"),
    Row("optim.weight_decay", "0.0", True, "no L2 decay"),
    Row("optim.epochs", "2", True, "a second epoch"),
    Row("optim.iters_per_epoch", "3", True, "a third iteration"),
    Row("optim.schedule", "warmup_multistep", True, "epoch 0 at 0.109 x lr (warm-up position 1)"),
    Row("optim.schedule", "constant", True, "no x0.1 at epoch 1", TWO_EPOCHS_DECAY, epochs=2),
    Row("optim.warmup_epochs", "2", True, "epoch 0 at position 1 of 2: 0.505 x lr", WARMUP),
    Row("optim.warmup_factor", "0.5", True, "epoch 0 at 0.55 x lr", WARMUP),
    Row("optim.milestones", "[1]", True, "x gamma from position 1 = epoch 0", WARMUP),
    Row("optim.lr_decay_epochs", "1", True, "x gamma at epoch 1", epochs=2),
    Row("optim.gamma", "0.5", True, "epoch 1 at x 0.5 instead of x 0.1", TWO_EPOCHS_DECAY, epochs=2),
    Row("optim.reference_warmup_offset", "false", True, "epoch 0 at position 0: 0.01 x lr", WARMUP),
    Row("optim.reset_each_epoch", "false", True, "epoch 1 starts from epoch 0's Adam moments", epochs=2),
    # keys that must not change training
    Row("run.eval_every", "1", False, "an evaluation between the two epochs", epochs=2),
    Row("run.diagnostics_every", "0", False, "no gradient-share diagnostics"),
    Row("run.diagnostics_every", "1", False, "diagnostics at every iteration"),
    Row("run.progress", "true", False, "progress bars"),
    # At 64x32: at the tiny set-up's 32x16, oneDNN's bf16 convolutions on 2x1 maps are refused
    # (training.check_autocast).
    Row("run.amp", "bf16", training.cpu_supports_bf16(), "bf16 autocast (float32 without bf16)", AT_64X32),
    Row("run.channels_last", "true", False, "auto is channels-last on the CPU already"),
    Row("run.channels_last", "false", True, "contiguous convolutions sum in another order"),
    Row("data.cache_images", "false", False, "pixels decoded again instead of shared"),
    # data.*: the training batches and images
    Row("data.height", "64", True, "a larger input"),
    Row("data.width", "32", True, "a larger input"),
    Row("data.batch_size", "8", True, "P x K = 2 x 4 instead of 4 x 4"),
    Row("data.num_instances", "2", True, "P x K = 8 x 2 instead of 4 x 4"),
    Row("data.random_erasing_prob", "0.0", True, "no erased blocks (the tiny set-up: 0.5)"),
    # Found when these rows were written: a run repeats bit for bit only at the same values of these two.
    Row("data.num_workers", "1", True, "the augmentation draws from the worker's seeded generator"),
    Row("data.test_batch_size", "16", True, "other extraction chunks round the features otherwise"),
    Row("data.skip_unreadable", "true", False, "every image reads: nothing dropped"),
    Row("data.source", "market1501", False, "adaptation reads no source data"),
    Row("data.source_root", "elsewhere", False, "adaptation reads no source data"),
    # evaluation.*: measurement only, with an evaluation between the two epochs
    Row("evaluation.flip", "true", False, "flip-averaged test features", EVALUATED, epochs=2),
    Row("evaluation.rerank", "true", False, "re-ranked test distances", EVALUATED, epochs=2),
    Row("evaluation.rerank_k1", "10", False, "re-ranking's k1", RERANKED, epochs=2),
    Row("evaluation.rerank_k2", "2", False, "re-ranking's k2", RERANKED, epochs=2),
    Row("evaluation.rerank_lambda", "0.5", False, "re-ranking's lambda", RERANKED, epochs=2),
    Row("run.seed", "2", True, "(control) another seed changes the weights"),
]


@pytest.fixture(scope="module")
def train(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[tuple[str, ...]], Outcome]]:
    """Runs the tiny adaptation with extra overrides (each distinct set once) and returns what it trained."""
    root = write_target(tmp_path_factory.mktemp("synth"))
    weights = tmp_path_factory.mktemp("weights") / "tiny_trunk.pt"
    torch.manual_seed(123)
    torch.save(build_backbone("tiny", pretrained=None).state_dict(), weights)
    cache: dict[tuple[str, ...], Outcome] = {}

    def run(overrides: tuple[str, ...]) -> Outcome:
        overrides = tuple(o.replace("{tiny_weights}", str(weights)) for o in overrides)
        if overrides not in cache:
            run_dir = tmp_path_factory.mktemp("run")
            with pytest.MonkeyPatch.context() as patch:
                if not any(o.startswith("run.eval_every=") for o in overrides):
                    # run.eval_every=0: the one evaluation comes after the last checkpoint; skip its cost
                    patch.setattr(common, "evaluator", lambda *args, **kwargs: None)
                    patch.setattr(common, "evaluate", lambda *args: {"mAP": 0.0, "rank1": 0.0, "mINP": 0.0})
                adapt.adapt_to_target(tiny_config(root, run_dir, *BASE, *overrides))
            cache[overrides] = outcome(run_dir)
        return cache[overrides]

    with quiet_pipeline():
        yield run


LR = 3.5e-4  # optim.lr's default


def _lrs(run: Outcome) -> list[float]:
    return [record["lr"] for record in run.records]


def _first(run: Outcome, key: str) -> Any:
    return run.records[0][key]


# Where a key's formula says which way (or how far) it moves what the run logs, the row checks that too:
# row id -> what the changed run (and its reference) must show. Learning rates from the schedule's formula
# (training.lr_at_epoch's docstring), worked by hand.
EXPECTED: dict[str, Callable[[Outcome, Outcome], bool]] = {
    "loss.spread_weight=0.5": lambda ref, new: _first(ref, "spread_weight") == 0.1
    and _first(new, "spread_weight") == 0.5,
    "loss.spread_weight=0.0": lambda ref, new: new.memory is None and new.losses[0]["loss_memory"] == 0.0,
    "loss.spread_rampup_epochs=2": lambda ref, new: _first(new, "spread_weight") == 0.0
    and new.losses[0]["loss_memory"] == 0.0  # weight 0: the term is not even computed
    and new.memory is not None
    and ref.losses[0]["loss_memory"] > 0,
    "loss.refined_weight=0.0": lambda ref, new: new.losses[0]["loss_ce_refined"] == 0.0
    and new.losses[0]["loss_triplet_refined"] == 0.0
    and ref.losses[0]["loss_ce_refined"] > 0,
    "loss.refined_weight=1.0": lambda ref, new: new.losses[0]["loss_ce_coarse"] == 0.0
    and new.losses[0]["loss_triplet_coarse"] == 0.0
    and ref.losses[0]["loss_ce_coarse"] > 0,
    "clustering.dbscan_rho=0.1": lambda ref, new: _first(new, "eps") > _first(ref, "eps"),
    "clustering.dbscan_eps=0.4": lambda ref, new: _first(new, "eps") == 0.4 != _first(ref, "eps"),
    "clustering.max_cluster_share=0.1": lambda ref, new: _first(new, "largest_cluster_share") <= 0.1
    < _first(ref, "largest_cluster_share")
    and _first(new, "eps") < _first(ref, "eps"),
    # More points needed to be core: never fewer outliers.
    "clustering.min_samples=6": lambda ref, new: _first(new, "num_outliers") > _first(ref, "num_outliers"),
    "optim.lr=1e-3": lambda ref, new: _lrs(ref) == [LR] and _lrs(new) == [1e-3],
    "optim.schedule=warmup_multistep": lambda ref, new: _lrs(new) == pytest.approx([0.109 * LR]),
    "optim.schedule=constant (2 epochs)": lambda ref, new: _lrs(ref) == pytest.approx([LR, 0.1 * LR])
    and _lrs(new) == [LR, LR],
    "optim.warmup_epochs=2": lambda ref, new: _lrs(new) == pytest.approx([0.505 * LR]),
    "optim.warmup_factor=0.5": lambda ref, new: _lrs(new) == pytest.approx([0.55 * LR]),
    "optim.milestones=[1]": lambda ref, new: _lrs(new) == pytest.approx([0.0109 * LR]),
    "optim.lr_decay_epochs=1 (2 epochs)": lambda ref, new: _lrs(ref) == [LR, LR]
    and _lrs(new) == pytest.approx([LR, 0.1 * LR]),
    "optim.gamma=0.5 (2 epochs)": lambda ref, new: _lrs(new) == pytest.approx([LR, 0.5 * LR]),
    "optim.reference_warmup_offset=false": lambda ref, new: _lrs(new) == pytest.approx([0.01 * LR]),
}


def _objective_holds(run: Outcome) -> bool:
    """The logged total is the paper's objective of the logged terms under the run's weights (means over
    iterations of a linear combination with per-epoch weights)."""
    lam, alpha = run.config["loss"]["ce_weight"], run.config["loss"]["refined_weight"]
    for terms, record in zip(run.losses, run.records, strict=True):
        coarse = lam * terms["loss_ce_coarse"] + terms["loss_triplet_coarse"]
        refined = lam * terms["loss_ce_refined"] + terms["loss_triplet_refined"]
        total = (1 - alpha) * coarse + alpha * refined + record["spread_weight"] * terms["loss_memory"]
        if terms["loss_total"] != pytest.approx(total, rel=1e-5, abs=1e-7):
            return False
    return True


def _weights_differ(a: Outcome, b: Outcome) -> bool:
    if a.model.keys() != b.model.keys() or (a.memory is None) != (b.memory is None):
        return True
    if any(not torch.equal(a.model[k], b.model[k]) for k in a.model):
        return True
    if a.memory is not None and b.memory is not None:
        return any(not torch.equal(a.memory[k], b.memory[k]) for k in a.memory)
    return False


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_config_key_changes_training_exactly_when_it_should(
    row: Row, train: Callable[[tuple[str, ...]], Outcome]
) -> None:
    base = (*row.base, *(("optim.epochs=2",) if row.epochs == 2 else ()))
    reference = train(base)
    changed = train((*base, f"{row.key}={row.value}"))
    if row.changes:
        assert _weights_differ(reference, changed), f"{row.id} did not change the weights ({row.why})"
    else:
        assert same_training(reference, changed), f"{row.id} changed the training ({row.why})"
    expected = EXPECTED.get(row.id)
    assert expected is None or expected(reference, changed), f"{row.id}: not what {row.why!r} implies"
    if row.key.startswith("loss."):
        assert _objective_holds(reference) and _objective_holds(changed), row.id


def test_every_expectation_names_a_row() -> None:
    assert set(EXPECTED) <= {row.id for row in ROWS}


def test_the_table_names_every_key_of_the_method() -> None:
    sections = {
        "loss": LossConfig,
        "clustering": ClusteringConfig,
        "model": ModelConfig,
        "optim": OptimConfig,
        "data": DataConfig,
        "evaluation": EvalConfig,
    }
    keys = {f"{name}.{f.name}" for name, cls in sections.items() for f in dataclasses.fields(cls)}
    missing = keys - DATA_IDENTITY - {row.key for row in ROWS}
    assert not missing, sorted(missing)


def test_rows_that_need_two_epochs_do_not_show_in_the_first(
    train: Callable[[tuple[str, ...]], Outcome],
) -> None:
    # The epoch-0 loss of a two-epoch row is the unchanged one: what the row tests is a later-epoch effect.
    for row in ROWS:
        if row.epochs == 2 and row.changes and not row.key.startswith("optim.epochs"):
            base = (*row.base, "optim.epochs=2")
            assert train(base).losses[0] == train((*base, f"{row.key}={row.value}")).losses[0], row.id
