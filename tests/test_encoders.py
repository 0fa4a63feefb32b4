"""Sequence encoders under Opacus: validator, DP steps, and per-sample clipping against a reference.

Each encoder declares the Opacus grad_sample_modes it trains correctly under. The
declared modes are checked against per-sample gradients taken one sample at a time
with plain autograd, and the undeclared ones must really fail, so the declaration
cannot silently go stale when Opacus or the encoders change.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import pytest
import torch
from opacus import PrivacyEngine
from opacus.layers import DPMultiheadAttention
from opacus.validators import ModuleValidator
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from fedmm.models.sequence import SensorGRUEncoder, TextGRUEncoder, TextTransformerEncoder, _SelfAttention

# Opacus' own noise, all benign here: no secure RNG; backward hooks fire on modules whose
# inputs (the data) need no gradient; functorch takes an Embedding's integer ids for mixed precision
pytestmark = pytest.mark.filterwarnings(
    "ignore:Secure RNG turned off", "ignore:Full backward hook is firing", "ignore:In CPU autocast, but the target dtype is not supported",
)

ALL_MODES = ("ghost", "hooks", "functorch")
SAMPLES, CLASSES, BUCKETS, LENGTH, CHANNELS, STEPS = 24, 3, 64, 10, 3, 12

Encoder = TextGRUEncoder | TextTransformerEncoder | SensorGRUEncoder

# Narrower than the defaults to keep the file fast: the gradient arithmetic checked here
# does not depend on the widths (test_default_sizes_stay_small covers the defaults).
ENCODERS: dict[str, Callable[[], Encoder]] = {
    "text-gru": lambda: TextGRUEncoder(buckets=BUCKETS, dim=16, hidden=24, out_features=16),
    # two blocks: ghost clipping must see every module used once per forward
    "text-transformer": lambda: TextTransformerEncoder(buckets=BUCKETS, length=LENGTH, dim=32, heads=4, layers=2, out_features=16),
    "sensor-gru": lambda: SensorGRUEncoder(channels=CHANNELS, hidden=24, out_features=16),
}
DEFAULTS: dict[str, Callable[[], Encoder]] = {
    "text-gru": lambda: TextGRUEncoder(buckets=BUCKETS),
    "text-transformer": lambda: TextTransformerEncoder(buckets=BUCKETS, length=LENGTH),
    "sensor-gru": lambda: SensorGRUEncoder(channels=CHANNELS),
}
DECLARED = {name: type(make()).grad_sample_modes for name, make in ENCODERS.items()}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # The tensors here are tiny: with several intra-op threads the time goes into
    # synchronising them (4x slower on a busy 2-core machine), not into arithmetic.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _classifier(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    encoder = ENCODERS[name]()
    return nn.Sequential(encoder, nn.Linear(encoder.out_features, CLASSES))


def _tokens(seed: int = 0) -> Tensor:
    """Token ids with trailing padding: three empty texts, three full-length ones, the rest in between."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, BUCKETS, (SAMPLES, LENGTH), generator=g)
    lengths = torch.randint(1, LENGTH, (SAMPLES,), generator=g)
    lengths[:3], lengths[3:6] = 0, LENGTH
    tokens[torch.arange(LENGTH) >= lengths[:, None]] = 0
    return tokens


def _data(name: str, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    inputs = torch.randn(SAMPLES, CHANNELS, STEPS, generator=g) if name.startswith("sensor") else _tokens(seed)
    return inputs, torch.randint(0, CLASSES, (SAMPLES,), generator=g)


def _make_private(model: nn.Module, data: tuple[Tensor, Tensor], *, mode: str, batch_size: int, noise: float, max_grad_norm: float, lr: float, poisson: bool) -> tuple[nn.Module, torch.optim.Optimizer, nn.Module, DataLoader[tuple[Tensor, ...]]]:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loader: DataLoader[tuple[Tensor, ...]] = DataLoader(TensorDataset(*data), batch_size=batch_size)
    kwargs = {"criterion": nn.CrossEntropyLoss()} if mode == "ghost" else {}
    wrapped = PrivacyEngine().make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise, max_grad_norm=max_grad_norm,
        grad_sample_mode=mode, poisson_sampling=poisson, **kwargs,
    )
    if mode == "ghost":  # ghost clipping needs its own criterion: it runs two backward passes
        return tuple(wrapped)  # type: ignore[return-value]
    private, dp_optimizer, dp_loader = wrapped
    return private, dp_optimizer, nn.CrossEntropyLoss(), dp_loader


def _flat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.detach().flatten() for t in tensors])


_REFERENCE: dict[tuple[str, float], tuple[Tensor, Tensor]] = {}


