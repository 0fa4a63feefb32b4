"""The fusion model under Opacus: validator, DP steps, per-sample clipping against a reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn

from fedmm.config import AccountantKind, GradSampleMode
from fedmm.data.avmnist import builtin_root, load_site
from fedmm.data.schema import MultimodalDataset
from fedmm.data.synthetic import make_synthetic
from fedmm.models import build_model, model_names, prepare_inputs
from fedmm.privacy.accounting import SiteAccountant
from fedmm.training import DPSettings, train


@pytest.fixture(scope="module")
def site() -> MultimodalDataset:
    return prepare_inputs("avmnist-concat", load_site(builtin_root(), "nicolas"))


@pytest.fixture(scope="module")
def synthetic() -> MultimodalDataset:
    """Every modality kind, with some modalities missing per sample (presence mask)."""
    ds = make_synthetic(64, seed=3)
    present = np.random.default_rng(0).random(ds.present.shape) > 0.3
    present[:, 0] |= ~present.any(axis=1)
    features = {n: np.where(present[:, j].reshape(-1, *[1] * (v.ndim - 1)), v, 0).astype(v.dtype) for j, (n, v) in enumerate(ds.features.items())}
    return ds.replace(present=present, features=features)


def _subset(arrays: MultimodalDataset, n: int) -> MultimodalDataset:
    return arrays.subset(range(n))


def _model(name: str, seed: int = 0) -> nn.Module:
    data = load_site(builtin_root(), "nicolas") if name == "avmnist-concat" else make_synthetic(10)
    return build_model(name, prepare_inputs(name, data).schema, seed=seed)


@pytest.mark.parametrize("name", model_names())
def test_models_pass_opacus_validator_without_fixes(name: str) -> None:
    assert ModuleValidator.validate(_model(name), strict=False) == []


def test_same_seed_same_weights() -> None:
    a, b = _model("avmnist-concat", seed=3), _model("avmnist-concat", seed=3)

    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


@pytest.mark.parametrize("mode", list(GradSampleMode))
def test_a_dp_step_runs_in_every_grad_sample_mode(mode: GradSampleMode, site: MultimodalDataset) -> None:
    model = _model("avmnist-concat")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    accountant = SiteAccountant(AccountantKind.RDP)

    loss = train(
        model, _subset(site, 64), epochs=1, batch_size=16, learning_rate=0.5, momentum=0.0, seed=0,
        dp=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode, accountant=accountant),
    )

    assert np.isfinite(loss)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert set(model.state_dict()) == set(before)  # no "_module." prefix leaks out
    assert accountant.history[0].steps == 4 and accountant.history[0].sample_rate == 0.25


def _reference_clipped_mean(model: nn.Module, arrays: MultimodalDataset, max_grad_norm: float) -> tuple[list[torch.Tensor], list[float]]:
    """Per-sample gradients one sample at a time, each clipped to max_grad_norm, averaged."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for i in range(len(arrays)):
        model.zero_grad()
        inputs = [torch.from_numpy(np.array(arrays.features[m][i : i + 1])) for m in arrays.schema.names]
        present = torch.from_numpy(arrays.present[i : i + 1].astype(np.float32))
        loss = nn.functional.cross_entropy(model(*inputs, present), torch.from_numpy(np.array(arrays.label[i : i + 1])))
        grads = torch.autograd.grad(loss, params)
        norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
        norms.append(norm)
        factor = min(1.0, max_grad_norm / (norm + 1e-6))  # Opacus' flat clipping
        for t, g in zip(total, grads):
            t += g * factor
    return [t / len(arrays) for t in total], norms


