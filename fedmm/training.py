"""Local training and evaluation loops, plain and with Opacus DP-SGD.

A batch is ``(*modalities, present, label)``: one tensor per modality in schema
order, the presence mask (float, 1.0 = present), then the label. Models take
``model(*modalities, present)``.

What keeps the DP claim true here (and what is refused): DP-SGD's accounting
assumes every record is sampled independently with the same rate (Poisson
sampling) and that the loss of one record does not depend on the others.
So under DP: sampling is always Poisson (no class-balanced sampler); class weights
may only be fixed in advance (``class-weights='1,2,...'``), never computed from
the site's labels; augmentation is applied per sample after sampling, which
changes no sensitivity. Samples without a label are not used for supervised
training and are not part of the DP dataset (they are counted and reported).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler

from fedmm.config import GradSampleMode
from fedmm.data.augment import Augmenter
from fedmm.data.schema import MultimodalDataset
from fedmm.privacy.accounting import SiteAccountant

__all__ = ["DPSettings", "WeightedCrossEntropy", "balanced_class_weights", "steps_per_epoch", "poisson_steps_per_epoch", "make_dataset", "train", "evaluate"]


@dataclass(frozen=True, kw_only=True)
class DPSettings:
    """DP-SGD settings for one round of local training at one site."""

    noise_multiplier: float
    max_grad_norm: float
    grad_sample_mode: GradSampleMode
    accountant: SiteAccountant


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Batches per epoch, ``ceil(n / batch)``; with Poisson sampling the sample rate is its inverse (as in Opacus)."""
    return max(1, math.ceil(num_examples / batch_size))


def poisson_steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """The DP-SGD steps Opacus' Poisson loader really takes per epoch: ``int(1 / sample_rate)``
    with ``sample_rate = 1 / ceil(n / batch)``. Floating point makes it one less than
    ``ceil(n / batch)`` for some sizes, and the plan must count what is taken.

    >>> steps_per_epoch(93, 1), poisson_steps_per_epoch(93, 1)
    (93, 92)
    """
    return int(1 / (1 / steps_per_epoch(num_examples, batch_size)))


def make_dataset(ds: MultimodalDataset) -> TensorDataset:
    """Wrap aligned arrays as ``(*modalities, present, label)`` tensors."""
    tensors = [torch.from_numpy(np.array(ds.features[name])) for name in ds.schema.names]
    return TensorDataset(*tensors, torch.from_numpy(ds.present.astype(np.float32)), torch.from_numpy(np.array(ds.label)))


