"""One-pass ghost clipping (fedmm.privacy.ghost, fedmm.privacy.ghost_norms) for every layer type
the default model and the CNN fusions use: per-record norms against explicit per-record
gradients, the clipped sum against Opacus' own per-sample clipping, and the sensitivity bound."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from opacus.validators.errors import UnsupportedModuleError
from torch import nn

from fedmm.data.synthetic import make_synthetic
from fedmm.models import ModelRecipe
from fedmm.models.evaluation import make_dataset
from fedmm.privacy.ghost import OnePassGradSampleModule, PrivacyEngine
from fedmm.privacy import ghost, ghost_norms
from fedmm.privacy.ghost_norms import layer_norms

CNN_FUSIONS = ("concat", "gated", "late", "attention")  # over every modality kind: Conv2d, Conv1d, Embedding, GroupNorm (+LayerNorm)


class _Probe(nn.Module):
    """One layer under test, then a fixed nonlinearity and a linear readout to 3 classes."""

    def __init__(self, layer: nn.Module, out: int) -> None:
        super().__init__()
        self.layer, self.readout = layer, nn.Linear(out, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.layer(x))
        return self.readout(h.reshape(h.shape[0], -1, self.readout.in_features).mean(dim=1))


def _frozen(layer: nn.Linear, name: str) -> nn.Module:
    getattr(layer, name).requires_grad_(False)
    return layer


def _embedding_with_padding() -> nn.Module:
    return nn.Embedding(7, 4, padding_idx=0)


# name: (layer, input maker, width the readout sees per position)
LAYERS = {
    "linear": (lambda: nn.Linear(6, 5), lambda n: torch.randn(n, 6), 5),
    "linear-no-bias": (lambda: nn.Linear(6, 5, bias=False), lambda n: torch.randn(n, 6), 5),
    "linear-frozen-weight": (lambda: _frozen(nn.Linear(6, 5), "weight"), lambda n: torch.randn(n, 6), 5),
    "linear-frozen-bias": (lambda: _frozen(nn.Linear(6, 5), "bias"), lambda n: torch.randn(n, 6), 5),
    "linear-sequence": (lambda: nn.Linear(6, 5), lambda n: torch.randn(n, 4, 6), 5),
    "conv1d": (lambda: nn.Conv1d(3, 4, 5, stride=2, padding=2), lambda n: torch.randn(n, 3, 16), 4 * 8),
    "conv2d-explicit": (lambda: nn.Conv2d(2, 4, 3, stride=2, padding=1), lambda n: torch.randn(n, 2, 12, 12), 4 * 36),
    "conv2d-ghost": (lambda: nn.Conv2d(24, 40, 3, stride=2, padding=1, dilation=1), lambda n: torch.randn(n, 24, 6, 6), 40 * 9),
    "conv1d-ghost": (lambda: nn.Conv1d(24, 40, 3, stride=2, padding=1), lambda n: torch.randn(n, 24, 8), 40 * 4),
    "conv2d-rectangular": (lambda: nn.Conv2d(3, 4, (3, 2), stride=(1, 2), padding=(1, 0)), lambda n: torch.randn(n, 3, 5, 6), 4 * 15),
    "conv2d-dilated-no-bias": (lambda: nn.Conv2d(2, 3, 3, padding=2, dilation=2, bias=False), lambda n: torch.randn(n, 2, 7, 7), 3 * 49),
    "conv2d-one-channel": (lambda: nn.Conv2d(1, 4, 5, stride=2, padding=2), lambda n: torch.randn(n, 1, 9, 9), 4 * 25),
    "conv1d-same-even-kernel": (lambda: nn.Conv1d(3, 4, 4, padding="same", dilation=2), lambda n: torch.randn(n, 3, 11), 4 * 11),
    "conv2d-same-even-kernel": (lambda: nn.Conv2d(2, 3, (2, 3), padding="same"), lambda n: torch.randn(n, 2, 5, 6), 3 * 30),
    "conv2d-valid": (lambda: nn.Conv2d(2, 3, 3, padding="valid"), lambda n: torch.randn(n, 2, 5, 6), 3 * 12),
    "embedding": (lambda: nn.Embedding(7, 4), lambda n: torch.randint(0, 7, (n, 9)), 4),
    "embedding-padding": (_embedding_with_padding, lambda n: torch.randint(0, 3, (n, 9)), 4),
    "embedding-single": (lambda: nn.Embedding(5, 4), lambda n: torch.randint(0, 5, (n,)), 4),
    "groupnorm": (lambda: nn.GroupNorm(2, 4), lambda n: torch.randn(n, 4, 5, 5), 4 * 25),
    "groupnorm-recomputed": (lambda: nn.GroupNorm(2, 4), lambda n: torch.randn(n, 4, 5, 5), 4 * 25),  # without the forward's saved stats
    "layernorm": (lambda: nn.LayerNorm(6), lambda n: torch.randn(n, 4, 6), 6),
    "layernorm-4d": (lambda: nn.LayerNorm((2, 3, 3, 3)), lambda n: torch.randn(n, 2, 3, 3, 3), 54),  # 5-D per-record gradients, not a Conv2d's
}


def _per_record_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Explicit per-record gradients ``[n, *shape]`` of every trainable parameter (torch.func)."""
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(model, p, (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0))

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return [grads[k] for k in params]


