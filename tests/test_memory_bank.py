"""Memory banks (instant, momentum, mini-batch), the ECN invariance loss, and the in-place Adam."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dualref.losses import invariance_loss, spread_out_loss
from dualref.memory_bank import (
    InPlaceAdam,
    InstantMemoryBank,
    MomentumMemoryBank,
    build_memory_bank,
    minibatch_bank,
)


def _features(num: int, dim: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(num, dim, generator=torch.Generator().manual_seed(seed)) * 3.0


def test_instant_bank_init_normalises_rows_and_is_trainable() -> None:
    bank = InstantMemoryBank(10, 8)
    raw = _features(10, 8)
    bank.init_from(raw)
    assert torch.allclose(bank.weight.norm(dim=1), torch.ones(10), atol=1e-6)
    assert torch.allclose(bank.weight, raw / raw.norm(dim=1, keepdim=True), atol=1e-6)
    assert bank.weight.requires_grad
    assert [name for name, _ in bank.named_parameters()] == ["weight"]


def test_instant_bank_receives_spread_out_gradient_on_every_row() -> None:
    bank = InstantMemoryBank(12, 4)
    bank.init_from(_features(12, 4))
    features = F.normalize(_features(3, 4, seed=1), dim=1).requires_grad_()
    loss = spread_out_loss(features, bank.bank(), torch.tensor([0, 5, 7]), num_neighbors=2)
    loss.backward()
    assert bank.weight.grad is not None
    # every row is a negative (or positive) of some sample, so every row gets a gradient
    assert (bank.weight.grad.norm(dim=1) > 0).all()


@pytest.mark.parametrize("bank_cls", [InstantMemoryBank, MomentumMemoryBank])
def test_state_dict_round_trip(bank_cls: type, tmp_path: object) -> None:
    bank = bank_cls(6, 5)
    bank.init_from(_features(6, 5))
    path = f"{tmp_path}/bank.pt"
    torch.save(bank.state_dict(), path)
    restored = bank_cls(6, 5)
    restored.load_state_dict(torch.load(path))
    assert torch.equal(restored.bank(), bank.bank())


@pytest.mark.parametrize("bank_cls", [InstantMemoryBank, MomentumMemoryBank])
def test_init_rejects_wrong_shape_and_non_finite(bank_cls: type) -> None:
    bank = bank_cls(4, 3)
    with pytest.raises(ValueError, match=r"\(4, 3\)"):
        bank.init_from(torch.ones(5, 3))
    bad = torch.ones(4, 3)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        bank.init_from(bad)


def test_momentum_update_matches_the_formula() -> None:
    momentum = 0.75
    bank = MomentumMemoryBank(5, 3, momentum=momentum)
    bank.init_from(torch.eye(5, 3) + 0.1)
    before = bank.bank().clone()
    batch = F.normalize(_features(2, 3, seed=2), dim=1)
    indices = torch.tensor([3, 1])
    bank.update(batch, indices)
    after = bank.bank()
    for row, index in enumerate(indices.tolist()):
        mixed = momentum * before[index] + (1 - momentum) * batch[row]
        assert torch.allclose(after[index], mixed / mixed.norm(), atol=1e-6)
    untouched = [0, 2, 4]
    assert torch.equal(after[untouched], before[untouched])
    assert not bank.bank().requires_grad


def test_momentum_update_hand_computed() -> None:
    # v = (1, 0), f = (0, 1), m = 0.5: 0.5 v + 0.5 f = (0.5, 0.5) -> normalised (1/sqrt2, 1/sqrt2)
    bank = MomentumMemoryBank(1, 2, momentum=0.5)
    bank.init_from(torch.tensor([[2.0, 0.0]]))
    bank.update(torch.tensor([[0.0, 1.0]]), torch.tensor([0]))
    assert torch.allclose(bank.bank(), torch.full((1, 2), 2**-0.5), atol=1e-6)


def test_momentum_update_with_a_repeated_index_applies_both_in_order() -> None:
    bank = MomentumMemoryBank(2, 2, momentum=0.5)
    bank.init_from(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    first, second = torch.tensor([0.0, 1.0]), torch.tensor([-1.0, 0.0])
    bank.update(torch.stack([first, second]), torch.tensor([0, 0]))
    step = F.normalize(0.5 * torch.tensor([1.0, 0.0]) + 0.5 * first, dim=0)
    step = F.normalize(0.5 * step + 0.5 * second, dim=0)
    assert torch.allclose(bank.bank()[0], step, atol=1e-6)


def test_build_memory_bank_kinds() -> None:
    assert isinstance(build_memory_bank("instant", 3, 2, 0.5), InstantMemoryBank)
    assert isinstance(build_memory_bank("traditional", 3, 2, 0.5), MomentumMemoryBank)
    assert build_memory_bank("minibatch", 3, 2, 0.5) is None
    with pytest.raises(ValueError, match="'bogus'"):
        build_memory_bank("bogus", 3, 2, 0.5)
    with pytest.raises(ValueError, match="momentum"):
        MomentumMemoryBank(3, 2, momentum=1.0)


def test_minibatch_bank_is_the_batch_itself() -> None:
    features = F.normalize(_features(9, 4), dim=1).requires_grad_()
    bank, indices = minibatch_bank(features)
    assert bank is features
    assert indices.tolist() == list(range(9))
    spread_out_loss(features, bank, indices, num_neighbors=2).backward()
    assert features.grad is not None and torch.isfinite(features.grad).all()


def _naive_invariance(
    features: torch.Tensor, bank: torch.Tensor, indices: torch.Tensor, temperature: float, k: int
) -> torch.Tensor:
    # Written out per sample, following ECN Eqs. 3-6 literally.
    total = torch.zeros(())
    unit_bank = bank / bank.norm(dim=1, keepdim=True)
    for f, own in zip(features, indices.tolist(), strict=True):
        sims = torch.stack([f @ v for v in unit_bank])
        log_p = sims / temperature - torch.logsumexp(sims / temperature, dim=0)
        loss = -log_p[own]
        if k:
            others = [j for j in range(len(bank)) if j != own]
            nearest = sorted(others, key=lambda j: -float(sims[j]))[:k]
            loss = loss - sum(log_p[j] for j in nearest) / k
        total = total + loss
    return total / len(features)


@pytest.mark.parametrize("k", [0, 3])
def test_invariance_loss_matches_naive_formula(k: int) -> None:
    bank = _features(15, 6, seed=3)
    features = F.normalize(_features(4, 6, seed=4), dim=1)
    indices = torch.tensor([0, 4, 9, 14])
    value = invariance_loss(features, bank, indices, temperature=0.1, num_neighbors=k)
    expected = _naive_invariance(features, bank, indices, 0.1, k)
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)


def test_invariance_loss_hand_value() -> None:
    # Two orthogonal unit memory rows, feature = row 0, T = 1: p(0) = e / (e + 1), loss = log(1 + 1/e).
    bank = torch.eye(2)
    value = invariance_loss(torch.tensor([[1.0, 0.0]]), bank, torch.tensor([0]), temperature=1.0)
    assert value.item() == pytest.approx(float(torch.log1p(torch.exp(torch.tensor(-1.0)))), rel=1e-6)


def test_invariance_loss_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="temperature"):
        invariance_loss(torch.ones(1, 2), torch.eye(2), torch.tensor([0]), temperature=0.0)
    with pytest.raises(ValueError, match="num_neighbors"):
        invariance_loss(torch.ones(1, 2), torch.eye(2), torch.tensor([0]), num_neighbors=2)


def _adam_run(
    optimizer_cls: type[torch.optim.Adam], steps: int, **kwargs: object
) -> tuple[list[torch.Tensor], dict[str, object]]:
    """`steps` Adam steps over a bank-like [N, D] parameter and two small ones (two param groups),
    with the bank's gradient scaled by 2 after backward as the target step does."""
    gen = torch.Generator().manual_seed(5)
    bank = torch.nn.Parameter(F.normalize(torch.randn(300, 16, generator=gen), dim=1))
    weight = torch.nn.Parameter(torch.randn(16, 16, generator=gen))
    bias = torch.nn.Parameter(torch.zeros(16))  # zero: weight decay adds nothing, the gradient alone moves it
    groups = [{"params": [weight, bias]}, {"params": [bank], "lr": 1e-3}]
    optimizer = optimizer_cls(groups, lr=3.5e-4, betas=(0.9, 0.999), eps=1e-8, **kwargs)  # type: ignore[arg-type]
    for step in range(steps):
        features = F.normalize(torch.randn(8, 16, generator=gen) @ weight + bias, dim=1)
        indices = torch.randint(0, 300, (8,), generator=gen)
        optimizer.zero_grad(set_to_none=True)
        spread_out_loss(features, bank, indices).backward()
        assert bank.grad is not None
        bank.grad.mul_(2.0)  # steps.scale_bank_gradient
        if step == 2:
            bias.grad = None  # a parameter without gradient this step is left alone
        optimizer.step()
    return [p.detach().clone() for p in (bank, weight, bias)], optimizer.state_dict()