def _reference(name: str, max_grad_norm: float) -> tuple[Tensor, Tensor]:
    """Mean of per-sample gradients taken one sample at a time, each clipped as Opacus does; and their norms."""
    if (name, max_grad_norm) not in _REFERENCE:
        model = _classifier(name, seed=1).double()
        inputs, labels = _data(name)
        inputs = inputs.double() if inputs.is_floating_point() else inputs
        params = list(model.parameters())
        total, norms = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64), []
        for i in range(SAMPLES):
            loss = nn.functional.cross_entropy(model(inputs[i : i + 1]), labels[i : i + 1])
            grad = _flat(list(torch.autograd.grad(loss, params)))
            norms.append(grad.norm())
            total += grad * min(1.0, max_grad_norm / (float(grad.norm()) + 1e-6))  # Opacus' flat clipping
        _REFERENCE[name, max_grad_norm] = total / SAMPLES, torch.stack(norms)
    return _REFERENCE[name, max_grad_norm]


def _dp_update_error(name: str, mode: str, max_grad_norm: float) -> float:
    """Relative error of one noiseless full-batch DP-SGD step (lr 1) against the reference clipped mean."""
    model = _classifier(name, seed=1).double()
    inputs, labels = _data(name)
    inputs = inputs.double() if inputs.is_floating_point() else inputs
    before = _flat(list(model.parameters()))
    # no Poisson sampling: one batch holding every sample; Opacus then divides the
    # summed clipped gradients by that batch size, as the reference does
    private, optimizer, criterion, loader = _make_private(
        model, (inputs, labels), mode=mode, batch_size=SAMPLES, noise=0.0, max_grad_norm=max_grad_norm, lr=1.0, poisson=False,
    )
    for batch, label in loader:
        optimizer.zero_grad()
        criterion(private(batch), label).backward()
        optimizer.step()
    expected, _ = _reference(name, max_grad_norm)
    update = before - _flat(list(model.parameters()))
    return float((update - expected).norm() / expected.norm())


@pytest.mark.parametrize("name", ENCODERS)
def test_encoders_pass_opacus_validator_without_fixes(name: str) -> None:
    assert ModuleValidator.validate(_classifier(name), strict=False) == []


@pytest.mark.parametrize("name", ENCODERS)
def test_declared_modes_are_opacus_modes(name: str) -> None:
    assert DECLARED[name] and DECLARED[name] <= set(ALL_MODES)


@pytest.mark.parametrize(("name", "mode"), [(n, m) for n in ENCODERS for m in sorted(DECLARED[n])])
def test_a_poisson_sampled_dp_step_runs_in_each_declared_mode(name: str, mode: str) -> None:
    model = _classifier(name)
    before = [p.detach().clone() for p in model.parameters()]
    torch.manual_seed(0)  # Poisson sampling draws from the global generator
    # sample rate 1/2: an empty Poisson batch (which Opacus cannot take through every layer) has odds 2^-24
    private, optimizer, criterion, loader = _make_private(
        model, _data(name), mode=mode, batch_size=SAMPLES // 2, noise=1.0, max_grad_norm=1.0, lr=0.5, poisson=True,
    )
    steps = 0
    for batch, label in loader:
        optimizer.zero_grad()
        loss = criterion(private(batch), label)
        loss.backward()
        optimizer.step()
        steps += 1
        assert math.isfinite(float(loss.detach()))  # ghost mode's loss is a wrapper, not a Tensor

    assert steps == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


@pytest.mark.parametrize("max_grad_norm", [1e6, 0.05], ids=["unclipped", "clipped"])
@pytest.mark.parametrize(("name", "mode"), [(n, m) for n in ENCODERS for m in sorted(DECLARED[n])])
def test_dp_update_equals_per_sample_clipped_gradients(name: str, mode: str, max_grad_norm: float) -> None:
    _, norms = _reference(name, max_grad_norm)
    # either no sample is clipped or every one is, so both halves of Opacus' clipping are exercised
    assert bool((norms < max_grad_norm).all()) if max_grad_norm > 1 else bool((norms > max_grad_norm).all())

    assert _dp_update_error(name, mode, max_grad_norm) <= 1e-5


@pytest.mark.parametrize(("name", "mode"), [(n, m) for n in ENCODERS for m in ALL_MODES if m not in DECLARED[n]])
def test_undeclared_modes_really_fail(name: str, mode: str) -> None:
    # Runs only for modes an encoder leaves out (none at present): if one starts
    # working, this fails so the mode gets added to grad_sample_modes.
    try:
        error = _dp_update_error(name, mode, 0.05)
    except Exception:  # any refusal counts: Opacus reports unsupported layers in many ways
        return
    assert error > 1e-3, f"{name} trains correctly under {mode!r}: declare it in grad_sample_modes"


