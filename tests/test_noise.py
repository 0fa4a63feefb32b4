"""DP-SGD's Gaussian noise (fedmm.privacy.noise): the right distribution, tails that are not cut
off where torch.normal cuts them (5.77 sigma), a secure key, and every DP optimizer using it."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from scipy import stats
from torch import nn

from fedmm.privacy import noise as noise_module
from fedmm.privacy.ghost import PrivacyEngine
from fedmm.privacy.noise import LARGEST_RADIUS, GaussianNoise

TORCH_NORMAL_CUT = math.sqrt(-2.0 * math.log(2.0**-24))  # 5.77: torch.normal's largest float32 draw on the CPU


class _Bits:
    """A keystream that returns chosen bytes (for the tail of the transform)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def update_into(self, zeros: bytes, buf: bytearray) -> int:
        buf[: len(self.data)] = self.data
        return len(self.data)


@pytest.mark.parametrize("count", [400_000, 400_001])  # an even count takes each pair's sums in one pass, an odd one in two
def test_the_samples_are_gaussian_with_the_asked_std(count: int) -> None:
    draws = GaussianNoise(bytes(32)).sample(count, 2.5).double()  # a fixed key: the test cannot flake
    assert draws.shape == (count,) and draws.dtype == torch.float64
    assert abs(float(draws.mean())) < 0.02 and abs(float(draws.std()) - 2.5) < 0.02
    assert stats.kstest((draws / 2.5).numpy(), "norm").pvalue > 1e-3
    beyond = float((draws.abs() > 4 * 2.5).double().mean())  # P(|N| > 4) = 6.3e-5
    assert 1e-5 < beyond < 2e-4


def test_the_tail_reaches_past_where_torch_normal_stops() -> None:
    # the smallest u (two 31-bit words of 0) gives the largest radius, 9.35 standard deviations, and the
    # angle 0 (a 32-bit word of 0) puts all of it on the first value of the pair
    stream = GaussianNoise(bytes(32))
    stream._stream = _Bits(bytes(12))  # type: ignore[assignment]
    largest = stream.sample(2, 1.0)
    assert float(largest[0]) == pytest.approx(LARGEST_RADIUS, rel=1e-6) and LARGEST_RADIUS > 9.3 > TORCH_NORMAL_CUT
    assert abs(float(largest[1])) < 1e-6


