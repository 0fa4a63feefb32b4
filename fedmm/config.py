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
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from fedmm.config_checks import AUTO
from fedmm.config_checks import at_least as _at_least
from fedmm.config_checks import check_sizes as _check_sizes_of
from fedmm.config_checks import coerce as _coerce
from fedmm.config_checks import positive as _positive
from fedmm.errors import ConfigError

__all__ = ["AccountantKind", "GradSampleMode", "RunConfig", "AUTO", "SECTIONS", "STRATEGIES", "key"]

MAX_TARGET_EPSILON = 1e4  # far past any privacy claim; Opacus' noise search never ends above about 1e15 (a bracket that stops shrinking)
# The server optimizers (``strategy``): FedAvg and the FedOpt family of Reddi et al. (ICLR 2021).
STRATEGIES = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedprox")
# The groups of keys in docs/configuration.md, each named by the field it starts with.
SECTIONS = {
    "rounds": "The run",
    "strategy": "Server optimizer and learning-rate schedule",
    "dp": "Sample-level DP (DP-SGD at each site)",
    "site_budgets": "Simulated sites' own policy (a deployed site sets its own in its site file)",
    "secure_aggregation": "Secure aggregation (Flower's SecAgg+): the server sees only the sum",
    "client_dp": "Client-level DP (DP-FedAvg): protects whole sites",
    "lenient": "Data loading",
    "image_size": "Preprocessing",
    "partitioner": "Simulated federations",
    "class_weights": "Imbalance",
    "encoder_width": "Model",
}


