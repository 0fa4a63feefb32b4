"""The fusion model under Opacus: validator, DP steps, per-sample clipping against a reference."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn

from fedmm.config import AccountantKind, GradSampleMode
from fedmm.data.avmnist import MultimodalArrays, builtin_root, load_site
from fedmm.models import build_model, model_names, prepare_inputs
from fedmm.privacy.accounting import SiteAccountant
from fedmm.training import DPSettings, train


@pytest.fixture(scope="module")
def site() -> MultimodalArrays:
    return prepare_inputs("avmnist-concat", load_site(builtin_root(), "nicolas"))


def _subset(arrays: MultimodalArrays, n: int) -> MultimodalArrays:
    return dataclasses.replace(
        arrays, image=arrays.image[:n], audio=arrays.audio[:n], label=arrays.label[:n],
        image_id=arrays.image_id[:n], recording=arrays.recording[:n],
    )


@pytest.mark.parametrize("name", model_names())
def test_models_pass_opacus_validator_without_fixes(name: str) -> None:
    assert ModuleValidator.validate(build_model(name), strict=False) == []


def test_same_seed_same_weights() -> None:
    a, b = build_model("avmnist-concat", seed=3), build_model("avmnist-concat", seed=3)

    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


@pytest.mark.parametrize("mode", list(GradSampleMode))
def test_a_dp_step_runs_in_every_grad_sample_mode(mode: GradSampleMode, site: MultimodalArrays) -> None:
    model = build_model("avmnist-concat")
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


def _reference_clipped_mean(model: nn.Module, arrays: MultimodalArrays, max_grad_norm: float) -> tuple[list[torch.Tensor], list[float]]:
    """Per-sample gradients one sample at a time, each clipped to max_grad_norm, averaged."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for i in range(len(arrays)):
        model.zero_grad()
        image, audio = torch.from_numpy(np.array(arrays.image[i : i + 1])), torch.from_numpy(np.array(arrays.audio[i : i + 1]))
        loss = nn.functional.cross_entropy(model(image, audio), torch.from_numpy(np.array(arrays.label[i : i + 1])))
        grads = torch.autograd.grad(loss, params)
        norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
        norms.append(norm)
        factor = min(1.0, max_grad_norm / (norm + 1e-6))  # Opacus' flat clipping
        for t, g in zip(total, grads):
            t += g * factor
    return [t / len(arrays) for t in total], norms


@pytest.mark.parametrize("mode", [GradSampleMode.GHOST, GradSampleMode.HOOKS])
def test_dp_update_equals_per_sample_clipped_gradients(mode: GradSampleMode, site: MultimodalArrays) -> None:
    # A batch that holds every sample (sample rate 1) and negligible noise make the
    # DP-SGD update equal to lr x the mean of the per-sample clipped gradients. A large
    # lr keeps float32 round-off of "weights before - weights after" far below 1e-5.
    arrays, max_grad_norm, lr = _subset(site, 16), 0.05, 1000.0
    model = build_model("avmnist-concat", seed=1)
    reference_model = build_model("avmnist-concat", seed=1)
    expected, norms = _reference_clipped_mean(reference_model, arrays, max_grad_norm)
    before = [p.detach().clone() for p in model.parameters()]

    train(
        model, arrays, epochs=1, batch_size=len(arrays), learning_rate=lr, momentum=0.0, seed=0,
        dp=DPSettings(noise_multiplier=1e-12, max_grad_norm=max_grad_norm, grad_sample_mode=mode, accountant=SiteAccountant(AccountantKind.RDP)),
    )

    assert min(norms) > max_grad_norm  # every sample really was clipped
    for b, p, e in zip(before, model.parameters(), expected):
        update = (b - p.detach()) / lr
        assert float((update - e).norm() / e.norm()) <= 1e-5
    applied = torch.sqrt(sum(((b - p.detach()) ** 2).sum() for b, p in zip(before, model.parameters())))
    assert float(applied) <= lr * max_grad_norm * (1 + 1e-5)  # the mean of clipped gradients is within the bound
