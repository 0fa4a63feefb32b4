"""What every ``fedmm`` command shares: the Typer apps, the console, errors to exit codes, run-config input."""

from __future__ import annotations

import contextlib
import io
import math
import os
import sys
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.markup import escape

from fedmm.config import RunConfig
from fedmm.errors import ConfigError, FedMMError
from fedmm.secure.certs_cli import certs_app

if TYPE_CHECKING:
    from fedmm.plan import RunPlan

__all__ = ["app", "data_app", "console", "exit_on_error", "parse_overrides", "load_preset", "build_plan", "absolute_data", "load_federation"]

app = typer.Typer(add_completion=False, no_args_is_help=True, help="fedmm: private multimodal federated learning.")
data_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Check data and inspect simulated federations.")
app.add_typer(data_app, name="data")
app.add_typer(certs_app, name="certs")
class _Stdout(io.TextIOBase):
    """``sys.stdout`` as it is at each write (a test's capture too), that survives its reader going away: with
    ``fedmm simulate | head`` the first write after ``head`` exits raised BrokenPipeError and killed the run before
    it had a folder. The rest of the output then goes nowhere (the run's folder and log keep it all)."""

    def write(self, text: str) -> int:
        try:
            return sys.stdout.write(text)
        except BrokenPipeError:
            _output_gone()
            return len(text)

    def flush(self) -> None:
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            _output_gone()

    def isatty(self) -> bool:
        return sys.stdout.isatty()

    def fileno(self) -> int:
        return sys.stdout.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(sys.stdout, "encoding", None) or "utf-8"


def _output_gone() -> None:
    """Standard output's reader went away (a pipe closed): send what follows nowhere."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no file descriptor (a test's capture): nothing to redirect
        pass


# emoji=False: data (a fingerprint "0A:AB:54", a site named ":AB:") is never an emoji code
console = Console(file=_Stdout(), emoji=False)  # type: ignore[arg-type]  # a TextIOBase is a text file


@app.callback()
def _root() -> None:
    """fedmm: private multimodal federated learning on Flower and Opacus."""


@contextlib.contextmanager
def exit_on_error() -> Iterator[None]:
    """Print a fedmm error and exit: 2 for configuration, 1 for data and anything else."""
    try:
        yield
    except ConfigError as err:
        console.print("[red]error:[/red] " + escape(str(err)))
        raise typer.Exit(2) from err
    except FedMMError as err:
        # The CLI runs where the data is: print the local detail (paths, values) a site never sends to the server.
        console.print("[red]error:[/red] " + escape(str(getattr(err, "local_message", err))))
        raise typer.Exit(1) from err


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Parse ``key=value`` pairs; values are TOML literals, else plain strings.

    >>> parse_overrides(["dp=false", "rounds=3", "data=avmnist:/data", "target-epsilon=4"])
    {'dp': False, 'rounds': 3, 'data': 'avmnist:/data', 'target-epsilon': 4}
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(pair, "is not of the form key=value", fix="e.g. --set rounds=3")
        try:
            out[key] = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = raw.strip()
    return out


def load_preset(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    if not path.is_file():
        raise ConfigError("PRESET", f"preset file {path} not found", fix="give a TOML file such as simulations/avmnist-dp.toml")
    try:
        values = dict(tomllib.loads(path.read_text()))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError("PRESET", f"{path} is not valid TOML ({err})", fix="correct the file") from err
    data = values.get("data")
    if isinstance(data, str):  # a relative data path: beside the preset when it is there (as a site file's), else from here
        name, sep, location = data.partition(":")
        if sep and name != "synthetic" and location and not Path(location).expanduser().is_absolute():
            beside = path.parent / Path(location)
            if beside.exists() or not Path(location).exists():
                values["data"] = f"{name}:{beside}"
    return values


def build_plan(cfg: RunConfig) -> RunPlan:
    """The run's parts, every key checked (imported late: data and model libraries are slow to load)."""
    from fedmm.plan import RunPlan

    return RunPlan.from_config(cfg)


def absolute_data(spec: str) -> str:
    """Make a relative data path absolute: Flower's processes do not share this working folder.

    >>> absolute_data("avmnist"), absolute_data("synthetic:100"), absolute_data("manifest:/srv/m.csv")
    ('avmnist', 'synthetic:100', 'manifest:/srv/m.csv')
    """
    name, sep, location = spec.partition(":")
    if not sep or name == "synthetic" or not location:
        return spec
    return f"{name}:{Path(location).expanduser().resolve()}"


