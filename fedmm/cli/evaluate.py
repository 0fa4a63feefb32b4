"""``fedmm evaluate RUN``: score a run's saved model on its held-out data, or on other data.

The model is rebuilt from the run's own resolved ``config.toml`` (:class:`fedmm.plan.RunPlan`)
and its input schema in ``model_card.json``, with the weights of ``model.pt`` (``--model
last``, the default) or ``model-best.pt`` (``--model best``). The data is the run's own
``data`` (``--data`` names another source: ``manifest:PATH``, ``basicmotions:ROOT``, ...),
its held-out split (``--split test``) or every row (``--split all``), preprocessed and
normalised as the run's sites and server did. The output: accuracy, macro-F1, loss, a
per-class table (precision, recall, F1, support) and the confusion matrix; ``--json`` gives
the same as one JSON object (conventions: :mod:`fedmm.models.metrics`).
"""

from __future__ import annotations

import json
import tomllib
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from fedmm.cli.common import absolute_data, app, console, exit_on_error
from fedmm.config import RunConfig
from fedmm.errors import DataError

if TYPE_CHECKING:
    from fedmm.data.schema import MultimodalDataset, Schema

__all__ = ["evaluate", "evaluate_run", "Split", "Which"]

_CONFUSION_MAX = 12  # classes the confusion matrix shows at 80 columns; more: --json


class Split(str, Enum):
    """Which rows of the data to score."""

    test = "test"
    all = "all"


class Which(str, Enum):
    """Which of the run's models to score."""

    last = "last"
    best = "best"


def _normalise(cfg: RunConfig, dataset: MultimodalDataset) -> MultimodalDataset:
    """The one place ``fedmm evaluate`` normalises data: as the run's server normalised its held-out set."""
    from fedmm.data.normalise import normalise

    return normalise(dataset, sensor_norm=cfg.sensor_norm, site_statistics=not cfg.dp, held_out=True)


def _concat(a: MultimodalDataset, b: MultimodalDataset) -> MultimodalDataset:
    """``a``'s rows then ``b``'s (the same source, so the same schema)."""
    import numpy as np

    if not len(a):
        return b
    groups = {k: np.concatenate([a.groups[k], b.groups[k]]) for k in a.groups if k in b.groups}
    return a.replace(
        features={k: np.concatenate([a.features[k], b.features[k]]) for k in a.features}, present=np.concatenate([a.present, b.present]),
        label=np.concatenate([a.label, b.label]), groups=groups, ids=a.ids + b.ids if a.ids and b.ids else (),
    )


def _mismatch(model: Schema, data: Schema) -> str | None:
    """What makes ``data`` unfit for a model trained on ``model``'s schema, or None."""
    if data.classes != model.classes:
        missing = [c for c in model.classes if c not in data.classes]
        extra = [c for c in data.classes if c not in model.classes]
        if missing or extra:
            return f"its classes differ from the model's: missing {missing or 'none'}, not in the model {extra or 'none'}"
        return f"its classes are in another order than the model's ({list(data.classes)} against {list(model.classes)})"
    ours = {m.name: m for m in data.modalities}
    for m in model.modalities:
        got = ours.get(m.name)
        if got is None:
            return f"it has no modality {m.name!r} (the model takes {', '.join(x.name for x in model.modalities)}; the data has {', '.join(ours) or 'none'})"
        if (got.shape, got.representation) != (m.shape, m.representation):
            return f"its modality {m.name!r} is {got.representation} {list(got.shape)}, the model takes {m.representation} {list(m.shape)}"
    return None


