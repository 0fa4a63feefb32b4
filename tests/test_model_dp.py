"""Every fusion x modality encoder under Opacus: validator, a DP step in each grad-sample
mode it supports, and per-sample clipped gradients against a one-sample-at-a-time reference."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn

from fedmm.config import AccountantKind, GradSampleMode, RunConfig
from fedmm.data.avmnist import builtin_root, load_site
from fedmm.data.schema import MultimodalDataset
from fedmm.data.synthetic import make_synthetic
from fedmm.errors import ConfigError
from fedmm.models import ModelOptions, ModelRecipe, model_names, save_image_encoder
from fedmm.models.encoders import ConvImageEncoder
from fedmm.privacy.accounting import SiteAccountant
from fedmm.site.training import DPSettings, train

DEFAULT = ModelRecipe.from_config(RunConfig())  # what `fedmm simulate` trains on AV-MNIST


@pytest.fixture(scope="module")
def site() -> MultimodalDataset:
    return DEFAULT.prepare(load_site(builtin_root(), "nicolas"))


@pytest.fixture(scope="module")
def synthetic() -> MultimodalDataset:
    """Every modality kind, with some modalities missing per sample (presence mask), and a
    second column to predict (multi-task)."""
    ds = make_synthetic(64, seed=3)
    present = np.random.default_rng(0).random(ds.present.shape) > 0.3
    present[:, 0] |= ~present.any(axis=1)
    features = {n: np.where(present[:, j].reshape(-1, *[1] * (v.ndim - 1)), v, 0).astype(v.dtype) for j, (n, v) in enumerate(ds.features.items())}
    speaker = np.array([f"s{i % 3}" for i in range(len(ds))])
    return ds.replace(present=present, features=features, groups={**ds.groups, "speaker": speaker})


@pytest.fixture(scope="module")
def image_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A "pretrained" image encoder: random weights stand in for a real one in tests."""
    path = tmp_path_factory.mktemp("weights") / "image.pt"
    with torch.random.fork_rng():
        torch.manual_seed(7)
        save_image_encoder(ConvImageEncoder(channels=1, out_features=24), path)
    return path


# Each encoder variant: the modality it encodes and the options that pick the encoder.
ENCODERS: dict[str, tuple[str, dict[str, str]]] = {
    "image-cnn": ("image", {"image_encoder": "cnn"}),
    "image-scattering": ("image", {"image_encoder": "scattering"}),
    "image-pretrained": ("image", {"image_encoder": "pretrained"}),
    "audio-pooled": ("audio", {"audio_encoder": "pooled"}),
    "audio-cnn": ("audio", {"audio_encoder": "cnn"}),
    "text-bag": ("text", {"text_encoder": "bag"}),
    "text-gru": ("text", {"text_encoder": "gru"}),
    "text-transformer": ("text", {"text_encoder": "transformer"}),
    "sensor-cnn": ("sensor", {"sensor_encoder": "cnn"}),
    "sensor-gru": ("sensor", {"sensor_encoder": "gru"}),
    "tabular": ("tabular", {}),
}
FUSIONS = model_names()


def _pair(fusion: str, encoder: str, data: MultimodalDataset, weights: Path, **extra: object) -> tuple[ModelRecipe, MultimodalDataset]:
    """The fusion over the encoder's modality and a second one: tabular values, or for
    embedding fusion the same values marked as frozen pretrained embeddings."""
    modality, options = ENCODERS[encoder]
    other = "tabular" if modality != "tabular" else "audio"
    if fusion == "embedding":
        mods = tuple(dataclasses.replace(m, representation="embedding") if m.name == "tabular" else m for m in data.schema.modalities)
        data = data.replace(schema=dataclasses.replace(data.schema, modalities=mods))
        other = "tabular"
        if modality == "tabular":
            modality = "audio"
    image_weights = str(weights) if options.get("image_encoder") == "pretrained" else ""
    recipe = ModelRecipe(fusion, ModelOptions(width=24, modalities=(modality, other), image_weights=image_weights, **options, **extra))  # type: ignore[arg-type]
    return recipe, recipe.prepare(data)


