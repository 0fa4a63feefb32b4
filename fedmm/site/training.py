"""Local training and evaluation loops, plain and with Opacus DP-SGD.

A batch is ``(*modalities, present, label, *task_labels)``: one tensor per modality
in schema order, the presence mask (float, 1.0 = present), the label, then one label
per auxiliary task (-1 where unknown). Models take ``model(*modalities, present)``;
the loss is ``objective(output, present, label, *task_labels)``
(:class:`fedmm.models.objective.Objective`).

What keeps the DP claim true here (and what is refused): DP-SGD's accounting
assumes every record is sampled independently with the same rate (Poisson
sampling) and that the loss of one record does not depend on the others.
So under DP: sampling is always Poisson (no class-balanced sampler); class weights
may only be fixed in advance (``class-weights='1,2,...'``), never computed from
the site's labels; augmentation is applied per sample after sampling, which
changes no sensitivity. Samples without a label are not used for supervised
training and are not part of the DP dataset (they are counted and reported).
Modality dropout hides modalities per sample after sampling, like augmentation.
Under DP, which records a step samples and its noise come from the operating
system's randomness, never from the run's seed (which the server hands out), so a
DP run is not bit-for-bit repeatable; everything else follows the seed.
Every model input is bounded (:func:`fedmm.models.evaluation.make_dataset`), and a record
whose clipped gradient would still not be finite is left out of its step
(:mod:`fedmm.privacy.ghost`): no record can turn an update into NaN, which the server
would reject and so see the record. How many were left out is logged here, at the site,
and never sent.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn
from torch.utils.data import DataLoader, WeightedRandomSampler

from fedmm.config import GradSampleMode
from fedmm.data.augment import Augmenter
from fedmm.data.schema import MultimodalDataset
from fedmm.models.evaluation import evaluate, make_dataset, output_layout, task_accuracies
from fedmm.models.objective import Objective
from fedmm.privacy.accounting import SiteAccountant
from fedmm.privacy.ghost import PrivacyEngine
from fedmm.privacy.sampling import poisson_loader
from fedmm.site.heap import keep_heap

__all__ = ["DPSettings", "add_proximal_term", "average_copies", "repeat_records", "scheduled_learning_rate", "balanced_class_weights", "steps_per_epoch", "poisson_steps_per_epoch", "make_dataset", "drop_modalities", "train", "evaluate", "task_accuracies"]  # evaluate, task_accuracies: from fedmm.models.evaluation

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class DPSettings:
    """DP-SGD settings for one round of local training at one site."""

    noise_multiplier: float
    max_grad_norm: float
    grad_sample_mode: GradSampleMode
    accountant: SiteAccountant


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """DP-SGD steps per epoch: ``ceil(n / batch)`` rounded up to the next of 1, 2, 3, 4, 6, 8, 12, 16, 24, ...
    (powers of two and 1.5 times them); the Poisson sample rate is its inverse.

    The sample rate leaves the site in every privacy report (the accountant's guarantee is stated
    for it). Opacus' ``1 / ceil(n / batch)`` told the server n to within one batch, and the server
    sets the batch; rounded so, it tells n to within a factor of about 1.5. Each record is still
    sampled with that rate; the expected batch is at least two thirds of ``batch-size`` (and at least one record).

    >>> [steps_per_epoch(n, 64) for n in (64, 65, 250, 257, 400, 1000)]
    [1, 2, 4, 6, 8, 16]
    """
    exact = max(1, math.ceil(num_examples / batch_size))
    power = 1 << (exact - 1).bit_length()  # the power of two at or above exact
    rounded = power * 3 // 4 if power >= 4 and power * 3 // 4 >= exact else power
    # Never more steps than records: Opacus divides by the expected batch int(n / k), which must stay >= 1
    # (only batch-size 1 reaches this; a deployed site takes no batch below its min-batch-size).
    return max(1, min(rounded, num_examples))


def poisson_steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """The DP-SGD steps Opacus' Poisson loader really takes per epoch: ``int(1 / sample_rate)``
    with ``sample_rate = 1 / steps_per_epoch(n, batch)``. Floating point can make ``int(1 / (1 / k))``
    one less than ``k`` (93 is such a k; no value of the rounded grid is, but batch-size 1 caps k at n),
    and the plan must count what is taken.

    >>> steps_per_epoch(93, 1), poisson_steps_per_epoch(93, 1), poisson_steps_per_epoch(186, 2)
    (93, 92, 96)
    """
    return int(1 / (1 / steps_per_epoch(num_examples, batch_size)))


def drop_modalities(inputs: list[torch.Tensor], p: float, generator: torch.Generator) -> list[torch.Tensor]:
    """Modality dropout: hide each present modality of each sample with chance ``p``
    (features zeroed, mask 0), always keeping at least one of a sample's modalities.

    >>> g = torch.Generator().manual_seed(0)
    >>> out = drop_modalities([torch.ones(4, 2), torch.ones(4, 3), torch.ones(4, 2)], 0.99, g)
    >>> out[-1].sum(dim=1).tolist()
    [1.0, 1.0, 1.0, 1.0]
    """
    *modalities, present = inputs
    keep = (torch.rand(present.shape, generator=generator) >= p).to(present.dtype) * present
    # a sample that would lose everything keeps one of its modalities, drawn at random
    lost = (keep.sum(dim=1) == 0) & (present.sum(dim=1) > 0)
    if lost.any():
        scores = torch.rand(present.shape, generator=generator) * present
        rescue = nn.functional.one_hot(scores.argmax(dim=1), present.shape[1]).to(present.dtype)
        keep = torch.where(lost.unsqueeze(1), rescue, keep)
    shaped = [keep[:, j].reshape(-1, *[1] * (x.dim() - 1)).to(x.dtype) for j, x in enumerate(modalities)]
    return [x * k for x, k in zip(modalities, shaped)] + [keep]


def scheduled_learning_rate(base: float, server_round: int, *, rounds: int, schedule: str = "constant", warmup: int = 0) -> float:
    """The sites' learning rate in ``server_round`` (1-based) of ``rounds``: ``lr-schedule`` with ``lr-warmup-rounds``.

    Warm-up: round ``r <= warmup`` trains at ``base * r / warmup``. After it, ``constant``
    keeps ``base``; ``cosine`` goes from ``base`` (first round after the warm-up) down to
    ``base / 10`` at the last round, ``base * (0.1 + 0.9 * (1 + cos(pi * p)) / 2)`` with
    ``p`` the fraction of those rounds done (a single such round keeps ``base``; rounds past
    ``rounds`` stay at a tenth). Never above ``base``, so ``max-update-norm = auto`` holds.

    >>> [round(scheduled_learning_rate(1.0, r, rounds=5, schedule="cosine", warmup=2), 3) for r in range(1, 6)]
    [0.5, 1.0, 1.0, 0.55, 0.1]
    """
    if warmup > 0 and server_round <= warmup:
        return base * max(server_round, 1) / warmup
    if schedule == "constant":
        return base
    span = rounds - warmup - 1
    p = min(1.0, (server_round - warmup - 1) / span) if span > 0 else 0.0
    return base * (0.1 + 0.9 * (1.0 + math.cos(math.pi * p)) / 2.0)


def add_proximal_term(optimizer: torch.optim.Optimizer, model: nn.Module, mu: float) -> torch.utils.hooks.RemovableHandle:
    """FedProx at a site: add the gradient of ``(mu / 2) |w - w_global|^2`` before every SGD step.

    ``w_global`` is ``model``'s weights now (the round's global model). The term is added to
    each parameter's ``.grad`` by a step pre-hook on the plain ``torch.optim`` optimizer,
    which runs when that optimizer steps. Under Opacus (``DPOptimizer.step`` =
    ``pre_step()``: clip each record's gradient, sum, add the noise, divide by the expected
    batch size; then ``original_optimizer.step()``) that is after the per-sample clipping
    and the noise: ``mu (w - w_global)`` depends on no record, so it needs neither, and
    putting it in the per-sample loss would spend each record's clip budget on it (and
    shrink the records' own gradients). DP-SGD's sensitivity, noise and accounting are
    therefore unchanged; the step is post-processing of the noised gradient. Without DP
    it is the same as adding the term to the loss. Returns the hook's handle (remove it
    after training).
    """
    anchors = {p: p.detach().clone() for p in model.parameters() if p.requires_grad}

    def hook(opt: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        with torch.no_grad():
            for p, anchor in anchors.items():
                if p.grad is not None:
                    p.grad.add_(p.detach() - anchor, alpha=mu)

    return optimizer.register_step_pre_hook(hook)


def repeat_records(tensors: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Each record (row) ``k`` times in a row: ``[B, ...]`` -> ``[B * k, ...]``, record i's copies at ``i*k .. i*k+k-1``.

    >>> repeat_records([torch.tensor([1, 2])], 2)[0].tolist()
    [1, 1, 2, 2]
    """
    return [t.repeat_interleave(k, dim=0) for t in tensors] if k > 1 else tensors