def test_each_stream_has_its_own_key_and_a_seeded_one_repeats() -> None:
    assert not torch.equal(GaussianNoise().sample(64, 1.0), GaussianNoise().sample(64, 1.0))
    a = GaussianNoise.from_generator(torch.Generator().manual_seed(3)).sample(65, 1.0)
    b = GaussianNoise.from_generator(torch.Generator().manual_seed(3)).sample(65, 1.0)
    assert torch.equal(a, b) and a.shape == (65,)
    stream = GaussianNoise(bytes(32))
    assert not torch.equal(stream.sample(64, 1.0), stream.sample(64, 1.0))  # a stream goes on, never repeats
    with pytest.raises(ValueError, match="32-byte key"):
        GaussianNoise(b"short")


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_dp_optimizers_draw_from_the_secure_stream_not_the_torch_generator(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two optimizers given the same seeded generator still add different noise (Opacus' own would
    repeat it), and every draw comes through GaussianNoise."""
    drawn: list[int] = []
    add_into = GaussianNoise.add_into  # where every draw reads the keystream

    def counting(self: GaussianNoise, target: torch.Tensor, std: float) -> None:
        drawn.append(target.numel())
        add_into(self, target, std)

    monkeypatch.setattr(GaussianNoise, "add_into", counting)
    grads = []
    for _ in range(2):
        torch.manual_seed(0)  # the same model, data and generator both times: only the noise may differ
        model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,))), batch_size=8)
        engine = PrivacyEngine(accountant="rdp")
        wrapped = engine.make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), data_loader=data, noise_multiplier=1.0,
            max_grad_norm=1.0, grad_sample_mode=mode, criterion=nn.CrossEntropyLoss(), poisson_sampling=False,
            noise_generator=torch.Generator().manual_seed(0),
        )
        module, optimizer, criterion = wrapped[0], wrapped[1], (wrapped[2] if mode == "ghost" else nn.CrossEntropyLoss())
        x, y = next(iter(data))
        optimizer.zero_grad()
        criterion(module(x), y).backward()
        optimizer.step()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert drawn == [4 * 3 + 3 + 3 * 2 + 2] * 2  # one draw a step, every coordinate
    assert not torch.equal(grads[0], grads[1])


def test_each_thread_and_each_forked_child_gets_its_own_key(monkeypatch: pytest.MonkeyPatch) -> None:
    here = noise_module.thread_stream()
    assert noise_module.thread_stream() is here
    box: list[GaussianNoise] = []
    worker = threading.Thread(target=lambda: box.append(noise_module.thread_stream()))
    worker.start()
    worker.join()
    assert box[0] is not here
    monkeypatch.setattr(noise_module.os, "getpid", lambda: -1)  # as in a child after fork()
    assert noise_module.thread_stream() is not here


def test_the_noised_gradient_is_the_clipped_sum_plus_noise_and_no_bare_sum_is_left() -> None:
    class _Opt:
        noise_multiplier, max_grad_norm = 2.0, 1.5

    weight, bias = nn.Parameter(torch.zeros(300, 400)), nn.Parameter(torch.zeros(7))
    opt = _Opt()
    opt.params = [weight, bias]  # type: ignore[attr-defined]
    for p in opt.params:  # type: ignore[attr-defined]
        p.summed_grad = torch.full(p.shape, 10.0)  # type: ignore[attr-defined]
    noise_module.add_noise(opt, scale=0.5)  # type: ignore[arg-type]
    assert weight.grad is not None and bias.grad is not None and weight.grad.data_ptr() == weight.summed_grad.data_ptr()  # type: ignore[attr-defined]
    assert abs(float(weight.grad.mean()) - 5.0) < 0.02 and abs(float(weight.grad.std()) - 1.5) < 0.02  # (10 + N(0, 3^2)) * 0.5


@pytest.mark.parametrize("count", [1, 2, 1001])
def test_adding_in_place_adds_the_values_a_draw_gives(count: int) -> None:
    target = torch.full((count,), 3.0)
    GaussianNoise(bytes(32)).add_into(target, 2.0)
    expected = 3.0 + GaussianNoise(bytes(32)).draw(count, 2.0)
    assert torch.allclose(target, expected, rtol=0, atol=1e-6)
    mixed, drawn = GaussianNoise(bytes(32)), GaussianNoise(bytes(32))  # a stream's values do not depend on how the last were taken
    mixed.add_into(torch.zeros(count), 1.0)
    drawn.draw(count, 1.0)
    again = torch.zeros(count)
    mixed.add_into(again, 1.0)
    assert torch.allclose(again, drawn.draw(count, 1.0), rtol=0, atol=1e-6)
    strided = torch.zeros(4, 6)[:, ::2]  # not contiguous: drawn, then added
    GaussianNoise(bytes(32)).add_into(strided, 1.0)
    assert torch.allclose(strided.reshape(-1), GaussianNoise(bytes(32)).draw(12, 1.0), rtol=0, atol=1e-6)


def test_a_buffer_that_does_not_hold_every_sum_is_not_trusted() -> None:
    """The optimizer's ``grad_buffer`` (left by the one-pass module) is only noised in one pass when
    the clipped sums tile it exactly, in order; a stale or partial one is ignored and every sum
    still gets its own noise."""

    class _Opt:
        noise_multiplier, max_grad_norm = 1.0, 1.0

    weight, bias = nn.Parameter(torch.zeros(50, 40)), nn.Parameter(torch.zeros(50))
    buffer = torch.zeros(2050)
    for case in ("stale", "reordered", "partial", "tiling"):
        opt = _Opt()
        opt.params = [weight, bias]  # type: ignore[attr-defined]
        if case == "stale":
            weight.summed_grad, bias.summed_grad = torch.zeros(50, 40), torch.zeros(50)  # type: ignore[attr-defined]
        elif case == "reordered":
            weight.summed_grad, bias.summed_grad = buffer[50:].view(50, 40), buffer[:50]  # type: ignore[attr-defined]
        elif case == "partial":
            weight.summed_grad, bias.summed_grad = buffer[:2000].view(50, 40), torch.zeros(50)  # type: ignore[attr-defined]
        else:
            weight.summed_grad, bias.summed_grad = buffer[:2000].view(50, 40), buffer[2000:]  # type: ignore[attr-defined]
        buffer.zero_()
        opt.grad_buffer = buffer  # type: ignore[attr-defined]
        noise_module.add_noise(opt, scale=1.0)  # type: ignore[arg-type]
        for p in (weight, bias):
            assert p.grad is not None and bool((p.grad != 0).all()), case  # every coordinate of every sum got noise
        if case == "stale":
            assert not bool(buffer.any())  # nothing went to a buffer no sum lives in
        assert "grad_buffer" not in opt.__dict__  # used once: a later step cannot reuse it by mistake


def test_numpys_float32_log_never_makes_a_radius_nan() -> None:
    # The radius is sqrt(-2 ln u): a log above 0 for some u <= 1 would make it NaN. Checked for the
    # 2^22 largest float32 values up to 1 (where rounding could push it over; the module's docs cite
    # the whole range [2^-63, 1], checked once) and the smallest u the sampler can give.
    import numpy as np

    top = np.arange(np.float32(1.0).view(np.int32) - (1 << 22), np.float32(1.0).view(np.int32) + 1, dtype=np.int32).view(np.float32)
    assert float(np.log(top).max()) == 0.0
    assert math.isclose(float(np.sqrt(-2.0 * np.log(np.float32(2.0**-63)))), LARGEST_RADIUS, rel_tol=1e-6)


def test_the_module_states_its_cut_off() -> None:
    assert f"{LARGEST_RADIUS:.2f}" == "9.35" and "9.35" in (noise_module.__doc__ or "")