def _dp(mode: GradSampleMode, noise: float = 1.0, clip: float = 1.0) -> DPSettings:
    return DPSettings(noise_multiplier=noise, max_grad_norm=clip, grad_sample_mode=mode, accountant=SiteAccountant(AccountantKind.RDP))


@pytest.mark.parametrize("encoder", list(ENCODERS))
@pytest.mark.parametrize("fusion", FUSIONS)
def test_every_fusion_with_every_encoder_trains_under_dp(fusion: str, encoder: str, synthetic: MultimodalDataset, image_weights: Path) -> None:
    recipe, data = _pair(fusion, encoder, synthetic, image_weights)
    model = recipe.build(data.schema)
    assert ModuleValidator.validate(model, strict=False) == []
    supported = recipe.grad_sample_modes(data.schema)
    assert "ghost" in supported or "hooks" in supported
    for mode in GradSampleMode:
        if mode.value not in supported:
            with pytest.raises(ConfigError, match="grad-sample-mode"):
                recipe.check_grad_sample_mode(mode.value, data.schema)
            continue
        model = recipe.build(data.schema)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        dp = _dp(mode)
        loss = train(model, data.subset(range(32)), epochs=1, batch_size=16, learning_rate=0.2, momentum=0.0, seed=0, dp=dp)
        assert np.isfinite(loss) and dp.accountant.history[0].steps == 2, mode
        assert all(torch.isfinite(v).all() for v in model.state_dict().values()), mode
        assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items()), mode
        assert set(model.state_dict()) == set(before)  # no "_module." prefix leaks out


def test_same_seed_same_weights(site: MultimodalDataset) -> None:
    a, b = DEFAULT.build(site.schema, seed=3), DEFAULT.build(site.schema, seed=3)

    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


@pytest.mark.parametrize("mode", list(GradSampleMode))
def test_the_default_model_takes_a_dp_step_in_every_grad_sample_mode(mode: GradSampleMode, site: MultimodalDataset) -> None:
    model = DEFAULT.build(site.schema)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dp = _dp(mode)

    loss = train(model, site.subset(range(64)), epochs=1, batch_size=16, learning_rate=0.5, momentum=0.0, seed=0, dp=dp)

    assert np.isfinite(loss)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert set(model.state_dict()) == set(before)
    assert dp.accountant.history[0].steps == 4 and dp.accountant.history[0].sample_rate == 0.25
    # nothing of the last step's clipped, un-noised sum (or Opacus' per-sample state) stays on the model
    assert not any(hasattr(p, a) for p in model.parameters() for a in ("summed_grad", "grad_sample", "_forward_counter"))


def _reference_clipped_mean(model: nn.Module, objective: nn.Module, arrays: MultimodalDataset, max_grad_norm: float) -> tuple[list[torch.Tensor], list[float]]:
    """Per-sample gradients one sample at a time, each clipped to max_grad_norm, averaged."""
    from fedmm.site.training import make_dataset

    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    norms = []
    rows = make_dataset(arrays)
    m = len(arrays.schema.modalities)
    for i in range(len(arrays)):
        model.zero_grad()
        sample = [t.unsqueeze(0) for t in rows[i]]
        loss = objective(model(*sample[: m + 1]), sample[m], *sample[m + 1 :])
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = tuple(torch.zeros_like(p) if g is None else g for g, p in zip(grads, params))
        norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
        norms.append(norm)
        factor = min(1.0, max_grad_norm / (norm + 1e-6))  # Opacus' flat clipping
        for t, g in zip(total, grads):
            t += g * factor
    return [t / len(arrays) for t in total], norms


def n_min(n: int) -> int:
    return (3 * n) // 4