def average_copies(model: nn.Module, k: int) -> None:
    """Augmentation multiplicity under DP-SGD (De et al. 2022): each parameter's per-sample gradients
    ``grad_sample`` ``[B * k, ...]`` (the rows of :func:`repeat_records`) become ``[B, ...]``, the mean of
    each record's ``k`` copies, before the optimizer clips them.

    So each record still contributes one gradient, clipped to ``max_grad_norm``: the sensitivity,
    the noise (calibrated for the expected batch of ``B`` records) and the accounting are those of
    DP-SGD without copies. Each row's ``grad_sample`` is the gradient of that row's own loss (Opacus
    undoes the mean over the ``B * k`` rows), so the mean over copies is the gradient of the record's
    mean loss over its copies. Only for ``hooks`` and ``functorch`` (ghost clipping never forms
    ``grad_sample``; the config refuses that pairing).
    """
    if k <= 1:
        return
    for p in model.parameters():
        grad_sample = getattr(p, "grad_sample", None)
        if grad_sample is None:
            continue
        if isinstance(grad_sample, list):  # accumulated over several backward passes: never in this loop
            grad_sample = torch.cat(grad_sample, dim=0)
        if grad_sample.shape[0] % k:
            raise RuntimeError(f"augment-multiplicity {k}: {grad_sample.shape[0]} per-sample gradients are not whole records")
        p.grad_sample = grad_sample.view(grad_sample.shape[0] // k, k, *grad_sample.shape[1:]).mean(dim=1)  # type: ignore[attr-defined]


def _chunks(batch: list[torch.Tensor], size: int) -> Iterator[list[torch.Tensor]]:
    """``batch`` split into chunks of at most ``size`` records (one chunk when ``size`` is 0)."""
    n = batch[0].shape[0]
    if size <= 0 or n <= size:
        yield batch
        return
    for start in range(0, n, size):
        yield [t[start : start + size] for t in batch]


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
    objective: nn.Module | None = None,
    modality_dropout: float = 0.0,
    proximal_mu: float = 0.0,
    max_physical_batch_size: int = 0,
    augment_multiplicity: int = 1,
) -> float:
    """Train ``model`` in place for ``epochs`` on the labelled samples of ``ds``; return the mean loss.

    With ``dp`` set, training is DP-SGD (Opacus, Poisson sampling, per-sample
    clipping to ``max_grad_norm``, Gaussian noise), and every step is recorded in
    ``dp.accountant``. The weights of ``model`` itself are updated, so its
    ``state_dict`` keeps the plain layout (no ``_module.`` prefix).
    ``augmenter`` transforms each batch's modalities (training only), then
    ``modality_dropout`` hides some. ``objective`` defaults to the weighted
    cross-entropy of the model's main task (and its auxiliary tasks, if any).
    ``proximal_mu > 0`` adds FedProx's ``(mu / 2) |w - w_global|^2`` to the objective, with
    ``w_global`` the weights ``model`` has now, after DP-SGD's clipping and noise
    (:func:`add_proximal_term`); the returned loss is without it.
    ``max_physical_batch_size > 0`` takes each sampled batch through the model in chunks of at
    most that many records and steps once per batch (under DP: Opacus' ``BatchMemoryManager``,
    the same steps, sample rate and noise as without it). ``augment_multiplicity = k > 1``
    trains on ``k`` augmented copies of each sampled record; under DP their per-sample gradients
    are averaged before clipping (:func:`average_copies`; ``hooks`` or ``functorch`` only).
    """
    if dp is not None and balanced_sampler:
        raise ValueError("a class-balanced sampler breaks DP-SGD's Poisson sampling; refused under DP")
    if dp is not None and getattr(objective, "contrastive", None) == "clip":
        raise ValueError("CLIP's in-batch loss couples the records of a batch; refused under DP (use contrastive='align')")
    copies = max(1, augment_multiplicity)
    if dp is not None and copies > 1 and dp.grad_sample_mode is GradSampleMode.GHOST:
        raise ValueError("augment-multiplicity > 1 under DP needs grad-sample-mode hooks or functorch (ghost clipping never forms per-sample gradients)")
    keep_heap()  # a DP step's megabytes of temporaries stay in the heap between steps (fedmm.site.heap)
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
    # On the plain optimizer: under DP, Opacus' wrapper calls its step after clipping and noise.
    proximal = add_proximal_term(optimizer, model, proximal_mu) if proximal_mu > 0 else None
    criterion: nn.Module = objective if objective is not None else Objective(output_layout(model, ds), class_weights=class_weights)
    modality_count = len(ds.schema.modalities)
    dropout_rng = torch.Generator().manual_seed(seed + 1)  # its own stream: the sampler's draws stay as they were
    trained: nn.Module = model
    if dp is not None:
        # A PrivacyEngine is a per-round wrapper here: the accountant it charges is the
        # site's persistent one, restored from the site's history before the round.
        with warnings.catch_warnings():
            # Opacus warns that its RNG is not cryptographically secure (secure_mode needs
            # torchcsprng, not installable here). Here it only draws the Poisson sample: the
            # noise comes from fedmm.privacy.noise (AES-CTR keyed from os.urandom).
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            engine = PrivacyEngine(accountant=dp.accountant.kind.value)
            engine.accountant = dp.accountant.opacus
            # Which records a step samples and the noise it adds must be unpredictable: drawn
            # from the run's public seed, anyone who knows the seed could regenerate the noise
            # and subtract it. The sample comes from a generator seeded by the OS, never the seed
            # (Opacus' own noise, which fedmm's optimizers replace, would too).
            secret = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))
            poisson = poisson_loader(loader, generator=secret, sample_rate=1.0 / steps_per_epoch(len(dataset), batch_size))
            wrapped = engine.make_private(
                module=model, optimizer=optimizer, criterion=criterion, data_loader=poisson,
                noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm,
                grad_sample_mode=dp.grad_sample_mode.value, poisson_sampling=False,  # already Poisson
                noise_generator=secret,
            )
        if dp.grad_sample_mode is GradSampleMode.GHOST:
            trained, optimizer, criterion, loader = wrapped
        else:
            trained, optimizer, loader = wrapped
    trained.train()
    with warnings.catch_warnings():
        # Opacus' backward hooks on a model whose first layer gets no input gradient (the data
        # never requires one) make torch warn on every step; the gradients are right (tested
        # against one-sample-at-a-time references). Silenced here only, for this one message.
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect to module outputs")
        physical = (
            # Splits each Poisson batch into chunks and tells the optimizer which chunk ends it: the
            # steps before it only clip and add up (no noise, no accounting), the last one steps.
            BatchMemoryManager(data_loader=loader, max_physical_batch_size=max_physical_batch_size, optimizer=optimizer)
            if dp is not None and max_physical_batch_size > 0 else contextlib.nullcontext(loader)
        )
        with physical as batches_of:
            total, batches = _epochs(
                trained, batches_of, optimizer, criterion, epochs=epochs, dp=dp, modality_count=modality_count, augmenter=augmenter,
                modality_dropout=modality_dropout, dropout_rng=dropout_rng, copies=copies,
                chunk=max_physical_batch_size if dp is None else 0,
            )
    if proximal is not None:
        proximal.remove()
    if dp is not None:
        _unwrap(trained, optimizer)  # the model is left in training mode, as without DP
        left_out = getattr(optimizer, "nonfinite_records", 0)
        if left_out:
            # data-derived: logged at the site only, never part of the update or its metrics
            logger.warning(
                "%d record gradient(s) of this round were not finite (a forward pass overflowed float32) and were left out "
                "of their DP-SGD step; the update and its DP guarantee are unaffected. Fix: check the site's data "
                "(`fedmm data check`) for extreme values", left_out,
            )
    return total / max(1, batches)


