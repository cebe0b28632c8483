"""Memory banks over the target training set: one vector per target image, addressed by dataset index.

docs/method.md §5 and the paper's Table III:

* `InstantMemoryBank` (the paper's IM, the default): one trainable parameter [N, D], initialised once from
  the source model's L2-normalised target features (epoch 0) and then moved by back-propagation of the
  spread-out loss, in the same Adam optimiser as the network, at every iteration. It is never refreshed
  from newly extracted features.
* `MomentumMemoryBank` (the paper's TM, "traditional memory"): a buffer [N, D] with no gradient, updated
  after each step from the batch features, ``v <- m v + (1 - m) f`` then renormalised (Wu et al. 2018,
  Zhong et al. 2019). The memory loss then trains only the network.
* the mini-batch variant (MB) has no state: the batch features themselves act as the bank
  (`minibatch_bank`).

A bank's rows are *raw*: the losses normalise them, so an instant bank may drift in norm between steps.

The instant bank makes Adam's step touch N x D entries every iteration (weight decay alone gives every
row a gradient): `InPlaceAdam` performs torch.optim.Adam's arithmetic without its [N, D] temporaries.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _check_features(features: Tensor, num_samples: int, feat_dim: int) -> None:
    if features.dim() != 2 or tuple(features.shape) != (num_samples, feat_dim):
        raise ValueError(
            f"memory bank initial features have shape {tuple(features.shape)}; "
            f"expected ({num_samples}, {feat_dim})"
        )
    if not torch.isfinite(features).all():
        raise ValueError("memory bank initial features contain NaN or Inf; expected finite values")


class InstantMemoryBank(nn.Module):
    """Instant memory bank: one trainable vector per target training image (paper: IM, §III-D).

    Args:
        num_samples: N, the number of target training images (outliers included: rows stay aligned
            with dataset indices).
        feat_dim: D, the feature dimension of the network.

    Attributes:
        weight: [N, D] trainable parameter, the raw bank rows (normalised inside the loss).
    """

    def __init__(self, num_samples: int, feat_dim: int) -> None:
        super().__init__()
        if num_samples <= 0 or feat_dim <= 0:
            raise ValueError(
                f"memory bank size ({num_samples}, {feat_dim}) is not valid; expected positive sizes"
            )
        self.weight = nn.Parameter(torch.zeros(num_samples, feat_dim))

    @property
    def num_samples(self) -> int:
        return int(self.weight.shape[0])

    @property
    def feat_dim(self) -> int:
        return int(self.weight.shape[1])

    @torch.no_grad()
    def init_from(self, features: Tensor) -> None:
        """Set every row to the L2-normalised feature of its image (Algorithm 1, step 2; epoch 0 only).

        Args:
            features: [N, D] target training features in dataset order (normalised again here).
        """
        _check_features(features, self.num_samples, self.feat_dim)
        self.weight.copy_(F.normalize(features.to(self.weight), dim=1))

    def bank(self) -> Tensor:
        """[N, D] raw rows, with gradient: the spread-out loss back-propagates into every row."""
        return self.weight


class MomentumMemoryBank(nn.Module):
    """Traditional memory (paper Table III, "TM"): rows follow the features by a momentum update.

    Args:
        num_samples: N, the number of target training images.
        feat_dim: D, the feature dimension.
        momentum: m in ``v <- m v + (1 - m) f``; 0 copies the newest feature.

    Attributes:
        features: [N, D] buffer of L2-normalised rows (saved in the state dict, no gradient).
    """

    features: Tensor

    def __init__(self, num_samples: int, feat_dim: int, momentum: float = 0.5) -> None:
        super().__init__()
        if num_samples <= 0 or feat_dim <= 0:
            raise ValueError(
                f"memory bank size ({num_samples}, {feat_dim}) is not valid; expected positive sizes"
            )
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"memory momentum={momentum!r} is not valid; expected 0 <= m < 1")
        self.momentum = momentum
        self.register_buffer("features", torch.zeros(num_samples, feat_dim))

    @property
    def num_samples(self) -> int:
        return int(self.features.shape[0])

    @property
    def feat_dim(self) -> int:
        return int(self.features.shape[1])

    @torch.no_grad()
    def init_from(self, features: Tensor) -> None:
        """Set every row to the L2-normalised feature of its image (epoch 0 only).

        Args:
            features: [N, D] target training features in dataset order.
        """
        _check_features(features, self.num_samples, self.feat_dim)
        self.features.copy_(F.normalize(features.to(self.features), dim=1))

    def bank(self) -> Tensor:
        """[N, D] rows without gradient: the memory loss trains only the network."""
        return self.features

    @torch.no_grad()
    def update(self, features: Tensor, indices: Tensor) -> None:
        """Move the rows of a batch towards its features: ``v <- normalise(m v + (1 - m) f)``.

        Call after the optimiser step with the batch's (detached) features. A dataset index repeated
        in the batch is updated once per occurrence, in batch order (the P x K sampler never repeats an
        index within a batch unless a cluster has fewer than K images).

        Args:
            features: [B, D] L2-normalised batch features.
            indices: [B] int64 dataset indices of the batch.
        """
        if features.dim() != 2 or features.shape[1] != self.feat_dim:
            raise ValueError(
                f"features have shape {tuple(features.shape)}; expected (B, {self.feat_dim})"
            )
        if indices.shape != (features.shape[0],):
            raise ValueError(
                f"indices have shape {tuple(indices.shape)}; expected ({features.shape[0]},)"
            )
        features = features.detach().to(self.features)
        indices = indices.to(self.features.device)
        if indices.unique().numel() == indices.numel():
            mixed = self.momentum * self.features[indices] + (1.0 - self.momentum) * features
            self.features[indices] = F.normalize(mixed, dim=1)
            return
        for row, index in zip(features, indices, strict=True):
            mixed = self.momentum * self.features[index] + (1.0 - self.momentum) * row
            self.features[index] = F.normalize(mixed, dim=0)


MemoryBank = InstantMemoryBank | MomentumMemoryBank


def build_memory_bank(kind: str, num_samples: int, feat_dim: int, momentum: float) -> MemoryBank | None:
    """The memory of a Table III variant: "instant", "traditional", or None for "minibatch".

    Args:
        kind: instant (trainable rows), traditional (momentum rows) or minibatch (no memory).
        num_samples: N target training images.
        feat_dim: D.
        momentum: momentum of the traditional memory (ignored otherwise).

    Returns:
        The (uninitialised) bank, or None for the mini-batch variant.
    """
    if kind == "instant":
        return InstantMemoryBank(num_samples, feat_dim)
    if kind == "traditional":
        return MomentumMemoryBank(num_samples, feat_dim, momentum=momentum)
    if kind == "minibatch":
        return None
    raise ValueError(f"memory kind {kind!r} is not valid; expected instant, traditional or minibatch")


def minibatch_bank(features: Tensor) -> tuple[Tensor, Tensor]:
    """The mini-batch variant (Table III, "MB"): the batch is its own bank.

    Args:
        features: [B, D] L2-normalised batch features.

    Returns:
        bank [B, D] (the same tensor, so gradients flow through both sides) and indices [B] = 0..B-1.
    """
    return features, torch.arange(features.shape[0], device=features.device)


def adam_step_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    scratch: Tensor,
    *,
    step: float,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One Adam step with L2 weight decay and bias correction, in place (t = `step`, already counted):

        g = grad + weight_decay * param
        m <- m + (1 - beta1) (g - m)              (lerp, = beta1 m + (1 - beta1) g)
        v <- beta2 v + (1 - beta2) g^2
        param <- param - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    The operations of torch.optim.Adam's single-tensor step (the CPU default), in its order, so the
    result is bit-identical; but `g` and the denominator are written into `scratch` rather than into
    two fresh parameter-sized tensors, and `grad` is left untouched.

    Args:
        param: the parameter, updated in place.
        grad: its gradient (same shape).
        exp_avg, exp_avg_sq: Adam's moments m and v, updated in place.
        scratch: a tensor of the parameter's shape whose contents may be overwritten.
        step: t, the 1-based number of this step.
        lr, beta1, beta2, eps, weight_decay: Adam's settings.
    """
    if weight_decay != 0:
        grad = torch.add(grad, param, alpha=weight_decay, out=scratch)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    denom = torch.sqrt(exp_avg_sq, out=scratch).div_(bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-(lr / bias_correction1))