@pytest.mark.parametrize("weight_decay", [5e-4, 0.0])
def test_in_place_adam_is_bit_identical_to_torch_adam(weight_decay: float) -> None:
    ours, our_state = _adam_run(InPlaceAdam, 6, weight_decay=weight_decay)
    theirs, their_state = _adam_run(torch.optim.Adam, 6, weight_decay=weight_decay)
    for mine, reference in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine, reference, rtol=0, atol=0)
    # Same state (moments and step counts), so checkpoints of one resume the other.
    assert our_state["param_groups"] == their_state["param_groups"]
    for index, reference_state in their_state["state"].items():  # type: ignore[attr-defined]
        for key, value in reference_state.items():
            mine = our_state["state"][index][key]  # type: ignore[index]
            assert mine.dtype == value.dtype
            torch.testing.assert_close(mine, value, rtol=0, atol=0)


def test_in_place_adam_leaves_the_gradient_and_falls_back_to_torch() -> None:
    param = torch.nn.Parameter(torch.ones(3, 2))
    optimizer = InPlaceAdam([param], lr=0.1, weight_decay=0.5)
    param.grad = torch.full((3, 2), 0.25)
    optimizer.step()
    assert torch.equal(param.grad, torch.full((3, 2), 0.25))
    # Options outside the in-place path (here amsgrad) take torch's own step: the same numbers.
    ours, _ = _adam_run(InPlaceAdam, 3, weight_decay=5e-4, amsgrad=True)
    theirs, _ = _adam_run(torch.optim.Adam, 3, weight_decay=5e-4, amsgrad=True)
    for mine, reference in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine, reference, rtol=0, atol=0)
