"""Local training and evaluation loops, plain and with Opacus DP-SGD.

Models take one tensor per modality (``model(image, audio)``); the label is the
last tensor of every batch.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedmm.config import GradSampleMode
from fedmm.data.avmnist import MultimodalArrays
from fedmm.privacy.accounting import SiteAccountant

__all__ = ["DPSettings", "steps_per_epoch", "make_dataset", "train", "evaluate"]


@dataclass(frozen=True, kw_only=True)
class DPSettings:
    """DP-SGD settings for one round of local training at one site."""

    noise_multiplier: float
    max_grad_norm: float
    grad_sample_mode: GradSampleMode
    accountant: SiteAccountant


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Optimizer steps per epoch; with Poisson sampling the sample rate is its inverse (as in Opacus)."""
    return max(1, math.ceil(num_examples / batch_size))


def make_dataset(arrays: MultimodalArrays) -> TensorDataset:
    """Wrap aligned arrays as ``(image, audio, label)`` tensors."""
    return TensorDataset(
        torch.from_numpy(np.array(arrays.image)),
        torch.from_numpy(np.array(arrays.audio)),
        torch.from_numpy(np.array(arrays.label)),
    )


def train(
    model: nn.Module,
    arrays: MultimodalArrays,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    momentum: float,
    seed: int,
    dp: DPSettings | None,
) -> float:
    """Train ``model`` in place for ``epochs`` and return the mean training loss.

    With ``dp`` set, training is DP-SGD (Opacus, Poisson sampling, per-sample
    clipping to ``max_grad_norm``, Gaussian noise), and every step is recorded in
    ``dp.accountant``. The weights of ``model`` itself are updated, so its
    ``state_dict`` keeps the plain layout (no ``_module.`` prefix).
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(make_dataset(arrays), batch_size=batch_size, shuffle=True, generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=momentum)
    criterion: nn.Module = nn.CrossEntropyLoss()
    trained: nn.Module = model
    if dp is not None:
        # A PrivacyEngine is a per-round wrapper here: the accountant it charges is the
        # site's persistent one, restored from the site's history before the round.
        engine = PrivacyEngine(accountant=dp.accountant.kind.value)
        engine.accountant = dp.accountant.opacus
        with warnings.catch_warnings():
            # Opacus warns that the RNG is not cryptographically secure (secure_mode needs
            # torchcsprng, which cannot be installed here); README states this limitation.
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
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
        for image, audio, label in loader:
            optimizer.zero_grad()
            loss = criterion(trained(image, audio), label)
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
def evaluate(model: nn.Module, arrays: MultimodalArrays, *, batch_size: int = 512) -> tuple[float, float]:
    """Return ``(mean cross-entropy, accuracy)`` of ``model`` on ``arrays``."""
    model.eval()
    loader = DataLoader(make_dataset(arrays), batch_size=batch_size)
    loss_sum, correct = 0.0, 0
    for image, audio, label in loader:
        logits = model(image, audio)
        loss_sum += float(nn.functional.cross_entropy(logits, label, reduction="sum"))
        correct += int((logits.argmax(dim=1) == label).sum())
    n = len(arrays)
    return loss_sum / n, correct / n
