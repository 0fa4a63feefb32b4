"""Flower ServerApp: FedAvg over the sites, central evaluation, run artifacts.

Thin on purpose: configuration, strategy and artifacts live in ``fedmm``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow import DefaultWorkflow
from flwr.serverapp import Grid, ServerApp

from fedmm import protocol
from fedmm.data.partition import build_federation
from fedmm.data.normalise import normalise, scale_warnings
from fedmm.data.sources import load_source
from fedmm.errors import ConfigError, FederationError, SitesExhausted
from fedmm.federation.artifacts import FAILURE, RunArtifacts, new_run_id
from fedmm.federation.book import FederationBook
from fedmm.federation.presence import PRESENCE_FILE, Presence, enrolled_lookup, site_names
from fedmm.federation.secagg import SecureFedMM, make_workflow
from fedmm.federation.central import BEST_STATE, BestRound, Participants, make_central_evaluation, model_digest, round_fields, summary_fields
from fedmm.federation.strategy import FedMMAvg
from fedmm.models import layout_fingerprint
from fedmm.models.evaluation import Scores
from fedmm.plan import RunPlan
from fedmm.runtime.grid import PromptGrid, RunStopped
from fedmm.secure.identity import KEYS_ENV, EnrolledKeys

# Opacus' import calls logging.basicConfig (a root handler): Flower's logger, which has its own handler,
# would print every line twice (and `flwr log` show it twice). Keep Flower's lines to Flower's handler.
logging.getLogger("flwr").propagate = False
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation described by the run config and write ``runs/<run-id>/``."""
    plan = RunPlan.from_run_config(context.run_config)
    cfg = plan.config
    artifacts = RunArtifacts(cfg, cfg.run_name or new_run_id(context.run_id), resume=cfg.resume)  # holds the run folder
    try:
        _federate(PromptGrid(grid), context, plan, artifacts)  # PromptGrid: replies noticed within 0.1 s, not Flower's fixed 3 s
    finally:
        artifacts.close()  # from here on the run may be resumed