def test_the_reference_tells_clipped_from_unclipped() -> None:
    # Guards the comparison itself: were clipping skipped, the update would miss by far more than 1e-5.
    unclipped, _ = _reference("text-transformer", 1e6)
    clipped, _ = _reference("text-transformer", 0.05)
    cosine = float(unclipped @ clipped / (unclipped.norm() * clipped.norm()))

    assert cosine < 0.999


@pytest.mark.parametrize("name", ENCODERS)
def test_default_sizes_stay_small(name: str) -> None:
    encoder = DEFAULTS[name]()
    # the token table scales with the caller's buckets; everything else is the encoder's own size
    own = sum(p.numel() for n, p in encoder.named_parameters() if not n.startswith(("embedding.", "tokens.")))

    assert 5_000 <= own <= 50_000
    assert ModuleValidator.validate(encoder, strict=False) == []


@pytest.mark.parametrize("name", ENCODERS)
def test_output_shape_and_finite_on_empty_texts(name: str) -> None:
    encoder = DEFAULTS[name]()
    inputs, _ = _data(name)

    out = encoder(inputs)

    assert out.shape == (SAMPLES, encoder.out_features)
    assert torch.isfinite(out).all()
    if not name.startswith("sensor"):
        assert bool((inputs[:3] == 0).all())
        assert torch.isfinite(encoder(torch.zeros(2, LENGTH, dtype=torch.long))).all()


@pytest.mark.parametrize("name", ["text-gru", "text-transformer"])
def test_text_output_ignores_trailing_padding(name: str) -> None:
    encoder = ENCODERS[name]().eval()
    tokens = _tokens()[:, : LENGTH - 4]  # rows cut short, then padded back out with zeros
    padded = nn.functional.pad(tokens, (0, 4))

    with torch.no_grad():
        short, long = encoder(tokens), encoder(padded)

    torch.testing.assert_close(short, long, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(short[0], short[1])  # every empty text maps to the same vector


def test_gru_empty_text_is_the_projection_of_zero() -> None:
    encoder = TextGRUEncoder(buckets=BUCKETS)
    projection = encoder.proj[0]
    assert isinstance(projection, nn.Linear)

    empty = encoder(torch.zeros(1, LENGTH, dtype=torch.long))

    torch.testing.assert_close(empty[0], torch.tanh(projection.bias).detach())


@pytest.mark.parametrize("name", ENCODERS)
def test_state_dict_loads_into_a_fresh_instance(name: str) -> None:
    # what the server relies on: the same class rebuilt elsewhere takes the sites' weights
    source, target = _classifier(name, seed=1).eval(), _classifier(name, seed=2).eval()
    inputs, _ = _data(name)

    target.load_state_dict(source.state_dict())

    with torch.no_grad():
        torch.testing.assert_close(target(inputs), source(inputs), rtol=0, atol=0)


def _torch_attention_like(attention: DPMultiheadAttention) -> nn.MultiheadAttention:
    """``nn.MultiheadAttention`` holding the same weights, as the independent reference."""
    reference = nn.MultiheadAttention(attention.embed_dim, attention.num_heads, batch_first=True)
    q, k, v = attention.qlinear, attention.klinear, attention.vlinear
    reference.load_state_dict({
        "in_proj_weight": torch.cat([q.weight, k.weight, v.weight]), "in_proj_bias": torch.cat([q.bias, k.bias, v.bias]),
        "out_proj.weight": attention.out_proj.weight, "out_proj.bias": attention.out_proj.bias,
    })
    return reference


def test_self_attention_matches_torch_multihead_attention() -> None:
    torch.manual_seed(0)
    attention = _SelfAttention(16, 4)
    x = torch.randn(5, 7, 16)
    padding = torch.arange(7) >= torch.tensor([7, 5, 3, 1, 6])[:, None]  # at least one real key per row

    expected, _ = _torch_attention_like(attention)(x, x, x, key_padding_mask=padding, need_weights=False)

    torch.testing.assert_close(attention(x, padding), expected)


def test_opacus_batch_first_attention_is_still_broken() -> None:
    # Why _SelfAttention exists (meta-pytorch/opacus#825). If this fails, the pinned
    # Opacus has fixed DPMultiheadAttention's batch-first forward: _SelfAttention can go.
    torch.manual_seed(0)
    attention = DPMultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(5, 7, 16)

    with torch.no_grad():
        got, _ = attention(x, x, x, need_weights=False)
        expected, _ = _torch_attention_like(attention)(x, x, x, need_weights=False)

    assert float((got - expected).abs().max()) > 1e-2
