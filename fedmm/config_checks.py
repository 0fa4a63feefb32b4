"""The run configuration's value checks: each raw value coerced to its key's type, and the range rules.

Part of the ground floor with :mod:`fedmm.config` (which imports these helpers): it may
import only :mod:`fedmm.errors` and the standard library. Every failure is a
:class:`fedmm.errors.ConfigError` naming the key, the value and the fix.

>>> at_least("rounds", 0, 1, "run at least one round")
Traceback (most recent call last):
...
fedmm.errors.ConfigError: config key 'rounds': must be >= 1 (got 0). Fix: run at least one round
"""

from __future__ import annotations

import dataclasses
import math
from enum import StrEnum
from typing import Any

from fedmm.errors import ConfigError

__all__ = ["AUTO", "at_least", "check_sizes", "coerce", "positive"]

AUTO = "auto"


def coerce(key: str, field: dataclasses.Field[Any], raw: Any) -> Any:
    """Check and convert one raw value to the field's declared type (an enum key takes its default's enum)."""
    kind = field.type
    if field.default is None:  # "auto" or a number
        if isinstance(raw, str) and raw.strip().lower() == AUTO:
            return None
        kind = "int" if field.metadata.get("integer") else "float"
    if kind == "bool":
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "false"):
            return raw.lower() == "true"
        raise ConfigError(key, "must be true or false", value=raw, fix=f"e.g. {key}=true")
    if kind == "int":
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ConfigError(key, "must be an integer", value=raw, fix=f"e.g. {key}={_example(field.default)}")
        return raw
    if kind == "float":
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise ConfigError(key, "must be a number", value=raw, fix=f"e.g. {key}={_example(field.default)}")
        return float(raw)
    if kind == "str":
        if not isinstance(raw, str):
            raise ConfigError(key, "must be a string", value=raw, fix=f"e.g. {key}='{field.default}'")
        return raw
    enum_type = type(field.default)
    if not issubclass(enum_type, StrEnum):
        raise TypeError(f"config key '{key}': no coercion for the type {kind!r}")
    try:
        return enum_type(str(raw).lower())
    except ValueError:
        allowed = ", ".join(m.value for m in enum_type)
        raise ConfigError(key, f"must be one of: {allowed}", value=raw, fix=f"e.g. {key}='{field.default}'") from None


def at_least(key: str, value: int, minimum: int, fix: str) -> None:
    """Refuse ``value`` below ``minimum``."""
    if value < minimum:
        raise ConfigError(key, f"must be >= {minimum}", value=value, fix=fix)


def positive(key: str, value: float, fix: str) -> None:
    """Refuse a ``value`` that is not a finite number above 0."""
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(key, "must be > 0", value=value, fix=fix)


def check_sizes(cfg: Any) -> None:
    """The declared ``bounds`` of every key of the run config ``cfg``, and the ranges of a few floats."""
    # Sizes beyond these crash a run (memory, numpy's seed) or mean a typo; the bounds are declared with each key.
    for field in dataclasses.fields(cfg):
        if field.metadata.get("bounds"):
            low, high = field.metadata["bounds"]
            value, name = getattr(cfg, field.name), field.name.replace("_", "-")
            if value is not None and not low <= value <= high:
                raise ConfigError(name, f"must be in [{low}, {high}]", value=value, fix=f"e.g. {name}={_example(field.default)}")
    if cfg.learning_rate is not None and not (math.isfinite(cfg.learning_rate) and 0 < cfg.learning_rate <= 100):
        raise ConfigError("learning-rate", "must be in (0, 100] or 'auto'", value=cfg.learning_rate, fix="e.g. learning-rate=0.5, or 'auto'")
    if not (math.isfinite(cfg.audio_seconds) and 0 < cfg.audio_seconds <= 60):
        raise ConfigError("audio-seconds", "must be in (0, 60] seconds", value=cfg.audio_seconds, fix="e.g. audio-seconds=1.0")
    if cfg.augment_multiplicity > 1 and not cfg.augment:
        raise ConfigError(
            "augment-multiplicity", "repeats each record's augmented copies, and augment is not set (every copy would be the same)",
            value=cfg.augment_multiplicity, fix="set augment, e.g. augment='image:shift+rotate', or use augment-multiplicity=1",
        )
    if cfg.augment_multiplicity > 1 and cfg.dp and cfg.grad_sample_mode == "ghost":
        raise ConfigError(
            "augment-multiplicity", "under DP needs each record's per-sample gradients to average its copies before clipping, and "
            "grad-sample-mode=ghost never forms them (it clips each copy alone)", value=cfg.augment_multiplicity,
            fix="add grad-sample-mode='hooks' (or 'functorch'), or use augment-multiplicity=1",
        )


def _example(default: object) -> object:
    """A key's default as a value to write back (None, a key's "auto", is written ``auto``)."""
    return "auto" if default is None else default
