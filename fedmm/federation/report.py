"""A run's report: one self-contained HTML page of ``runs/<run-id>/`` (``fedmm report RUN``).

It reads the run's artifacts (``config.toml``, ``metrics.jsonl``, ``summary.json``, ``privacy.json``,
``federation.json``) and shows: the run in a header (data, DP, epsilon against its target, rounds, why it
stopped); accuracy, macro-F1, loss and epsilon per round; which site was aggregated, refused or rejected in
which round; the final model's confusion matrix and per-class scores; each site's privacy; the best round
against the last. Plots are drawn with matplotlib (Agg) and inlined as PNG: no script, no network.

A field an older fedmm did not record is said to be missing, never guessed; a failed run (no ``summary.json``) gets
a page that says so. Every string from the artifacts is escaped (:func:`html.escape`; in plots :func:`_plain`).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import tomllib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from fedmm import __version__
from fedmm.errors import DataError

__all__ = ["RunFiles", "load_run", "render_report", "write_report", "NOT_RECORDED"]

NOT_RECORDED = "not recorded by this fedmm version"
# Participation states, in the grid's colour order.
STATES = ("aggregated", "refused", "rejected", "absent", "not recorded")
COLOURS = ("#2e7d32", "#f9a825", "#c62828", "#e0e0e0", "#ffffff")
e = html.escape


@dataclass
class RunFiles:
    """What a run folder holds, each part None (or empty) when missing; ``notes`` say what could not be read."""

    path: Path
    config: dict[str, Any] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] | None = None
    privacy: dict[str, Any] | None = None
    federation: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    failed = property(lambda self: self.summary is None, doc="no summary.json: the run did not finish")

    def last(self, name: str) -> Any:
        """The last recorded value of a per-round field, or None."""
        return next((r[name] for r in reversed(self.rounds) if r.get(name) is not None), None)


def load_run(path: Path | str) -> RunFiles:
    """Read a run folder.

    Raises
    ------
    DataError
        When ``path`` is not a folder, or holds neither ``metrics.jsonl`` nor ``summary.json`` (a run that ended before its first round).
    """
    path = Path(path).expanduser()
    fix = "give the folder a run wrote, <runs-dir>/<run-id>/ (by default runs/<run-id>/; `ls runs/` lists them)"
    if not path.is_dir():
        raise DataError(path, "no such run folder", fix=fix)
    if not (path / "metrics.jsonl").is_file() and not (path / "summary.json").is_file():
        if (path / "config.toml").is_file():  # in (or ended in) its first round: `fedmm status` says which
            raise DataError(path, "is a run without a finished round: nothing to report yet", fix=f"`fedmm status {path}` says how it stands")
        raise DataError(path, "is not a fedmm run folder: it has neither metrics.jsonl nor summary.json", fix=fix)
    run = RunFiles(path)
    for name in ("config.toml", "summary.json", "privacy.json", "federation.json"):
        try:
            text = (path / name).read_text(encoding="utf-8") if (path / name).is_file() else None
            value = None if text is None else tomllib.loads(text) if name.endswith(".toml") else json.loads(text)
        except (OSError, ValueError) as err:
            text, value = None, None
            run.notes.append(f"{name} could not be read ({err}); left out")
        if isinstance(value, dict):
            setattr(run, name.partition(".")[0], value)
        elif text is not None:
            run.notes.append(f"{name} holds no JSON object; left out")
    lines = (path / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if (path / "metrics.jsonl").is_file() else []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("round"), int):
            run.rounds.append(record)
        elif line.strip():
            run.notes.append(f"metrics.jsonl line {number} is not a round's record; left out")
    return run


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _num(value: Any, spec: str = ".4f") -> str:
    if value is None:
        return "–"
    return format(value, spec) if _finite(value) else e(str(value))


def _plain(text: Any, limit: int = 0) -> str:
    """A data string for a matplotlib label: ``$`` kept literal, cut to ``limit`` characters."""
    text = str(text)
    if limit and len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("$", r"\$")


def _site_key(name: str) -> tuple[int, Any]:
    return (0, int(name)) if name.isdigit() else (1, name)


def _pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (no screen), imported when first drawing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any, alt: str) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    return f"<img alt='{e(alt)}' src='data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}'>"


def _series(run: RunFiles, name: str) -> tuple[list[int], list[float]] | None:
    """Rounds and values of a per-round field (NaN where missing), or None when no round has it."""
    if not any(_finite(r.get(name)) for r in run.rounds):
        return None
    return [r["round"] for r in run.rounds], [float(r[name]) if _finite(r.get(name)) else math.nan for r in run.rounds]


def _missing(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#666", wrap=True)
    ax.set(xticks=[], yticks=[])


def curves_plot(run: RunFiles) -> str:
    """Accuracy, macro-F1, loss and epsilon per round: four panels (PNG ``<img>``)."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    marker = "o" if len(run.rounds) <= 30 else None
    panels = (
        (axes[0, 0], "Accuracy (server's test set)", "accuracy", [("accuracy", "accuracy")] + [(k, k.removeprefix("accuracy_") + " accuracy") for k in sorted({k for r in run.rounds for k in r if k.startswith("accuracy_")})]),
        (axes[0, 1], "Macro-F1 (server's test set)", "macro-F1", [("macro_f1", "macro-F1")]),
        (axes[1, 0], "Loss", "loss", [("loss", "test loss (server)"), ("train_loss", "train loss (mean over sites)")]),
        (axes[1, 1], "Privacy spent", "epsilon", [("max_epsilon", "max epsilon over sites (lifetime)"), ("client_epsilon", "client-level epsilon")]),
    )
    target: Any = run.config.get("target-epsilon") if run.config.get("dp", True) else None
    for ax, title, ylabel, fields in panels:
        ax.set_title(title)
        drawn = [(label, s) for name, label in fields if (s := _series(run, name)) is not None]
        if not drawn:
            why = NOT_RECORDED
            if ylabel == "epsilon" and run.config.get("dp") is False:
                why = "dp=false: no sample-level DP, no epsilon"
            _missing(ax, f"{ylabel}: {why}" if run.rounds else "no round completed")
            continue
        for label, (xs, ys) in drawn:
            ax.plot(xs, ys, marker=marker, markersize=4, label=label)
        if ylabel == "epsilon" and _finite(target):
            ax.axhline(float(target), color="#c62828", linestyle="--", linewidth=1.2, label=f"target epsilon {float(target):g} (this run's)")
        if ylabel in ("accuracy", "macro-F1"):
            ax.set_ylim(0, 1.02)
        ax.set(xlabel="round", ylabel=ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return _png(fig, "accuracy, macro-F1, loss and epsilon per round")


def site_names(run: RunFiles) -> list[str]:
    names: set[str] = set((run.federation or {}).get("sites", {}) or {})
    names |= {str(p.get("site")) for p in (run.privacy or {}).get("sites", []) or [] if isinstance(p, dict) and p.get("site") is not None}
    for r in run.rounds:
        names |= {str(s) for s in r.get("participants") or []} | {str(s) for s in r.get("rejected_by") or {}}
    return sorted(names, key=_site_key)


def participation(run: RunFiles, sites: list[str]) -> np.ndarray:
    """A site x round grid of indexes into :data:`STATES`.

    Rejected (``rejected_by``) wins; a round without ``participants`` is "not recorded";
    a site in it is aggregated; a site that refused (``privacy.json``) is "refused" in every
    round after its last aggregated one (a site that refuses is not asked again); else absent.
    """
    refused = {str(p.get("site")) for p in (run.privacy or {}).get("sites", []) or [] if isinstance(p, dict) and p.get("refused")}
    grid = np.full((len(sites), len(run.rounds)), STATES.index("not recorded"))
    last_in: dict[str, int] = {}
    for j, r in enumerate(run.rounds):
        taking = r.get("participants")
        rejected = {str(s) for s in r.get("rejected_by") or {}}
        for i, site in enumerate(sites):
            if site in rejected:
                grid[i, j] = STATES.index("rejected")
            elif taking is None:
                continue
            elif site in {str(s) for s in taking}:
                grid[i, j] = STATES.index("aggregated")
                last_in[site] = r["round"]
            else:
                grid[i, j] = STATES.index("absent")
    for i, site in enumerate(sites):
        if site in refused:
            for j, r in enumerate(run.rounds):
                if grid[i, j] == STATES.index("absent") and r["round"] > last_in.get(site, 0):
                    grid[i, j] = STATES.index("refused")
    return grid


def participation_plot(run: RunFiles, sites: list[str], grid: np.ndarray) -> str:
    plt = _pyplot()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    rounds = [r["round"] for r in run.rounds]
    fig, ax = plt.subplots(figsize=(min(14.0, 3 + 0.4 * len(rounds)), min(12.0, 1.4 + 0.32 * len(sites))))
    ax.imshow(grid, cmap=ListedColormap(COLOURS), vmin=-0.5, vmax=len(STATES) - 0.5, aspect="auto", interpolation="nearest")
    step = max(1, len(rounds) // 25)
    ax.set_xticks(range(0, len(rounds), step), [str(x) for x in rounds[::step]])
    ax.set_yticks(range(len(sites)), [_plain(s, 24) for s in sites], fontsize=9 if len(sites) <= 30 else 6)
    ax.set_xticks(np.arange(-0.5, len(rounds)), minor=True)
    ax.set_yticks(np.arange(-0.5, len(sites)), minor=True)
    ax.grid(which="minor", color="#9e9e9e", linewidth=0.5)
    ax.tick_params(which="minor", length=0)
    ax.set(xlabel="round", ylabel="site")
    used = sorted(set(grid.ravel().tolist()))
    ax.legend(handles=[Patch(facecolor=COLOURS[k], edgecolor="#9e9e9e", label=STATES[k]) for k in used],
              loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    ax.set_title("Participation: site x round")
    return _png(fig, "participation per site and round")


def class_names(run: RunFiles, size: int) -> list[str]:
    names = (run.summary or {}).get("classes")
    if not names:
        per_class = (run.summary or {}).get("per_class") or run.last("per_class") or {}
        names = list(per_class)
    names = [str(n) for n in names or []]
    return names if len(names) == size else [str(k) for k in range(size)]


def confusion_plot(matrix: np.ndarray, names: list[str]) -> str:
    plt, n = _pyplot(), len(names)
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros(matrix.shape, float), where=rows > 0)
    side = max(4.5, min(16.0, 2.5 + 0.6 * n))
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    labels = [_plain(name, 20) for name in names]
    ax.set_xticks(range(n), labels, rotation=45, ha="right", rotation_mode="anchor", fontsize=9 if n <= 20 else 7)
    ax.set_yticks(range(n), labels, fontsize=9 if n <= 20 else 7)
    for (i, j), count in np.ndenumerate(matrix if n <= 30 else np.zeros((0, 0))):
        ax.text(j, i, str(int(count)), ha="center", va="center", fontsize=9 if n <= 15 else 6, color="white" if share[i, j] > 0.55 else "black")
    ax.set(xlabel="predicted class", ylabel="true class")
    ax.set_title("Confusion matrix of the final model (counts; colour: share of the true class)")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the row (recall on the diagonal)")
    return _png(fig, "confusion matrix of the final model")


def _table(header: list[str] | None, rows: list[list[str]], cls: str = "") -> str:
    """A table of cells already escaped (``header`` None: no header row)."""
    head = "<tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table class='{cls}'>{head}{body}</table>"


def _header(run: RunFiles) -> str:
    cfg, summary = run.config, run.summary or {}
    run_id = summary.get("run_id") or cfg.get("run-name") or run.path.name
    if run.failed:
        status = ("failed", "This run failed: it left no summary.json. Shown here is what it left: "
                  f"{len(run.rounds)} round(s) of metrics" + (", privacy.json (the spends the server saw)" if run.privacy else "") + ".")
    elif summary.get("stopped"):
        status = ("stopped", f"Stopped early: {summary['stopped']}")
    else:
        status = ("completed", "Completed.")
    dp = cfg.get("dp", summary.get("dp"))
    eps = summary.get("max_epsilon") if not run.failed else run.last("max_epsilon")
    delta = summary.get("delta") or run.last("delta") or cfg.get("target-delta")
    accountant = summary.get("accountant") or cfg.get("accountant")
    if dp is False:
        privacy = "none (dp=false: the sites' records are not protected by DP-SGD)"
    else:
        # max_epsilon: the largest site's lifetime figure; the per-run target is set against the server's figure for this run
        this_run = [float(v) for p in (run.privacy or {}).get("sites", []) or [] if isinstance(p, dict) and isinstance(v := p.get("epsilon_server"), (int, float))]
        privacy = (f"stated epsilon {_num(eps, '.3f')} (the largest site's lifetime figure, earlier runs included), at delta "
                   f"{_num(delta, 'g')} ({e(str(accountant or 'accountant not recorded'))}); this run alone "
                   + (f"{_num(max(this_run), '.3f')} (the server's own accountant of each site)" if this_run else "not recorded")
                   + f" against its target {_num(cfg.get('target-epsilon'), 'g')}")
    if summary.get("client_epsilon") is not None:
        privacy += f"; client-level epsilon {_num(summary['client_epsilon'], '.3f')} at delta {_num(summary.get('client_delta'), 'g')}"
    done = summary.get("rounds", len(run.rounds))
    planned = summary.get("rounds_planned", cfg.get("rounds"))
    run_version = summary.get("fedmm_version")
    f1 = summary.get("final_macro_f1", run.last("macro_f1"))
    rows = [
        ["run", e(str(run_id))], ["folder", e(str(run.path))], ["data", e(str(cfg.get("data", "not recorded")))],
        ["model", e(str(cfg.get("model", "not recorded")))], ["sites", e(f"{cfg.get('sites', 'not recorded')}" + (f" ({summary['sites']} in the last round)" if "sites" in summary else ""))],
        ["DP", privacy], ["secure aggregation", {None: "not recorded", True: "yes", False: "no"}.get(cfg.get("secure-aggregation", summary.get("secure_aggregation")), "?")],
        ["rounds", f"{e(str(done))} done of {e(str(planned if planned is not None else 'unknown'))} planned"],
        ["last accuracy" if run.failed else "final accuracy", _num(summary.get("final_accuracy", run.last("accuracy")))],
        ["last macro-F1" if run.failed else "final macro-F1", _num(f1) if f1 is not None else NOT_RECORDED],
        ["fedmm version", e(f"{__version__} (this report); the run's: {run_version or 'not in summary.json'}")],
        ["report date", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")],
    ]
    return (f"<h1>fedmm run {e(str(run_id))}</h1><p class='status {status[0]}'>{e(status[1])}</p>"
            + _table(None, rows, "meta"))


def _classes_section(run: RunFiles) -> str:
    summary = run.summary or {}
    confusion = summary.get("confusion") or run.last("confusion")
    per_class = summary.get("per_class") or run.last("per_class")
    parts = ["<h2>The final model, per class</h2>"]
    matrix = None
    try:
        matrix = np.asarray(confusion, dtype=float) if confusion else None
        if matrix is not None and (matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or not np.isfinite(matrix).all()):
            parts.append("<p>The recorded confusion matrix is not a square table of counts; left out.</p>")
            matrix = None
    except (TypeError, ValueError):
        parts.append("<p>The recorded confusion matrix could not be read; left out.</p>")
    if matrix is not None:
        names = class_names(run, matrix.shape[0])
        source = "summary.json" if summary.get("confusion") else "the last round of metrics.jsonl"
        parts.append(f"<p>Rows: true class; columns: predicted class (from {source}).</p>" + confusion_plot(matrix, names))
    else:
        parts.append(f"<p>Confusion matrix: {NOT_RECORDED}.</p>")
    if isinstance(per_class, dict) and per_class:
        order = [n for n in (summary.get("classes") or []) if n in per_class] or list(per_class)
        order += [n for n in per_class if n not in order]
        scores = {name: per_class[name] if isinstance(per_class[name], dict) else {} for name in order}
        rows = [[e(str(name))] + [_num(scores[name].get(k), "g" if k == "support" else ".4f") for k in ("precision", "recall", "f1", "support")] for name in order]
        parts.append(_table(["class", "precision", "recall", "F1", "support (test samples)"], rows, "num"))
    else:
        parts.append(f"<p>Per-class precision, recall and F1: {NOT_RECORDED}.</p>")
    return "".join(parts)


def _privacy_section(run: RunFiles) -> str:
    parts = ["<h2>Privacy per site</h2>"]
    sites = [p for p in (run.privacy or {}).get("sites", []) or [] if isinstance(p, dict)]
    if run.privacy is None:
        parts.append("<p>No privacy.json in the run folder.</p>")
    elif not sites:
        parts.append("<p>No site reported a privacy spend" + (" (dp=false)." if run.config.get("dp") is False else ".") + "</p>")
    else:
        rows = [[e(str(p.get("site"))), _num(p.get("epsilon"), ".3f"), _num(p.get("epsilon_budget"), "g"), _num(p.get("delta"), "g"),
                 e(str(p.get("accountant") or "–")), _num(p.get("noise_multiplier"), ".4f"), _num(p.get("sample_rate"), ".4f"),
                 e(str(p.get("steps", "–"))), _num(p.get("epsilon_site"), ".3f"), _num(p.get("epsilon_server"), ".3f"),
                 e(str(p.get("ledger_seq", "–"))), "yes" if p.get("refused") else "–"]
                for p in sorted(sites, key=lambda p: _site_key(str(p.get("site"))))]
        parts.append(_table(["site", "epsilon", "budget", "delta", "accountant", "noise multiplier", "sample rate", "steps",
                             "stated by site", "server's figure", "ledger entry", "refused"], rows, "num"))
        parts.append("<p>epsilon is the larger of the site's stated figure and the server's own; the budget is the site's lifetime budget.</p>")
        parts += [f"<p>Site {e(str(p.get('site')))} refused: {e(str(p['refused']))}</p>" for p in sites if p.get("refused")]
    client = (run.privacy or {}).get("client_level")
    if isinstance(client, dict):
        parts.append(f"<p>Client-level DP: epsilon {_num(client.get('epsilon'), '.3f')} at delta {_num(client.get('delta'), 'g')}, "
                     f"noise multiplier {_num(client.get('noise_multiplier'), 'g')}, clip norm {_num(client.get('clip_norm'), 'g')}.</p>")
    return "".join(parts)


def _best_section(run: RunFiles) -> str:
    summary = run.summary or {}
    if not run.rounds:
        return "<h2>Best round and last round</h2><p>No round completed.</p>"
    best, how = summary.get("best_round"), "summary.json's best_round"
    if not isinstance(best, int):
        scored = [r for r in run.rounds if _finite(r.get("accuracy"))]
        best = max(scored, key=lambda r: r["accuracy"])["round"] if scored else None
        how = f"the highest accuracy in metrics.jsonl (best round {NOT_RECORDED})"
    by_round, rows = {r["round"]: r for r in run.rounds}, []
    for label, number in (("best", best), ("last", run.rounds[-1]["round"])):
        r = by_round.get(number, {})
        rows.append([label, e(str(number)), _num(r.get("accuracy")), "not recorded" if r.get("macro_f1") is None else _num(r["macro_f1"]),
                     _num(r.get("loss")), _num(r.get("max_epsilon"), ".3f")])
    text = f"<p>Best round by {e(how)}."
    if _finite(summary.get("best_accuracy")) or _finite(summary.get("best_macro_f1")):
        text += f" Recorded best accuracy {_num(summary.get('best_accuracy'))}, best macro-F1 {_num(summary.get('best_macro_f1'))}."
    return "<h2>Best round and last round</h2>" + text + "</p>" + _table(["", "round", "accuracy", "macro-F1", "loss", "max epsilon"], rows, "num")


STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:1150px;color:#212121}h2{margin-top:1.6em;border-bottom:1px solid #ddd}"
    "table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:4px 8px}th{background:#f5f5f5}"
    "table.num td+td{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}table.meta td:first-child{font-weight:bold}"
    "img{max-width:100%;height:auto}.status{padding:.6em 1em;border-radius:4px;font-weight:bold}"
    ".completed{background:#e8f5e9}.stopped{background:#fff8e1}.failed{background:#ffebee;color:#b71c1c}"
)


def render_report(run: RunFiles | Path | str) -> str:
    """The report of a run folder (or of a :class:`RunFiles` already read) as one HTML page."""
    if not isinstance(run, RunFiles):
        run = load_run(run)
    parts = [_header(run), "<h2>Per round</h2>"]
    parts.append(curves_plot(run) if run.rounds else "<p>No round completed: metrics.jsonl has no round.</p>")
    parts.append("<h2>Participation</h2>")
    sites = site_names(run)
    if run.rounds and sites:
        grid = participation(run, sites)
        empty = bool((grid == STATES.index("not recorded")).all())
        if not any(r.get("participants") is not None for r in run.rounds):
            shown = "no update was rejected, so there is no grid" if empty else "the grid shows only rejected updates (rejected_by)"
            parts.append(f"<p>Which sites were aggregated in each round (participants) is {NOT_RECORDED}: {shown}.</p>")
        if not empty:
            parts.append("<p>aggregated: the site's update went into the round's model; refused: the site declined (budget or policy, "
                         "see the privacy table) and was not asked again; rejected: the server left its update out (rejected_by); "
                         "absent: not sampled, or no reply.</p>" + participation_plot(run, sites, grid))
    else:
        parts.append("<p>No sites or no rounds recorded.</p>")
    parts += [_classes_section(run), _best_section(run), _privacy_section(run)]
    if run.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in run.notes) + "</ul>")
    title = e(f"fedmm run {(run.summary or {}).get('run_id') or run.path.name}")
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{title}</title><style>{STYLE}</style>"
            f"</head><body>{''.join(parts)}</body></html>")


def write_report(run_dir: Path | str, out: Path | str | None = None) -> Path:
    """Write the report of ``run_dir`` to ``out`` (default ``run_dir/report.html``); return its path."""
    run = load_run(run_dir)
    target = Path(out).expanduser() if out is not None else run.path / "report.html"
    page = render_report(run)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(page, encoding="utf-8")
        tmp.replace(target)
    except OSError as err:
        raise DataError(target, f"could not write the report ({err.strerror or err})", fix="give a writable --out path") from err
    return target
