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
- ``site``: standardised per channel by the mean and deviation of the site's own records
  (dp=false only).

Every mode but ``site`` uses nothing but one record (or constants), so DP-SGD's
per-record guarantee is untouched: no record's features depend on another record.
``site`` statistics depend on all of a site's records, which DP-SGD does not account
for, so it is refused under dp=true (the same rule as tabular columns below).

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

__all__ = ["SensorNorm", "SENSOR_NORMS", "DEFAULT_SENSOR_NORM", "normalise", "scale_warnings"]

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
        """Refuse ``site`` under DP, and a named column the data does not have."""
        if dp and any(mode == "site" for _, mode in self.modes):
            raise ConfigError(
                "sensor-norm", "'site' statistics depend on every record of the site, which DP-SGD's guarantee does not cover",
                value=self.text, fix="use window-stats (per-record, DP-safe), a fixed scale=F, or set dp=false",
            )
        if columns is not None:
            unknown = [c for c, _ in self.modes if c != "*" and c not in columns]
            if unknown:
                raise ConfigError("sensor-norm", f"no sensor column named {', '.join(unknown)} (have: {', '.join(columns) or 'none'})", value=self.text, fix=_FIX)

    @property
    def text(self) -> str:
        """The resolved setting, as it is written to config.toml."""
        return ",".join(f"{c}:{m}" if c != "*" else m for c, m in self.modes if c != "*") + ("," if len(self.modes) > 1 else "") + dict(self.modes)["*"]


def normalise(dataset: MultimodalDataset, *, sensor_norm: str | SensorNorm = "auto", site_statistics: bool) -> MultimodalDataset:
    """Normalise one site's (or the server's held-out) sensor and tabular features (see the module doc).

    ``site_statistics`` is ``not dp``: whether statistics of the whole data set may be used.
    A ``window-stats`` sensor column comes back with three times its channels, and the
    schema says so.
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
            scaled = _sensor(values.astype(np.float64), norm.mode(m.name), rows)
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
