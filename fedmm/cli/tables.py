"""Tables the CLI prints: never cut, never read as markup, readable at 80 columns.

Every cell is a :class:`rich.text.Text` (a site or class named ``[bold]x[/bold]`` or
``:AB:`` prints as written) in a column that folds instead of cutting to ``…``. A table
whose columns cannot each hold their longest word in the width it is printed at comes out
as one key/value block a row instead, so a fingerprint or a timestamp is never chopped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from rich import box
from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

__all__ = ["cell", "FitTable"]


def cell(value: object, style: str = "") -> Text:
    """A table cell printed literally (no markup, no emoji codes)."""
    return value if isinstance(value, Text) else Text("" if value is None else str(value), style=style)


class FitTable:
    """Rows under columns: a table where it fits the width it is printed at, else one key/value block a row."""

    def __init__(self, title: str, columns: Sequence[str], *, justify: Mapping[str, str] | None = None) -> None:
        self.title, self.columns, self.justify = title, tuple(columns), dict(justify or {})
        self.rows: list[tuple[list[Text], str | None]] = []
        self.notes: list[Text] = []  # lines printed under the table (warnings about its rows)

    def add_row(self, *values: object, style: str | None = None) -> None:
        self.rows.append(([cell(v) for v in values], style))

    def extend(self, rows: Iterable[Sequence[object]]) -> FitTable:
        for row in rows:
            self.add_row(*row)
        return self

    def table(self) -> Table:
        table = Table(title=Text(self.title), box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)  # narrow: no outer frame
        for name in self.columns:
            table.add_column(Text(name), overflow="fold", no_wrap=False, justify=self.justify.get(name, "left"))  # type: ignore[arg-type]
        for values, style in self.rows:
            table.add_row(*values, style=style)
        return table

    def fits(self, console: Console, width: int) -> bool:
        """Whether every column can hold its longest word (rich measures the table at an unbounded width)."""
        wide = console.options.update(width=10_000, max_width=10_000)
        return Measurement.get(console, wide, self.table()).minimum <= width

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield from self._body(console, options)
        yield from self.notes

    def _body(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if self.fits(console, options.max_width):
            yield self.table()
            return
        yield Text(self.title, style="italic")
        for values, style in self.rows:
            block = Table.grid(padding=(0, 2), pad_edge=False)
            block.add_column(style="bold", overflow="fold")
            block.add_column(overflow="fold")
            for name, value in zip(self.columns, values):
                block.add_row(Text(name), value, style=style)
            yield Text("")
            yield block
