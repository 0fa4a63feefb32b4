"""Classification metrics against hand values, the server's per-round record, the best round, `fedmm evaluate`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from typer.testing import CliRunner

import server.app as server_app
from clients.app import app as client_app
from fedmm.cli import app
from fedmm.cli.evaluate import _mismatch, _print
from fedmm.config import RunConfig
from fedmm.data.schema import Schema
from fedmm.data.synthetic import SYNTHETIC_SCHEMA, make_synthetic
from fedmm.federation.artifacts import RunArtifacts
from fedmm.federation.central import BEST_STATE, BestRound, model_digest
from fedmm.models import ModelOptions, ModelRecipe
from fedmm.models.evaluation import evaluate, score, task_accuracies
from fedmm.models.metrics import classification_report, confusion_matrix
from fedmm.runtime.local import LocalGrid, stage_of


# ----------------------------------------------------------------- metrics by hand
def test_metrics_match_hand_computed_values_with_an_unpredicted_and_an_absent_class() -> None:
    # true a a a b b c c; predicted a a b b a a d. "c" is never predicted, "d" never occurs.
    report = classification_report([0, 0, 1, 1, 0, 0, 3], [0, 0, 0, 1, 1, 2, 2], ("a", "b", "c", "d"))

    assert report.confusion.tolist() == [[2, 1, 0, 0], [1, 1, 0, 0], [1, 0, 0, 1], [0, 0, 0, 0]]
    assert report.accuracy == pytest.approx(3 / 7) and report.samples == 7
    a, b, c, d = (report.per_class[k] for k in "abcd")
    assert (a.precision, a.recall, a.f1, a.support) == pytest.approx((2 / 4, 2 / 3, 4 / 7, 3))
    assert (b.precision, b.recall, b.f1, b.support) == pytest.approx((1 / 2, 1 / 2, 1 / 2, 2))
    assert (c.precision, c.recall, c.f1, c.support) == (0.0, 0.0, 0.0, 2)  # no predictions: precision 0, and it counts
    assert (d.precision, d.recall, d.f1, d.support) == (0.0, 0.0, 0.0, 0)  # absent: reported with support 0 ...
    assert report.macro_f1 == pytest.approx((4 / 7 + 1 / 2 + 0) / 3)  # ... and left out of the macro average
    as_json = report.to_json()
    assert as_json["per_class"]["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0} and as_json["classes"] == ["a", "b", "c", "d"]
    json.dumps(as_json)  # plain JSON types


def test_perfect_empty_and_out_of_range_inputs() -> None:
    perfect = classification_report([1, 0, 1], [1, 0, 1], ("x", "y"))
    assert perfect.accuracy == perfect.macro_f1 == 1.0
    empty = classification_report([], [], ("x", "y"))
    assert (empty.accuracy, empty.macro_f1, empty.confusion.tolist()) == (0.0, 0.0, [[0, 0], [0, 0]])
    with pytest.raises(ValueError, match="outside the 2 classes"):
        confusion_matrix([2], [0], 2)
    with pytest.raises(ValueError, match="1 predictions for 2 labels"):
        confusion_matrix([0], [0, 1], 2)


def test_score_agrees_with_evaluate_and_task_accuracies() -> None:
    recipe = ModelRecipe("concat", ModelOptions(width=16, tasks=(("cluster", 0.5),)))
    raw = make_synthetic(40, seed=3)
    data = recipe.prepare(raw.replace(label=np.where(np.arange(40) % 7 == 0, -1, raw.label)))  # some unlabelled
    model = recipe.build(data.schema, seed=1)

    result = score(model, data)
    loss, accuracy = evaluate(model, data)

    assert result.accuracy == pytest.approx(accuracy) and result.loss == pytest.approx(loss, rel=1e-5)
    assert result.tasks == pytest.approx(task_accuracies(model, data))
    assert result.report.samples == int((data.label >= 0).sum()) and list(result.report.per_class) == list(data.schema.classes)


def test_a_mismatched_schema_says_which_classes_or_modality() -> None:
    other = Schema(SYNTHETIC_SCHEMA.modalities[:1], ("class-0", "zebra"))
    assert "missing ['class-1'" in (_mismatch(SYNTHETIC_SCHEMA, other) or "") and "['zebra']" in (_mismatch(SYNTHETIC_SCHEMA, other) or "")
    same_classes = Schema(SYNTHETIC_SCHEMA.modalities[:1], SYNTHETIC_SCHEMA.classes)
    assert "no modality 'audio'" in (_mismatch(SYNTHETIC_SCHEMA, same_classes) or "")
    assert _mismatch(SYNTHETIC_SCHEMA, SYNTHETIC_SCHEMA) is None


def test_the_printout_never_reads_class_names_as_markup(capsys: pytest.CaptureFixture[str]) -> None:
    report = classification_report([0, 1], [0, 0], ("[bold]cat", "dog[/]"))
    _print({"run": "r", "model": "model.pt", "data": "x", "split": "test", "synthetic": False, "loss": 0.5, "tasks": {}, **report.to_json()})

    out = capsys.readouterr().out
    assert "[bold]cat" in out and "dog[/]" in out and "macro-F1 0.6667" in out
    assert max(len(line) for line in out.splitlines()) <= 80


# ----------------------------------------------------------------- a real (in-process) federation
class ServerKilled(Exception):
    """Stands for the server process dying at that moment."""


def _run(cfg: RunConfig, *, kill_at: int | None = None) -> None:
    run_config = cfg.to_run_config()

    def kill(node: int, msg: object) -> bool:
        plain = msg.content.config_records.get("config")  # type: ignore[attr-defined]
        if kill_at is not None and plain is not None and int(plain["server-round"]) == kill_at and stage_of(msg) == "plain":  # type: ignore[arg-type]
            raise ServerKilled(f"killed at round {kill_at}")
        return False

    grid = LocalGrid(client_app, [{"partition-id": i, "num-partitions": cfg.sites} for i in range(cfg.sites)], run_config, drop=kill)
    server_app.main(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=run_config))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three rounds of 3 DP sites on synthetic data; the server dies after round 2's checkpoint and resumes."""
    root = tmp_path_factory.mktemp("runs")
    cfg = RunConfig(data="synthetic:300", sites=3, rounds=3, runs_dir=str(root), run_name="run", noise_multiplier=1.5, target_epsilon=50.0)
    with pytest.raises(ServerKilled):
        _run(cfg, kill_at=3)
    run = root / "run"
    checkpoint = json.loads((run / "checkpoint.json").read_text())
    best = BestRound.from_state(checkpoint["state"][BEST_STATE])
    assert checkpoint["round"] == 2 and best.round in (1, 2)
    assert model_digest(torch.load(run / "model-best.pt", weights_only=True)) == best.digest  # written with the checkpoint
    (run / "before-resume.json").write_text(json.dumps(best.to_state()))
    _run(cfg.replace(resume=True))
    return run


