"""Poisson sampling for DP-SGD: Opacus' ``DPDataLoader``, without its copy of a batch every round.

Opacus' loader wraps the collate function so that an empty Poisson batch (no record drawn)
still has the right structure: it keeps a deep copy of the first batch of every loader, that
is of every round here, and only ever reads its shapes and dtypes. For the default AV-MNIST
site that copy is a megabyte of features and half a millisecond a round. :func:`poisson_loader`
keeps the structure only (tensors with no records). The sampling, the sample rate and the
batches themselves are Opacus' own.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from opacus.data_loader import CollateFnWithEmpty, DPDataLoader
from torch.utils.data import DataLoader

__all__ = ["poisson_loader"]


class _StructureOnly(CollateFnWithEmpty):
    """Opacus' ``CollateFnWithEmpty`` that remembers the first batch as empty tensors of its shapes
    (or, for a batch Opacus could not empty, such as one with strings, as Opacus does: a copy)."""

    def __call__(self, batch: list[Any]) -> Any:
        if len(batch) > 0 and getattr(self, "first_batch", None) is None:
            output = self.wrapped_collator_fn(batch) if self.wrapped_collator_fn else batch
            try:
                self.first_batch = self._make_empty_batch(output)  # what an empty batch is built from, and all that is read of it
            except (TypeError, IndexError):
                self.first_batch = copy.deepcopy(output)  # Opacus' own: it fails only if an empty batch comes
            return output
        return super().__call__(batch)


def poisson_loader(loader: DataLoader, generator: torch.Generator, *, sample_rate: float | None = None) -> DPDataLoader:
    """``DPDataLoader.from_data_loader(loader, generator=generator)``, sampling each record
    independently with rate ``sample_rate`` (Opacus' ``1 / len(loader)`` by default), whose empty
    batches keep the structure of the first."""
    if sample_rate is None:
        poisson = DPDataLoader.from_data_loader(loader, generator=generator)
    else:
        poisson = DPDataLoader(dataset=loader.dataset, sample_rate=sample_rate, collate_fn=loader.collate_fn, generator=generator)
    if type(poisson.collate_fn) is CollateFnWithEmpty:
        poisson.collate_fn.__class__ = _StructureOnly
    return poisson