def _check_per_sample_clipping(recipe: ModelRecipe, data: MultimodalDataset, mode: GradSampleMode, n: int = 16) -> None:
    # A batch that holds every sample (sample rate 1) and negligible noise make the
    # DP-SGD update equal to lr x the mean of the per-sample clipped gradients. A large
    # lr keeps float32 round-off of "weights before - weights after" far below 1e-5.
    arrays, max_grad_norm, lr = data.subset(range(n)), 0.05, 1000.0
    model, reference_model = recipe.build(data.schema, seed=1), recipe.build(data.schema, seed=1)
    expected, norms = _reference_clipped_mean(reference_model, recipe.objective(data.schema), arrays, max_grad_norm)
    before = [p.detach().clone() for p in model.parameters()]

    train(
        model, arrays, epochs=1, batch_size=len(arrays), learning_rate=lr, momentum=0.0, seed=0,
        dp=_dp(mode, noise=1e-12, clip=max_grad_norm), objective=recipe.objective(data.schema),
    )

    # every sample really was clipped (one with none of the chosen modalities may have no gradient)
    assert all(n > max_grad_norm for n in norms if n > 0) and sum(n > 0 for n in norms) >= n_min(len(norms))
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


@pytest.mark.parametrize("encoder", list(ENCODERS))
@pytest.mark.parametrize("fusion", FUSIONS)
def test_per_sample_gradients_match_one_sample_at_a_time(fusion: str, encoder: str, synthetic: MultimodalDataset, image_weights: Path) -> None:
    recipe, data = _pair(fusion, encoder, synthetic, image_weights)
    supported = recipe.grad_sample_modes(data.schema)
    mode = GradSampleMode.GHOST if "ghost" in supported else GradSampleMode.HOOKS  # the default mode, or the one this encoder allows
    _check_per_sample_clipping(recipe, data, mode)


@pytest.mark.parametrize("mode", [GradSampleMode.GHOST, GradSampleMode.HOOKS])
def test_default_model_per_sample_gradients_on_avmnist(mode: GradSampleMode, site: MultimodalDataset) -> None:
    _check_per_sample_clipping(DEFAULT, site, mode)


@pytest.mark.parametrize("fusion", ["concat", "attention", "late"])
def test_multi_task_and_alignment_losses_are_per_record_under_dp(fusion: str, synthetic: MultimodalDataset) -> None:
    # digit + "speaker" heads with weighted losses and the within-record alignment term:
    # the DP update still equals the mean of one-sample-at-a-time clipped gradients.
    recipe = ModelRecipe(fusion, ModelOptions(width=24, modalities=("image", "audio", "tabular"), tasks=(("speaker", 0.5),), contrastive="align", contrastive_weight=0.5))
    data = recipe.prepare(synthetic)
    assert data.schema.tasks == (("speaker", ("s0", "s1", "s2")),)
    assert recipe.build(data.schema).output_layout.width == 10 + 3 + 3 * 32  # type: ignore[union-attr]
    _check_per_sample_clipping(recipe, data, GradSampleMode.GHOST)


GENERIC = ["concat", "gated", "late", "attention"]


@pytest.mark.parametrize("name", GENERIC)
def test_presence_mask_reaches_the_model(name: str, synthetic: MultimodalDataset) -> None:
    recipe = ModelRecipe(name)
    synthetic = recipe.prepare(synthetic)
    model = recipe.build(synthetic.schema).eval()
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
    # batch size 1 on 40 records: sample rate 1/40 (40 steps: never more steps than records), so about a third draw no record.
    recipe = ModelRecipe()
    data = recipe.prepare(synthetic)
    model = recipe.build(data.schema)
    dp = _dp(mode)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    train(model, data.subset(range(40)), epochs=1, batch_size=1, learning_rate=0.1, momentum=0.0, seed=1, dp=dp)

    assert dp.accountant.steps == 40  # every step, empty or not, is accounted
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_ghost_optimizer_noise_is_gaussian_with_the_calibrated_std() -> None:
    # fedmm.privacy.ghost draws the noise of all tensors in one call: each coordinate must
    # still get independent N(0, (noise_multiplier * max_grad_norm)^2) noise.
    from fedmm.privacy.ghost import GhostClippingOptimizer

    params = [nn.Parameter(torch.zeros(200, 100)), nn.Parameter(torch.zeros(20000))]
    optimizer = GhostClippingOptimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=1.5, max_grad_norm=2.0, expected_batch_size=1)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.accumulate()
    optimizer.add_noise()

    for p in params:
        assert abs(float(p.grad.std()) - 3.0) < 0.05 and abs(float(p.grad.mean())) < 0.05
    assert not torch.equal(params[0].grad.flatten()[:100], params[1].grad[:100])


