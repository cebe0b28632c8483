"""The wires of Algorithm 1: each stage's output reaches the stage that needs it, unchanged and on time.

The maths of every stage has its own tests; these check the connections (issue 14), where they are made:
`dualref.pipelines.adapt.adapt_to_target` (off-line stage -> classifier, sampler, bank, optimizer, step)
and `dualref.steps.train_target_epoch` (batch -> labels, features, loss terms, objective, gradients).
Pipeline tests record, with small wrappers around the functions the loop calls, what each stage received
during a real two-epoch run on the tiny synthetic target; the off-line stage (`adapt.prepare_epoch`, a pure
function of the run state and the features) is called directly on the features the run extracted; step
tests use hand-built batches with answers computed here, term by term.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from dualref import clustering, distances, extraction, losses, pseudo_labels, steps
from dualref.config import AdaptConfig, LossConfig
from dualref.data import datasets, loaders
from dualref.data.samplers import RandomIdentitySampler
from dualref.losses import objective
from dualref.losses.objective import LossTerms, LossWeights
from dualref.memory_bank import InstantMemoryBank, MemoryBank, MomentumMemoryBank
from dualref.models.reid_net import ReidNet, ReidOutput
from dualref.pipelines import adapt, common
from dualref.pipelines.cluster import run_cluster
from tiny_adapt import outcome, quiet_pipeline, tiny_config, write_target

# --- recording a real adaptation ---------------------------------------------------------------------


@dataclass
class Epoch:
    """What `train_target_epoch` was given (and left) in one epoch of the pipeline."""

    classifier: Tensor  # the classifier rows when the epoch's training starts
    classifier_param: torch.nn.Parameter
    trainable: list[torch.nn.Parameter]  # the model's trainable parameters (and the instant bank)
    optimizer: torch.optim.Optimizer
    optimizer_state: set[int]  # ids of the parameters the optimizer already holds a state for
    lr: float
    refined_labels: Tensor  # the [N] labels handed to the step
    spread_weight: float | None
    loss: LossConfig
    memory: MemoryBank | None
    bank_in: Tensor | None  # the bank rows before / after the epoch's training
    bank_out: Tensor | None = None
    model_out: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class Step:
    """The inputs and outputs of `target_loss_terms` (and the weights of the objective) of one batch."""

    epoch: int
    logits: Tensor
    metric: Tensor
    features: Tensor
    coarse: Tensor
    refined: Tensor
    indices: Tensor
    terms: LossTerms
    weights: LossWeights | None = None


@dataclass
class Recording:
    cfg: AdaptConfig
    run_dir: Path
    # (epochs trained before the call, model state, output) of every feature extraction
    extractions: list[tuple[int, dict[str, Tensor], Tensor]] = field(default_factory=list)
    # (features, the state's eps, the labels) of every `prepare_epoch` call, and its whole result
    pseudo: list[tuple[Tensor, float | None, pseudo_labels.PseudoLabels]] = field(default_factory=list)
    prepared: list[adapt.EpochLabels] = field(default_factory=list)
    sampler_calls: list[tuple[list[int], list[int], dict[str, Any]]] = field(default_factory=list)
    bank_inits: list[Tensor] = field(default_factory=list)
    epochs: list[Epoch] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    spread_calls: list[tuple[Tensor, Tensor, Tensor, dict[str, Any]]] = field(default_factory=list)

    def labels(self, epoch: int) -> pseudo_labels.PseudoLabels:
        return self.pseudo[epoch][2]


def _state(model: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _install_recorders(patch: pytest.MonkeyPatch, rec: Recording) -> None:
    real_extract = extraction.extract_features
    real_prepare = adapt.prepare_epoch
    real_loader = loaders.train_loader
    real_init = InstantMemoryBank.init_from
    real_epoch = steps.train_target_epoch
    real_terms = steps.target_loss_terms
    real_objective = objective.dual_refinement_objective
    real_spread = losses.spread_out_loss

    def extract(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Tensor:
        state = _state(model)
        features = real_extract(model, *args, **kwargs)
        rec.extractions.append((len(rec.epochs), state, features))
        return features

    def prepare(state: adapt.AdaptState, features: Tensor, *args: Any) -> adapt.EpochLabels:
        eps = state.eps
        prepared = real_prepare(state, features, *args)
        rec.pseudo.append((features, eps, prepared.labels))
        rec.prepared.append(prepared)
        return prepared

    def loader(paths: Any, labels: Any, camids: Any, **kwargs: Any) -> Any:
        rec.sampler_calls.append((list(labels), list(camids), kwargs))
        return real_loader(paths, labels, camids, **kwargs)

    def init_from(self: InstantMemoryBank, features: Tensor) -> None:
        rec.bank_inits.append(features)
        real_init(self, features)

    def train_epoch(
        model: ReidNet, loader: Any, optimizer: torch.optim.Optimizer, refined_labels: Tensor, **kwargs: Any
    ) -> steps.EpochStats:
        memory = kwargs["memory"]
        trainable = [p for p in model.parameters() if p.requires_grad]
        if isinstance(memory, InstantMemoryBank):
            trainable.append(memory.weight)
        entry = Epoch(
            classifier=model.classifier.weight.detach().clone(),
            classifier_param=model.classifier.weight,
            trainable=trainable,
            optimizer=optimizer,
            optimizer_state={id(p) for p in optimizer.state if optimizer.state[p]},
            lr=optimizer.param_groups[0]["lr"],
            refined_labels=refined_labels.clone(),
            spread_weight=kwargs.get("spread_weight"),
            loss=kwargs["loss"],
            memory=memory,
            bank_in=memory.bank().detach().clone() if memory is not None else None,
        )
        rec.epochs.append(entry)
        stats = real_epoch(model, loader, optimizer, refined_labels, **kwargs)
        entry.bank_out = memory.bank().detach().clone() if memory is not None else None
        entry.model_out = _state(model)
        return stats

    def terms(
        logits: Tensor,
        metric: Tensor,
        features: Tensor,
        coarse: Tensor,
        refined: Tensor,
        indices: Tensor,
        *args: Any,
    ) -> LossTerms:
        result = real_terms(logits, metric, features, coarse, refined, indices, *args)
        rec.steps.append(
            Step(
                epoch=len(rec.epochs) - 1,
                logits=logits.detach().clone(),
                metric=metric.detach().clone(),
                features=features.detach().clone(),
                coarse=coarse.clone(),
                refined=refined.clone(),
                indices=indices.clone(),
                terms=LossTerms(*(t.detach().clone() for t in result)),
            )
        )
        return result

    def total(terms_: LossTerms, weights: LossWeights) -> Tensor:
        rec.steps[-1].weights = weights
        return real_objective(terms_, weights)

    def spread(*args: Any, **kwargs: Any) -> Tensor:
        bound = inspect.signature(real_spread).bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        features, bank, indices = (arguments.pop(k) for k in ("features", "bank", "indices"))
        rec.spread_calls.append((features.detach().clone(), bank, indices.clone(), arguments))
        return real_spread(*args, **kwargs)

    patch.setattr(extraction, "extract_features", extract)
    patch.setattr(adapt, "prepare_epoch", prepare)
    patch.setattr(loaders, "train_loader", loader)
    patch.setattr(InstantMemoryBank, "init_from", init_from)
    patch.setattr(steps, "train_target_epoch", train_epoch)
    patch.setattr(steps, "target_loss_terms", terms)
    patch.setattr(objective, "dual_refinement_objective", total)
    patch.setattr(losses, "spread_out_loss", spread)


@pytest.fixture(scope="module")
def target_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_target(tmp_path_factory.mktemp("synth"))


def _recorded_run(root: Path, run_dir: Path, *overrides: str) -> Recording:
    cfg = tiny_config(root, run_dir, *overrides)
    rec = Recording(cfg, run_dir)
    with quiet_pipeline() as patch:
        _install_recorders(patch, rec)
        adapt.adapt_to_target(cfg)
    return rec


@pytest.fixture(scope="module")
def run(target_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Recording:
    """The reference method (every default of loss.*), 2 epochs of 3 iterations; lr decays at epoch 1."""
    return _recorded_run(target_root, tmp_path_factory.mktemp("runs") / "full", "optim.lr_decay_epochs=1")


@pytest.fixture(scope="module")
def variant_run(target_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Recording:
    """Bank refreshed every epoch, mu ramped over 2 epochs, Adam moments carried over."""
    return _recorded_run(
        target_root,
        tmp_path_factory.mktemp("runs") / "variant",
        "loss.bank_refresh=true",
        "loss.spread_rampup_epochs=2",
        "optim.reset_each_epoch=false",
    )


def _equal(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and bool(torch.equal(a, b))


def test_off_line_stage_gives_clusters_outliers_and_refined_labels_that_move(run: Recording) -> None:
    # alpha > 0: the refined labels are computed. The checks below also need the set-up to have outliers,
    # several clusters and refined labels that differ from the coarse ones.
    assert len(run.epochs) == 2 and len(run.steps) == 6
    for epoch in range(2):
        labels = run.labels(epoch)
        assert labels.num_clusters >= 3 and (labels.coarse < 0).any()
        assert labels.refined is not None
        clustered = labels.coarse >= 0
        assert (labels.refined[clustered] != labels.coarse[clustered]).any()


# --- off-line stage -> everything else ---------------------------------------------------------------


def test_clustering_sees_each_epochs_features_of_the_current_model(run: Recording) -> None:
    for epoch in range(2):
        features = run.pseudo[epoch][0]
        # the extraction that produced them ran after exactly `epoch` epochs of training...
        ((trained, state),) = [(n, s) for n, s, out in run.extractions if out is features]
        assert trained == epoch
        if epoch > 0:  # ...with the model as the previous epoch's training left it
            previous = run.epochs[epoch - 1].model_out
            assert all(_equal(state[k], previous[k]) for k in state)
    assert not _equal(run.pseudo[0][0], run.pseudo[1][0])


def test_prepare_epoch_is_the_off_line_stage_of_the_run_settings_and_changes_no_state(run: Recording) -> None:
    features = run.pseudo[1][0]  # epoch 1's features, extracted by the run
    cfg, cpu = run.cfg, torch.device("cpu")
    model = ReidNet("tiny", 1)
    for eps, seed, alpha in ((None, 0, 0.5), (0.55, 0, 0.5), (0.55, 7, 0.5), (0.55, 0, 0.0)):
        settings = dataclasses.replace(
            cfg,
            run=dataclasses.replace(cfg.run, seed=seed),
            loss=dataclasses.replace(cfg.loss, refined_weight=alpha),
        )
        state = adapt.AdaptState(model, None, eps=eps, epoch=1)
        prepared = adapt.prepare_epoch(state, features, settings, cpu)
        # clustering.*, the state's eps, refinement only when a term reads it, k-means seeded by run.seed
        expected = pseudo_labels.compute_pseudo_labels(
            features, cfg.clustering, eps=eps, refine=alpha > 0, seed=seed, device=cpu
        )
        assert np.array_equal(prepared.labels.coarse, expected.coarse) and prepared.labels.eps == expected.eps
        if alpha > 0:
            assert expected.refined is not None and prepared.labels.refined is not None
            assert np.array_equal(prepared.labels.refined, expected.refined)
        else:
            assert prepared.labels.refined is None
        centroids = clustering.cluster_centroids(features, expected.coarse, expected.num_clusters)
        assert _equal(prepared.centroids, centroids)
        assert prepared.profile == pseudo_labels.cluster_profile(expected.coarse, num_instances=4)
        assert (state.eps, state.epoch, state.optimizer) == (eps, 1, None)  # read, not changed
    # In the run, each epoch's labels are what prepare_epoch gives on that epoch's features and eps.
    for epoch, (features, eps, labels) in enumerate(run.pseudo):
        again = adapt.prepare_epoch(adapt.AdaptState(model, None, eps=eps, epoch=epoch), features, cfg, cpu)
        assert np.array_equal(again.labels.coarse, labels.coarse) and again.labels.eps == labels.eps


def test_eps_is_derived_from_epoch_0_features_and_then_fixed(run: Recording) -> None:
    (f0, eps_in0, labels0), (f1, eps_in1, labels1) = run.pseudo
    assert eps_in0 is None  # derived at epoch 0...
    # The rho rule written out on the dense matrix (absent entries are 1): the mean of the smallest
    # round(rho * count) non-zero distances above the diagonal, as the reference computed it.
    stored = distances.jaccard_distance(f0, run.cfg.clustering.k1, run.cfg.clustering.k2).tocoo()
    dense = np.ones(stored.shape)
    dense[stored.row, stored.col] = stored.data
    values = dense[np.triu_indices(len(dense), k=1)]
    values = np.sort(values[values != 0])
    chosen = int(np.round(run.cfg.clustering.dbscan_rho * values.size))
    assert labels0.eps == pytest.approx(float(values[:chosen].mean()), rel=1e-9)
    assert eps_in1 == labels0.eps and labels1.eps == labels0.eps  # ...and handed to every later epoch
    # Epoch 1's clusters are DBSCAN's at that eps on epoch 1's distances.
    dist1 = distances.jaccard_distance(f1, run.cfg.clustering.k1, run.cfg.clustering.k2)
    coarse1 = clustering.cluster_dbscan(dist1, labels0.eps, run.cfg.clustering.min_samples)
    assert np.array_equal(np.asarray(coarse1), labels1.coarse)


def test_coarse_labels_drive_the_sampler_and_the_coarse_terms(run: Recording) -> None:
    data, optim = run.cfg.data, run.cfg.optim
    cameras = [s.camid for s in datasets.load_dataset(data.target, data.target_root).train]
    assert len(set(cameras)) > 1
    for epoch in range(2):
        labels, camids, kwargs = run.sampler_calls[epoch]
        assert labels == run.labels(epoch).coarse.tolist()
        assert camids == cameras  # the camera-aware sampler sees the images' cameras
        settings = ("batch_size", "num_instances", "num_iterations", "seed")
        assert [kwargs[k] for k in settings] == [
            data.batch_size, data.num_instances, optim.iters_per_epoch, run.cfg.run.seed
        ]
        # The batches the step saw are the sampler's batches of this epoch (its order is set per epoch).
        sampler = RandomIdentitySampler(
            labels, camids, batch_size=data.batch_size, num_instances=data.num_instances,
            num_iterations=optim.iters_per_epoch, seed=run.cfg.run.seed,
        )
        sampler.set_epoch(epoch)
        seen = [step.indices.tolist() for step in run.steps if step.epoch == epoch]
        assert seen == [list(batch) for batch in sampler]
    for step in run.steps:
        coarse = torch.from_numpy(run.labels(step.epoch).coarse)
        assert _equal(step.coarse, coarse[step.indices])


def test_outliers_never_appear_in_a_batch(run: Recording) -> None:
    for step in run.steps:
        assert (torch.from_numpy(run.labels(step.epoch).coarse)[step.indices] >= 0).all()
        assert (step.coarse >= 0).all() and (step.refined >= 0).all()


def test_refined_labels_reach_the_refined_terms_and_only_those(run: Recording) -> None:
    for epoch in range(2):
        refined = run.labels(epoch).refined
        assert refined is not None
        assert _equal(run.epochs[epoch].refined_labels, torch.from_numpy(refined))
    smoothing, margin = run.cfg.loss.label_smoothing, run.cfg.loss.triplet_margin
    told_apart = 0
    for step in run.steps:
        refined = run.labels(step.epoch).refined
        assert refined is not None
        assert _equal(step.refined, torch.from_numpy(refined)[step.indices])
        by_label = {
            name: (
                losses.cross_entropy_with_label_smoothing(step.logits, labels, epsilon=smoothing),
                losses.batch_hard_triplet_loss(step.metric, labels, margin=margin),
            )
            for name, labels in (("coarse", step.coarse), ("refined", step.refined))
        }
        torch.testing.assert_close(step.terms.ce_coarse, by_label["coarse"][0], rtol=0, atol=0)
        torch.testing.assert_close(step.terms.triplet_coarse, by_label["coarse"][1], rtol=0, atol=0)
        torch.testing.assert_close(step.terms.ce_refined, by_label["refined"][0], rtol=0, atol=0)
        torch.testing.assert_close(step.terms.triplet_refined, by_label["refined"][1], rtol=0, atol=0)
        told_apart += int(by_label["coarse"][0] != by_label["refined"][0])
    assert told_apart > 0  # some batch where the two label sets give different terms


def test_classifier_rows_are_the_normalised_coarse_centroids_at_each_epoch_start(run: Recording) -> None:
    for epoch, entry in enumerate(run.epochs):
        features, _, labels = run.pseudo[epoch]
        expected = torch.stack(
            [F.normalize(features[labels.coarse == c].mean(0), dim=0) for c in range(labels.num_clusters)]
        )
        assert entry.classifier.shape == expected.shape
        torch.testing.assert_close(entry.classifier, expected, rtol=1e-5, atol=1e-6)


def test_a_fresh_adam_each_epoch_over_the_new_classifier_the_network_and_the_bank(run: Recording) -> None:
    for epoch, entry in enumerate(run.epochs):
        held = [p for group in entry.optimizer.param_groups for p in group["params"]]
        assert {id(p) for p in held} == {id(p) for p in entry.trainable}
        assert any(p is entry.classifier_param for p in held)  # the classifier of this epoch
        assert isinstance(entry.memory, InstantMemoryBank) and any(p is entry.memory.weight for p in held)
        assert entry.optimizer_state == set()  # optim.reset_each_epoch (default): no moment carried over
        assert entry.lr == common.epoch_lr(run.cfg.optim, epoch)
        assert all(g["weight_decay"] == run.cfg.optim.weight_decay for g in entry.optimizer.param_groups)
    assert run.epochs[0].lr != run.epochs[1].lr  # lr_decay_epochs=1: the schedule is read each epoch


def test_adam_moments_are_carried_over_when_not_reset(variant_run: Recording) -> None:
    first, second = variant_run.epochs
    bank = second.memory.weight if isinstance(second.memory, InstantMemoryBank) else None
    trunk = [p for p in second.trainable if p is not second.classifier_param and p is not bank and p.ndim > 1]
    assert trunk and all(id(p) in second.optimizer_state for p in trunk)
    assert id(second.classifier_param) not in second.optimizer_state  # a new classifier: new moments
    assert first.optimizer_state == set()


def test_bank_is_initialised_once_from_epoch_0_features_then_only_trained(run: Recording) -> None:
    (init,) = run.bank_inits
    assert init is run.pseudo[0][0]  # the features the epoch-0 clustering saw
    first, second = run.epochs
    assert first.bank_in is not None and second.bank_in is not None
    assert first.bank_out is not None and second.bank_out is not None
    torch.testing.assert_close(first.bank_in, F.normalize(init, dim=1), rtol=0, atol=0)
    assert _equal(second.bank_in, first.bank_out)  # not re-initialised at epoch 1...
    # ...and trained in both epochs
    assert not _equal(first.bank_out, first.bank_in) and not _equal(second.bank_out, second.bank_in)


def test_bank_refresh_reinitialises_the_bank_from_each_epochs_features(variant_run: Recording) -> None:
    assert len(variant_run.bank_inits) == 2
    for epoch, init in enumerate(variant_run.bank_inits):
        assert init is variant_run.pseudo[epoch][0]
        bank_in = variant_run.epochs[epoch].bank_in
        assert bank_in is not None
        torch.testing.assert_close(bank_in, F.normalize(init, dim=1), rtol=0, atol=0)


def test_spread_weight_of_each_epoch_reaches_the_objective(variant_run: Recording) -> None:
    # spread_rampup_epochs=2: mu = 0.1 min(1, e / 2): epoch 0 trains without the memory term, epoch 1 at 0.05
    assert [e.spread_weight for e in variant_run.epochs] == [0.0, 0.05]
    for step in variant_run.steps:
        assert step.weights is not None
        assert step.weights.spread_weight == [0.0, 0.05][step.epoch]
        assert (step.terms.memory > 0) == (step.epoch == 1)


def test_objective_weights_come_from_the_config(run: Recording) -> None:
    loss = run.cfg.loss
    for step in run.steps:
        assert step.weights == LossWeights(loss.ce_weight, loss.refined_weight, loss.spread_weight)
    assert all(e.loss == loss for e in run.epochs)


def test_memory_loss_sees_the_batch_indices_its_features_and_the_bank(run: Recording) -> None:
    assert len(run.spread_calls) == len(run.steps)
    loss = run.cfg.loss
    for (features, bank, indices, kwargs), step in zip(run.spread_calls, run.steps, strict=True):
        memory = run.epochs[step.epoch].memory
        assert isinstance(memory, InstantMemoryBank) and bank is memory.weight
        assert _equal(indices, step.indices) and _equal(features, step.features)
        torch.testing.assert_close(features.norm(dim=1), torch.ones(len(features)))
        assert kwargs == {
            "num_neighbors": loss.spread_num_neighbors,
            "margin": loss.spread_margin,
            "variant": loss.spread_variant,
        }


# --- the step on hand-built batches ------------------------------------------------------------------

NUM_SAMPLES = 20
CPU = torch.device("cpu")


def _batch(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(NUM_SAMPLES, generator=generator)[:8]
    coarse = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    images = torch.rand(8, 3, 32, 16, generator=generator)
    return images, coarse, torch.zeros(8, dtype=torch.long), indices


def _refined_for(batch: tuple[Tensor, ...]) -> Tensor:
    """[N] refined labels that move three of the batch's eight images to another cluster."""
    refined = torch.arange(NUM_SAMPLES) % 4
    refined[batch[3]] = torch.tensor([0, 1, 1, 1, 2, 3, 3, 0])
    return refined