class InPlaceAdam(torch.optim.Adam):
    """torch.optim.Adam whose step writes no parameter-sized temporaries (`adam_step_`).

    Same constructor, state and state dict as torch.optim.Adam, and the same numbers: on the CPU, for
    the settings the pipelines use (L2 weight decay, no amsgrad / maximize / foreach / fused /
    capturable / differentiable), every parameter goes through `adam_step_`, bit-identical to torch's
    single-tensor step; anything else falls back to torch's own step. Torch's step allocates three
    parameter-sized tensors per parameter, which for the 12,936 x 1,280 instant bank are page-faulted
    66 MB buffers costing several times the arithmetic; here one scratch buffer, as large as the largest
    parameter, is kept between steps instead.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._scratch: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    def _in_place_supported(self) -> bool:
        for group in self.param_groups:
            flags = ("amsgrad", "maximize", "foreach", "fused", "capturable", "differentiable")
            if any(group.get(flag) for flag in flags) or group.get("decoupled_weight_decay", False):
                return False
            if isinstance(group["lr"], Tensor) or any(isinstance(beta, Tensor) for beta in group["betas"]):
                return False
            for param in group["params"]:
                if (
                    param.device.type != "cpu"
                    or param.is_complex()
                    or (param.grad is not None and param.grad.is_sparse)
                ):
                    return False
        return True

    def _scratch_like(self, param: Tensor) -> Tensor:
        key = (param.dtype, param.device)
        buffer = self._scratch.get(key)
        if buffer is None or buffer.numel() < param.numel():
            largest = max(
                p.numel() for group in self.param_groups for p in group["params"] if p.dtype == param.dtype
            )
            buffer = self._scratch[key] = torch.empty(largest, dtype=param.dtype, device=param.device)
        return buffer[: param.numel()].view_as(param)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One Adam step over every parameter with a gradient (see the class docstring)."""
        if not self._in_place_supported():
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:  # torch.optim.Adam's initial state
                    scalar_dtype = (
                        torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
                    )
                    state["step"] = torch.tensor(0.0, dtype=scalar_dtype)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["step"] += 1
                adam_step_(
                    param,
                    param.grad,
                    state["exp_avg"],
                    state["exp_avg_sq"],
                    self._scratch_like(param),
                    step=state["step"].item(),
                    lr=group["lr"],
                    beta1=beta1,
                    beta2=beta2,
                    eps=group["eps"],
                    weight_decay=group["weight_decay"],
                )
        return loss