def test_ghost_optimizer_step_divides_the_noised_sum_by_the_expected_batch_once() -> None:
    # pre_step adds the noise and divides in one pass (fedmm.privacy.ghost): (sum + noise) / batch,
    # in the clipped sum's own tensor (no bare clipped sum is left behind), and a second step without
    # zero_grad refused (Opacus' rule)
    from fedmm.privacy.ghost import GhostClippingOptimizer

    params = [nn.Parameter(torch.zeros(3, 2)), nn.Parameter(torch.zeros(5))]
    for noise, expected_std in ((0.0, 0.0), (2.0, 0.5)):
        optimizer = GhostClippingOptimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=noise, max_grad_norm=1.0, expected_batch_size=4)
        sums = [torch.full_like(p, 8.0) for p in params]
        for p, s in zip(params, sums):
            p.grad = s.clone()
        assert optimizer.pre_step()
        for p, s in zip(params, sums):
            assert p.grad.data_ptr() == p.summed_grad.data_ptr()  # noised in place: the bare sum is gone
            if noise == 0.0:
                assert torch.equal(p.grad, s / 4)
        if noise:
            big = [nn.Parameter(torch.zeros(40000))]
            optimizer = GhostClippingOptimizer(torch.optim.SGD(big, lr=1.0), noise_multiplier=noise, max_grad_norm=1.0, expected_batch_size=4)
            big[0].grad = torch.full_like(big[0], 8.0)
            optimizer.pre_step()
            assert abs(float(big[0].grad.std()) - expected_std) < 0.01 and abs(float(big[0].grad.mean()) - 2.0) < 0.01
        with pytest.raises(ValueError, match="zero_grad"):
            optimizer.pre_step()  # the same gradients again


def test_ghost_optimizer_keeps_a_skipped_steps_sum_when_grad_is_zeroed_in_place() -> None:
    # Physical batches (BatchMemoryManager): a skipped step keeps its clipped sum until the last
    # chunk. Zeroing .grad in place in between (module.zero_grad() defaults to that) must not
    # zero the kept sum: the step is (sum of both chunks) / batch.
    from fedmm.privacy.ghost import GhostClippingOptimizer

    params = [nn.Parameter(torch.zeros(4))]
    optimizer = GhostClippingOptimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=2)
    optimizer.signal_skip_step(do_skip=True)
    params[0].grad = torch.full((4,), 3.0)
    assert not optimizer.pre_step()  # skipped: only accumulated
    params[0].grad.zero_()
    params[0].grad = torch.full((4,), 5.0)  # the next chunk's clipped sum
    assert optimizer.pre_step()
    assert torch.equal(params[0].grad, torch.full((4,), 4.0))  # (3 + 5) / 2