def _federate(grid: PromptGrid, context: Context, plan: RunPlan, artifacts: RunArtifacts) -> None:
    """The run itself, with its folder held (see :func:`main`)."""
    cfg, recipe = plan.config, plan.model
    log(INFO, "[fedmm] run %s: %s sites, %d rounds, dp=%s -> %s", artifacts.run_id, cfg.sites or "auto", cfg.rounds, cfg.dp, artifacts.dir)
    source = load_source(cfg.data, plan.preprocessing, classes=cfg.class_list, lenient=cfg.lenient, test_fraction=cfg.test_fraction)
    if source.pool.synthetic:
        log(INFO, "[fedmm] data: SYNTHETIC (%s), not real data", cfg.data)
    # The server's own held-out set, normalised as the sites normalise theirs.
    test = normalise(source.require_test(), sensor_norm=cfg.sensor_norm, site_statistics=not cfg.dp, held_out=True)
    for warning in scale_warnings(test, cfg.sensor_norm):
        log(WARNING, "[fedmm] %s", warning)
    partitioner = None
    if len(source.pool):
        # In simulation the server can rebuild the federation the sites see (same seed) and
        # record its per-site counts; this reads only what the simulation itself made up.
        federation = build_federation(source, plan.federation)
        partitioner = federation.partitioner
        plan = plan.with_sites(len(federation.names))  # sites=auto: every natural group
        cfg = plan.config
        if not cfg.resume:
            artifacts.save_federation(federation.summary())
        for shown, (name, ds) in enumerate(zip(federation.names, federation.sites)):
            if shown == 50:  # thousands of sites: one line each would flood the log; federation.json has them all
                log(INFO, "[fedmm] ... and %d more sites (per-site counts in %s)", len(federation.names) - shown, artifacts.dir / "federation.json")
                break
            counts = ds.counts()
            log(INFO, "[fedmm] site %s: %d samples, per modality %s", name, counts["samples"], counts["per_modality"])
        if federation.unassigned:
            log(INFO, "[fedmm] %d samples of the pool are held by no site (%s partition)", federation.unassigned, federation.partitioner)
        if federation.skipped:
            log(INFO, "[fedmm] lenient loading skipped %s", federation.skipped)
    else:
        log(INFO, "[fedmm] no training data here: the sites bring their own")
        if cfg.sites is None:
            raise ConfigError("sites", "is auto, but the server holds no training data to count the sites from", value="auto", fix="set sites to the number of sites of the deployment, e.g. sites=3")
    # The server names the auxiliary tasks' classes for every site, from its own held-out set
    # only: a list taken from the sites' training records would publish who is in them.
    schema = recipe.prepare(test, tasks_from=recipe.task_classes(test)).schema
    model = recipe.build(schema, seed=cfg.seed)
    initial = model.state_dict()
    layout = layout_fingerprint(initial)
    done, saved_state, best = 0, None, BestRound()  # best: the round whose model scored best on the held-out set
    if cfg.resume:
        done, arrays, saved_state = artifacts.load_checkpoint()
        if done >= cfg.rounds:
            raise ConfigError("resume", f"run {artifacts.run_id} already completed its {cfg.rounds} rounds", value=True, fix="raise 'rounds' to train on, or start a new run")
        if list(arrays) != list(initial) or any(arrays[k].shape != tuple(v.shape) for k, v in initial.items()):
            raise FederationError(f"the checkpoint in {artifacts.dir} holds another model than run config builds; resume with the run's own config.toml")
        initial = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
        log(INFO, "[fedmm] resuming run %s after round %d of %d, from its checkpoint", artifacts.run_id, done, cfg.rounds)
        (artifacts.dir / FAILURE).unlink(missing_ok=True)  # the run goes on: its last failure is no longer what became of it
        best = BestRound.from_state(saved_state.get(BEST_STATE))
        trouble = best.keep_on_resume(artifacts, checkpoint_round=done, arrays=arrays)
        if trouble:
            log(WARNING, "[fedmm] %s", trouble)
    else:
        artifacts.save_model_card(recipe.card(model, schema))
    # Every "auto" as this run resolves it (learning rate, momentum, sites, ...): what the server uses from here
    # on, and config.toml, so a run replays with the same values even if a later fedmm changes a default.
    plan = RunPlan.from_config(plan.resolved(schema=schema, partitioner=partitioner, sites=cfg.sites))
    cfg = plan.config
    if not cfg.resume:
        artifacts.save_config(cfg)
    else:
        changed = artifacts.record_resume(cfg, after_round=done)
        if changed:
            log(WARNING, "[fedmm] resumed with settings that differ from the run's config.toml (kept as config-resumed-%d.toml; rounds so far "
                "stay accounted as they ran): %s", done, "; ".join(changed))
    train_config: dict[str, Any] = {protocol.SCHEMA: schema.to_json(), protocol.RUN_ID: artifacts.run_id}
    strategy: FederationBook
    if cfg.secure_aggregation:
        strategy = SecureFedMM(
            cfg, initial={k: v.numpy() for k, v in initial.items()}, train_config=train_config, layout=layout,
            evaluate_fn=lambda r, arrays: evaluate_fn(r, arrays),
        )
    else:
        strategy = FedMMAvg.from_plan(plan, initial=initial, layout=layout, learning_rate=plan.learning_rate(schema))
    # Every report is checked against the server's own account of its site; in a deployment (`fedmm server`
    # names the enrolled keys) it must also prove the site's name with that site's key.
    keys_dir = os.environ.get(KEYS_ENV)
    keys = EnrolledKeys.load(keys_dir) if keys_dir else None
    strategy.expect_identities(accountant=cfg.accountant.value, delta=cfg.target_delta, local_epochs=cfg.local_epochs, run_id=artifacts.run_id, keys=keys)
    grid.presence = Presence(artifacts.dir / PRESENCE_FILE, site_names(strategy, keys))  # who is online, lost, back: by name
    strategy.enrolled_name = enrolled_lookup(keys)  # each node is told the site its key is enrolled as; another's key refuses at once
    log(INFO, "[fedmm] site identity: %s", f"every report proves its site's name with one of {len(keys.keys)} enrolled keys" if keys else "names from the simulation's partition (no enrolled keys)")
    if saved_state is not None:
        strategy.restore(saved_state, rounds_done=done)
        for site, report in sorted(strategy.site_privacy.items()):
            log(INFO, "[fedmm] checkpoint: site %s at epsilon %.3f, ledger entry %s", site, report.epsilon, report.ledger_seq)

    final: dict[str, float] = {}
    final_scores: dict[str, Scores] = {}
    clock = {"last": time.monotonic()}
    participants = Participants(strategy, dp=cfg.dp, secure=cfg.secure_aggregation)  # the sites each round aggregated

    def on_round(server_round: int, scores: Scores, arrays: ArrayRecord) -> None:
        loss, accuracy, tasks = scores.loss, scores.accuracy, scores.tasks
        final.update(loss=loss, accuracy=accuracy, round=server_round)
        final_scores["last"] = scores
        if server_round == done:
            log(INFO, "[fedmm] round %d (%s model): accuracy %.4f, macro-F1 %.4f, loss %.4f", done, "checkpoint" if done else "initial", accuracy, scores.macro_f1, loss)
            clock["last"] = time.monotonic()
            return
        eps, client_eps = strategy.max_epsilon, strategy.client_epsilon
        now = time.monotonic()
        seconds, clock["last"] = now - clock["last"], now
        report = strategy.round_report
        artifacts.append_round(
            {
                "round": server_round, "accuracy": accuracy, "loss": loss, "seconds": round(seconds, 3),
                "train_loss": strategy.last_train_metrics.get("train-loss"),
                "sites": strategy.sites_last_round, "max_epsilon": eps,
                "delta": cfg.target_delta if cfg.dp else None,
                **({"client_epsilon": client_eps, "client_delta": cfg.client_delta} if client_eps is not None else {}),
                "rejected": report.get("rejected", 0), "rejected_by": strategy.rejected_in(server_round),
                **({"dropped": report.get("dropped", 0)} if cfg.secure_aggregation
                   else {"dropped": report["dropped"]} if report.get("dropped") else {}),  # FedAvg: sites lost mid-round
                **{f"accuracy_{name}": value for name, value in tasks.items()},
                **round_fields(scores, participants.of_round(strategy, server_round)),
            }
        )
        state = arrays.to_torch_state_dict()
        is_best = best.offer(server_round, accuracy=accuracy, macro_f1=scores.macro_f1, digest=model_digest(state))
        eps_text = f"max epsilon {eps:.3f} (delta={cfg.target_delta:g}, {cfg.accountant})" if eps is not None else "no DP"
        if client_eps is not None:
            eps_text += f", client-level epsilon {client_eps:.3f} (delta={cfg.client_delta:g}, rdp)"
        task_text = "".join(f", {name} accuracy {value:.4f}" for name, value in tasks.items())
        log(INFO, "[fedmm] round %d/%d: accuracy %.4f, macro-F1 %.4f, loss %.4f%s, %s", server_round, cfg.rounds, accuracy, scores.macro_f1, loss, task_text, eps_text)
        # Durable before the next round starts: a server that dies from here on resumes after this round.
        if strategy.latest_arrays is not None:
            artifacts.save_checkpoint(server_round, {k: v.numpy() for k, v in strategy.latest_arrays.items()}, {**strategy.to_state(), BEST_STATE: best.to_state()})
        if is_best:  # after the checkpoint that records it: a crash in between is repaired on resume (BestRound.keep_on_resume)
            artifacts.save_model(state, best=True)

    central = make_central_evaluation(cfg, test, tasks_from=schema, on_score=on_round)

    # What the server evaluates and saves: the global model, or its moving average (server-ema; the sites train the former).
    served = strategy.served if isinstance(strategy, (FedMMAvg, SecureFedMM)) else (lambda arrays: arrays)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        # Flower counts rounds from 1 again after a resume; SecureFedMM adds the offset itself.
        return central(server_round + (0 if cfg.secure_aggregation else done), served(arrays))
    stopped = None
    try:
        if isinstance(strategy, SecureFedMM):
            # SecAgg+ runs on Flower's legacy workflow (the only path that has it in Flower 1.42).
            legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=cfg.rounds - done), strategy=strategy)
            DefaultWorkflow(fit_workflow=make_workflow(cfg, strategy))(grid, legacy)
            final_arrays = strategy.latest_arrays or ArrayRecord(initial)
        else:
            result = strategy.start(
                grid=grid, initial_arrays=ArrayRecord(initial), num_rounds=cfg.rounds - done,
                train_config=ConfigRecord(train_config), evaluate_fn=evaluate_fn,
            )
            final_arrays = result.arrays
    except SitesExhausted as stop:
        # Sites refusing for their budgets is the privacy promise working: stop cleanly, keep the last model.
        stopped = str(stop)
        log(INFO, "[fedmm] stopped early: %s", stopped)
        final_arrays = strategy.latest_arrays or ArrayRecord(initial)
    except Exception:
        # A failed run has no summary, but what its sites spent (every report received) is on record.
        privacy = sorted(strategy.site_privacy.values(), key=lambda p: p.site)
        error = sys.exc_info()[1]
        try:
            artifacts.save_privacy(privacy, rounds=int(final.get("round", done)), client_epsilon=strategy.client_epsilon)
            artifacts.save_failure(f"{type(error).__name__}: {error}", rounds=int(final.get("round", done)), interrupted=isinstance(error, RunStopped))
        except OSError as err:  # the run's own error matters more; say why the record is missing
            log(WARNING, "[fedmm] could not write privacy.json and failure.json of the failed run: %s", err)
        eps = strategy.max_epsilon
        ended = "stopped from outside" if isinstance(error, RunStopped) else "failed"
        log(INFO, "[fedmm] run %s; privacy.json records %d site report(s), max epsilon %s", ended, len(privacy), "none" if eps is None else f"{eps:.3f}")
        raise
    artifacts.save_model(served(final_arrays).to_torch_state_dict())
    # completed: every planned round; stopped: some rounds, then too few sites with budget (the privacy
    # promise working, a normal end); failed: no round aggregated since this start, nothing trained.
    rounds_done = int(final.get("round", done))
    status = "failed" if rounds_done <= done else "stopped" if stopped else "completed"
    if status == "failed" and stopped is None:
        stopped = "no round was aggregated"
    summary = artifacts.finish(
        rounds=rounds_done, sites=strategy.sites_last_round, final_accuracy=final["accuracy"],
        final_loss=final["loss"], privacy=sorted(strategy.site_privacy.values(), key=lambda p: p.site), stopped=stopped, status=status,
        client_epsilon=strategy.client_epsilon, rejected=strategy.rejected, unaggregated_spends=strategy.unaggregated_spends,
        rejected_by_site=strategy.rejected_by_site, max_update_norm=getattr(strategy, "max_update_norm", None),
        evaluation=summary_fields(final_scores.get("last"), best),
    )
    eps = summary["max_epsilon"]
    if status == "failed":
        # After summary.json and privacy.json are written: Flower records the run as finished:failed.
        raise FederationError(
            f"run {artifacts.run_id} failed: no round was aggregated after round {done} ({stopped}); "
            f"summary.json says status failed, privacy.json what the sites spent; artifacts in {artifacts.dir}"
        )
    log(INFO, "[fedmm] finished (%s): accuracy %.4f, max epsilon %s; artifacts in %s", status, summary["final_accuracy"], "none" if eps is None else f"{eps:.3f}", artifacts.dir)