class WeightedCrossEntropy(nn.Module):
    """Cross-entropy with fixed per-class weights whose mean is over the batch size.

    Unlike ``nn.CrossEntropyLoss(weight=...)``, the mean does not divide by the batch's
    sum of weights, so one record's loss never depends on the other records in its
    batch (which would break DP-SGD's per-record sensitivity). Honours ``reduction``
    (Opacus' ghost clipping sets it to ``"none"``).
    """

    def __init__(self, weight: torch.Tensor | None = None, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction
        self.weight: torch.Tensor | None
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.cross_entropy(logits, label, reduction="none")
        if self.weight is not None:
            loss = loss * self.weight[label]
        if self.reduction == "none":
            return loss
        return loss.sum() if self.reduction == "sum" else loss.mean()


def balanced_class_weights(label: np.ndarray, num_classes: int) -> torch.Tensor:
    """``n / (K * count_k)`` from a site's own labels (dp=false only; classes it lacks get 0).

    >>> balanced_class_weights(np.array([0, 0, 0, 1]), 2).tolist()
    [0.6666666865348816, 2.0]
    """
    counts = np.bincount(label[label >= 0], minlength=num_classes).astype(np.float64)
    n = counts.sum()
    weights = np.where(counts > 0, n / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def train(
    model: nn.Module,
    ds: MultimodalDataset,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    momentum: float,
    seed: int,
    dp: DPSettings | None,
    augmenter: Augmenter | None = None,
    class_weights: torch.Tensor | None = None,
    balanced_sampler: bool = False,
) -> float:
    """Train ``model`` in place for ``epochs`` on the labelled samples of ``ds``; return the mean loss.

    With ``dp`` set, training is DP-SGD (Opacus, Poisson sampling, per-sample
    clipping to ``max_grad_norm``, Gaussian noise), and every step is recorded in
    ``dp.accountant``. The weights of ``model`` itself are updated, so its
    ``state_dict`` keeps the plain layout (no ``_module.`` prefix).
    ``augmenter`` transforms each batch's modalities (training only).
    """
    if dp is not None and balanced_sampler:
        raise ValueError("a class-balanced sampler breaks DP-SGD's Poisson sampling; refused under DP")
    ds = ds.labelled()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    dataset = make_dataset(ds)
    if balanced_sampler:
        per_sample = balanced_class_weights(ds.label, ds.schema.num_classes)[torch.from_numpy(ds.label)]
        sampler = WeightedRandomSampler(per_sample.double().tolist(), num_samples=len(ds), replacement=True, generator=generator)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler)
    else:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=momentum)
    criterion: nn.Module = WeightedCrossEntropy(class_weights)
    trained: nn.Module = model
    if dp is not None:
        # A PrivacyEngine is a per-round wrapper here: the accountant it charges is the
        # site's persistent one, restored from the site's history before the round.
        with warnings.catch_warnings():
            # Opacus warns that the RNG is not cryptographically secure (secure_mode needs
            # torchcsprng, which cannot be installed here); README states this limitation.
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            engine = PrivacyEngine(accountant=dp.accountant.kind.value)
            engine.accountant = dp.accountant.opacus
            wrapped = engine.make_private(
                module=model, optimizer=optimizer, criterion=criterion, data_loader=loader,
                noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm,
                grad_sample_mode=dp.grad_sample_mode.value, poisson_sampling=True,
            )
        if dp.grad_sample_mode is GradSampleMode.GHOST:
            trained, optimizer, criterion, loader = wrapped
        else:
            trained, optimizer, loader = wrapped
    trained.train()
    total, batches = 0.0, 0
    for _ in range(epochs):
        for *inputs, label in loader:
            if dp is not None and label.shape[0] == 0:
                # Poisson sampling drew no record. The DP-SGD step is then pure noise (the sum
                # of no clipped gradients is 0). Opacus cannot take an empty batch through
                # some layers (Embedding with ghost norms, functorch), so take that step directly.
                optimizer.zero_grad()
                for p in trained.parameters():
                    if p.requires_grad:
                        if dp.grad_sample_mode is GradSampleMode.GHOST:
                            p.grad = torch.zeros_like(p)
                        else:
                            p.grad_sample = torch.zeros(0, *p.shape, dtype=p.dtype)  # type: ignore[attr-defined]
                optimizer.step()
                continue
            if augmenter is not None:
                inputs = augmenter(inputs)
            optimizer.zero_grad()
            loss = criterion(trained(*inputs), label)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            batches += 1
    if dp is not None:
        trained.eval()
        _unwrap(trained)
    return total / max(1, batches)


def _unwrap(wrapped: nn.Module) -> None:
    """Remove Opacus' hooks so the plain module can be reused (and saved) as it was."""
    remove = getattr(wrapped, "_close", None)
    if callable(remove):
        remove()


@torch.no_grad()
def evaluate(model: nn.Module, ds: MultimodalDataset, *, batch_size: int = 512) -> tuple[float, float]:
    """Return ``(mean cross-entropy, accuracy)`` of ``model`` on the labelled samples of ``ds``."""
    model.eval()
    ds = ds.labelled()
    loader = DataLoader(make_dataset(ds), batch_size=batch_size)
    loss_sum, correct = 0.0, 0
    for *inputs, label in loader:
        logits = model(*inputs)
        loss_sum += float(nn.functional.cross_entropy(logits, label, reduction="sum"))
        correct += int((logits.argmax(dim=1) == label).sum())
    n = max(1, len(ds))
    return loss_sum / n, correct / n
