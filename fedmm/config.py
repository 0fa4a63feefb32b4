"""Run configuration: parsed and validated once, at the edge.

Flower hands the ServerApp and every ClientApp a flat ``run_config`` mapping
(from ``[tool.flwr.app.config]`` in ``pyproject.toml`` plus any overrides).
:meth:`RunConfig.from_run_config` turns it into a frozen, typed
:class:`RunConfig`; nothing below this module reads ``run_config[...]``.

>>> cfg = RunConfig.from_run_config({"rounds": 3, "dp": False})
>>> cfg.rounds, cfg.dp, cfg.target_epsilon
(3, False, 8.0)
>>> RunConfig.from_run_config({"target-epsilon": 0})
Traceback (most recent call last):
...
fedmm.errors.ConfigError: config key 'target-epsilon': must be > 0 (got 0.0). Fix: set a positive privacy budget, e.g. target-epsilon=8.0
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from fedmm.errors import ConfigError

__all__ = ["AccountantKind", "GradSampleMode", "RunConfig", "AUTO"]

AUTO = "auto"


class AccountantKind(StrEnum):
    """Opacus privacy accountants fedmm can use (names as Opacus registers them)."""

    RDP = "rdp"
    PRV = "prv"


class GradSampleMode(StrEnum):
    """How Opacus computes per-sample gradient norms."""

    GHOST = "ghost"
    HOOKS = "hooks"
    FUNCTORCH = "functorch"


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything one federated run needs, typed and range-checked.

    Field names are the run-config keys with ``-`` replaced by ``_``.
    """

    rounds: int = 20
    sites: int = 6
    data: str = "avmnist"
    model: str = "auto"  # the fusion: concat | gated | attention | late | embedding (auto: concat)
    local_epochs: int = 1
    batch_size: int = 64
    learning_rate: float | None = None  # None ("auto"): the model's tuned rate (fedmm.models)
    momentum: float = 0.0
    dp: bool = True
    target_epsilon: float = 8.0
    target_delta: float = 1e-5
    noise_multiplier: float | None = None  # None: calibrated from target_epsilon
    max_grad_norm: float = 2.0
    accountant: AccountantKind = AccountantKind.RDP
    grad_sample_mode: GradSampleMode = GradSampleMode.GHOST
    seed: int = 0
    runs_dir: str = "runs"
    run_name: str = ""  # empty: a new id from the time and Flower's run id
    resume: bool = False  # continue run-name from its last checkpoint (after a server crash or restart)
    min_sites: int = 1  # stop cleanly when fewer sites than this still have budget
    # --- simulated sites' own policy (fedmm.privacy.policy; a deployed site sets its own in --node-config)
    site_budgets: str = ""  # lifetime epsilon per site, e.g. "george:2,*:8"; empty: target-epsilon each
    site_min_noise_multiplier: float = 0.5  # a site refuses less noise than this
    site_state_dir: str = ""  # where simulated sites keep their ledgers; empty: runs/<run-id>/sites
    # --- secure aggregation (Flower's SecAgg+, fedmm.secure.secagg): the server sees only the sum
    secure_aggregation: bool = False
    secagg_shares: float = 1.0  # <= 1: fraction of a round's sites each site shares its keys with; > 2: a count
    secagg_threshold: float = 0.67  # <= 1: fraction of the shares needed to unmask; >= 2: a count
    secagg_clip_range: float = 8.0  # every weighted value is clipped to +-this before quantisation (counted)
    secagg_max_weight: float = 1000.0  # weights (num-examples) are divided by this before quantisation
    secagg_timeout: float = 0.0  # seconds to wait for each protocol stage; 0: wait for every site
    # --- client-level DP (DP-FedAvg, fedmm.privacy.client_dp): protects whole sites
    client_dp: bool = False
    client_clip_norm: float = 1.0  # each site clips its update (the change to the global model) to this L2 norm
    client_noise_multiplier: float = 1.0  # noise std on the sum of updates = this x client-clip-norm
    client_noise: str = "central"  # central (the server adds it) | distributed (each site adds a share; needs SecAgg)
    client_fraction: float = 1.0  # Poisson sampling rate of sites per round (privacy amplification)
    client_delta: float = 1e-5
    client_target_epsilon: float = 0.0  # > 0: the server stops before a round that would exceed it
    # --- data loading (fedmm.data.sources, fedmm.data.manifest)
    lenient: bool = False  # skip bad samples (counted per reason) instead of stopping
    classes: str = ""  # comma-separated class names; empty: the labels found in the data
    test_fraction: float = 0.2  # manifests without a split column: rows held out for the server
    # --- preprocessing (fedmm.data.preprocess)
    image_size: int = 28
    image_mode: str = "L"
    audio_rate: int = 8000
    audio_seconds: float = 1.0
    audio_resample: bool = False
    audio_features: str = "log-mel"
    text_length: int = 32
    text_buckets: int = 4096
    text_features: str = "hashed"  # hashed | minilm (frozen sentence embeddings, optional extra)
    sensor_length: int = 100
    # --- augmentation at training time (fedmm.data.augment), e.g. "image:shift+rotate,audio:specaugment"
    augment: str = ""
    # --- simulated federations (fedmm.data.partition)
    partitioner: str = "auto"
    partition_by: str = ""
    dirichlet_alpha: float = 0.5
    classes_per_site: int = 2
    missing_modality_site_p: float = 0.0
    missing_modality_sample_p: float = 0.0
    missing_modality_sites: str = ""  # e.g. "audio:0.5": exactly that share of the sites lacks audio
    missing_label_p: float = 0.0
    label_noise: float = 0.0
    # --- imbalance (fedmm.training)
    class_weights: str = "none"  # none | balanced (dp=false only) | w1,w2,... (fixed in advance)
    balanced_sampler: bool = False  # dp=false only: DP-SGD's accounting needs Poisson sampling
    # --- model (fedmm.models.recipe.ModelOptions)
    encoder_width: int = 64
    image_encoder: str = "auto"  # auto (scattering on AV-MNIST, else cnn) | cnn | scattering | pretrained
    image_weights: str = ""  # image-encoder=pretrained: the frozen encoder's weights file
    audio_encoder: str = "pooled"  # pooled | cnn
    text_encoder: str = "bag"  # bag | gru | transformer
    sensor_encoder: str = "cnn"  # cnn | gru
    modalities: str = ""  # train on these modalities only (comma-separated); empty: all
    tasks: str = ""  # auxiliary tasks from group columns with loss weights, e.g. "speaker:0.5"
    contrastive: str = "none"  # none | align | clip (dp=false only)
    contrastive_weight: float = 0.1
    modality_dropout: float = 0.0  # per-sample chance of hiding each present modality in training

    def __post_init__(self) -> None:
        _at_least("rounds", self.rounds, 1, "run at least one round")
        _at_least("sites", self.sites, 1, "use at least one site")
        _at_least("local-epochs", self.local_epochs, 1, "train at least one epoch a round")
        _at_least("batch-size", self.batch_size, 1, "use a batch size of at least 1, e.g. 32")
        if self.learning_rate is not None:
            _positive("learning-rate", self.learning_rate, "e.g. learning-rate=0.5, or 'auto'")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError("momentum", "must be in [0, 1)", value=self.momentum, fix="e.g. momentum=0.9")
        _positive("target-epsilon", self.target_epsilon, "set a positive privacy budget, e.g. target-epsilon=8.0")
        _at_least("min-sites", self.min_sites, 1, "e.g. min-sites=1")
        if self.resume and not self.run_name:
            raise ConfigError("resume", "needs the run to continue: set run-name too", value=True, fix="e.g. resume=true run-name='hospital-study-1'")
        if not (math.isfinite(self.site_min_noise_multiplier) and self.site_min_noise_multiplier >= 0):
            raise ConfigError("site-min-noise-multiplier", "must be a finite number >= 0", value=self.site_min_noise_multiplier, fix="e.g. site-min-noise-multiplier=0.5")
        from fedmm.privacy.policy import parse_site_budgets

        parse_site_budgets(self.site_budgets, self.target_epsilon)  # refuses a malformed list up front
        if not 0.0 < self.target_delta < 1.0:
            raise ConfigError(
                "target-delta", "must be in the open interval (0, 1)", value=self.target_delta,
                fix="use a delta well below 1/number-of-records, e.g. target-delta=1e-5",
            )
        if self.noise_multiplier is not None and not (
            math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0.0
        ):
            raise ConfigError(
                "noise-multiplier", "must be a finite number >= 0 or 'auto'", value=self.noise_multiplier,
                fix="use noise-multiplier='auto' to calibrate it from target-epsilon, or e.g. 1.1",
            )
        _positive("max-grad-norm", self.max_grad_norm, "e.g. max-grad-norm=1.0")
        self._check_secure_aggregation()
        self._check_client_dp()
        if not self.data:
            raise ConfigError("data", "must not be empty", value=self.data, fix="use data='avmnist'")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ConfigError("test-fraction", "must be in [0, 1)", value=self.test_fraction, fix="e.g. test-fraction=0.2")
        # The sub-configurations validate their own keys.
        from fedmm.data.augment import parse_augment
        from fedmm.data.partition import FederationPlan
        from fedmm.data.preprocess import Preprocessing
        from fedmm.models.recipe import ModelRecipe

        Preprocessing.from_config(self)
        ModelRecipe.from_config(self)  # the fusion name and the model options
        FederationPlan.from_config(self)
        parse_augment(self.augment)
        self.fixed_class_weights()
        if self.dp and self.class_weights.strip() == "balanced":
            raise ConfigError(
                "class-weights", "'balanced' weights are computed from the site's labels, so with dp=true they would "
                "leak the label counts outside DP-SGD's guarantee", value=self.class_weights,
                fix="give fixed weights decided without the data (class-weights='1,2,...'), or set dp=false",
            )
        if self.dp and self.balanced_sampler:
            raise ConfigError(
                "balanced-sampler", "DP-SGD's accounting assumes Poisson sampling of every record with the same rate; "
                "a class-balanced sampler breaks the privacy claim", value=True,
                fix="use fixed class-weights instead, or set dp=false",
            )

    def _check_secure_aggregation(self) -> None:
        shares, threshold = self.secagg_shares, self.secagg_threshold
        if not (math.isfinite(shares) and (0 < shares <= 1 or (shares > 2 and shares.is_integer()))):
            raise ConfigError(
                "secagg-shares", "must be a fraction in (0, 1] of the round's sites or a whole number > 2", value=shares,
                fix="e.g. secagg-shares=1.0 (every site shares with every other) or secagg-shares=5",
            )
        if not (math.isfinite(threshold) and (0 < threshold <= 1 or (threshold >= 2 and threshold.is_integer()))):
            raise ConfigError(
                "secagg-threshold", "must be a fraction in (0, 1] of the shares or a whole number >= 2", value=threshold,
                fix="e.g. secagg-threshold=0.67",
            )
        if shares > 2 and shares > self.sites:
            raise ConfigError("secagg-shares", f"is a count above the {self.sites} sites", value=shares, fix=f"use at most sites={self.sites}, or a fraction such as 1.0")
        if shares > 2 and threshold >= 2 and threshold >= shares:
            raise ConfigError("secagg-threshold", f"must be below secagg-shares={shares:g}", value=threshold, fix=f"e.g. secagg-threshold={max(2, int(shares) - 1)}")
        _positive("secagg-clip-range", self.secagg_clip_range, "e.g. secagg-clip-range=8.0")
        _positive("secagg-max-weight", self.secagg_max_weight, "e.g. secagg-max-weight=1000")
        if not (math.isfinite(self.secagg_timeout) and self.secagg_timeout >= 0):
            raise ConfigError("secagg-timeout", "must be >= 0 seconds (0: no limit)", value=self.secagg_timeout, fix="e.g. secagg-timeout=600")
        if self.secure_aggregation and self.sites < 2:
            raise ConfigError("sites", "secure aggregation needs at least 2 sites (the sum of one update is that update)", value=self.sites, fix="use sites >= 3, or secure-aggregation=false")

    def _check_client_dp(self) -> None:
        _positive("client-clip-norm", self.client_clip_norm, "e.g. client-clip-norm=1.0")
        if not (math.isfinite(self.client_noise_multiplier) and self.client_noise_multiplier > 0):
            raise ConfigError("client-noise-multiplier", "must be > 0 (noise 0 gives no client-level privacy)", value=self.client_noise_multiplier, fix="e.g. client-noise-multiplier=1.0, or client-dp=false")
        if self.client_noise not in ("central", "distributed"):
            raise ConfigError("client-noise", "must be central or distributed", value=self.client_noise, fix="e.g. client-noise='central'")
        if self.client_dp and self.client_noise == "distributed" and not self.secure_aggregation:
            raise ConfigError(
                "client-noise", "distributed noise needs secure aggregation: without it the server reads each site's update "
                "with only its share of the noise", value=self.client_noise, fix="set secure-aggregation=true, or client-noise='central'",
            )
        if not 0 < self.client_fraction <= 1:
            raise ConfigError("client-fraction", "must be in (0, 1]", value=self.client_fraction, fix="e.g. client-fraction=1.0 (every site every round)")
        if not 0 < self.client_delta < 1:
            raise ConfigError("client-delta", "must be in (0, 1)", value=self.client_delta, fix="use a delta well below 1/number-of-sites, e.g. client-delta=1e-5")
        if not (math.isfinite(self.client_target_epsilon) and self.client_target_epsilon >= 0):
            raise ConfigError("client-target-epsilon", "must be >= 0 (0: no limit)", value=self.client_target_epsilon, fix="e.g. client-target-epsilon=10")

    @property
    def sends_deltas(self) -> bool:
        """Sites send the change to the global model (not weights) under SecAgg or client-level DP."""
        return self.secure_aggregation or self.client_dp

    @property
    def class_list(self) -> tuple[str, ...]:
        """The ``classes`` key as a tuple (empty: take the labels found in the data)."""
        return tuple(c.strip() for c in self.classes.split(",") if c.strip())

    def fixed_class_weights(self) -> tuple[float, ...] | None:
        """``class-weights`` given as numbers, or None for ``none``/``balanced``."""
        text = self.class_weights.strip()
        if text in ("none", "balanced", ""):
            return None
        try:
            weights = tuple(float(w) for w in text.split(","))
        except ValueError:
            raise ConfigError("class-weights", "must be none, balanced, or comma-separated numbers", value=text, fix="e.g. class-weights='1,1,2'") from None
        if not all(math.isfinite(w) and w > 0 for w in weights):
            raise ConfigError("class-weights", "every weight must be a positive number", value=text, fix="e.g. class-weights='1,1,2'")
        return weights

    # ------------------------------------------------------------------ parsing
    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """Return every accepted run-config key (kebab-case)."""
        return tuple(f.name.replace("_", "-") for f in dataclasses.fields(cls))

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Build a config from Flower's ``run_config`` (or any flat mapping).

        Raises
        ------
        ConfigError
            For an unknown key (with the closest known key), a value of the wrong
            type, or a value out of range.
        """
        known = {f.name.replace("_", "-"): f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in run_config.items():
            field = known.get(key)
            if field is None:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"did you mean '{close[0]}'?" if close else "remove it"
                raise ConfigError(
                    key, "unknown key", value=raw,
                    fix=f"{hint} Known keys: {', '.join(sorted(known))}",
                )
            values[field.name] = _coerce(key, field, raw)
        return cls(**values)

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        """Return the flat, kebab-case mapping (TOML- and Flower-compatible)."""
        out: dict[str, bool | int | float | str] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                value = AUTO
            elif isinstance(value, StrEnum):
                value = str(value)
            out[f.name.replace("_", "-")] = value
        return out

    def replace(self, **changes: Any) -> RunConfig:
        """Return a copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _coerce(key: str, field: dataclasses.Field[Any], raw: Any) -> Any:
    """Check and convert one raw value to the field's declared type."""
    kind = field.type
    if field.name in ("noise_multiplier", "learning_rate"):
        if isinstance(raw, str) and raw.strip().lower() == AUTO:
            return None
        kind = "float"
    if kind == "bool":
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "false"):
            return raw.lower() == "true"
        raise ConfigError(key, "must be true or false", value=raw, fix=f"e.g. {key}=true")
    if kind == "int":
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ConfigError(key, "must be an integer", value=raw, fix=f"e.g. {key}={field.default}")
        return raw
    if kind == "float":
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise ConfigError(key, "must be a number", value=raw, fix=f"e.g. {key}={field.default}")
        return float(raw)
    if kind == "str":
        if not isinstance(raw, str):
            raise ConfigError(key, "must be a string", value=raw, fix=f"e.g. {key}='{field.default}'")
        return raw
    enum_type = {"AccountantKind": AccountantKind, "GradSampleMode": GradSampleMode}[str(kind)]
    try:
        return enum_type(str(raw).lower())
    except ValueError:
        allowed = ", ".join(m.value for m in enum_type)
        raise ConfigError(key, f"must be one of: {allowed}", value=raw, fix=f"e.g. {key}='{field.default}'") from None


def _at_least(key: str, value: int, minimum: int, fix: str) -> None:
    if value < minimum:
        raise ConfigError(key, f"must be >= {minimum}", value=value, fix=fix)


def _positive(key: str, value: float, fix: str) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(key, "must be > 0", value=value, fix=fix)
