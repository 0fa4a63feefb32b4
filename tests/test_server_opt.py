"""Server optimizers (Reddi et al. as Flower implements them), server EMA, FedProx under DP-SGD, learning-rate schedules."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine as OpacusEngine
from torch.utils.data import DataLoader, TensorDataset

from fedmm.config import AccountantKind, GradSampleMode, RunConfig
from fedmm.data.synthetic import make_synthetic
from fedmm.errors import ConfigError
from fedmm.federation.artifacts import RunArtifacts
from fedmm.federation.server_opt import ServerOptimizer, check_proximal, optimizer_state, restore_optimizer, server_learning_rate
from fedmm.federation.strategy import FedMMAvg
from fedmm.models import ModelRecipe
from fedmm.privacy.accounting import SiteAccountant
from fedmm.site.training import DPSettings, add_proximal_term, scheduled_learning_rate, train

pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
]

X0 = np.array([1.0, 2.0])
Y1 = X0 + np.array([0.5, -1.0])  # the first aggregate: delta [0.5, -1]


def _two_steps(opt: ServerOptimizer) -> tuple[np.ndarray, np.ndarray]:
    x1 = opt.apply({"w": X0}, {"w": Y1})["w"]
    x2 = opt.apply({"w": x1}, {"w": x1 + np.array([0.2, 0.3])})["w"]  # second delta [0.2, 0.3]
    return x1, x2


def test_fedavg_and_fedprox_take_the_aggregate_or_a_scaled_step() -> None:
    assert ServerOptimizer("fedavg").identity and ServerOptimizer("fedprox").identity
    x1, x2 = _two_steps(ServerOptimizer("fedavg", learning_rate=0.5))
    assert np.allclose(x1, [1.25, 1.5]) and np.allclose(x2, [1.35, 1.65])


def test_fedavgm_by_hand() -> None:
    x1, x2 = _two_steps(ServerOptimizer("fedavgm", learning_rate=0.5, momentum=0.9))
    # v1 = [0.5, -1]; x1 = x0 + 0.5 v1.  v2 = 0.9 v1 + [0.2, 0.3] = [0.65, -0.6]; x2 = x1 + 0.5 v2
    assert np.allclose(x1, [1.25, 1.5]) and np.allclose(x2, [1.25 + 0.325, 1.5 - 0.3])


def _adaptive(kind: str, b1: float, v_rule) -> tuple[list[float], list[float]]:  # type: ignore[no-untyped-def]
    """Each coordinate by scalar arithmetic: eta 0.1, tau 1e-3."""
    out1, out2 = [], []
    for x, d1, d2 in ((1.0, 0.5, 0.2), (2.0, -1.0, 0.3)):
        m = (1 - b1) * d1
        v = v_rule(0.0, d1)
        eta = 0.1 * math.sqrt(1 - 0.99**2) / (1 - 0.9**2) if kind == "fedadam" else 0.1
        x1 = x + eta * m / (math.sqrt(v) + 1e-3)
        m = b1 * m + (1 - b1) * d2
        v = v_rule(v, d2)
        eta = 0.1 * math.sqrt(1 - 0.99**3) / (1 - 0.9**3) if kind == "fedadam" else 0.1
        out1.append(x1)
        out2.append(x1 + eta * m / (math.sqrt(v) + 1e-3))
    return out1, out2


@pytest.mark.parametrize(("kind", "b1", "v_rule"), [
    ("fedadam", 0.9, lambda v, d: 0.99 * v + 0.01 * d * d),
    ("fedyogi", 0.9, lambda v, d: v - 0.01 * d * d * (1 if v > d * d else -1 if v < d * d else 0)),
    ("fedadagrad", 0.0, lambda v, d: v + d * d),  # Flower's FedAdagrad: beta1 = 0 whatever server-beta1 says
])
def test_adaptive_optimizers_by_hand(kind: str, b1: float, v_rule) -> None:  # type: ignore[no-untyped-def]
    x1, x2 = _two_steps(ServerOptimizer(kind, learning_rate=0.1, beta1=0.9, beta2=0.99, tau=1e-3))
    want1, want2 = _adaptive(kind, b1, v_rule)
    assert np.allclose(x1, want1, rtol=1e-12) and np.allclose(x2, want2, rtol=1e-12)


def test_integer_buffers_take_the_aggregate_and_dtypes_stay() -> None:
    opt = ServerOptimizer("fedadam", learning_rate=0.1, ema=0.5)
    x = {"w": np.ones(3, np.float32), "n": np.array(5, np.int64)}
    out = opt.apply(x, {"w": np.full(3, 2.0, np.float32), "n": np.array(7, np.int64)})
    assert out["n"] == 7 and out["n"].dtype == np.int64 and out["w"].dtype == np.float32
    assert not np.allclose(out["w"], 2.0)  # the float tensor was optimized
    assert opt.served(out)["n"] == 7 and "n" not in opt.m


def test_ema_is_bias_corrected_and_served() -> None:
    opt = ServerOptimizer("fedavg", ema=0.5)
    assert not opt.identity
    a = opt.apply({"w": np.zeros(2)}, {"w": np.full(2, 2.0)})
    assert np.allclose(a["w"], 2.0) and np.allclose(opt.served(a)["w"], 2.0)  # the first average is the first model
    b = opt.apply(a, {"w": np.full(2, 4.0)})
    assert np.allclose(b["w"], 4.0)  # the sites train on the raw model
    assert np.allclose(opt.served(b)["w"], (0.5 * 0.5 * 2.0 + 0.5 * 4.0) / (1 - 0.25))


def test_state_round_trips_a_checkpoint_and_resume_repeats_the_next_step(tmp_path: Path) -> None:
    cfg = RunConfig(runs_dir=str(tmp_path), dp=False, strategy="fedyogi", server_ema=0.3, sites=2)
    rng = np.random.default_rng(0)
    x = {"w": rng.normal(size=(3, 2)).astype(np.float32), "b": np.zeros(2, np.float32), "n": np.array(1, np.int64)}
    aggregates = [{k: (v + rng.normal(size=v.shape).astype(v.dtype) if v.dtype.kind == "f" else v + 1) for k, v in x.items()} for _ in range(3)]
    straight = ServerOptimizer.from_config(cfg)
    first = FedMMAvg(dp=False, sites=2, server_opt=ServerOptimizer.from_config(cfg))
    glob = dict(x)
    for y in aggregates[:2]:
        glob = first.server_opt.apply(glob, y)
    artifacts = RunArtifacts(cfg, "run")
    artifacts.save_checkpoint(2, glob, first.to_state())
    artifacts.close()  # the run ends (a run still writing its folder cannot be resumed)
    done, arrays, state = RunArtifacts(cfg, "run", resume=True).load_checkpoint()
    resumed = FedMMAvg(dp=False, sites=2, server_opt=ServerOptimizer.from_config(cfg))
    resumed.restore(state, rounds_done=done)
    assert resumed.server_opt.steps == 2 and set(resumed.server_opt.v) == {"w", "b"}
    # an uninterrupted run of three steps
    g = dict(x)
    for y in aggregates:
        g = straight.apply(g, y)
    nxt = resumed.server_opt.apply({k: arrays[k] for k in x}, aggregates[2])
    for k in x:
        assert np.array_equal(nxt[k], g[k])
    assert all(np.array_equal(resumed.server_opt.served(nxt)[k], straight.served(g)[k]) for k in x)


def test_resume_refuses_another_optimizer_or_a_checkpoint_without_its_state() -> None:
    adam = ServerOptimizer("fedadam")
    adam.apply({"w": X0}, {"w": Y1})
    with pytest.raises(ConfigError, match="strategy"):
        restore_optimizer(ServerOptimizer("fedyogi"), optimizer_state(adam), rounds_done=1)
    with pytest.raises(ConfigError, match="no server optimizer state"):
        restore_optimizer(ServerOptimizer("fedadam"), {}, rounds_done=1)
    restore_optimizer(ServerOptimizer("fedavg"), {}, rounds_done=1)  # a stateless optimizer resumes from an old checkpoint


def test_auto_server_learning_rates() -> None:
    assert server_learning_rate(RunConfig(strategy="fedavg")) == 1.0
    assert server_learning_rate(RunConfig(strategy="fedadam", server_learning_rate=0.2)) == 0.2
    assert 0 < server_learning_rate(RunConfig(strategy="fedadam")) < 1


@pytest.mark.parametrize(("key", "value"), [
    ("strategy", "fedadamw"), ("server_learning_rate", 0.0), ("server_learning_rate", 11.0), ("server_momentum", 1.0),
    ("server_beta1", -0.1), ("server_beta2", 1.0), ("server_tau", 0.0), ("proximal_mu", -1.0), ("proximal_mu", math.inf),
    ("server_ema", 1.0), ("lr_schedule", "linear"), ("lr_warmup_rounds", -1),
])
def test_a_bad_value_of_every_new_key_is_a_config_error(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=key.replace("_", "-")):
        RunConfig(**{key: value})  # type: ignore[arg-type]


def test_proximal_step_that_would_overshoot_is_refused() -> None:
    check_proximal(RunConfig(strategy="fedprox", proximal_mu=1.0), 0.5)
    with pytest.raises(ConfigError, match="proximal-mu"):
        check_proximal(RunConfig(strategy="fedprox", proximal_mu=2.0), 0.5)


def test_schedules() -> None:
    lr = [scheduled_learning_rate(0.5, r, rounds=10, schedule="constant", warmup=0) for r in range(1, 11)]
    assert lr == [0.5] * 10
    cos = [scheduled_learning_rate(1.0, r, rounds=11, schedule="cosine") for r in range(1, 12)]
    assert cos[0] == 1.0 and math.isclose(cos[-1], 0.1) and math.isclose(cos[5], 0.55)
    assert all(a > b for a, b in zip(cos, cos[1:]))
    warm = [scheduled_learning_rate(1.0, r, rounds=6, schedule="cosine", warmup=3) for r in range(1, 8)]
    assert np.allclose(warm, [1 / 3, 2 / 3, 1.0, 1.0, 0.55, 0.1, 0.1])  # past the last round: stays at a tenth
    assert np.allclose([scheduled_learning_rate(1.0, r, rounds=5, warmup=2) for r in (1, 2, 3)], [0.5, 1.0, 1.0])


# ------------------------------------------------------------ FedProx under DP-SGD
def test_proximal_term_is_added_after_clipping_and_noise() -> None:
    """One DP-SGD step (Opacus, noise 0) from weights away from w_global: the gradient is the
    clipped mean of the records (each within the clip, unchanged by mu) plus mu (w - w_global)."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 3) * 10, torch.randint(0, 2, (8,))
    clip, lr, mu = 0.01, 0.1, 5.0

    def step(with_mu: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        model = torch.nn.Linear(3, 2)
        torch.nn.init.zeros_(model.weight), torch.nn.init.zeros_(model.bias)
        inner = torch.optim.SGD(model.parameters(), lr=lr)
        if with_mu:
            add_proximal_term(inner, model, with_mu)  # w_global: zeros
        with torch.no_grad():
            model.weight.fill_(1.0)  # now w - w_global = 1 everywhere (norm 2.4, far above the clip)
        module, optimizer, _ = OpacusEngine().make_private(
            module=model, optimizer=inner, data_loader=DataLoader(TensorDataset(x, y), batch_size=8),
            noise_multiplier=0.0, max_grad_norm=clip, poisson_sampling=False,
        )
        torch.nn.functional.cross_entropy(module(x), y).backward()
        norms = torch.stack([g.reshape(8, -1).norm(dim=1) for g in (model.weight.grad_sample, model.bias.grad_sample)]).norm(dim=0)
        optimizer.step()
        clipped_mean = model.weight.summed_grad / 8
        return model.weight.detach().clone(), clipped_mean, norms

    w_plain, mean_plain, norms = step(0.0)
    w_prox, mean_prox, _ = step(mu)
    assert float(norms.min()) > clip  # every record is clipped...
    assert torch.allclose(mean_prox, mean_plain) and float(mean_prox.norm()) <= clip * (1 + 1e-5)  # ...to the same bound, mu or not
    assert torch.allclose(w_prox, 1.0 - lr * (mean_plain + mu * 1.0), atol=1e-6)  # mu (w - w_global), outside the clip
    assert float(w_prox.norm()) < float(w_plain.norm())  # toward w_global = 0


def test_fedprox_through_fedmm_training_under_dp() -> None:
    """fedmm's train() (ghost clipping, noise 0, every record every step): step 2 adds exactly mu (w1 - w0)."""
    recipe = ModelRecipe.from_config(RunConfig(data="synthetic"))
    data = recipe.prepare(make_synthetic(40, seed=3))
    lr, mu = 0.5, 1.5

    def run(model: torch.nn.Module, epochs: int, proximal_mu: float = 0.0) -> dict[str, torch.Tensor]:
        dp = DPSettings(noise_multiplier=0.0, max_grad_norm=0.05, grad_sample_mode=GradSampleMode.GHOST, accountant=SiteAccountant(AccountantKind.RDP))
        train(model, data, epochs=epochs, batch_size=41, learning_rate=lr, momentum=0.0, seed=0, dp=dp, proximal_mu=proximal_mu)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    start = recipe.build(data.schema, seed=1).state_dict()
    fresh = lambda weights: (lambda m: (m.load_state_dict(weights), m)[1])(recipe.build(data.schema, seed=1))  # noqa: E731
    w1 = run(fresh(start), 1)
    w2_plain = run(fresh(start), 2)
    w1_on = run(fresh(w1), 1)  # step 2 without the term, from w1: w1 - lr g1
    w2_prox = run(fresh(start), 2, proximal_mu=mu)
    for k in start:
        if start[k].is_floating_point():
            want = w1_on[k] - lr * mu * (w1[k] - start[k])
            assert torch.allclose(w2_prox[k], want, atol=1e-5), k
    dist = lambda w: sum(float((w[k] - start[k]).double().norm() ** 2) for k in start if start[k].is_floating_point())  # noqa: E731
    assert dist(w2_prox) < dist(w2_plain)


def test_the_secagg_path_steps_from_the_unmasked_mean() -> None:
    from test_secagg import LocalGrid, _bound, _config, _protocol_app, _run_round, _updates, _weighted_mean, _weights

    cfg = _config(3, strategy="fedavgm", server_learning_rate=0.5, server_ema=0.5)
    updates, weights = _updates(3), _weights(3)
    strategy = _run_round(cfg, LocalGrid(_protocol_app(cfg, updates, weights), [{}] * 3, {}))
    mean = _weighted_mean(updates, weights, set(updates))
    assert strategy.server_opt.steps == 1 and strategy.server_opt.strategy == "fedavgm"
    assert np.max(np.abs(strategy.global_arrays["w"] - 0.5 * mean)) <= 0.5 * _bound(cfg, weights, set(updates))
    served = strategy.served(strategy.latest_arrays)["w"].numpy()  # type: ignore[arg-type]
    assert np.allclose(served, strategy.global_arrays["w"])  # the first average is the first model
