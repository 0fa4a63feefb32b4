"""Normalising sensor and tabular features at one site, never mixing sites.

Sensor columns follow ``sensor-norm`` (one mode for every column, or per column as
``accelerometer:none,*:window``):

- ``none`` (``auto``): the values as read. The default: it keeps every offset and scale, and
  the convolutional sensor encoder's group norms make it insensitive to the data's units.
  Under DP the input's scale sets the gradients' scale against the clipping bound, so
  :func:`scale_warnings` names a column whose values are far from unit scale;
- ``scale=F``: divided by a fixed, data-independent ``F`` (e.g. ``9.81`` turns m/s^2 into g);
- ``window``: each window (record) standardised per channel by its own mean and deviation.
  This deletes what the mean and the scale carry: a gravity offset that tells lying from
  standing, how hard a movement is;
- ``window-stats``: ``window``, plus each window's per-channel mean and deviation
  as extra channels, compressed with ``asinh`` (a fixed map that keeps the sign and works in
  any unit), constant over time: ``C`` channels become ``3C`` (representation
  ``series+stats``; the sensor encoders pass the statistics around their convolutions or
  recurrence, straight to their last layer). The shape of the signal, its offset and its
  strength all reach the model, whatever the data's units;
- ``site``: standardised per channel by the mean and deviation of the site's own records.
  Without DP they are exact. Under DP (``site_statistics=False``) :func:`normalise` leaves
  the column as read and the site's round standardises it with :class:`SiteStatistics`,
  released by a Gaussian mechanism (:func:`noisy_site_statistics`) whose spend the site
  checks against its budget and records in its ledger before the statistics are used
  (``fedmm.site.round``). The server's held-out set (``held_out=True``) is standardised by
  its own exact statistics: it is the server's data, no site's.

Every mode but ``site`` uses nothing but one record (or constants), so DP-SGD's
per-record guarantee is untouched: no record's features depend on another record.
Under DP, ``site`` features depend on the others only through the noisy statistics, a
differentially private release accounted with DP-SGD (adaptive composition); see
docs/privacy.md#site-statistics-under-dp.

Tabular columns: with ``site_statistics`` (dp=false) standardised with the mean and
deviation of the site's present samples, computed at the site and never sent; under DP
used as written.

Statistics are taken in float64: float32 ones overflow (inf, then NaN) for values beyond
about 1e19. Call :func:`normalise` once per data set: at each site on its own data, and
at the server on its held-out set, with the same settings as the sites.

>>> SensorNorm.parse("accelerometer:scale=9.81,*:window").mode("accelerometer")
'scale=9.81'
>>> SensorNorm.parse("auto").channels("gyroscope", 3), SensorNorm.parse("window-stats").channels("gyroscope", 3)
(3, 9)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from fedmm.data.schema import STATS_SERIES, ModalityKind, MultimodalDataset
from fedmm.errors import ConfigError

__all__ = [
    "DEFAULT_SENSOR_NORM",
    "SENSOR_NORMS",
    "SensorNorm",
    "SiteStatistics",
    "noisy_site_statistics",
    "normalise",
    "scale_warnings",
    "site_columns",
    "site_stat_contributions",
]

SENSOR_NORMS = ("none", "window", "window-stats", "site", "scale=F")
DEFAULT_SENSOR_NORM = "none"  # chosen on held-out data, with and without DP: see docs/data.md#sensors
_FIX = "e.g. sensor-norm='window-stats', 'none', 'scale=9.81', or per column 'accelerometer:scale=9.81,*:window'"


@dataclass(frozen=True)
class SensorNorm:
    """``sensor-norm`` parsed: the mode of each named column and of every other (``*``)."""

    modes: tuple[tuple[str, str], ...] = (("*", DEFAULT_SENSOR_NORM),)

    @classmethod
    def parse(cls, text: str) -> SensorNorm:
        """Parse ``MODE`` or ``COLUMN:MODE,...`` (``*`` for the other columns); ``auto`` is window-stats."""
        modes: dict[str, str] = {}
        for part in (p.strip() for p in (text or "auto").split(",") if p.strip()):
            column, _, mode = part.rpartition(":")
            column, mode = column.strip() or "*", mode.strip().lower()
            if mode == "auto":
                mode = DEFAULT_SENSOR_NORM
            if mode.startswith("scale="):
                try:
                    factor = float(mode.partition("=")[2])
                except ValueError:
                    factor = math.nan
                if not (math.isfinite(factor) and factor > 0):
                    raise ConfigError("sensor-norm", f"scale needs a positive number (column {column})", value=text, fix=_FIX)
                mode = f"scale={factor:g}"
            elif mode not in SENSOR_NORMS:
                raise ConfigError("sensor-norm", f"unknown mode {mode!r} (column {column}); modes: {', '.join(SENSOR_NORMS)}", value=text, fix=_FIX)
            if column in modes:
                raise ConfigError("sensor-norm", f"column {column} is given twice", value=text, fix=_FIX)
            modes[column] = mode
        modes.setdefault("*", DEFAULT_SENSOR_NORM)
        return cls(tuple(sorted(modes.items())))

    def mode(self, column: str) -> str:
        """The mode of ``column``."""
        table = dict(self.modes)
        return table.get(column, table["*"])

    def channels(self, column: str, channels: int) -> int:
        """How many channels the model sees for a column of ``channels`` channels."""
        return 3 * channels if self.mode(column) == "window-stats" else channels

    def check(self, *, dp: bool, columns: tuple[str, ...] | None = None) -> None:
        """Refuse a named column the data does not have (``site`` is allowed under DP: its statistics are noised and accounted)."""
        if columns is not None:
            unknown = [c for c, _ in self.modes if c != "*" and c not in columns]
            if unknown:
                raise ConfigError("sensor-norm", f"no sensor column named {', '.join(unknown)} (have: {', '.join(columns) or 'none'})", value=self.text, fix=_FIX)

    @property
    def text(self) -> str:
        """The resolved setting, as it is written to config.toml."""
        return ",".join(f"{c}:{m}" if c != "*" else m for c, m in self.modes if c != "*") + ("," if len(self.modes) > 1 else "") + dict(self.modes)["*"]


def normalise(
    dataset: MultimodalDataset, *, sensor_norm: str | SensorNorm = "auto", site_statistics: bool, held_out: bool = False
) -> MultimodalDataset:
    """Normalise one site's (or the server's held-out) sensor and tabular features (see the module doc).

    ``site_statistics`` is ``not dp``: whether statistics of the whole data set may be used.
    ``held_out`` marks the server's own held-out set: its ``site`` sensor columns are
    standardised by its own exact statistics even under DP (no site's records are in it);
    at a site under DP they are left as read, for the round to standardise with noisy,
    accounted statistics. A ``window-stats`` sensor column comes back with three times its
    channels, and the schema says so.
    """
    norm = sensor_norm if isinstance(sensor_norm, SensorNorm) else SensorNorm.parse(sensor_norm)
    sensors = tuple(m.name for m in dataset.schema.modalities if m.kind is ModalityKind.SENSOR)
    norm.check(dp=not site_statistics, columns=sensors if sensors else None)
    features = dict(dataset.features)
    modalities = list(dataset.schema.modalities)
    for j, m in enumerate(dataset.schema.modalities):
        rows = dataset.present[:, j]
        values = features[m.name]
        if m.kind is ModalityKind.SENSOR:
            mode = norm.mode(m.name)
            deferred = mode == "site" and not (site_statistics or held_out)  # DP: the round's noisy statistics, later
            scaled = _sensor(values.astype(np.float64), "none" if deferred else mode, rows)
            stats = norm.mode(m.name) == "window-stats"
            modalities[j] = dataclasses.replace(m, shape=(scaled.shape[1], *m.shape[1:]), representation=STATS_SERIES if stats else m.representation)
        elif m.kind is ModalityKind.TABULAR and site_statistics and rows.any():
            values = values.astype(np.float64)
            mean, std = values[rows].mean(axis=0, keepdims=True), values[rows].std(axis=0, keepdims=True) + 1e-6
            scaled = ((values - mean) / std).astype(np.float32)
        else:
            continue
        scaled[~rows] = 0.0
        features[m.name] = scaled
    schema = dataclasses.replace(dataset.schema, modalities=tuple(modalities))
    return dataset.replace(features=features, schema=schema)


def _sensor(values: np.ndarray, mode: str, rows: np.ndarray) -> np.ndarray:
    """One sensor column ``[N, C, T]`` (float64) normalised by ``mode``; float32 out."""
    if mode == "none":
        return values.astype(np.float32)
    if mode.startswith("scale="):
        return (values / float(mode.partition("=")[2])).astype(np.float32)
    if mode == "site":
        present = values[rows] if rows.any() else values
        mean = present.mean(axis=(0, 2), keepdims=True)
        std = present.std(axis=(0, 2), keepdims=True) + 1e-6
        return ((values - mean) / std).astype(np.float32)
    mean = values.mean(axis=2, keepdims=True)
    std = values.std(axis=2, keepdims=True)
    shape = (values - mean) / (std + 1e-6)
    if mode == "window":
        return shape.astype(np.float32)
    steps = values.shape[2]
    stats = np.concatenate([np.arcsinh(mean), np.arcsinh(std)], axis=1).repeat(steps, axis=2)
    return np.concatenate([shape, stats], axis=1).astype(np.float32)


def scale_warnings(dataset: MultimodalDataset, norm: str | SensorNorm = "auto") -> list[str]:
    """Warnings for sensor columns left as read (``none``) whose typical value is far from unit scale.

    Run it on the server's own held-out set (it costs the sites nothing): a column whose median
    absolute value is above 100 or below 0.01 trains worse under DP-SGD, whose clipping bound
    is fixed, than one in natural units (g, rad/s).
    """
    norm = norm if isinstance(norm, SensorNorm) else SensorNorm.parse(norm)
    out = []
    for j, m in enumerate(dataset.schema.modalities):
        rows = dataset.present[:, j]
        if m.kind is not ModalityKind.SENSOR or norm.mode(m.name) != "none" or not rows.any():
            continue
        typical = float(np.median(np.abs(dataset.features[m.name][rows].astype(np.float64))))
        if typical > 100 or 0 < typical < 0.01:
            out.append(
                f"sensor column {m.name!r} is used as read (sensor-norm=none) and its typical value is {typical:.3g}, far from "
                f"unit scale. Fix: sensor-norm='{m.name}:scale={typical:.3g}' (a fixed factor), or '{m.name}:window-stats'"
            )
    return out


# --------------------------------------------------------------- sensor-norm=site under DP
# How the squared L2 sensitivity (1) is shared between the means, the mean squares and the counts.
# Set by the errors in units of the deviation (docs/privacy.md#site-statistics-under-dp): the mean
# squares' range B^2 makes them the noisiest, a count's error matters least.
SITE_STATS_SHARES = (0.32, 0.64, 0.04)
SITE_STATS_STD_FLOOR = 0.01  # a deviation is at least this x site-stats-bound (noise can drive a variance below 0)


def site_columns(dataset: MultimodalDataset, sensor_norm: str | SensorNorm) -> tuple[str, ...]:
    """The sensor columns of ``dataset`` that ``sensor_norm`` standardises by site statistics."""
    norm = sensor_norm if isinstance(sensor_norm, SensorNorm) else SensorNorm.parse(sensor_norm)
    return tuple(m.name for m in dataset.schema.modalities if m.kind is ModalityKind.SENSOR and norm.mode(m.name) == "site")


def _scales(dataset: MultimodalDataset, columns: tuple[str, ...], bound: float) -> tuple[float, float, float]:
    """The factors (mean, mean square, count) that give every record's contribution an L2 norm of at most 1."""
    channels = sum(dataset.features[c].shape[1] for c in columns)
    share_mean, share_square, share_count = SITE_STATS_SHARES
    return math.sqrt(share_mean / channels) / bound, math.sqrt(share_square / channels) / bound**2, math.sqrt(share_count / len(columns))


def site_stat_contributions(dataset: MultimodalDataset, columns: tuple[str, ...], *, bound: float) -> np.ndarray:
    """Each record's scaled contribution to the statistics' sums, ``[N, D]``: every row's L2 norm is at most 1.

    Per column: its channels' window means of the values clipped to ``[-bound, bound]``, their
    window mean squares (so in ``[0, bound^2]``), and a count of 1 where the record has the column
    (0 where it is absent), each scaled by :func:`_scales`. Non-finite values count as 0 (NaN)
    or the bound (infinities).
    """
    if not columns:
        raise ValueError("no sensor column uses sensor-norm=site")
    if not (math.isfinite(bound) and bound > 0):
        raise ValueError(f"site-stats-bound must be a positive number, got {bound!r}")
    a, b, c = _scales(dataset, columns, bound)
    parts = []
    for name in columns:
        j = dataset.schema.names.index(name)
        x = np.nan_to_num(dataset.features[name].astype(np.float64), nan=0.0, posinf=bound, neginf=-bound)
        x = np.clip(x, -bound, bound)
        present = dataset.present[:, j].astype(np.float64)[:, None]
        parts += [a * x.mean(axis=2) * present, b * np.minimum((x * x).mean(axis=2), bound**2) * present, c * present]
    return np.concatenate(parts, axis=1)


@dataclass(frozen=True)
class SiteStatistics:
    """A site's per-channel sensor means and deviations for ``sensor-norm=site`` (never sent anywhere)."""

    columns: tuple[tuple[str, tuple[float, ...], tuple[float, ...]], ...]  # (column, means, deviations)

    def apply(self, dataset: MultimodalDataset) -> MultimodalDataset:
        """Standardise each of these columns of ``dataset`` by these statistics (absent rows stay 0)."""
        features = dict(dataset.features)
        for name, mean, std in self.columns:
            rows = dataset.present[:, dataset.schema.names.index(name)]
            values = features[name].astype(np.float64)
            scaled = ((values - np.asarray(mean)[None, :, None]) / np.asarray(std)[None, :, None]).astype(np.float32)
            scaled[~rows] = 0.0
            features[name] = scaled
        return dataset.replace(features=features)

    def to_json(self) -> list[list[object]]:
        return [[name, list(mean), list(std)] for name, mean, std in self.columns]

    @classmethod
    def from_json(cls, data: list[list[object]]) -> SiteStatistics:
        return cls(tuple((str(n), tuple(map(float, m)), tuple(map(float, s))) for n, m, s in data))  # type: ignore[call-overload]


def noisy_site_statistics(
    dataset: MultimodalDataset, columns: tuple[str, ...], *, bound: float, noise_multiplier: float, rng: np.random.Generator | None = None
) -> SiteStatistics:
    """The Gaussian mechanism on the sums of :func:`site_stat_contributions` (sensitivity 1), then post-processing.

    Adds N(0, ``noise_multiplier``^2) to every coordinate of the scaled sums, with noise from
    the operating system's entropy unless ``rng`` is given (tests only). Then, per column and
    channel: count = noisy count (at least 1), mean = noisy sum / count and mean square =
    noisy sum of squares / count, each clamped to the range its true value lies in, and
    deviation = sqrt(max(mean square - mean^2, floor^2)) with floor = 0.01 x ``bound``. The
    caller accounts for the release (one Gaussian mechanism, sampling rate 1) before using it.
    """
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"site-stats-noise must be > 0 for a DP release, got {noise_multiplier!r}")
    rng = rng if rng is not None else np.random.default_rng()  # seeded from the operating system, never the run's seed
    sums = site_stat_contributions(dataset, columns, bound=bound).sum(axis=0)
    noisy = sums + rng.normal(0.0, noise_multiplier, size=sums.shape)
    a, b, c = _scales(dataset, columns, bound)
    out, at = [], 0
    for name in columns:
        k = dataset.features[name].shape[1]
        sum_mean, sum_square, count = noisy[at : at + k] / a, noisy[at + k : at + 2 * k] / b, noisy[at + 2 * k] / c
        at += 2 * k + 1
        count = max(float(count), 1.0)
        mean = np.clip(sum_mean / count, -bound, bound)
        square = np.clip(sum_square / count, 0.0, bound**2)
        std = np.sqrt(np.maximum(square - mean**2, (SITE_STATS_STD_FLOOR * bound) ** 2))
        out.append((name, tuple(map(float, mean)), tuple(map(float, std))))
    return SiteStatistics(tuple(out))
