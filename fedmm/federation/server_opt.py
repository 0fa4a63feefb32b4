"""The server's optimizer over the aggregated update (``strategy``) and its moving average (``server-ema``).

The server treats what aggregation produced (``y``: FedAvg, a robust rule, SecAgg+'s unmasked
mean, or DP-FedAvg after the server's noise) as one step of a pseudo-gradient
``delta = y - x`` from the current global model ``x``, and applies the rules of Reddi et al.,
"Adaptive Federated Optimization" (ICLR 2021), exactly as Flower 1.42 implements them
(``flwr/serverapp/strategy/fedavgm.py``, ``fedopt.py``, ``fedadam.py``, ``fedyogi.py``,
``fedadagrad.py``), with ``eta`` the server learning rate and ``t`` the number of updates applied:

- ``fedavg``, ``fedprox``: ``x <- y`` (``eta`` 1); with ``server-learning-rate`` set, ``x <- x + eta delta``;
- ``fedavgm``: ``v <- mu v + delta``; ``x <- x + eta v`` (Flower's FedAvgM with ``server_momentum=mu``);
- ``fedadam``: ``m <- b1 m + (1 - b1) delta``; ``v <- b2 v + (1 - b2) delta^2``;
  ``x <- x + eta sqrt(1 - b2^(t+1)) / (1 - b1^(t+1)) m / (sqrt(v) + tau)`` (Flower's bias
  correction, whose exponent is the round plus one);
- ``fedyogi``: ``m`` as Adam; ``v <- v - (1 - b2) delta^2 sign(v - delta^2)``; ``x <- x + eta m / (sqrt(v) + tau)``;
- ``fedadagrad``: ``m <- delta`` (Flower fixes b1 = 0); ``v <- v + delta^2``; ``x <- x + eta m / (sqrt(v) + tau)``.

``m`` and ``v`` start at zero, as in Flower. Only floating-point tensors are optimized
(in float64, cast back to the tensor's dtype); integer buffers (BatchNorm's counters) take
``y``. ``server-ema = d > 0`` keeps ``e <- d e + (1 - d) x`` over the global models after
each update, bias-corrected as ``e / (1 - d^t)`` (so the first average is the first model,
not a pull toward zero); that average is what the server evaluates and saves, while the
sites keep training the raw global model.

Privacy: every step here reads only the aggregate the server already holds (under DP-SGD,
the sites' noised updates; under client-level DP, after the server's noise; under SecAgg+,
the unmasked sum). It is post-processing of a DP release and costs no privacy.

``server-learning-rate = auto`` resolves to :data:`AUTO_SERVER_LR`, chosen by
``benchmarks/server_optimizers.py`` on AV-MNIST (docs/training.md#measured).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord

from fedmm.config import STRATEGIES, RunConfig
from fedmm.errors import ConfigError, FederationError
from fedmm.plan import AUTO_SERVER_LR, server_learning_rate  # the auto rule sits with the run's other autos

__all__ = ["AUTO_SERVER_LR", "ServerOptimizer", "WithServerOptimizer", "server_learning_rate", "optimizer_state", "restore_optimizer", "check_proximal"]

_STATE_PREFIX = ("m/", "v/", "ema/")


class ServerOptimizer:
    """One server optimizer over a run: its moments (``m``, ``v``), its step count and the EMA.

    Use :meth:`apply` once per round, after aggregation; :meth:`served` gives the model
    to evaluate and save; :meth:`state` / :meth:`load_state` carry it through a checkpoint.
    """

    def __init__(
        self, strategy: str = "fedavg", *, learning_rate: float | None = None, momentum: float = 0.9,
        beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3, ema: float = 0.0,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ConfigError("strategy", f"must be one of {', '.join(STRATEGIES)}", value=strategy, fix="e.g. strategy='fedadam'")
        self.strategy = strategy
        self.explicit_lr = learning_rate is not None
        self.lr = float(learning_rate) if learning_rate is not None else AUTO_SERVER_LR[strategy]
        self.momentum, self.tau, self.ema_decay = momentum, tau, ema
        self.beta1 = 0.0 if strategy == "fedadagrad" else beta1  # Flower's FedAdagrad: m is the update itself
        self.beta2 = beta2
        self.steps = 0
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}
        self.ema: dict[str, np.ndarray] = {}  # the un-corrected average e (float64), of floating tensors only

    @classmethod
    def from_config(cls, cfg: RunConfig) -> ServerOptimizer:
        """The optimizer ``strategy`` and the ``server-*`` keys describe."""
        return cls(
            cfg.strategy, learning_rate=cfg.server_learning_rate, momentum=cfg.server_momentum, beta1=cfg.server_beta1,
            beta2=cfg.server_beta2, tau=cfg.server_tau, ema=cfg.server_ema,
        )

    @property
    def identity(self) -> bool:
        """True when the new global model is simply the aggregate (fedavg/fedprox at rate 1, no EMA)."""
        return self.strategy in ("fedavg", "fedprox") and (not self.explicit_lr or self.lr == 1.0) and self.ema_decay == 0.0

    def describe(self) -> str:
        """One line for the server's log."""
        text = f"server optimizer {self.strategy} (server-learning-rate {self.lr:g}{'' if self.explicit_lr else ' auto'}"
        if self.strategy == "fedavgm":
            text += f", momentum {self.momentum:g}"
        elif self.strategy in ("fedadam", "fedyogi", "fedadagrad"):
            text += (f", beta1 {self.beta1:g}, beta2 {self.beta2:g}" if self.strategy != "fedadagrad" else "") + f", tau {self.tau:g}"
        return text + ")" + (f", server-ema {self.ema_decay:g}" if self.ema_decay else "")

    def apply(self, x: Mapping[str, np.ndarray], y: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The new global model from the current one ``x`` and the aggregate ``y`` (same names, shapes, dtypes)."""
        if set(x) != set(y):
            raise FederationError(f"server optimizer: the aggregate's tensors {sorted(set(y) ^ set(x))[:4]} do not match the global model's")
        new: dict[str, np.ndarray] = {}
        t = self.steps + 1
        eta = self.lr
        if self.strategy == "fedadam":
            eta = self.lr * math.sqrt(1.0 - self.beta2 ** (t + 1)) / (1.0 - self.beta1 ** (t + 1))
        for name in x:
            old, agg = np.asarray(x[name]), np.asarray(y[name])
            if old.shape != agg.shape:
                raise FederationError(f"server optimizer: tensor '{name}' has shape {agg.shape} in the aggregate, {old.shape} in the global model")
            if old.dtype.kind != "f":
                new[name] = agg.copy()
                continue
            x64 = old.astype(np.float64)
            delta = agg.astype(np.float64) - x64
            new[name] = (x64 + self._step(name, delta, eta)).astype(old.dtype)
        self.steps = t
        if self.ema_decay:
            d = self.ema_decay
            for name, value in new.items():
                if value.dtype.kind == "f":
                    self.ema[name] = d * self.ema.get(name, np.zeros(value.shape)) + (1.0 - d) * value.astype(np.float64)
        return {k: v.copy() for k, v in new.items()}

    def _step(self, name: str, delta: np.ndarray, eta: float) -> np.ndarray:
        """The change to one floating tensor (float64)."""
        kind = self.strategy
        if kind in ("fedavg", "fedprox"):
            return eta * delta
        if kind == "fedavgm":
            self.m[name] = self.momentum * self.m.get(name, np.zeros_like(delta)) + delta
            return eta * self.m[name]
        m = self.beta1 * self.m.get(name, np.zeros_like(delta)) + (1.0 - self.beta1) * delta
        v = self.v.get(name, np.zeros_like(delta))
        square = delta**2
        if kind == "fedadam":
            v = self.beta2 * v + (1.0 - self.beta2) * square
        elif kind == "fedyogi":
            v = v - (1.0 - self.beta2) * square * np.sign(v - square)
        else:  # fedadagrad
            v = v + square
        self.m[name], self.v[name] = m, v
        return eta * m / (np.sqrt(v) + self.tau)

    def served(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The model the server evaluates and saves: the bias-corrected EMA of ``arrays``' tensors, or ``arrays``."""
        if not self.ema_decay or not self.ema or self.steps == 0:
            return {k: np.asarray(v) for k, v in arrays.items()}
        correction = 1.0 - self.ema_decay**self.steps
        out = {}
        for name, value in arrays.items():
            value = np.asarray(value)
            out[name] = (self.ema[name] / correction).astype(value.dtype) if name in self.ema else value
        return out

    # ------------------------------------------------------------ checkpoints
    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """What a checkpoint keeps: JSON-ready settings and step count, and the arrays (``m/``, ``v/``, ``ema/`` + name)."""
        scalars = {"strategy": self.strategy, "steps": self.steps, "server_learning_rate": self.lr, "server_ema": self.ema_decay}
        arrays = {**{f"m/{k}": v for k, v in self.m.items()}, **{f"v/{k}": v for k, v in self.v.items()},
                  **{f"ema/{k}": v for k, v in self.ema.items()}}
        return scalars, arrays

    def load_state(self, scalars: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        """Continue from a checkpoint's :meth:`state` (made by the same strategy)."""
        if scalars.get("strategy") != self.strategy:
            raise ConfigError(
                "strategy", f"the checkpoint was made with strategy={scalars.get('strategy')!r}; its server optimizer state cannot "
                "continue another optimizer", value=self.strategy, fix=f"resume with strategy='{scalars.get('strategy')}' (the run's own config.toml)",
            )
        if float(scalars.get("server_ema", 0.0)) != self.ema_decay:
            raise ConfigError("server-ema", f"the checkpoint was made with server-ema={scalars.get('server_ema')}", value=self.ema_decay,
                              fix="resume with the run's own config.toml")
        self.steps = int(scalars["steps"])
        self.m, self.v, self.ema = {}, {}, {}
        for key, value in arrays.items():
            prefix, _, name = key.partition("/")
            if prefix + "/" not in _STATE_PREFIX:
                raise FederationError(f"server optimizer state: unknown array '{key}' in the checkpoint")
            getattr(self, prefix)[name] = np.asarray(value, dtype=np.float64)


def optimizer_state(opt: ServerOptimizer) -> dict[str, Any]:
    """A checkpoint's ``server_optimizer`` entry: settings, step count and ``arrays`` (m, v, EMA)."""
    scalars, arrays = opt.state()
    return {"server_optimizer": {**scalars, "arrays": arrays}}


def restore_optimizer(opt: ServerOptimizer, state: Mapping[str, Any], *, rounds_done: int) -> None:
    """Continue ``opt`` from a checkpoint's state; one made without it can resume only a stateless optimizer."""
    saved = state.get("server_optimizer")
    if saved is not None:
        opt.load_state(saved, saved.get("arrays", {}))
    elif rounds_done and not opt.identity:
        raise ConfigError(
            "strategy", f"the checkpoint holds no server optimizer state, so {opt.strategy} (server-ema {opt.ema_decay:g}) cannot "
            "continue where it stopped", value=opt.strategy, fix="resume with the run's own config.toml (strategy='fedavg'), or start a new run",
        )


def check_proximal(cfg: RunConfig, learning_rate: float) -> None:
    """FedProx's pull ``lr * mu`` per step must stay below 1, or each step overshoots the global model."""
    if cfg.strategy == "fedprox" and learning_rate * cfg.proximal_mu >= 1.0:
        raise ConfigError(
            "proximal-mu", f"times the sites' learning rate {learning_rate:g} is {learning_rate * cfg.proximal_mu:g}; at 1 or more each "
            "step jumps past the global model and training diverges", value=cfg.proximal_mu, fix=f"use proximal-mu < {1.0 / learning_rate:g}, e.g. 0.01",
        )


class WithServerOptimizer:
    """What both strategies (plain and SecAgg+) share about their ``server_opt``: the model they serve,
    and its state in their checkpoints. Put it before the strategy's other bases (it calls theirs)."""

    server_opt: ServerOptimizer

    def served(self, arrays: ArrayRecord) -> ArrayRecord:
        """The model the server evaluates and saves: the global model, or its moving average (``server-ema``)."""
        if not self.server_opt.ema_decay:
            return arrays
        return ArrayRecord({k: torch.from_numpy(v) for k, v in self.server_opt.served({k: v.numpy() for k, v in arrays.items()}).items()})

    def to_state(self) -> dict[str, Any]:
        """The book's state, plus the server optimizer's (its arrays go to the checkpoint's npz)."""
        return {**super().to_state(), **optimizer_state(self.server_opt)}  # type: ignore[misc]

    def restore(self, state: Mapping[str, Any], *, rounds_done: int) -> None:
        super().restore(state, rounds_done=rounds_done)  # type: ignore[misc]
        restore_optimizer(self.server_opt, state, rounds_done=rounds_done)
