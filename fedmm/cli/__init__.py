"""The ``fedmm`` command (one module per group of commands; ``common`` holds what they share).

- ``fedmm simulate [PRESET] [--set key=value ...]`` runs a federation offline and
  writes ``runs/<run-id>/``; it exits 0 only when the run completed;
- ``fedmm status RUN [--json]`` says what became of a run (completed, stopped and why,
  failed, running), its rounds and every site by name (exit 0, 3 stopped, 1 failed);
- ``fedmm data check MANIFEST [--lenient]`` validates a manifest and prints counts per
  modality, class and site (exit 1 on a strict failure);
- ``fedmm data split [PRESET] [--set ...]`` shows how a simulated federation splits
  the data (per-site counts per class and modality);
- ``fedmm plan [PRESET] [--set ...]`` prints each site's DP plan: sample rate, steps,
  the noise multiplier chosen for the budget, and the rounds each site's own budget allows;
- ``fedmm server --pki DIR`` and ``fedmm site SITE.toml`` run a deployment: Flower's
  SuperLink and one SuperNode per site, with TLS and SuperNode authentication (docs/deploy.md);
- ``fedmm audit LEDGER... [--json] [--html FILE]`` checks site privacy ledgers: spend
  against budget, runs, last spend, hash chain (exit 1 on a broken chain or a spend over
  budget).
- ``fedmm ledger init STATE_DIR --site NAME`` makes a site's first privacy ledger (once,
  logged); ``--replace-lost`` replaces one lost for good, carrying its spend over;
- ``fedmm evaluate RUN [--data SPEC] [--split test|all] [--model best|last] [--json]``
  scores a run's saved model: accuracy, macro-F1, per-class scores, confusion matrix;
- ``fedmm report RUN [--out FILE]`` writes an HTML page of a run (plots per round,
  participation, confusion matrix, per-class and privacy tables; docs/runs.md);
- ``fedmm certs init|server|site|show`` makes a private CA, the SuperLink's TLS certificate (renewed from the same CA by ``server``)
  and the sites' SuperNode keys, and lists them with expiry (see docs/transport.md).

Exit codes: 0 success, 1 failed run or bad data, 2 bad configuration.

The top floor: may import every part of fedmm (lazily where a library is slow to load,
so ``fedmm --help`` stays fast).
"""

from __future__ import annotations

import gc
import sys

from fedmm.cli import run, status, data, privacy, ledger, evaluate, report  # noqa: F401, I001  each registers its commands on ``app``, in help order
from fedmm.cli.common import app, parse_overrides

__all__ = ["app", "main", "parse_overrides"]


def main() -> None:
    """Entry point of the ``fedmm`` console script."""
    if sys.argv[1:2] == ["simulate"]:
        # Start-up builds about 600,000 long-lived objects (PyTorch, Flower, the sites' data). Each
        # full collection among them while they are made finds nothing and walks them all: about
        # 1 s of the README's 15 s run. They wait until the run starts, where
        # fedmm.runtime.embedded.frozen_heap leaves the start-up's objects out and puts the
        # threshold back; younger generations are collected as usual meanwhile.
        young, middle, full = gc.get_threshold()
        gc.set_threshold(young, middle, DEFERRED_FULL_COLLECTION)
        try:
            sys.exit(app())
        finally:
            gc.set_threshold(young, middle, full)
    sys.exit(app())


DEFERRED_FULL_COLLECTION = 1 << 30  # gen-1 collections before a full one: never, in practice