@pytest.mark.parametrize("path", ["one-pass, module.zero_grad()", "two-pass, no zero_grad"])
def test_physical_batches_release_at_most_their_records_clipped_sum(path: str) -> None:
    # Two physical batches of one record each, noise 0, C = 1: the released sum is at most 2 however
    # the caller clears .grad in between. On Opacus' two-pass path (a layer one-pass clipping does not
    # take) its first, unclipped backward adds into .grad in place: a kept sum sharing .grad's storage
    # took in that unclipped gradient (|sum| ~ 2e4 here before the fix).
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    from fedmm.privacy.ghost import GhostClippingOptimizer, OnePassGradSampleModule, _ClippingCriterion

    class Unsupported(nn.Linear):  # fedmm.privacy.ghost_norms.supports() refuses subclasses
        pass

    torch.manual_seed(0)
    one_pass = path.startswith("one-pass")
    model = nn.Sequential((nn.Linear if one_pass else Unsupported)(4, 1, bias=False))
    module = (OnePassGradSampleModule if one_pass else GradSampleModuleFastGradientClipping)(model, max_grad_norm=1.0, loss_reduction="sum")
    optimizer = GhostClippingOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=1, loss_reduction="sum")
    criterion = DPLossFastGradientClipping(module, optimizer, nn.MSELoss(reduction="sum"), loss_reduction="sum")
    criterion.__class__ = _ClippingCriterion
    x, y = torch.full((1, 4), 100.0), torch.zeros(1, 1)
    for last in (False, True):
        optimizer.signal_skip_step(do_skip=not last)
        if one_pass:
            module.zero_grad()  # Opacus' default: set_to_none=False, .grad zeroed in place
        criterion(module(x), y).backward()
        optimizer.step()
    summed = float(model[0].weight.summed_grad.norm())
    assert summed <= 2.0 + 1e-5
    assert summed > 1.99  # both records clipped to 1, the same direction: nothing lost either


def test_fast_linear_norms_equal_opacus_own() -> None:
    from opacus.grad_sample.linear import compute_linear_norm_sample

    from fedmm.privacy.ghost import linear_norm_sample

    layer = nn.Linear(7, 5)
    g = torch.Generator().manual_seed(0)
    for shape in ((6, 7), (6, 3, 7)):  # [batch, features] takes the fast path, sequences Opacus'
        activations, backprops = torch.randn(*shape, generator=g), torch.randn(*shape[:-1], 5, generator=g)
        ours, theirs = linear_norm_sample(layer, [activations], backprops), compute_linear_norm_sample(layer, [activations], backprops)
        assert set(ours) == set(theirs) and all(torch.allclose(ours[p], theirs[p], rtol=1e-5) for p in ours)


def test_linear_only_models_clip_in_one_backward_pass(site: MultimodalDataset, synthetic: MultimodalDataset) -> None:
    # fedmm.privacy.ghost takes one backward pass when every trainable layer is one it supports (the
    # default model, the CNN fusions); anything else keeps Opacus' two-pass module. Both are checked against
    # one-sample-at-a-time references above; this pins which one each model gets.
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    from fedmm.privacy.ghost import OnePassGradSampleModule, PrivacyEngine

    def wrapped(recipe: ModelRecipe, data: MultimodalDataset) -> nn.Module:
        model = recipe.build(data.schema)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(8, 1)), batch_size=4)
        module, *_ = PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), criterion=recipe.objective(data.schema),
            data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="ghost",
        )
        return module

    assert type(wrapped(DEFAULT, site)) is OnePassGradSampleModule
    cnn = ModelRecipe("concat", ModelOptions(modalities=("image", "audio")))  # convolutions: one pass too (tests/test_one_pass_clipping.py)
    assert type(wrapped(cnn, cnn.prepare(synthetic))) is OnePassGradSampleModule
    gru = ModelRecipe("concat", ModelOptions(modalities=("sensor", "audio"), sensor_encoder="gru"))  # Opacus' DPGRU: two passes
    assert type(wrapped(gru, gru.prepare(synthetic))) is GradSampleModuleFastGradientClipping