def test_every_round_records_macro_f1_per_class_confusion_and_participants(run_dir: Path) -> None:
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    for r in rounds:
        assert 0.0 <= r["macro_f1"] <= 1.0 and list(r["per_class"]) == list(SYNTHETIC_SCHEMA.classes)
        assert sum(map(sum, r["confusion"])) == 75 == sum(c["support"] for c in r["per_class"].values())  # the held-out set
        assert r["accuracy"] == pytest.approx(sum(r["confusion"][k][k] for k in range(10)) / 75)
        assert r["participants"] is not None and len(r["participants"]) == r["sites"] == 3  # dp=true, plain: the sites' own names
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_macro_f1"] == rounds[-1]["macro_f1"] and summary["per_class"] == rounds[-1]["per_class"]
    assert summary["confusion"] == rounds[-1]["confusion"] and summary["classes"] == list(SYNTHETIC_SCHEMA.classes)


def test_the_best_round_is_saved_and_kept_over_a_resume(run_dir: Path) -> None:
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    top = max(rounds, key=lambda r: (r["accuracy"], r["macro_f1"], -r["round"]))
    assert (summary["best_round"], summary["best_accuracy"], summary["best_macro_f1"]) == (top["round"], top["accuracy"], top["macro_f1"])
    before = json.loads((run_dir / "before-resume.json").read_text())
    if summary["best_round"] != 3:  # round 3 did not beat it: the record from before the restart stands
        assert summary["best_round"] == before["round"]
    best = BestRound.from_state(json.loads((run_dir / "checkpoint.json").read_text())["state"][BEST_STATE])
    assert best.round == summary["best_round"] and model_digest(torch.load(run_dir / "model-best.pt", weights_only=True)) == best.digest
    assert (run_dir / "model.pt").is_file() and not list(run_dir.glob("*.tmp"))