class _GradientProbe(torch.optim.SGD):
    """Records each parameter's gradient when the step is taken, and moves nothing (lr 0)."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        super().__init__(params, lr=0.0)
        self.params = params
        self.grads: list[list[Tensor | None]] = []

    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        self.grads.append([None if p.grad is None else p.grad.clone() for p in self.params])


def _model_and_bank(seed: int = 0) -> tuple[ReidNet, InstantMemoryBank]:
    torch.manual_seed(seed)
    model = ReidNet("tiny", num_classes=4)
    bank = InstantMemoryBank(NUM_SAMPLES, model.feat_dim)
    bank.init_from(torch.randn(NUM_SAMPLES, model.feat_dim))
    return model, bank


def _trainable(model: ReidNet, bank: InstantMemoryBank) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad] + [bank.weight]


@pytest.mark.parametrize(
    ("ce_weight", "refined_weight", "spread_weight", "bank_grad_scale", "triplet_feature", "triplet_scale"),
    [
        (0.5, 0.5, 0.1, None, "bn_normalized", 1.0),  # the reference: bank gradient x 1/lambda = 2
        (1.3, 0.3, 0.7, None, "bn_normalized", 2.0),  # alpha != 1/2 tells the coarse and refined sides apart
        (0.25, 0.0, 0.2, 3.0, "pooled", 1.0),  # the baseline's coarse-only terms, an explicit bank scale
        (0.7, 1.0, 0.05, 1.0, "bn_normalized", 1.0),  # refined-only terms
        (0.0, 0.8, 0.4, None, "bn_normalized", 1.0),  # lambda 0: no CE, bank scale 1 (not 1/0)
    ],
)
def test_every_weight_changes_the_gradient_as_its_formula_says(
    ce_weight: float,
    refined_weight: float,
    spread_weight: float,
    bank_grad_scale: float | None,
    triplet_feature: str,
    triplet_scale: float,
) -> None:
    # d total / d theta = (1-a) l dCE_c + (1-a) dTri_c + a l dCE_r + a dTri_r + mu dL_mem, and the bank's
    # gradient times the bank scale: each term's gradient is computed here on its own, by hand.
    settings = LossConfig(
        ce_weight=ce_weight,
        refined_weight=refined_weight,
        spread_weight=spread_weight,
        bank_grad_scale=bank_grad_scale,
        triplet_feature=triplet_feature,
        triplet_scale=triplet_scale,
        spread_num_neighbors=3,
    )
    model, bank = _model_and_bank()
    twin, twin_bank = copy.deepcopy(model), copy.deepcopy(bank)
    batch = _batch()
    refined = _refined_for(batch)
    probe = _GradientProbe(_trainable(model, bank))
    stats = steps.train_target_epoch(
        model, [batch], probe, refined, memory=bank, loss=settings, device=CPU, progress=False
    )
    (actual,) = probe.grads

    images, coarse, _, indices = batch
    twin.train()
    out = twin(images)
    assert isinstance(out, ReidOutput)
    features = F.normalize(out.bn, dim=1)
    metric = out.pooled if triplet_feature == "pooled" else features * triplet_scale
    ls = settings.label_smoothing
    terms = [
        losses.cross_entropy_with_label_smoothing(out.logits, coarse, epsilon=ls),
        losses.batch_hard_triplet_loss(metric, coarse),
        losses.cross_entropy_with_label_smoothing(out.logits, refined[indices], epsilon=ls),
        losses.batch_hard_triplet_loss(metric, refined[indices]),
        losses.spread_out_loss(features, twin_bank.weight, indices, num_neighbors=3),
    ]
    a, lam = refined_weight, ce_weight
    coefficients = [(1 - a) * lam, 1 - a, a * lam, a, spread_weight]
    params = _trainable(twin, twin_bank)
    expected = [torch.zeros_like(p) for p in params]
    for coefficient, term in zip(coefficients, terms, strict=True):
        grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        for total, grad in zip(expected, grads, strict=True):
            if grad is not None:
                total += coefficient * grad
    expected[-1] *= settings.bank_gradient_scale()
    assert settings.bank_gradient_scale() == (bank_grad_scale or (1 / lam if lam > 0 else 1.0))
    names = [name for name, p in twin.named_parameters() if p.requires_grad] + ["memory bank"]
    for name, got, want in zip(names, actual, expected, strict=True):
        got = torch.zeros_like(want) if got is None else got
        scale = float(want.abs().max())
        # summation order: measured <= 1.4e-6 of the tensor's largest entry
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * scale + 1e-12, msg=name)
    assert float(expected[-1].abs().max()) > 0  # the bank does receive a gradient
    # The logged terms are the hand-built ones (a switched-off term is logged as 0).
    for name, term in zip(LossTerms._fields, terms, strict=True):
        switched_off = (name.endswith("coarse") and a == 1) or (name.endswith("refined") and a == 0)
        want_value = 0.0 if switched_off else float(term.detach())
        assert stats.means[name] == pytest.approx(want_value, rel=1e-6, abs=1e-7), name


@pytest.mark.parametrize(
    ("triplet_feature", "triplet_scale"), [("bn_normalized", 1.0), ("bn_normalized", 3.0), ("pooled", 1.0)]
)
def test_triplet_sees_the_configured_feature_and_the_memory_the_unit_bn_feature(
    triplet_feature: str, triplet_scale: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, bank = _model_and_bank()
    outputs: list[ReidOutput] = []
    model.register_forward_hook(lambda module, inputs, output: outputs.append(output))
    triplet_inputs: list[tuple[Tensor, Tensor]] = []
    spread_inputs: list[tuple[Tensor, Tensor]] = []
    real_triplet, real_spread = losses.batch_hard_triplet_loss, losses.spread_out_loss

    def triplet(features: Tensor, labels: Tensor, **kwargs: Any) -> Tensor:
        triplet_inputs.append((features.detach().clone(), labels.clone()))
        return real_triplet(features, labels, **kwargs)

    def spread(features: Tensor, bank_rows: Tensor, indices: Tensor, **kwargs: Any) -> Tensor:
        spread_inputs.append((features.detach().clone(), indices.clone()))
        return real_spread(features, bank_rows, indices, **kwargs)

    monkeypatch.setattr(losses, "batch_hard_triplet_loss", triplet)
    monkeypatch.setattr(losses, "spread_out_loss", spread)
    settings = LossConfig(
        triplet_feature=triplet_feature, triplet_scale=triplet_scale, spread_num_neighbors=3
    )
    batch = _batch()
    refined = _refined_for(batch)
    optimizer = torch.optim.SGD(_trainable(model, bank), lr=0.0)
    steps.train_target_epoch(model, [batch], optimizer, refined, memory=bank, loss=settings, device=CPU,
                             progress=False)
    (out,) = outputs
    unit = F.normalize(out.bn.detach(), dim=1)
    want = out.pooled.detach() if triplet_feature == "pooled" else unit * triplet_scale
    assert [labels.tolist() for _, labels in triplet_inputs] == [
        batch[1].tolist(),
        refined[batch[3]].tolist(),
    ]
    for seen, _ in triplet_inputs:
        torch.testing.assert_close(seen, want, rtol=0, atol=0)
    ((seen_features, seen_indices),) = spread_inputs
    torch.testing.assert_close(seen_features, unit, rtol=0, atol=0)
    assert _equal(seen_indices, batch[3])


def test_traditional_memory_moves_the_batch_rows_after_the_step() -> None:
    torch.manual_seed(0)
    model = ReidNet("tiny", num_classes=4)
    memory = MomentumMemoryBank(NUM_SAMPLES, model.feat_dim, momentum=0.7)
    memory.init_from(torch.randn(NUM_SAMPLES, model.feat_dim))
    before = memory.bank().clone()
    outputs: list[ReidOutput] = []
    model.register_forward_hook(lambda module, inputs, output: outputs.append(output))
    batch = _batch()
    settings = LossConfig(memory="traditional", spread_num_neighbors=3)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    steps.train_target_epoch(model, [batch], optimizer, _refined_for(batch), memory=memory, loss=settings,
                             device=CPU, progress=False)
    (out,) = outputs
    features = F.normalize(out.bn.detach(), dim=1)
    indices = batch[3]
    expected = before.clone()
    expected[indices] = F.normalize(0.7 * before[indices] + 0.3 * features, dim=1)
    torch.testing.assert_close(memory.bank(), expected, rtol=1e-5, atol=1e-6)


def test_minibatch_memory_is_the_batch_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = _model_and_bank()
    seen: list[tuple[Tensor, Tensor, Tensor]] = []
    real_spread = losses.spread_out_loss

    def spread(features: Tensor, bank_rows: Tensor, indices: Tensor, **kwargs: Any) -> Tensor:
        seen.append((features, bank_rows, indices.clone()))
        return real_spread(features, bank_rows, indices, **kwargs)

    monkeypatch.setattr(losses, "spread_out_loss", spread)
    batch = _batch()
    settings = LossConfig(memory="minibatch", spread_num_neighbors=3)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    steps.train_target_epoch(model, [batch], optimizer, _refined_for(batch), memory=None, loss=settings,
                             device=CPU, progress=False)
    ((features, bank_rows, indices),) = seen
    assert bank_rows is features and _equal(indices, torch.arange(8))


# --- refined == coarse and mu = 0: the full path is the matched baseline ----------------------------


def _forced_refined_run(root: Path, run_dir: Path, *overrides: str) -> tuple[list[Tensor], dict[str, Tensor]]:
    """A run whose refined labels are its coarse ones: its per-step totals and its initial weights."""
    real_prepare, real_objective = adapt.prepare_epoch, objective.dual_refinement_objective
    real_extract = extraction.extract_features
    totals: list[Tensor] = []
    initial: list[dict[str, Tensor]] = []

    def coarse_as_refined(*args: Any) -> adapt.EpochLabels:
        prepared = real_prepare(*args)
        labels = prepared.labels
        if labels.refined is None:
            return prepared
        return dataclasses.replace(prepared, labels=dataclasses.replace(labels, refined=labels.coarse.copy()))

    def total(terms: LossTerms, weights: LossWeights) -> Tensor:
        result = real_objective(terms, weights)
        totals.append(result.detach().clone())
        return result

    def extract(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Tensor:
        if not initial:
            initial.append(_state(model))
        return real_extract(model, *args, **kwargs)

    with quiet_pipeline() as patch:
        patch.setattr(adapt, "prepare_epoch", coarse_as_refined)
        patch.setattr(objective, "dual_refinement_objective", total)
        patch.setattr(extraction, "extract_features", extract)
        adapt.adapt_to_target(tiny_config(root, run_dir, *overrides))
    return totals, initial[0]


def test_refined_equal_to_coarse_and_no_memory_is_the_baseline(target_root: Path, tmp_path: Path) -> None:
    """alpha = 1/2 with refined = coarse and mu = 0 trains as the alpha = 0 baseline, to rounding.

    (1-a)(l CE_c + T_c) + a(l CE_r + T_r) with r = c, a = 1/2 is 0.5 X + 0.5 X = X exactly in floating
    point, so the first step's loss is the baseline's bit for bit. The gradients are not: autograd sums the
    contributions of a tensor used several times (the features enter the triplet's distance matrix three
    times, the log-probabilities the CE twice) in an order that interleaves the two copies of the terms, and
    float addition is not associative, so they differ in the last bits (about 1e-6 of each tensor's largest
    entry). Adam then turns such noise on near-zero gradient entries into updates of up to one learning
    rate. Hence: first loss identical; later losses to 1e-6 relative; final weights to 1e-4 of the distance
    training moved them (measured: 1e-5) and to one learning rate per entry (measured: 0.15 lr).
    """
    # Contiguous convolutions: the tolerances below were measured in that layout (channels-last sums in
    # another order, which Adam amplifies on near-zero gradient entries: ~4e-6 relative by step 6).
    shared = (
        "loss.spread_weight=0",
        "loss.triplet_feature=bn_normalized",
        "optim.schedule=step",
        "run.channels_last=false",
    )
    full_totals, init = _forced_refined_run(
        target_root, tmp_path / "full", *shared, "loss.refined_weight=0.5"
    )
    base_totals, _ = _forced_refined_run(
        target_root, tmp_path / "baseline", *shared, "loss.refined_weight=0"
    )
    assert len(full_totals) == len(base_totals) == 6
    assert torch.equal(full_totals[0], base_totals[0])
    torch.testing.assert_close(torch.stack(full_totals), torch.stack(base_totals), rtol=1e-6, atol=0)
    a, b = outcome(tmp_path / "full"), outcome(tmp_path / "baseline")
    assert a.memory is None and b.memory is None
    for left, right in zip(a.losses, b.losses, strict=True):
        assert left["loss_ce_refined"] == left["loss_ce_coarse"] and right["loss_ce_refined"] == 0.0
        for name in ("loss_total", "loss_ce_coarse", "loss_triplet_coarse"):
            assert left[name] == pytest.approx(right[name], rel=1e-6, abs=0), name
    assert a.model.keys() == b.model.keys()
    lr = tiny_config(target_root, tmp_path).optim.lr
    trained = [k for k in b.model if k in init and b.model[k].is_floating_point()]
    difference = torch.stack([(a.model[k] - b.model[k]).double().pow(2).sum() for k in trained]).sum().sqrt()
    moved = torch.stack([(b.model[k] - init[k]).double().pow(2).sum() for k in trained]).sum().sqrt()
    assert float(moved) > 1.0 and float(difference) <= 1e-4 * float(moved)
    for key in a.model:
        torch.testing.assert_close(a.model[key], b.model[key], rtol=0, atol=lr, msg=key)


def test_refined_equal_to_coarse_first_step_gradients_agree_to_rounding() -> None:
    """One batch, the step itself: the same loss bit for bit and the same gradient to a few float32 ulps."""
    results = []
    for alpha in (0.5, 0.0):
        model, _ = _model_and_bank()
        batch = _batch()
        probe = _GradientProbe([p for p in model.parameters() if p.requires_grad])
        settings = LossConfig(refined_weight=alpha, spread_weight=0.0)
        same_labels = torch.full((NUM_SAMPLES,), -1)
        same_labels[batch[3]] = batch[1]
        stats = steps.train_target_epoch(model, [batch], probe, same_labels, memory=None, loss=settings,
                                         device=CPU, progress=False)
        results.append((stats.means["total"], probe.grads[0]))
    (full_total, full_grads), (base_total, base_grads) = results
    assert full_total == base_total
    for got, want in zip(full_grads, base_grads, strict=True):
        assert got is not None and want is not None
        torch.testing.assert_close(got, want, rtol=0, atol=8 * 1.2e-7 * float(want.abs().max()))


def test_dualref_cluster_gives_the_loops_labels_on_the_same_features(run: Recording, tmp_path: Path) -> None:
    # `dualref cluster` on the features the loop clustered at epoch 0 (saved as `dualref extract` saves
    # them) gives the loop's labels: both compute the off-line stage the same way on the same device.
    features, _, labels = run.pseudo[0]
    np.save(tmp_path / "features.npy", features.numpy())
    cpu = torch.device("cpu")
    run_cluster(tmp_path / "features.npy", settings=run.cfg.clustering, seed=run.cfg.run.seed, device=cpu)
    assert labels.refined is not None
    assert np.array_equal(np.load(tmp_path / "coarse_labels.npy"), labels.coarse)
    assert np.array_equal(np.load(tmp_path / "refined_labels.npy"), labels.refined)
