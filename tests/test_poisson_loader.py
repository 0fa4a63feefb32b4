"""fedmm.privacy.sampling.poisson_loader: Opacus' Poisson batches, empty ones shaped like the first, no copy of a record kept."""

from __future__ import annotations

import torch
from opacus.data_loader import DPDataLoader
from torch.utils.data import DataLoader, TensorDataset

from fedmm.privacy.sampling import poisson_loader


def _dataset() -> TensorDataset:
    return TensorDataset(torch.randn(40, 3, 2), torch.arange(40), torch.randint(0, 9, (40, 5), dtype=torch.int32))


def test_the_same_batches_as_opacus_for_the_same_draws() -> None:
    data = _dataset()
    ours = list(poisson_loader(DataLoader(data, batch_size=8), torch.Generator().manual_seed(3)))
    theirs = list(DPDataLoader.from_data_loader(DataLoader(data, batch_size=8), generator=torch.Generator().manual_seed(3)))
    assert len(ours) == len(theirs) == 5
    for a, b in zip(ours, theirs):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_an_empty_batch_has_the_first_batchs_structure_and_no_record_is_kept() -> None:
    loader = poisson_loader(DataLoader(_dataset(), batch_size=8), torch.Generator().manual_seed(0))
    collate = loader.collate_fn
    first = collate([loader.dataset[i] for i in (4, 7)])
    assert first[0].shape == (2, 3, 2)
    assert all(t.numel() == 0 for t in collate.first_batch)  # the structure only, none of the records' values
    empty = collate([])
    assert [tuple(t.shape) for t in empty] == [(0, 3, 2), (0,), (0, 5)]
    assert [t.dtype for t in empty] == [torch.float32, torch.int64, torch.int32]
    assert collate([loader.dataset[1]])[1].tolist() == [1]  # later batches are collated as before


def test_records_with_strings_load_as_with_opacus() -> None:
    # a batch Opacus' empty-batch structure cannot hold (strings) is kept as Opacus keeps it
    class WithIds(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 20

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
            return torch.full((3,), float(i)), i % 2, f"record-{i}"

    ours = list(poisson_loader(DataLoader(WithIds(), batch_size=4), torch.Generator().manual_seed(1)))
    theirs = list(DPDataLoader.from_data_loader(DataLoader(WithIds(), batch_size=4), generator=torch.Generator().manual_seed(1)))
    assert [b[2] for b in ours] == [b[2] for b in theirs] and len(ours) == 5
