"""A run's artifacts on disk: ``runs/<run-id>/``.

- ``config.toml``: the resolved run configuration;
- ``metrics.jsonl``: one JSON object a round (accuracy, loss, macro-F1, per-class scores,
  confusion matrix, the sites aggregated, privacy, rejections);
- ``model.pt``: the final global model (a torch state_dict);
- ``model-best.pt``: the global model of the round that scored best on the server's
  held-out set (see :mod:`fedmm.federation.central`);
- ``summary.json``: the outcome in one object;
- ``privacy.json``: each site's (epsilon, delta), accountant, noise, sample rate, steps;
- ``model_card.json``: parameters per modality encoder and per head, DP layer replacements;
- ``federation.json``: how the data was split (partitioner, seed) and, per site, the
  samples per class and per modality, lost modalities, hidden or flipped labels, skips;
- ``run.lock``: held (an exclusive ``flock``) by the one process writing the folder, and naming
  it: a second run on the same folder (a resume while the run still goes on) is refused.

Files are written whole to a temporary name, then renamed, so a crash never
leaves a half-written artifact.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import tomllib
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import tomli_w

from fedmm import __version__
from fedmm.config import RunConfig
from fedmm.errors import ConfigError, DataError, FederationError
from fedmm.holder_lock import Held, HolderLock, holder_of

if TYPE_CHECKING:
    import torch  # loaded on use: `fedmm status` and the ledger commands never need it

__all__ = ["RunArtifacts", "new_run_id", "check_run_folder", "resume_advice", "run_in_use", "CHECKPOINT", "FAILURE", "LOCK", "MODEL", "BEST_MODEL"]

CHECKPOINT = "checkpoint.json"
FAILURE = "failure.json"  # why a run failed, from the ServerApp: a deployment's run folder has no flower.log to look in
OPTIMIZER_PREFIX = "server-optimizer/"  # the server optimizer's arrays inside a checkpoint's npz
MODEL = "model.pt"
BEST_MODEL = "model-best.pt"
LOCK = "run.lock"  # held by the process writing the run folder (its ServerApp), for the whole run


def resume_advice(done: int | None) -> str:
    """What to do with a stopped run whose last checkpoint is after round ``done`` (None: it has none)."""
    if done:
        return f"resume=true with the same run-name continues after round {done}"
    return "nothing to resume (no round ended): start it again under another run-name"


def run_in_use(run_dir: Path) -> str | None:
    """Who holds ``run_dir``'s lock (a run writing it now), or None when no process does (nothing is written)."""
    return holder_of(run_dir / LOCK)