def _unwrap(wrapped: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Remove Opacus' hooks so the plain module can be reused (and saved) as it was, and the
    optimizer's ``summed_grad`` from each of its parameters (the only ones it sets it on): the last
    step's clipped sum before its noise, which Opacus leaves there and nothing may read."""
    remove = getattr(wrapped, "_close", None)
    if callable(remove):
        remove()
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.__dict__.pop("summed_grad", None)


def _epochs(
    trained: nn.Module, loader: object, optimizer: torch.optim.Optimizer, criterion: nn.Module, *, epochs: int, dp: DPSettings | None,
    modality_count: int, augmenter: Augmenter | None, modality_dropout: float, dropout_rng: torch.Generator, copies: int, chunk: int,
) -> tuple[float, int]:
    """The training loop of :func:`train`: ``(summed loss, batches)``. ``chunk > 0`` (dp=false only) takes
    each batch through in chunks of at most that many records, weighted to the batch's mean loss."""
    total, batches = 0.0, 0
    for _ in range(epochs):
        for batch in loader:  # type: ignore[attr-defined]
            targets = batch[modality_count + 1 :]
            if dp is not None and targets[0].shape[0] == 0:
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
            optimizer.zero_grad()
            size = targets[0].shape[0]
            for part in _chunks(list(batch), chunk):
                part = repeat_records(part, copies)  # each record's copies side by side, augmented independently
                inputs, part_targets = part[: modality_count + 1], part[modality_count + 1 :]
                if augmenter is not None:
                    inputs = augmenter(inputs)
                if modality_dropout > 0:
                    inputs = drop_modalities(inputs, modality_dropout, dropout_rng)
                loss = criterion(trained(*inputs), inputs[-1], *part_targets)
                if dp is None and chunk > 0:
                    (loss * (part_targets[0].shape[0] / (size * copies))).backward()  # the batch's mean loss, summed over chunks
                else:
                    loss.backward()
                if dp is not None:
                    average_copies(trained, copies)
                total += float(loss.detach())
                batches += 1
            optimizer.step()
    return total, batches
