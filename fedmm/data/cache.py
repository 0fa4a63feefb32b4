"""A disk cache of the built-in dataset's audio features.

Every process that loads AV-MNIST (the CLI, the ServerApp, each simulated or deployed site)
would otherwise import librosa's feature module (about 4 s) and recompute the same log-mel
maps. The first process writes them to ``$FEDMM_CACHE_DIR`` (default
``$XDG_CACHE_HOME/fedmm`` or ``~/.cache/fedmm``); later ones read them back in milliseconds.

- The key is a SHA-256 of the exact input (the decoded clips) and of every setting that
  shapes the output (feature parameters, librosa's version, this module's format version),
  so a changed recording or setting can never be served a stale entry.
- Only the public built-in dataset is cached. A site's own (manifest) data is never written
  outside its data folder by this cache.
- An unreadable entry is reported and recomputed; a cache folder that cannot be written is
  reported once and the features are computed as if there were no cache.
  ``FEDMM_CACHE_DIR=off`` turns the cache off. Deleting the folder is always safe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

__all__ = ["CACHE_ENV", "cache_dir", "cached_features"]

CACHE_ENV = "FEDMM_CACHE_DIR"
FORMAT_VERSION = 1
_OFF = {"", "0", "off", "false", "no", "none"}

logger = logging.getLogger(__name__)
_warned_unwritable: set[Path] = set()


def cache_dir() -> Path | None:
    """The cache folder, or None when ``FEDMM_CACHE_DIR`` turns the cache off."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in _OFF else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fedmm"


def cached_features(kind: str, inputs: np.ndarray, params: Mapping[str, object], compute: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``compute(inputs)``, read from the cache when this exact input and ``params`` were seen before.

    ``compute`` must map row ``i`` of ``inputs`` to row ``i`` of its output.
    """
    root = cache_dir()
    if root is None:
        return np.ascontiguousarray(compute(inputs))  # laid out as a cached array is: same sums, cache or not
    inputs = np.ascontiguousarray(inputs)
    digest = hashlib.sha256()
    header = {"kind": kind, "format": FORMAT_VERSION, "params": dict(params), "dtype": str(inputs.dtype), "shape": list(inputs.shape)}
    digest.update(json.dumps(header, sort_keys=True, default=str).encode())
    digest.update(inputs.tobytes())
    path = root / kind / f"{digest.hexdigest()}.npy"
    if path.is_file():
        try:
            found = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            problem = f"cannot be read ({err})"
        else:
            if found.ndim >= 1 and found.shape[0] == inputs.shape[0] and np.isfinite(found).all():
                return found
            problem = f"holds an array of shape {found.shape} for {inputs.shape[0]} inputs, or non-finite values"
        logger.warning("fedmm: the cached features %s %s; recomputing them (deleting %s is safe)", path, problem, root)
    out = np.ascontiguousarray(compute(inputs))
    _write(path, out, root)
    return out


def _write(path: Path, array: np.ndarray, root: Path) -> None:
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)
        os.replace(tmp, path)  # whole or not at all: a reader never sees half a file
    except OSError as err:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if root not in _warned_unwritable:
            _warned_unwritable.add(root)
            logger.warning("fedmm: cannot write the feature cache in %s (%s); going on without it. Fix: set %s to a writable folder, or to 'off'", root, err, CACHE_ENV)