def check_run_folder(runs_dir: str | Path, run_id: str, *, resume: bool, rounds: int | None = None) -> int | None:
    """Refuse now what :class:`RunArtifacts` and the ServerApp would refuse for this folder when the run
    starts (nothing is held or written here): a new run on a folder that exists; a resume of a folder with
    no checkpoint, of one another run is writing, or of a run that completed its ``rounds`` already (the
    engine, once started, would have written its log and site presence into the completed run's folder).
    Returns the round a resume continues after (None for a new run)."""
    run_dir = Path(runs_dir).expanduser().resolve() / run_id
    holder = run_in_use(run_dir)  # first: a run in its first round has no checkpoint yet, and has not stopped
    if holder is not None:
        raise _in_use_error(run_dir, holder)
    if not resume:
        if run_dir.exists():
            raise _exists_error(run_dir, run_id)
        return None
    if not (run_dir / CHECKPOINT).is_file():
        raise _no_checkpoint_error(run_dir)
    try:
        done = int(json.loads((run_dir / CHECKPOINT).read_text()).get("round", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return None  # the ServerApp's load_checkpoint says what is wrong with it
    if rounds is not None and done >= rounds:
        raise ConfigError("resume", f"run {run_id} already completed its {done} rounds (rounds={rounds})", value=True,
                          fix=f"raise rounds to train on (e.g. rounds={done + 10}), or start a new run")
    return done


def _no_checkpoint_error(run_dir: Path) -> ConfigError:
    if run_dir.is_dir():
        return ConfigError(
            "resume", f"run {run_dir.name} has no checkpoint ({run_dir / CHECKPOINT}): it stopped before its first round "
            "ended, so there is nothing to resume", value=True,
            fix=f"start it again under another run-name; {run_dir} keeps its log, and its sites' ledgers what they spent",
        )
    return ConfigError("resume", f"no run folder {run_dir} to resume", value=True,
                       fix="set run-name to the run to resume (its folder under runs-dir), or resume=false for a new run")


def _exists_error(run_dir: Path, run_id: str) -> ConfigError:
    holder = run_in_use(run_dir)
    if holder is not None:
        return _in_use_error(run_dir, holder)
    if not (run_dir / CHECKPOINT).is_file():
        return ConfigError("run-name", f"a run folder {run_dir} exists already", value=run_id,
                           fix="give this run another run-name (that run stopped before its first checkpoint: nothing to resume)")
    return ConfigError(
        "run-name", f"a run folder {run_dir} exists already", value=run_id,
        fix="give this run another run-name, or set resume=true to continue that run from its checkpoint",
    )


def _in_use_error(run_dir: Path, holder: str) -> ConfigError:
    return ConfigError(
        "run-name", f"run folder {run_dir} is being written by another run ({holder}); two runs on one folder would "
        "interleave its metrics, checkpoints and summary", value=run_dir.name,
        fix="wait for that run to end (or stop it) before resuming it, or give this run its own run-name",
    )


def new_run_id(flower_run_id: int | str | None = None) -> str:
    """A sortable run id: UTC time, plus Flower's run id when there is one."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{flower_run_id}" if flower_run_id is not None else stamp


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class RunArtifacts:
    """Writes one run's folder."""

    def __init__(self, cfg: RunConfig, run_id: str, *, resume: bool = False) -> None:
        self.cfg = cfg
        self.run_id = run_id
        self.dir = Path(cfg.runs_dir).expanduser().resolve() / run_id
        self.started = time.monotonic()
        if resume:
            holder = run_in_use(self.dir)
            if holder is not None:
                raise _in_use_error(self.dir, holder)
            if not (self.dir / CHECKPOINT).is_file():
                raise _no_checkpoint_error(self.dir)
        else:
            try:
                self.dir.mkdir(parents=True, exist_ok=False)  # one new run per folder, even when two start at once
            except FileExistsError:
                raise _exists_error(self.dir, run_id) from None
        try:
            self._lock = HolderLock(self.dir / LOCK)  # held until close(): no second run writes this folder meanwhile
        except Held as held:
            raise _in_use_error(self.dir, held.holder) from None
        if not resume:
            self.save_config(cfg)

    def close(self) -> None:
        """Release the run folder (its lock): the run writes nothing more, and may be resumed."""
        self._lock.release()

    def save_config(self, cfg: RunConfig) -> None:
        """Write ``config.toml``: the run's configuration (the server rewrites it with every ``auto`` resolved)."""
        _write_atomic(self.dir / "config.toml", tomli_w.dumps(cfg.to_run_config()).encode())

    def record_resume(self, cfg: RunConfig, *, after_round: int) -> list[str]:
        """A resume's settings against ``config.toml``: each change as ``key: old -> new``. With any change,
        the resumed run's configuration is kept as ``config-resumed-<round>.toml`` (``config.toml`` stays the
        run's first): the rounds after ``after_round`` ran with it, and each is accounted as it ran."""
        saved = self.dir / "config.toml"
        before = tomllib.loads(saved.read_text()) if saved.is_file() else {}
        now = cfg.to_run_config()
        changes = [f"{key}: {before.get(key, '(unset)')!r} -> {value!r}" for key, value in sorted(now.items())
                   if key != "resume" and before.get(key) != value]
        if changes:
            _write_atomic(self.dir / f"config-resumed-{after_round}.toml", tomli_w.dumps(now).encode())
        return changes

    def save_checkpoint(self, server_round: int, arrays: Mapping[str, np.ndarray], state: Mapping[str, Any]) -> None:
        """After a round: the global model, the round and the server's state, atomically.

        The model goes to ``checkpoint-<round>.npz`` first, then ``checkpoint.json`` (which
        names it, with its SHA-256) replaces the previous one; a crash at any point leaves the
        last complete checkpoint in force. The server optimizer's arrays (``state["server_optimizer"]
        ["arrays"]``: its moments and EMA, :mod:`fedmm.federation.server_opt`) go into the same npz,
        under ``server-optimizer/<key>``, covered by the same SHA-256; the rest of ``state`` is JSON.
        """
        if not self._lock.still_held():  # run.lock removed by hand: a second run may have locked a new one and write here too
            raise FederationError(
                f"run folder {self.dir}: its lock file {LOCK} was removed or replaced while this run held it, so another run may "
                f"be writing the folder too; round {server_round} is not checkpointed. Fix: stop every run of this folder, then "
                "resume one (resume=true); never remove run.lock by hand (the lock goes with its process)"
            )
        model = self.dir / f"checkpoint-{server_round}.npz"
        tmp = model.with_name(model.name + ".tmp")
        state = dict(state)
        optimizer = state.get("server_optimizer")
        extra: dict[str, np.ndarray] = {}
        if isinstance(optimizer, Mapping) and "arrays" in optimizer:
            extra = {OPTIMIZER_PREFIX + k: np.asarray(v) for k, v in optimizer["arrays"].items()}
            state["server_optimizer"] = {**{k: v for k, v in optimizer.items() if k != "arrays"}, "arrays": sorted(optimizer["arrays"])}
        with open(tmp, "wb") as handle:
            np.savez(handle, **cast(dict[str, Any], {k: np.asarray(v) for k, v in arrays.items()}), **cast(dict[str, Any], extra))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, model)
        record = {"round": server_round, "model": model.name, "sha256": hashlib.sha256(model.read_bytes()).hexdigest(), "order": list(arrays), "state": state}
        _write_atomic(self.dir / CHECKPOINT, json.dumps(record, indent=2).encode())
        for old in self.dir.glob("checkpoint-*.npz"):
            if old.name != model.name:
                old.unlink(missing_ok=True)

    def load_checkpoint(self) -> tuple[int, dict[str, np.ndarray], dict[str, Any]]:
        """The last checkpoint: its round, the global model (in state_dict order) and the server's state.

        The server optimizer's arrays come back where :meth:`save_checkpoint` found them,
        ``state["server_optimizer"]["arrays"]`` (a dict of arrays).

        Raises
        ------
        DataError
            When the checkpoint's model file is missing or does not match its SHA-256.
        """
        record = json.loads((self.dir / CHECKPOINT).read_text())
        model = self.dir / record["model"]
        if not model.is_file() or hashlib.sha256(model.read_bytes()).hexdigest() != record["sha256"]:
            raise DataError(model, "the checkpoint's model is missing or does not match checkpoint.json's SHA-256", fix="resume cannot trust it; start a new run")
        state = record["state"]
        optimizer = state.get("server_optimizer")
        with np.load(model) as data:
            arrays = {name: data[name] for name in record["order"]}
            if isinstance(optimizer, dict) and isinstance(optimizer.get("arrays"), list):
                missing = [k for k in optimizer["arrays"] if OPTIMIZER_PREFIX + k not in data.files]
                if missing:
                    raise DataError(model, f"the checkpoint lacks the server optimizer arrays {missing[:3]}", fix="resume cannot continue the optimizer; start a new run")
                optimizer["arrays"] = {k: data[OPTIMIZER_PREFIX + k] for k in optimizer["arrays"]}
        # Rounds after the checkpoint were lost with the server: their metrics lines go too.
        metrics = self.dir / "metrics.jsonl"
        if metrics.exists():
            kept = [line for line in metrics.read_text().splitlines() if json.loads(line)["round"] <= record["round"]]
            _write_atomic(metrics, "".join(line + "\n" for line in kept).encode())
        return int(record["round"]), arrays, state

    def append_round(self, record: Mapping[str, Any]) -> None:
        """Append one round's metrics to ``metrics.jsonl`` (flushed to disk)."""
        with open(self.dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(dict(record)) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def save_model_card(self, card: Mapping[str, Any]) -> None:
        """Write ``model_card.json`` (parameters per encoder and head, DP layer replacements)."""
        _write_atomic(self.dir / "model_card.json", json.dumps(card, indent=2).encode())

    def save_federation(self, summary: Mapping[str, Any]) -> None:
        """Write ``federation.json`` (per-site counts per class and modality)."""
        _write_atomic(self.dir / "federation.json", json.dumps(summary, indent=2).encode())

    def save_model(self, state_dict: Mapping[str, torch.Tensor], *, best: bool = False) -> None:
        """Save the final global model (``model.pt``), or the best round's (``model-best.pt``), as a torch state_dict, atomically."""
        path = self.dir / (BEST_MODEL if best else MODEL)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as handle:
            import torch

            torch.save(dict(state_dict), handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)

    def load_model(self, *, best: bool = False) -> dict[str, torch.Tensor] | None:
        """``model.pt`` (or ``model-best.pt``) as a state_dict, or None when there is none."""
        path = self.dir / (BEST_MODEL if best else MODEL)
        if not path.is_file():
            return None
        import torch

        return dict(torch.load(path, map_location="cpu", weights_only=True))

    def save_failure(self, reason: str, *, rounds: int, interrupted: bool) -> None:
        """Write ``failure.json``: why the run ended without a summary, after how many rounds."""
        text = json.dumps({"run_id": self.run_id, "status": "interrupted" if interrupted else "failed", "reason": reason[:4000],
                           "rounds": rounds, "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}, indent=2)
        (self.dir / FAILURE).write_text(text + "\n")

    def save_privacy(self, privacy: Iterable[Any], *, rounds: int, client_epsilon: float | None = None) -> list[dict[str, Any]]:
        """Write ``privacy.json``: every site report the server received, and the client-level guarantee.

        :meth:`finish` writes it with the summary; a run that fails writes it alone, so what
        its sites spent is on record even without a summary. Returns the site reports.
        """
        site_reports = [{"site": p.site, **{k: v for k, v in dataclasses.asdict(p).items() if k != "site"}} for p in privacy]
        client_level = None
        if self.cfg.client_dp:
            client_level = {
                "epsilon": client_epsilon, "delta": self.cfg.client_delta, "accountant": "rdp",
                "noise_multiplier": self.cfg.client_noise_multiplier, "clip_norm": self.cfg.client_clip_norm,
                "sample_rate": self.cfg.client_fraction, "rounds": rounds, "noise": self.cfg.client_noise,
            }
        _write_atomic(self.dir / "privacy.json", json.dumps({"sites": site_reports, "client_level": client_level}, indent=2).encode())
        return site_reports

    def finish(
        self, *, rounds: int, sites: int, final_accuracy: float, final_loss: float, privacy: Iterable[Any], stopped: str | None = None,
        status: str | None = None,
        client_epsilon: float | None = None, rejected: Mapping[str, int] | None = None, unaggregated_spends: Mapping[str, int] | None = None,
        rejected_by_site: Mapping[str, Mapping[str, int]] | None = None, max_update_norm: float | None = None,
        evaluation: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Write ``privacy.json`` and ``summary.json``; return the summary.

        ``evaluation``: the central evaluation's fields (``final_macro_f1``, ``classes``,
        ``per_class``, ``confusion``, ``best_round``, ``best_accuracy``, ``best_macro_f1``;
        :func:`fedmm.federation.central.summary_fields`), written after ``final_loss``.

        ``rounds`` is the rounds completed; ``stopped`` says why the run ended before
        ``rounds`` of the config (sites out of budget), or None. ``status`` is ``completed``
        (every planned round), ``stopped`` (some rounds, then ``stopped``) or ``failed`` (no
        round aggregated; ``stopped`` says why); None: ``stopped`` or ``completed`` from
        ``stopped``. ``client_epsilon`` is the
        client-level (DP-FedAvg) epsilon at ``client-delta``; ``rejected`` counts the
        updates left out of the aggregate, per reason.
        """
        if status is None:
            status = "stopped" if stopped else "completed"
        if status not in ("completed", "stopped", "failed"):
            raise ValueError(f"status must be completed, stopped or failed, not {status!r}")
        site_reports = self.save_privacy(privacy, rounds=rounds, client_epsilon=client_epsilon)
        summary = {
            "run_id": self.run_id,
            "fedmm_version": __version__,
            "rounds": rounds,
            "rounds_planned": self.cfg.rounds,
            "stopped": stopped,
            "status": status,
            "sites": sites,
            "dp": self.cfg.dp,
            "secure_aggregation": self.cfg.secure_aggregation,
            "client_dp": self.cfg.client_dp,
            "client_epsilon": client_epsilon,
            "client_delta": self.cfg.client_delta if self.cfg.client_dp else None,
            "rejected_updates": dict(rejected or {}),
            "rejected_by_site": {site: dict(kinds) for site, kinds in (rejected_by_site or {}).items()},
            "max_update_norm": max_update_norm,
            "unaggregated_spends": dict(unaggregated_spends or {}),
            "final_accuracy": final_accuracy,
            "final_loss": final_loss,
            **dict(evaluation or {}),
            "max_epsilon": max((p["epsilon"] for p in site_reports), default=None) if self.cfg.dp else None,
            "delta": self.cfg.target_delta if self.cfg.dp else None,
            "accountant": str(self.cfg.accountant) if self.cfg.dp else None,
            "wall_seconds": round(time.monotonic() - self.started, 2),
        }
        _write_atomic(self.dir / "summary.json", json.dumps(summary, indent=2).encode())
        return summary