@pytest.mark.parametrize("name", ["avmnist-concat", "concat", "gated", "late", "attention"])
@pytest.mark.parametrize("mode", [GradSampleMode.GHOST, GradSampleMode.HOOKS])
def test_dp_update_equals_per_sample_clipped_gradients(mode: GradSampleMode, name: str, site: MultimodalDataset, synthetic: MultimodalDataset) -> None:
    # A batch that holds every sample (sample rate 1) and negligible noise make the
    # DP-SGD update equal to lr x the mean of the per-sample clipped gradients. A large
    # lr keeps float32 round-off of "weights before - weights after" far below 1e-5.
    data = site if name == "avmnist-concat" else synthetic
    arrays, max_grad_norm, lr = _subset(data, 16), 0.05, 1000.0
    model = build_model(name, data.schema, seed=1)
    reference_model = build_model(name, data.schema, seed=1)
    expected, norms = _reference_clipped_mean(reference_model, arrays, max_grad_norm)
    before = [p.detach().clone() for p in model.parameters()]

    train(
        model, arrays, epochs=1, batch_size=len(arrays), learning_rate=lr, momentum=0.0, seed=0,
        dp=DPSettings(noise_multiplier=1e-12, max_grad_norm=max_grad_norm, grad_sample_mode=mode, accountant=SiteAccountant(AccountantKind.RDP)),
    )

    assert min(norms) > max_grad_norm  # every sample really was clipped
    updates = [(b - p.detach()) / lr for b, p in zip(before, model.parameters())]
    flat_update, flat_expected = torch.cat([u.flatten() for u in updates]), torch.cat([e.flatten() for e in expected])
    for update, e in zip(updates, expected):
        # per tensor: small tensors (a 4096-row embedding touched by a few tokens) carry float32 round-off;
        # tensors whose true gradient is ~0 (attention's key bias: softmax is shift-invariant) are left to the global check
        if float(e.norm()) > 1e-6 * float(flat_expected.norm()):
            assert float((update - e).norm() / e.norm()) <= 1e-4
    assert float((flat_update - flat_expected).norm() / flat_expected.norm()) <= 1e-5
    applied = torch.sqrt(sum(((b - p.detach()) ** 2).sum() for b, p in zip(before, model.parameters())))
    assert float(applied) <= lr * max_grad_norm * (1 + 1e-5)  # the mean of clipped gradients is within the bound


GENERIC = ["concat", "gated", "late", "attention"]


@pytest.mark.parametrize("name", GENERIC)
@pytest.mark.parametrize("mode", list(GradSampleMode))
def test_every_fusion_takes_every_modality_kind_under_dp(mode: GradSampleMode, name: str, synthetic: MultimodalDataset) -> None:
    model = build_model(name, synthetic.schema)
    accountant = SiteAccountant(AccountantKind.RDP)

    loss = train(
        model, synthetic, epochs=1, batch_size=16, learning_rate=0.5, momentum=0.0, seed=0,
        dp=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode, accountant=accountant),
    )

    assert np.isfinite(loss) and accountant.history[0].steps == 4
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())


@pytest.mark.parametrize("name", GENERIC)
def test_presence_mask_reaches_the_model(name: str, synthetic: MultimodalDataset) -> None:
    model = build_model(name, synthetic.schema).eval()
    inputs = [torch.from_numpy(np.array(synthetic.features[m][:4])) for m in synthetic.schema.names]
    present = torch.ones(4, len(inputs))
    absent_image = present.clone()
    absent_image[:, 0] = 0.0

    with torch.no_grad():
        full, masked = model(*inputs, present), model(*inputs, absent_image)
        # An absent modality contributes nothing but the mask: its values do not matter.
        scrambled = [inputs[0] + 100.0, *inputs[1:]]
        assert torch.allclose(model(*scrambled, absent_image), masked)
    assert not torch.allclose(full, masked)


@pytest.mark.parametrize("mode", list(GradSampleMode))
def test_empty_poisson_batches_still_take_a_noisy_step(mode: GradSampleMode, synthetic: MultimodalDataset) -> None:
    # batch size 1 on 40 records: sample rate 1/40, so about a third of the 40 steps draw no record.
    model = build_model("concat", synthetic.schema)
    accountant = SiteAccountant(AccountantKind.RDP)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    train(
        model, synthetic.subset(range(40)), epochs=1, batch_size=1, learning_rate=0.1, momentum=0.0, seed=1,
        dp=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode, accountant=accountant),
    )

    assert accountant.steps == 40  # every step, empty or not, is accounted
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