def key(default: Any, help: str, *, range: str = "", bounds: tuple[int, int] | None = None, integer: bool = False) -> Any:
    """A run-config key: its default, its help text (the only copy) and the range it is checked against.

    ``bounds`` (smallest, largest) are checked for every run (:meth:`RunConfig._check_sizes`) and
    written as the range; other ranges are checked in ``__post_init__`` and stated in ``range``.
    A ``None`` default means ``auto``; ``integer`` makes such a key a whole number when set.
    """
    shown = f"[{bounds[0]}, {bounds[1]}]" if bounds else range
    if bounds and default is None:
        shown += " or auto"
    metadata = {"help": help, "range": shown, "bounds": bounds, "integer": integer}
    return dataclasses.field(default=default, metadata=metadata)


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

    Field names are the run-config keys with ``-`` replaced by ``_``. Each field's help
    text, and the range it is checked against, is its ``metadata`` (read by
    ``scripts/write_config_docs.py`` into ``docs/configuration.md``). The checks here
    need nothing but the values; what needs other parts of fedmm (the data sources,
    the model registry) is checked when :class:`fedmm.plan.RunPlan` builds the run.
    """

    rounds: int = key(20, "federated rounds", bounds=(1, 100000))
    sites: int | None = key(None, "number of sites; `auto`: every group of a natural partition (AV-MNIST: its six speakers), else 6", bounds=(1, 1_000_000), integer=True)
    data: str = key("avmnist", "the data source: `avmnist[:ROOT]`, `basicmotions[:ROOT]`, `manifest:PATH`, `synthetic[:N]` (docs/data.md)")
    model: str = key(AUTO, "the fusion: `concat` (auto), `gated`, `attention`, `late`, `embedding`, or one you registered (docs/models.md)")
    local_epochs: int = key(1, "local epochs per round", bounds=(1, 1000))
    batch_size: int | None = key(None, "expected (logical) batch size; with Poisson sampling the sample rate is 1 / k, k = ceil(n / batch-size) rounded up to 1, 2, 3, 4, 6, 8, 12, 16, ... (so it tells n only to within about 1.5x); `auto`: 64, or 256 under DP with target-epsilon below 4, where larger batches were measured far better (docs/benchmarks.md)", bounds=(1, 1000000), integer=True)
    max_physical_batch_size: int = key(0, "most records in one forward/backward pass (Opacus' BatchMemoryManager): a larger batch-size fits in memory, same DP accounting; 0: no limit (docs/training.md)", bounds=(0, 1000000))
    augment_multiplicity: int = key(1, "augmented copies of each sampled record; under DP their gradients are averaged before clipping (De et al. 2022; needs augment, and grad-sample-mode hooks or functorch; docs/training.md)", bounds=(1, 64))
    learning_rate: float | None = key(None, "SGD learning rate; `auto`: the fusion's tuned rate (0.5 with linear encoders over fixed features, 0.2 with CNN, GRU or transformer encoders)", range="(0, 100] or auto")
    momentum: float | None = key(None, "SGD momentum at the sites; `auto`: 0.9 with dp=false and linear encoders (with learning-rate 0.1), else 0", range="[0, 1) or auto")
    strategy: str = key("fedavg", "the server's optimizer over the averaged update: `fedavg`, `fedavgm` (server momentum), `fedadam`, `fedyogi`, `fedadagrad` (Reddi et al., ICLR 2021), or `fedprox` (FedAvg with a proximal term at the sites); docs/training.md")
    server_learning_rate: float | None = key(None, "the server optimizer's step size; `auto`: 1.0 for fedavg and fedprox, 0.3 for fedavgm, 0.03 for fedadam and fedyogi, 0.1 for fedadagrad (measured, docs/training.md)", range="(0, 10] or auto")
    server_momentum: float = key(0.9, "fedavgm: momentum of the server's update", range="[0, 1)")
    server_beta1: float = key(0.9, "fedadam, fedyogi: first-moment decay", range="[0, 1)")
    server_beta2: float = key(0.99, "fedadam, fedyogi: second-moment decay", range="[0, 1)")
    server_tau: float = key(1e-3, "fedadam, fedyogi, fedadagrad: adaptivity (added to the root of the second moment)", range="> 0")
    proximal_mu: float = key(0.01, "fedprox: weight of the sites' proximal term (mu/2)|w - w_global|^2", range=">= 0")
    server_ema: float = key(0.0, "decay of an exponential moving average of the global model, which is evaluated and saved (0: off)", range="[0, 1)")
    lr_schedule: str = key("constant", "the sites' learning rate over rounds: `constant` or `cosine` (decays to a tenth by the last round)")
    lr_warmup_rounds: int = key(0, "rounds over which the sites' learning rate rises linearly to its value", bounds=(0, 100000))
    seed: int = key(0, "seed of the model initialisation, the partition and augmentation (DP sampling and noise use OS randomness)", bounds=(0, 2**32 - 1))
    runs_dir: str = key("runs", "folder that holds the run folders")
    run_name: str = key("", "the run's folder name; empty: a new id from the time and Flower's run id")
    resume: bool = key(False, "continue `run-name` from its last checkpoint (after a server crash or restart)")
    min_sites: int = key(1, "stop cleanly when fewer sites than this still have budget", range=">= 1")
    aggregation: str = key("fedavg", "how accepted updates are combined: `fedavg` (weighted by num-examples), or for sites not all trusted `trimmed-mean`, `median` or `krum` (unweighted; plain path only; docs/privacy.md#what-the-server-sees)")
    malicious_sites: int = key(1, "bad sites `trimmed-mean` (cut from each end), `median` and `krum` must tolerate: a round needs 2f+1 accepted updates (krum 2f+3)", range=">= 0")
    max_site_weight: int = key(1_000_000, "largest FedAvg weight (num-examples) a site may send without DP (under dp=true every weight is exactly 1); also the largest site, in records, the `auto` update-norm bound allows for", range=">= 1")
    max_update_norm: float | None = key(None, "an update whose L2 norm (site weights minus global weights) is above this is rejected; `auto`: derived from the plan (docs/privacy.md#what-the-server-sees)", range="> 0 or auto")
    dp: bool = key(True, "DP-SGD (Opacus) at every site")
    target_epsilon: float = key(8.0, "each site's epsilon for this run: the noise is calibrated so that no site spends more", range="(0, 10000]")
    target_delta: float = key(1e-5, "the delta epsilon is stated at; well below 1 / records per site", range="(0, 1)")
    noise_multiplier: float | None = key(None, "noise std / max-grad-norm; `auto`: calibrated per site from target-epsilon (recorded in privacy.json)", range=">= 0 or auto")
    max_grad_norm: float = key(2.0, "per-sample clipping bound (L2)", range="> 0")
    accountant: AccountantKind = key(AccountantKind.RDP, "Opacus accountant: `rdp` (fast) or `prv` (tighter, about 0.5 s an evaluation)")
    grad_sample_mode: GradSampleMode = key(GradSampleMode.GHOST, "per-sample gradient norms: `ghost` (one pass for Linear, Conv, Embedding and norm layers; recurrent models take Opacus' two passes), `hooks`, `functorch`")
    site_budgets: str = key("", "simulation only: each site's lifetime epsilon, e.g. `george:2,*:8`; empty: target-epsilon each")
    site_min_noise_multiplier: float = key(0.5, "simulation only: the least noise multiplier a site accepts", range=">= 0")
    site_state_dir: str = key("", "simulation only: where sites keep their ledgers; empty: `runs/<run-id>/sites`; a lasting folder makes spends compose across runs")
    secure_aggregation: bool = key(False, "Flower's SecAgg+: the server sees only the (weighted) sum of the sites' updates (docs/secure-aggregation.md)")
    secagg_shares: float = key(1.0, "SecAgg+ neighbourhood: a fraction of the round's sites each site shares its keys with, or a count > 2", range="(0, 1] or a whole number > 2")
    secagg_threshold: float = key(0.67, "shares needed to unmask: a fraction of secagg-shares, or a count >= 2; fewer survivors fail the round", range="(0, 1] or a whole number >= 2")
    secagg_clip_range: float = key(8.0, "every weighted value is clipped to +-this before quantisation (the sites clip first and count it)", range="> 0")
    secagg_max_weight: float = key(1000.0, "weights (num-examples) are divided by this before quantisation", range="> 0")
    secagg_timeout: float = key(0.0, "seconds to wait for each protocol stage before a site counts as dropped; 0: wait for every site", range=">= 0")
    client_dp: bool = key(False, "client-level DP (DP-FedAvg): clipped updates, Gaussian noise on their sum")
    client_clip_norm: float = key(1.0, "each site clips its update (the change to the global model) to this L2 norm", range="> 0")
    client_noise_multiplier: float = key(1.0, "noise std on the sum of updates = this x client-clip-norm", range="> 0")
    client_noise: str = key("central", "`central` (the server adds the noise) or `distributed` (each site adds a share; needs secure-aggregation)")
    client_fraction: float = key(1.0, "share of the sites asked each round: with client-dp a Poisson sample (it amplifies the client-level guarantee), otherwise ceil(share x sites) drawn from the seed and round; a site not asked trains and spends nothing", range="(0, 1]")
    client_delta: float = key(1e-5, "the delta of the client-level guarantee", range="(0, 1)")
    client_target_epsilon: float = key(0.0, "> 0: the server stops before a round that would exceed this client-level epsilon; 0: no limit", range=">= 0")
    lenient: bool = key(False, "skip bad samples (counted per reason) instead of stopping at the first")
    classes: str = key("", "comma-separated class names; empty: the sorted labels found in the data")
    test_fraction: float = key(0.2, "manifests without a `split` column: share of rows held out for the server", range="[0, 1)")
    image_size: int = key(28, "images are resized to this square size", bounds=(4, 1024))
    image_mode: str = key("L", "`L` (grayscale) or `RGB`")
    audio_rate: int = key(8000, "expected audio sample rate (Hz)", bounds=(1000, 192000))
    audio_seconds: float = key(1.0, "audio clip length: clips are padded or cut to it", range="(0, 60]")
    audio_resample: bool = key(False, "resample other rates instead of refusing them")
    audio_features: str = key("log-mel", "`log-mel` (32 bands) or `mfcc` (20)")
    text_length: int = key(32, "tokens per text", bounds=(1, 4096))
    text_buckets: int = key(4096, "size of the hashed token space", bounds=(16, 2**22))
    text_features: str = key("hashed", "`hashed` token ids, or `minilm`: frozen all-MiniLM-L6-v2 sentence embeddings (the `text` extra)")
    sensor_length: int | None = key(None, "sensor series are padded or trimmed to this many steps; `auto`: the data's own length (a warning names any series that is cut, and any over 4 times the median); a deployed site takes the server's length", bounds=(4, 100000), integer=True)
    sensor_norm: str = key(AUTO, "how each sensor column is normalised: `none`, `scale=F` (divided by a fixed F, e.g. 9.81 for m/s^2 to g), `window` (each window by its own mean and deviation), `window-stats` (that, plus each window's per-channel mean and log-deviation as extra channels), `site` (the site's own per-channel statistics; under DP noisy and accounted, docs/privacy.md#site-statistics-under-dp); per column as `accelerometer:none,*:window`; `auto`: none, the best on held-out data with and without DP (docs/data.md#sensors)")
    site_stats_bound: float = key(20.0, "sensor-norm=site under DP: each value is clipped to +-this (natural units: 20 holds inertial data in m/s^2 or rad/s) before the site's noisy per-channel statistics are taken (docs/privacy.md#site-statistics-under-dp)", range="> 0")
    site_stats_noise: float = key(5.0, "sensor-norm=site under DP: noise multiplier of the Gaussian mechanism that releases the site's per-channel statistics, once per run, accounted with DP-SGD", range="> 0")
    augment: str = key("", "training-time augmentation, e.g. `image:shift+rotate,audio:specaugment` (docs/data.md)")
    partitioner: str = key(AUTO, "`auto` (natural if the source has sites, else iid), `natural`, `iid`, `dirichlet`, `pathological`, `linear`, `exponential`; the one used is in federation.json")
    partition_by: str = key("", "the group column a natural partition splits by (`speaker`, `site`, `meta:subject`, ...); empty: the source's")
    dirichlet_alpha: float = key(0.5, "label skew of the `dirichlet` partitioner (smaller: more skew)")
    classes_per_site: int = key(2, "classes per site of the `pathological` partitioner")
    missing_modality_site_p: float = key(0.0, "chance that a site loses each modality")
    missing_modality_sample_p: float = key(0.0, "chance that a sample loses each modality")
    missing_modality_sites: str = key("", "exact shares instead, e.g. `audio:0.5`: half the sites (drawn with the seed) have no audio")
    missing_label_p: float = key(0.0, "share of labels hidden at the sites")
    label_noise: float = key(0.0, "share of labels flipped through a per-site class-transition matrix")
    class_weights: str = key("none", "`none`, `balanced` (dp=false only: computed from the site's labels) or fixed weights `w1,w2,...` in class order")
    balanced_sampler: bool = key(False, "class-balanced sampling (dp=false only: DP-SGD's accounting needs Poisson sampling)")
    encoder_width: int = key(64, "every modality encoder's output width", range="[4, 4096]")
    image_encoder: str = key(AUTO, "`cnn` on pixels, `scattering` (fixed 2-D scattering features) or `pretrained` (frozen, from image-weights); `auto`: scattering on AV-MNIST, else cnn")
    image_weights: str = key("", "image-encoder=pretrained: the frozen encoder's weights file")
    audio_encoder: str = key("pooled", "`pooled` (linear over a pooled spectrogram) or `cnn`")
    text_encoder: str = key("bag", "`bag` (mean of hashed-token embeddings), `gru` (Opacus DPGRU) or `transformer` (pre-LN, DP attention)")
    sensor_encoder: str = key("cnn", "`cnn` (1-D) or `gru`")
    modalities: str = key("", "train on these modalities only, comma-separated (single-modality baselines); empty: all")
    tasks: str = key("", "auxiliary tasks from group columns with loss weights, e.g. `speaker:0.5` (multi-task heads)")
    contrastive: str = key("none", "auxiliary loss: `none`, `align` (a sample's modalities agree; DP-safe) or `clip` (in-batch negatives; dp=false only)")
    contrastive_weight: float = key(0.1, "weight of the contrastive loss", range=">= 0")
    modality_dropout: float = key(0.0, "per-sample chance of hiding each present modality while training (one is always kept)", range="[0, 1)")

    def __post_init__(self) -> None:
        _at_least("rounds", self.rounds, 1, "run at least one round")
        if self.sites is not None:
            _at_least("sites", self.sites, 1, "use at least one site, or sites='auto'")
        _at_least("local-epochs", self.local_epochs, 1, "train at least one epoch a round")
        if self.momentum is not None and not 0.0 <= self.momentum < 1.0:
            raise ConfigError("momentum", "must be in [0, 1)", value=self.momentum, fix="e.g. momentum=0.9")
        self._check_server_optimizer()
        _positive("target-epsilon", self.target_epsilon, "set a positive privacy budget, e.g. target-epsilon=8.0")
        if self.target_epsilon > MAX_TARGET_EPSILON:
            raise ConfigError("target-epsilon", f"must be at most {MAX_TARGET_EPSILON:g}: an epsilon that large promises no privacy",
                              value=self.target_epsilon, fix="e.g. target-epsilon=8.0, or dp=false to train without differential privacy")
        _at_least("min-sites", self.min_sites, 1, "e.g. min-sites=1")
        self._check_min_sites()
        robust = ("trimmed-mean", "median", "krum")
        if self.aggregation not in ("fedavg", *robust):
            raise ConfigError("aggregation", f"must be one of fedavg, {', '.join(robust)}", value=self.aggregation, fix="e.g. aggregation='fedavg', or 'median' when some sites may be malicious")
        _at_least("malicious-sites", self.malicious_sites, 0, "e.g. malicious-sites=1")
        _at_least("max-site-weight", self.max_site_weight, 1, "set it near the largest site's record count, e.g. max-site-weight=100000")
        if self.max_update_norm is not None:
            _positive("max-update-norm", self.max_update_norm, "e.g. max-update-norm=100, or 'auto'")
        if self.aggregation in robust and self.secure_aggregation:
            raise ConfigError(
                "aggregation", "a robust rule needs each site's update, and under secure aggregation the server sees only their sum",
                value=self.aggregation, fix="use aggregation='fedavg' with secure-aggregation=true, or secure-aggregation=false",
            )
        if self.aggregation in robust and self.client_dp:
            raise ConfigError(
                "aggregation", "client-level DP's noise is calibrated for the sum of clipped updates (one site moves it by at most "
                "client-clip-norm); a median, trimmed mean or Krum's choice has another sensitivity, so the accounted epsilon would "
                "not hold", value=self.aggregation, fix="use aggregation='fedavg' with client-dp=true, or client-dp=false",
            )
        least = 2 * self.malicious_sites + (3 if self.aggregation == "krum" else 1)
        if self.aggregation in robust and self.sites is not None and self.sites < least:
            raise ConfigError(
                "malicious-sites", f"{self.aggregation} tolerates {self.malicious_sites} bad site(s) only with at least {least} "
                f"updates a round, and there are sites={self.sites}", value=self.malicious_sites,
                fix=f"use sites >= {least}, or lower malicious-sites",
            )
        if self.run_name and (not re.fullmatch(r"[A-Za-z0-9._-]{1,200}", self.run_name) or self.run_name in (".", "..")):
            raise ConfigError("run-name", "must be a plain name (letters, digits, '.', '_', '-'): it names the run's folder", value=self.run_name, fix="e.g. run-name='hospital-study-1'")
        if self.resume and not self.run_name:
            raise ConfigError("resume", "needs the run to continue: set run-name too", value=True, fix="e.g. resume=true run-name='hospital-study-1'")
        if not (math.isfinite(self.site_min_noise_multiplier) and self.site_min_noise_multiplier >= 0):
            raise ConfigError("site-min-noise-multiplier", "must be a finite number >= 0", value=self.site_min_noise_multiplier, fix="e.g. site-min-noise-multiplier=0.5")
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
        _positive("site-stats-bound", self.site_stats_bound, "e.g. site-stats-bound=20")
        _positive("site-stats-noise", self.site_stats_noise, "e.g. site-stats-noise=5")
        self._check_secure_aggregation()
        self._check_client_dp()
        if not self.data:
            raise ConfigError("data", "must not be empty", value=self.data, fix="use data='avmnist'")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ConfigError("test-fraction", "must be in [0, 1)", value=self.test_fraction, fix="e.g. test-fraction=0.2")
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
        self._check_sizes()

    def _check_server_optimizer(self) -> None:
        if self.strategy not in STRATEGIES:
            close = difflib.get_close_matches(self.strategy, STRATEGIES, n=1)
            raise ConfigError("strategy", f"must be one of {', '.join(STRATEGIES)}", value=self.strategy, fix=f"e.g. strategy='{close[0] if close else 'fedadam'}'")
        if self.server_learning_rate is not None and not (math.isfinite(self.server_learning_rate) and 0 < self.server_learning_rate <= 10):
            raise ConfigError("server-learning-rate", "must be in (0, 10] or 'auto'", value=self.server_learning_rate, fix="e.g. server-learning-rate=0.01, or 'auto'")
        for name, value in (("server-momentum", self.server_momentum), ("server-beta1", self.server_beta1), ("server-beta2", self.server_beta2), ("server-ema", self.server_ema)):
            if not 0.0 <= value < 1.0:
                raise ConfigError(name, "must be in [0, 1)", value=value, fix=f"e.g. {name}=0.9")
        _positive("server-tau", self.server_tau, "e.g. server-tau=0.001")
        if not (math.isfinite(self.proximal_mu) and self.proximal_mu >= 0):
            raise ConfigError("proximal-mu", "must be a finite number >= 0", value=self.proximal_mu, fix="e.g. proximal-mu=0.01")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError("lr-schedule", "must be constant or cosine", value=self.lr_schedule, fix="e.g. lr-schedule='cosine'")

    def _check_min_sites(self) -> None:
        # Every round would train every site (each spending its budget) and then discard the updates.
        if self.sites is not None and self.min_sites > self.sites:
            raise ConfigError(
                "min-sites", f"is above sites={self.sites}: no round could ever aggregate, yet every site would train and "
                "spend its privacy budget first", value=self.min_sites, fix=f"use min-sites <= {self.sites}, e.g. min-sites=1",
            )

    def _check_sizes(self) -> None:
        """Sizes and rates beyond what a run can hold (called last by ``__post_init__``)."""
        _check_sizes_of(self)

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
        if shares > 2 and self.sites is not None and shares > self.sites:
            raise ConfigError("secagg-shares", f"is a count above the {self.sites} sites", value=shares, fix=f"use at most sites={self.sites}, or a fraction such as 1.0")
        if shares > 2 and threshold >= 2 and threshold >= shares:
            raise ConfigError("secagg-threshold", f"must be below secagg-shares={shares:g}", value=threshold, fix=f"e.g. secagg-threshold={max(2, int(shares) - 1)}")
        _positive("secagg-clip-range", self.secagg_clip_range, "e.g. secagg-clip-range=8.0")
        _positive("secagg-max-weight", self.secagg_max_weight, "e.g. secagg-max-weight=1000")
        if not (math.isfinite(self.secagg_timeout) and self.secagg_timeout >= 0):
            raise ConfigError("secagg-timeout", "must be >= 0 seconds (0: no limit)", value=self.secagg_timeout, fix="e.g. secagg-timeout=600")
        if self.secure_aggregation and self.sites is not None and self.sites < 2:
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