def test_a_best_model_lost_between_checkpoint_and_file_is_rewritten_on_resume(run_dir: Path, tmp_path: Path) -> None:
    run = Path(shutil.copytree(run_dir, tmp_path / "run"))
    cfg = RunConfig(data="synthetic:300", sites=3, rounds=3, runs_dir=str(tmp_path), run_name="run", resume=True)
    artifacts = RunArtifacts(cfg, "run", resume=True)
    done, arrays, _ = artifacts.load_checkpoint()
    (run / "model-best.pt").unlink()
    best = BestRound(done, 0.5, 0.5, model_digest(arrays))  # the checkpoint names its own round as best; the file never came

    assert "rewritten" in (best.keep_on_resume(artifacts, checkpoint_round=done, arrays=arrays) or "")
    assert model_digest(torch.load(run / "model-best.pt", weights_only=True)) == best.digest
    assert best.keep_on_resume(artifacts, checkpoint_round=done, arrays=arrays) is None
    older = BestRound(done - 1, 0.5, 0.5, "not-this-one")
    assert "not the model of round" in (older.keep_on_resume(artifacts, checkpoint_round=done, arrays=arrays) or "")


# ----------------------------------------------------------------- fedmm evaluate
def test_fedmm_evaluate_prints_and_writes_json(run_dir: Path) -> None:
    shown = CliRunner().invoke(app, ["evaluate", str(run_dir)])
    as_json = CliRunner().invoke(app, ["evaluate", str(run_dir), "--json"])
    best = CliRunner().invoke(app, ["evaluate", str(run_dir), "--model", "best", "--split", "all", "--json"])

    assert shown.exit_code == 0, shown.output
    assert "macro-F1" in shown.output and "class-9" in shown.output and "confusion (rows" in shown.output and "SYNTHETIC" in shown.output
    assert max(len(line) for line in shown.output.splitlines()) <= 80
    result = json.loads(as_json.output)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert result["model"] == "model.pt" and result["split"] == "test" and result["samples"] == 75
    assert result["accuracy"] == pytest.approx(summary["final_accuracy"]) and result["macro_f1"] == pytest.approx(summary["final_macro_f1"])
    assert result["confusion"] == summary["confusion"]  # the server's own figures, rebuilt from the folder
    other = json.loads(best.output)
    assert other["model"] == "model-best.pt" and other["samples"] == 375 and other["accuracy"] >= 0


def test_fedmm_evaluate_errors_say_what_is_wrong(run_dir: Path, tmp_path: Path) -> None:
    missing_run = CliRunner().invoke(app, ["evaluate", str(tmp_path / "nope")])
    no_model = tmp_path / "unfinished"
    shutil.copytree(run_dir, no_model)
    (no_model / "model.pt").unlink()
    unfinished = CliRunner().invoke(app, ["evaluate", str(no_model)])
    wrong_data = CliRunner().invoke(app, ["evaluate", str(run_dir), "--data", "basicmotions", "--split", "all"])

    said = {name: "".join(result.output.splitlines()) for name, result in (("run", missing_run), ("model", unfinished), ("data", wrong_data))}
    assert missing_run.exit_code == 1 and "no run folder" in said["run"]
    assert unfinished.exit_code == 1 and "model.pt" in said["model"] and "--model best" in said["model"]
    assert wrong_data.exit_code == 1 and "does not fit the model" in said["data"] and "'image'" in said["data"], said["data"]