def evaluate_run(run_dir: Path, *, data: str | None = None, split: Split | str = Split.test, which: Which | str = Which.last) -> dict[str, Any]:
    """Score a run's model (``which``) on ``data`` (default: the run's own) and return the JSON-ready result.

    Raises
    ------
    DataError
        For a missing run folder, config or model, or data whose classes or modalities the model does not take.
    ConfigError
        For a ``config.toml`` or ``--data`` value fedmm refuses.
    """
    from fedmm.data.schema import Schema
    from fedmm.data.sources import load_source
    from fedmm.federation.artifacts import BEST_MODEL, MODEL
    from fedmm.models.evaluation import score
    from fedmm.plan import RunPlan
    import torch

    split, which = Split(split), Which(which)
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise DataError(run_dir, "no run folder here", fix="give a run's folder, e.g. runs/<run-id> (see `ls runs`)")
    config = run_dir / "config.toml"
    if not config.is_file():
        raise DataError(config, "the run folder has no config.toml", fix="give the folder a run wrote (it holds config.toml and model.pt)")
    weights = run_dir / (BEST_MODEL if which is Which.best else MODEL)
    if not weights.is_file():
        why = ("no round of the run was scored and kept as best (or fedmm before 0.3 wrote the run)" if which is Which.best
               else "the run did not finish (a failed or running run has no final model)")
        other = "--model last" if which is Which.best else "--model best, if a round was kept"
        raise DataError(weights, f"no {which.value} model: {why}", fix=f"try {other}, or resume the run to finish it")
    cfg = RunConfig.from_run_config(tomllib.loads(config.read_text()))
    plan = RunPlan.from_config(cfg)
    spec = absolute_data(data) if data else cfg.data
    source = load_source(spec, plan.preprocessing, classes=cfg.class_list, lenient=cfg.lenient, test_fraction=cfg.test_fraction)
    dataset = source.require_test() if split is Split.test else _concat(source.pool, source.test) if source.test is not None else source.pool
    dataset = _normalise(cfg, dataset)
    card = run_dir / "model_card.json"
    model_schema = Schema.from_json(json.dumps(json.loads(card.read_text())["schema"])) if card.is_file() else None
    if model_schema is not None:
        names = set(dataset.schema.names)
        lost = [m.name for m in model_schema.modalities if m.name not in names]
        if lost:
            raise DataError(spec, f"the data does not fit the model: it has no modality {', '.join(map(repr, lost))} (it has {', '.join(sorted(names)) or 'none'})",
                            fix="evaluate data with the modalities the run trained on")
    prepared = plan.model.prepare(dataset, tasks_from=model_schema)
    model_schema = model_schema or prepared.schema
    problem = _mismatch(model_schema, prepared.schema)
    if problem:
        raise DataError(spec, f"the data does not fit the model: {problem}", fix="evaluate data of the run's classes and modalities")
    model = plan.model.build(model_schema, seed=cfg.seed)
    try:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    except (RuntimeError, KeyError) as err:
        raise DataError(weights, f"the saved model does not fit the model config.toml builds ({str(err).splitlines()[0]})",
                        fix="evaluate the folder as the run wrote it (config.toml, model_card.json and the model together)") from err
    result = score(model, prepared)
    return {
        "run": str(run_dir), "model": weights.name, "data": spec, "split": split.value, "synthetic": bool(prepared.synthetic),
        **result.report.to_json(), "loss": result.loss, "tasks": result.tasks,
    }


def _cell(value: object) -> Text:
    return Text(str(value))  # never markup: class names may hold '['


def _print(result: dict[str, Any]) -> None:
    classes = result["classes"]
    console.print(
        f"run {result['run']}: {result['model']} on {result['data']} ({result['split']} split, {result['samples']} labelled samples"
        + (", SYNTHETIC data" if result["synthetic"] else "") + ")", markup=False, highlight=False,
    )
    tasks = "".join(f", {name} accuracy {value:.4f}" for name, value in result["tasks"].items())
    console.print(f"accuracy {result['accuracy']:.4f}, macro-F1 {result['macro_f1']:.4f}, loss {result['loss']:.4f}{tasks}", markup=False, highlight=False)
    table = Table(title=_cell("per class"), show_edge=False)
    for column in ("#", "class", "precision", "recall", "F1", "support"):
        table.add_column(column, justify="left" if column == "class" else "right", overflow="fold", max_width=40 if column == "class" else None)
    for k, name in enumerate(classes):
        s = result["per_class"][name]
        table.add_row(_cell(k), _cell(name), _cell(f"{s['precision']:.4f}"), _cell(f"{s['recall']:.4f}"), _cell(f"{s['f1']:.4f}"), _cell(s["support"]))
    console.print(table)
    if len(classes) > _CONFUSION_MAX:
        console.print(f"confusion matrix: {len(classes)} classes do not fit 80 columns; see --json", markup=False, highlight=False)
        return
    matrix = Table(title=_cell("confusion (rows: true #, columns: predicted #)"), show_edge=False, pad_edge=False)
    matrix.add_column("true", justify="right")
    for k in range(len(classes)):
        matrix.add_column(str(k), justify="right")
    for k, row in enumerate(result["confusion"]):
        matrix.add_row(_cell(k), *(_cell(v) for v in row))
    console.print(matrix)


@app.command()
def evaluate(
    run: Annotated[Path, typer.Argument(help="the run's folder, runs/<run-id>")],
    data: Annotated[str | None, typer.Option("--data", help="other data to score: manifest:PATH, basicmotions:ROOT, avmnist:ROOT, synthetic:N (default: the run's own)")] = None,
    split: Annotated[Split, typer.Option("--split", help="the data's held-out rows (test) or every row (all)")] = Split.test,
    model: Annotated[Which, typer.Option("--model", help="the final model (last: model.pt) or the best round's (best: model-best.pt)")] = Which.last,
    json_: Annotated[bool, typer.Option("--json", help="one JSON object, for machines")] = False,
) -> None:
    """Score a run's saved model: accuracy, macro-F1, per-class precision/recall/F1 and the confusion matrix."""
    with exit_on_error():
        result = evaluate_run(run, data=data, split=split, which=model)
    if json_:
        typer.echo(json.dumps(result, indent=2))
    else:
        _print(result)