class _LinearsOnly(nn.Module):
    """Linear layers in the awkward places: on a sequence and on a batch, each followed by an
    in-place ReLU, one with a frozen bias, and one whose output never reaches the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.sequence = nn.Linear(5, 6)
        self.relu = nn.ReLU(inplace=True)
        self.middle = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)
        self.head.bias.requires_grad_(False)
        self.unused = nn.Linear(6, 2)
        self.spare = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.relu(self.middle(self.relu(self.sequence(x)).mean(dim=1)))
        self.spare = self.unused(hidden)  # computed, not part of the loss
        return self.head(hidden)


def test_one_pass_clipping_equals_per_sample_clipping_on_awkward_linear_models() -> None:
    from fedmm.privacy.ghost import OnePassGradSampleModule

    torch.manual_seed(0)
    model = _LinearsOnly().double()
    x, y, clip = torch.randn(7, 4, 5, dtype=torch.float64), torch.randint(0, 3, (7,)), 0.8
    trainable = [p for p in model.parameters() if p.requires_grad]
    expected, norms = [torch.zeros_like(p) for p in trainable], []
    for i in range(len(x)):
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), trainable, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, trainable)]
        norm = float(torch.sqrt(sum((g**2).sum() for g in grads)))
        norms.append(norm)
        for e, g in zip(expected, grads):
            e += g * min(1.0, clip / (norm + 1e-6))
    assert min(norms) < clip < max(norms)  # some records are clipped, some are not

    module = OnePassGradSampleModule(model, max_grad_norm=clip)
    module.clipped_backward(nn.functional.cross_entropy(module(x), y, reduction="none"))

    for p, e in zip(trainable, expected):
        assert torch.allclose(p.grad, e, rtol=1e-10, atol=1e-12)
    assert model.head.bias.grad is None and not model.unused.weight.grad.any()
    module.zero_grad()
    model(x)
    with pytest.raises(NotImplementedError, match="tying"):  # a layer used twice in one step is refused, as Opacus does
        module.clipped_backward(nn.functional.cross_entropy(module(x), y, reduction="none"))


class _TwoLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(5, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.first(x))


@pytest.mark.parametrize("mode", ["ghost", "hooks", "functorch"])
def test_a_huge_but_finite_record_is_clipped_exactly_not_dropped(mode: str) -> None:
    # One record's inputs are 1e32: its per-sample norm (~1e33) overflows float32's squares, so
    # fedmm takes norms in float64 and the clipped sum in float64 (fedmm.privacy.ghost.WIDE);
    # the record must still count as one gradient clipped to max_grad_norm, as computed in float64.
    from fedmm.privacy.ghost import PrivacyEngine

    torch.manual_seed(0)
    model, clip, lr = _TwoLinears(), 0.5, 1000.0
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    x[2] *= 1e32
    reference = _TwoLinears().double()
    reference.load_state_dict(model.state_dict())
    expected = [torch.zeros_like(p) for p in reference.parameters()]
    for i in range(len(x)):
        grads = torch.autograd.grad(nn.functional.cross_entropy(reference(x[i : i + 1].double()), y[i : i + 1]), list(reference.parameters()))
        norm = float(torch.sqrt(sum((g**2).sum() for g in grads)))
        for e, g in zip(expected, grads):
            e += g * min(1.0, clip / (norm + 1e-6))
    before = [p.detach().double().clone() for p in model.parameters()]

    wrapped = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr), criterion=nn.CrossEntropyLoss(),
        data_loader=torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=len(x)),
        noise_multiplier=0.0, max_grad_norm=clip, grad_sample_mode=mode, poisson_sampling=False,
    )
    module, optimizer = wrapped[0], wrapped[1]
    criterion = wrapped[2] if mode == "ghost" else nn.CrossEntropyLoss()
    optimizer.zero_grad()
    criterion(module(x), y).backward()
    optimizer.step()

    summed = torch.cat([((b - p.detach().double()) * len(x) / lr).flatten() for b, p in zip(before, model.parameters())])
    flat_expected = torch.cat([e.flatten() for e in expected])
    assert float((summed - flat_expected).norm() / flat_expected.norm()) <= 1e-5
    assert optimizer.nonfinite_records == 0  # type: ignore[attr-defined]
