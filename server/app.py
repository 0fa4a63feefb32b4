"""Flower ServerApp: FedAvg over the sites, central evaluation, run artifacts.

Thin on purpose: configuration, strategy and artifacts live in ``fedmm``.
"""

from __future__ import annotations

from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedmm.artifacts import RunArtifacts, new_run_id
from fedmm.config import RunConfig
from fedmm.data.avmnist import load_test, resolve_root
from fedmm.federation import FedMMAvg, make_central_evaluation
from fedmm.models import build_model

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation described by the run config and write ``runs/<run-id>/``."""
    cfg = RunConfig.from_run_config(context.run_config)
    artifacts = RunArtifacts(cfg, cfg.run_name or new_run_id(context.run_id))
    log(INFO, "[fedmm] run %s: %d sites, %d rounds, dp=%s -> %s", artifacts.run_id, cfg.sites, cfg.rounds, cfg.dp, artifacts.dir)
    test = load_test(resolve_root(cfg.data))
    strategy = FedMMAvg(dp=cfg.dp, sites=cfg.sites)
    final: dict[str, float] = {}

    def on_round(server_round: int, loss: float, accuracy: float) -> None:
        final.update(loss=loss, accuracy=accuracy)
        if server_round == 0:
            log(INFO, "[fedmm] round 0 (initial model): accuracy %.4f, loss %.4f", accuracy, loss)
            return
        eps = strategy.max_epsilon
        artifacts.append_round(
            {
                "round": server_round, "accuracy": accuracy, "loss": loss,
                "train_loss": strategy.last_train_metrics.get("train-loss"),
                "sites": strategy.sites_last_round, "max_epsilon": eps,
                "delta": cfg.target_delta if cfg.dp else None,
            }
        )
        eps_text = f"max epsilon {eps:.3f} (delta={cfg.target_delta:g}, {cfg.accountant})" if eps is not None else "no DP"
        log(INFO, "[fedmm] round %d/%d: accuracy %.4f, loss %.4f, %s", server_round, cfg.rounds, accuracy, loss, eps_text)

    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(build_model(cfg.model, seed=cfg.seed).state_dict()),
        num_rounds=cfg.rounds,
        train_config=ConfigRecord({}),
        evaluate_fn=make_central_evaluation(cfg, test, on_round),
    )
    artifacts.save_model(result.arrays.to_torch_state_dict())
    summary = artifacts.finish(
        rounds=cfg.rounds, sites=strategy.sites_last_round, final_accuracy=final["accuracy"],
        final_loss=final["loss"], privacy=sorted(strategy.site_privacy.values(), key=lambda p: p.site),
    )
    log(INFO, "[fedmm] finished: accuracy %.4f, max epsilon %s; artifacts in %s", summary["final_accuracy"], summary["max_epsilon"], artifacts.dir)