def _clipped_reference(grads: list[torch.Tensor], clip: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    norms = torch.sqrt(sum(g.reshape(len(g), -1).square().sum(dim=1) for g in grads))
    coef = (clip / (norms + 1e-6)).clamp(max=1.0)
    return norms, [torch.einsum("i,i...->...", coef, g) for g in grads]


@pytest.mark.parametrize("name", list(LAYERS))
def test_per_record_norms_and_clipped_sum_equal_explicit_per_record_gradients(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if name.endswith("-ghost"):  # as for a convolution whose per-record gradients would be too large to form
        monkeypatch.setattr(ghost_norms, "EXPLICIT_MAX", 0)
    if name.endswith("-recomputed"):  # as for a GroupNorm whose graph node is not native_group_norm's: normalised again
        monkeypatch.setattr(ghost, "_group_norm_stats", lambda layers, edges: {})
    make_layer, make_input, width = LAYERS[name]
    torch.manual_seed(0)
    model = _Probe(make_layer(), width).double()
    x = make_input(8)
    x = x.double() if x.is_floating_point() else x
    y = torch.randint(0, 3, (8,))
    grads = _per_record_grads(model, x, y)
    clip = float(torch.sqrt(sum(g.reshape(len(g), -1).square().sum(dim=1) for g in grads)).median())
    norms, expected = _clipped_reference(grads, clip)
    assert (norms > clip).any() and (norms < clip).any()  # some records are clipped, some are not

    module = OnePassGradSampleModule(model, max_grad_norm=clip)  # the old code refused every non-Linear layer here
    module.clipped_backward(nn.functional.cross_entropy(module(x), y, reduction="none"))

    assert torch.allclose(module.per_sample_gradient_norms, norms.double(), rtol=1e-5, atol=1e-12)
    for p, e in zip([p for p in model.parameters() if p.requires_grad], expected):
        assert torch.allclose(p.grad, e, rtol=1e-5, atol=1e-10), name


def test_convolutions_form_per_record_gradients_unless_too_large(monkeypatch: pytest.MonkeyPatch) -> None:
    # the same norms either way (above); here which one each shape takes. Small enough: explicit
    # gradients, reused for the clipped sum (the ghost norm would only add work)
    for name in ("conv2d-explicit", "conv2d-ghost"):
        make_layer, make_input, _ = LAYERS[name]
        layer, x = make_layer(), make_input(3)
        g = torch.randn_like(layer(x))
        assert layer_norms(layer, x, g).per_record is not None, name
    # beyond the memory bound: the ghost norm where it costs less than the explicit gradients
    monkeypatch.setattr(ghost_norms, "EXPLICIT_MAX", 0)
    for name, ghost in (("conv2d-explicit", False), ("conv2d-ghost", True)):
        make_layer, make_input, _ = LAYERS[name]
        layer, x = make_layer(), make_input(3)
        g = torch.randn_like(layer(x))
        assert (layer_norms(layer, x, g).per_record is None) is ghost, name


@pytest.mark.parametrize("layer", [nn.GroupNorm(2, 4), nn.Conv1d(2, 4, 3)], ids=["groupnorm", "conv1d"])
def test_a_layers_clipped_sum_lands_in_its_places_side_by_side_apart_or_new(layer: nn.Module) -> None:
    # A layer's per-record gradients are clipped block by block (a GroupNorm's weight and bias in one):
    # straight into one buffer's span when its places lie side by side there, else part by part.
    torch.manual_seed(0)
    x = torch.randn(5, 2, 6) if isinstance(layer, nn.Conv1d) else torch.randn(5, 4, 6)
    g = torch.randn_like(layer(x))
    coef = torch.rand(5)
    norms = layer_norms(layer, x, g)
    params = [p for p in layer.parameters()]
    ways: dict[str, dict[nn.Parameter, torch.Tensor] | None] = {"new": None}
    flat = torch.full((sum(p.numel() for p in params),), float("nan"))
    ways["side by side"], at = {}, 0
    for p in params:
        ways["side by side"][p] = flat[at : at + p.numel()].view(p.shape)  # type: ignore[index]
        at += p.numel()
    ways["apart"] = {p: torch.full(p.shape, float("nan")) for p in params}  # separate tensors: no span
    results = {}
    for way, out in ways.items():
        for p in params:
            p.grad = None
        ghost_norms.clip_into(layer, x, g, norms, coef, None, out)
        results[way] = [p.grad.clone() for p in params]
        if out is not None:
            assert all(p.grad is out[p] for p in params), way  # each .grad is its place
    expected = [torch.einsum("i,i...->...", coef, t) for t in _explicit_per_record(layer, x, g)]
    for way, grads in results.items():
        for got, want in zip(grads, expected):
            assert torch.allclose(got, want, atol=1e-5), way


def _explicit_per_record(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    """Each parameter's per-record gradients, one record at a time with torch.func."""
    names = [name for name, _ in layer.named_parameters()]

    def loss(params: dict[str, torch.Tensor], xi: torch.Tensor, gi: torch.Tensor) -> torch.Tensor:
        return (torch.func.functional_call(layer, params, (xi.unsqueeze(0),)) * gi.unsqueeze(0)).sum()

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(dict(layer.named_parameters()), x, g)
    return [grads[name].detach() for name in names]


def _fusion(name: str) -> tuple[nn.Module, list[torch.Tensor], torch.Tensor]:
    recipe = ModelRecipe(name)
    data = recipe.prepare(make_synthetic(24, seed=5))
    batch = make_dataset(data)[:]
    count = len(data.schema.modalities)
    torch.manual_seed(1)
    return recipe.build(data.schema, seed=1), list(batch[: count + 1]), batch[count + 1]


@pytest.mark.parametrize("fusion", CNN_FUSIONS)
def test_cnn_fusion_norms_and_clipped_sum_equal_opacus_hooks(fusion: str) -> None:
    model, inputs, y = _fusion(fusion)
    model = model.double()
    inputs = [t.double() if t.is_floating_point() else t for t in inputs]
    clip = 0.5
    reference = GradSampleModule(copy.deepcopy(model), batch_first=True, loss_reduction="sum")  # Opacus' per-sample gradients (hooks)
    nn.functional.cross_entropy(reference(*inputs)[:, :10], y, reduction="sum").backward()
    grads = [p.grad_sample for p in reference.parameters() if p.requires_grad]
    norms, expected = _clipped_reference(grads, clip)
    assert (norms > clip).any()

    module = OnePassGradSampleModule(model, max_grad_norm=clip)
    module.clipped_backward(nn.functional.cross_entropy(module(*inputs)[:, :10], y, reduction="none"))

    assert torch.allclose(module.per_sample_gradient_norms, norms, rtol=1e-5)
    for p, e in zip([p for p in model.parameters() if p.requires_grad], expected):
        assert torch.allclose(p.grad, e, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("fusion", CNN_FUSIONS)
def test_cnn_fusions_get_one_pass_clipping_and_match_opacus_hooks_before_noise(fusion: str) -> None:
    # End to end through the privacy engine, noise 0: the step's gradient (clipped sum / batch)
    # in ghost mode equals Opacus' own per-sample clipping (hooks mode) on the same batch.
    model, inputs, y = _fusion(fusion)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(y), batch_size=len(y))
    steps = {}
    for mode in ("ghost", "hooks"):
        copy_ = copy.deepcopy(model)
        wrapped = PrivacyEngine().make_private(
            module=copy_, optimizer=torch.optim.SGD(copy_.parameters(), lr=0.1), criterion=nn.CrossEntropyLoss(),
            data_loader=loader, noise_multiplier=0.0, max_grad_norm=0.3, grad_sample_mode=mode, poisson_sampling=False,
        )
        module, optimizer = wrapped[0], wrapped[1]
        if mode == "ghost":
            assert type(module) is OnePassGradSampleModule  # the old code fell back to Opacus' two passes
        criterion = wrapped[2] if mode == "ghost" else nn.CrossEntropyLoss()
        optimizer.zero_grad()
        criterion(module(*inputs)[:, :10], y).backward()
        optimizer.pre_step()
        steps[mode] = torch.cat([p.grad.flatten() for p in copy_.parameters() if p.requires_grad])
    assert torch.allclose(steps["ghost"], steps["hooks"], rtol=1e-4, atol=1e-7)


def test_a_step_never_overwrites_a_gradient_someone_still_holds() -> None:
    # Each step's clipped sums share one buffer, reused by the next step only when nothing else
    # holds it: a .grad kept from step 1 keeps its values through step 2 (a new buffer then), and
    # once it is let go, step 3 uses step 2's buffer again.
    model, inputs, y = _fusion("concat")
    module = OnePassGradSampleModule(model, max_grad_norm=0.5)
    params = [p for p in model.parameters() if p.requires_grad]

    def step(records: slice) -> list[torch.Tensor]:
        for p in params:
            p.grad = None
        module.clipped_backward(nn.functional.cross_entropy(module(*[t[records] for t in inputs])[:, :10], y[records], reduction="none"))
        assert all(p.grad.data_ptr() == v.data_ptr() for p, v in zip(params, module.grad_buffer.split([p.numel() for p in params])))
        return [p.grad for p in params]

    kept = step(slice(0, 4))
    values = [g.clone() for g in kept]
    first = module.grad_buffer
    second = step(slice(4, 8))
    assert module.grad_buffer is not first and all(torch.equal(g, v) for g, v in zip(kept, values))
    assert not all(torch.equal(g, v) for g, v in zip(second, values))  # a different batch: different sums
    buffer = module.grad_buffer
    del kept, second, first
    step(slice(0, 4))
    assert module.grad_buffer is buffer

    # The buffer's views are used again too: a holder of one view itself (no alias, so the storage's
    # count of users does not show it) keeps it from being overwritten, from Python or from C++
    one = params[1].grad
    kept_value = one.clone()
    step(slice(4, 8))
    assert module.grad_buffer is not buffer and torch.equal(one, kept_value)
    buffer, holder = module.grad_buffer, nn.Parameter(torch.zeros_like(params[2]))
    holder.grad, kept_value = params[2].grad, params[2].grad.clone()  # held by another parameter only (C++)
    del one
    step(slice(0, 4))
    assert module.grad_buffer is not buffer and torch.equal(holder.grad, kept_value)
    buffer = module.grad_buffer
    holder.grad = None
    step(slice(4, 8))
    assert module.grad_buffer is buffer


def test_a_record_with_a_huge_gradient_moves_the_sum_by_at_most_max_grad_norm() -> None:
    model, inputs, y = _fusion("concat")
    clip = 0.2

    def clipped_sum(records: slice) -> torch.Tensor:
        copy_ = copy.deepcopy(model)
        module = OnePassGradSampleModule(copy_, max_grad_norm=clip)
        module.clipped_backward(nn.functional.cross_entropy(module(*[t[records] for t in inputs])[:, :10], y[records], reduction="none"))
        return torch.cat([p.grad.flatten() for p in copy_.parameters() if p.requires_grad])

    inputs = [t.clone() for t in inputs]
    inputs[0][0] *= 1e4  # record 0's image: its gradient norm is huge
    inputs[3][0] *= 1e4  # and its sensor series
    with_it, without = clipped_sum(slice(0, None)), clipped_sum(slice(1, None))
    assert float((with_it - without).norm()) <= clip * (1 + 1e-5)
    assert float((with_it - without).norm()) > clip * 0.99  # it is clipped, not dropped


def test_a_record_whose_gradient_is_not_finite_is_left_out_and_counted() -> None:
    # An infinite pixel makes record 0's forward pass NaN through the CNN: the step is the others'
    # clipped sum exactly (the record's rows are zeroed, never multiplied by 0), and it is counted.
    model, inputs, y = _fusion("concat")
    clip = 0.2

    def clipped_sum(batch: list[torch.Tensor], labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        copy_ = copy.deepcopy(model)
        module = OnePassGradSampleModule(copy_, max_grad_norm=clip)
        left_out = module.clipped_backward(nn.functional.cross_entropy(module(*batch)[:, :10], labels, reduction="none"))
        return torch.cat([p.grad.flatten() for p in copy_.parameters() if p.requires_grad]), left_out

    broken = [t.clone() for t in inputs]
    broken[0][0, 0, 0, 0] = float("inf")
    with_it, left_out = clipped_sum(broken, y)
    without, none_left = clipped_sum([t[1:] for t in inputs], y[1:])
    assert (left_out, none_left) == (1, 0)
    assert torch.isfinite(with_it).all()
    assert torch.allclose(with_it, without, rtol=1e-5, atol=1e-7)


def test_wrapping_and_closing_leave_the_model_as_it_was() -> None:
    # OnePassGradSampleModule builds and removes Opacus' state itself (one walk over the model):
    # after _close no recording forward (an instance attribute, in place of a forward hook), no
    # attribute on a parameter, and the same weights and state_dict keys; a forward a layer had
    # as its own attribute before is put back
    model, inputs, y = _fusion("concat")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]
    own = next(m for m in model.modules() if isinstance(m, nn.Linear))
    own.forward = own_forward = functools.partial(nn.Linear.forward, own)  # type: ignore[method-assign]
    module = OnePassGradSampleModule(model, max_grad_norm=1.0)
    assert module.trainable_parameters == params
    assert all(p.grad_sample is None and p._forward_counter == 0 for p in params)
    assert sum("forward" in m.__dict__ for m in model.modules()) == len(module._layers) > 0
    assert all(not m._forward_hooks for m in model.modules())  # no hook: torch's fast call path
    module.clipped_backward(nn.functional.cross_entropy(module(*inputs), y, reduction="none"))
    assert own.weight.grad is not None and bool(own.weight.grad.any())  # its own forward was recorded too
    module._close()
    assert [m for m in model.modules() if "forward" in m.__dict__] == [own] and own.forward is own_forward
    assert not hasattr(model, "autograd_grad_sample_hooks") and not hasattr(module, "autograd_grad_sample_hooks")
    assert not any(hasattr(p, a) for p in params for a in ("grad_sample", "_forward_counter", "_current_grad_sample", "_norm_sample"))
    assert list(model.state_dict()) == list(before) and all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_a_trainable_layer_with_buffers_is_refused() -> None:
    layer = nn.Linear(4, 3)
    layer.register_buffer("running", torch.zeros(3))  # state outside DP-SGD's accounting
    with pytest.raises(NotImplementedError, match="buffers"):
        OnePassGradSampleModule(nn.Sequential(layer), max_grad_norm=1.0)


def test_a_weight_shared_by_two_layers_is_refused() -> None:
    # each layer would set the shared .grad from its own share only (the last one written wins)
    first, second = nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False)
    second.weight = first.weight
    with pytest.raises(NotImplementedError, match="Parameter tying"):
        OnePassGradSampleModule(nn.Sequential(first, nn.Tanh(), second), max_grad_norm=1.0)


def test_the_one_pass_path_validates_as_opacus_does() -> None:
    # fedmm checks the trainable layers it already found with Opacus' validators, instead of
    # Opacus' own walks: the same refusals (a model in eval mode; a registered validator's error).
    def private(model: nn.Module) -> object:
        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 6), torch.randint(0, 3, (4,))), batch_size=4)
        return PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), criterion=nn.CrossEntropyLoss(), data_loader=data,
            noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="ghost", poisson_sampling=False,
        )

    with pytest.raises(UnsupportedModuleError, match="training mode"):
        private(nn.Linear(6, 3).eval())
    assert type(private(nn.Linear(6, 3))[0]) is OnePassGradSampleModule

    def refuse(layer: nn.Module) -> list[Exception]:
        return [UnsupportedModuleError(f"no {type(layer).__name__}")]

    ModuleValidator.VALIDATORS[nn.Linear] = refuse
    try:
        with pytest.raises(UnsupportedModuleError, match="no Linear"):
            private(nn.Linear(6, 3))
    finally:
        del ModuleValidator.VALIDATORS[nn.Linear]