def load_federation(run_plan: RunPlan) -> Any:
    """Load and split the data as the sites will, and check the model and augmentation fit it."""
    from fedmm.data.augment import Augmenter
    from fedmm.data.partition import build_federation
    from fedmm.data.sources import load_source
    from fedmm.site.data import class_weights

    cfg, recipe = run_plan.config, run_plan.model
    source = load_source(cfg.data, run_plan.preprocessing, classes=cfg.class_list, lenient=cfg.lenient, test_fraction=cfg.test_fraction)
    federation = build_federation(source, run_plan.federation)
    _check_budget_names(run_plan.site_budgets, federation.names, cfg.site_budgets)
    test_sites = source.test.groups.get("site") if source.test is not None else None
    if test_sites is not None and federation.partitioner == "natural":
        for name in sorted(set(test_sites.tolist()) - set(federation.names) - {""}):
            console.print(f"[yellow]note:[/yellow] site {escape(repr(name))} has only split=test rows ({int((test_sites == name).sum())}): "
                          "it takes no part in training (its rows are in the held-out set)", soft_wrap=True)
    if cfg.dp and federation.sites:
        largest = max(len(ds) for ds in federation.sites)
        if cfg.target_delta * largest >= 1:  # (epsilon, delta) with delta >= 1/n allows releasing a record outright
            suggested = 10.0 ** math.floor(math.log10(0.1 / largest))
            raise ConfigError("target-delta", f"is not below 1/n for a site of {largest} records (1/n = {1 / largest:.3g}): a guarantee "
                              "with a delta that large allows publishing a whole record", value=cfg.target_delta,
                              fix=f"use a delta well below 1/number-of-records, e.g. target-delta={suggested:g}")
    _note_unused_classes(cfg.class_list, source)
    test = recipe.prepare(source.require_test(), tasks_from=recipe.task_classes(source.require_test()))
    Augmenter(test.schema, run_plan.augment, seed=0)
    class_weights(cfg, test)
    if cfg.dp:
        recipe.check_grad_sample_mode(cfg.grad_sample_mode.value, test.schema)
    return federation


def _note_unused_classes(classes: Sequence[str], source: Any) -> None:
    """A note for each class the run config names that no record has (``Swiming``): a model output nothing trains."""
    import difflib

    import numpy as np

    if not classes:
        return
    held = [ds for ds in (source.pool, source.test) if ds is not None and len(ds)]
    seen = {int(i) for ds in held for i in np.unique(ds.label) if i >= 0}
    names = [str(c) for c in held[0].schema.classes] if held else list(classes)
    for index, name in enumerate(names):
        if index not in seen:
            close = difflib.get_close_matches(name, [n for i, n in enumerate(names) if i in seen], n=1)
            console.print(f"[yellow]note:[/yellow] class {escape(repr(name))} of 'classes' has no record in the data" +
                          (f" (a typo of {escape(repr(close[0]))}?)" if close else "") + ": the model's output for it is never trained", soft_wrap=True)


def _check_budget_names(budgets: Mapping[str, float], names: Sequence[str], spec: str) -> None:
    """Every site ``site-budgets`` names is a site of the federation (a misspelt one would leave that site at ``*``'s budget)."""
    import difflib

    known = set(names)
    for name in budgets:
        if name != "*" and name not in known:
            close = difflib.get_close_matches(name, list(names), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError("site-budgets", f"names site {name!r}, which is not a site of this federation ({', '.join(list(names)[:8])}"
                              f"{', ...' if len(names) > 8 else ''})", value=spec, fix=f"{hint}use the sites' names, or '*' for every other site")


def federation_usage(federation: Any) -> str:
    """One line, printed before anything else: records per site, and how many no site holds (and why)."""
    held = [len(ds) for ds in federation.sites]
    total = sum(held) + federation.unassigned
    per_site = ", ".join(f"{name} {n}" for name, n in zip(federation.names, held))
    line = f"{total} training records: {sum(held)} held by {len(held)} sites ({per_site})"
    if federation.unassigned:
        line += (f"; {federation.unassigned} ({federation.unassigned / max(1, total):.0%}) UNUSED: held by no site of the "
                 f"{federation.partitioner} partition. Fix: sites=auto uses every group")
    return line