# Layers whose norm is a product of factors (|g| |a|, or the ghost sum of (a_t . a_s)(g_t . g_s)): an output
# gradient whose entries square below float32's smallest normal (|g| = 1e-23 here) reads as norm 0 in float32,
# while its input (1e18-5e18: a curious server's weights can make one that large from inputs inside INPUT_BOUND) makes
# the record's true norm 1e-5 to 5e-5 x positions x sqrt(fan-in x fan-out), far above max-grad-norm (1e-5).
UNDERFLOWING = {
    "linear": (lambda: nn.Linear(4, 2), (3, 4), 5e18),  # one position: the default model's layers
    "linear-positions": (lambda: nn.Linear(4, 2), (3, 5, 4), 5e18),  # over tokens: the ghost (Gram) norm
    "conv1d-ghost": (lambda: nn.Conv1d(8, 16, 3), (3, 8, 5), 1e18),  # a convolution too large to form its gradients
}


@pytest.mark.parametrize("name", list(UNDERFLOWING))
def test_a_record_whose_gradient_squares_below_float32_is_still_clipped(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ghost_norms, "EXPLICIT_MAX", 0)  # the convolution takes the ghost norm
    make, shape, value = UNDERFLOWING[name]
    clip = 1e-5
    layer = make()
    module = OnePassGradSampleModule(nn.Sequential(layer), max_grad_norm=clip)
    out = module(torch.full(shape, value))
    module.clipped_backward((out * 1e-23).reshape(shape[0], -1).sum(dim=1))
    total = torch.sqrt(sum(p.grad.double().square().sum() for p in layer.parameters()))
    assert float(total) <= shape[0] * clip * (1 + 1e-5)  # three records, each clipped to max-grad-norm
    assert float(total) > 0  # clipped, not left out (an upper bound this far above the norm clips it far below max-grad-norm)


def test_opacus_two_pass_linear_norm_over_positions_bounds_an_underflowing_record() -> None:
    # fedmm's Linear norm sampler (Opacus' two-pass ghost clipping, for models with layers the one pass lacks)
    layer = nn.Linear(4, 2)
    a, g = torch.full((3, 5, 4), 5e18), torch.full((3, 5, 2), 1e-23)
    norms = ghost.linear_norm_sample(layer, [a], g)
    true = torch.einsum("ntj,ntk->njk", g.double(), a.double()).flatten(1).norm(dim=1)
    assert bool((norms[layer.weight].double() >= true * (1 - 1e-6)).all()), (norms[layer.weight], true)
