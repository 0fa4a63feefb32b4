"""What a manifest's rows say as a whole: skipped rows per site and split, and repeated files.

- :func:`skips_by_site`: lenient loading's skips counted per site (training rows) and for the
  test rows, with a warning naming a site whose training rows were *all* skipped (it would
  vanish from a natural federation) and one when every ``split=test`` row was skipped;
- :func:`duplicate_warnings`: a file used by two rows (the same resolved path), worst when one
  is a ``train`` row and the other a ``test`` row (the test set then scores samples the model
  trained on); with ``by_content``, also files of equal content under different names
  (hashed only among files of equal size, up to :data:`MAX_HASH_BYTES` in all).
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedmm.data.checks import SampleError
from fedmm.data.manifest_table import TableRow

__all__ = ["MAX_HASH_BYTES", "Skips", "skips_by_site", "RowFile", "duplicate_warnings"]

MAX_HASH_BYTES = 256 * 2**20  # files hashed by `fedmm data check` to find copies under other names
_EXAMPLES = 3


@dataclass(frozen=True)
class Skips:
    """Skipped rows per site (training rows, i.e. not ``split=test``) and among the test rows."""

    by_site: dict[str, dict[str, int]] = field(default_factory=dict)
    test: dict[str, int] = field(default_factory=dict)
    declares_test: bool = False  # some row, kept or skipped, says split=test
    warnings: tuple[str, ...] = ()


def _reasons(counter: Counter[str]) -> str:
    return ", ".join(f"{reason}: {n}" for reason, n in counter.most_common())


def skips_by_site(rows: Sequence[TableRow], problems: Sequence[SampleError], has_site: bool, name: str) -> Skips:
    """Count ``problems`` (one a row) per site and split; warn about a site or a test set left with no row."""
    reason = {p.row: p.reason for p in problems if p.row is not None}
    by_site: dict[str, Counter[str]] = defaultdict(Counter)
    kept_sites: Counter[str] = Counter()
    test: Counter[str] = Counter()
    test_rows = 0
    for row in rows:
        is_test = row.cells.get("split") == "test"
        test_rows += is_test
        site = row.cells.get("site", "") if has_site else ""
        if row.number in reason:
            if is_test:
                test[reason[row.number]] += 1
            elif site:
                by_site[site][reason[row.number]] += 1
        elif not is_test:
            kept_sites[site] += 1
    warnings = []
    fix = f"fix the rows that `fedmm data check {name} --lenient` lists"
    for site, counter in sorted(by_site.items()):
        if not kept_sites[site]:
            warnings.append(
                f"{name}: site {site!r} has no training row left: all {sum(counter.values())} of its training rows were skipped ({_reasons(counter)}), "
                f"so it takes no part in a federation split by site. Fix: {fix}"
            )
    if test and sum(test.values()) == test_rows:
        warnings.append(
            f"{name}: every split=test row ({test_rows}) was skipped ({_reasons(test)}), so the server has no test set. Fix: {fix}"
        )
    return Skips({s: dict(c) for s, c in sorted(by_site.items())}, dict(test), test_rows > 0, tuple(warnings))


@dataclass(frozen=True)
class RowFile:
    """One file cell of an accepted row: the row, its split, the cell as written and the file."""

    row: int
    split: str  # "train" or "test"
    cell: str
    path: Path


def duplicate_warnings(files: Sequence[RowFile], name: str, *, by_content: bool) -> list[str]:
    """Warnings about files used by more than one row (by path; by content too when ``by_content``)."""
    by_path: dict[Path, list[RowFile]] = defaultdict(list)
    for f in files:
        by_path[f.path].append(f)
    out = _groups([uses for uses in by_path.values() if len(uses) > 1], name, "files are")
    if by_content:
        digests, skipped = _digests(list(by_path))
        by_digest: dict[str, list[Path]] = defaultdict(list)
        for path, digest in digests.items():
            by_digest[digest].append(path)
        copies = [[f for p in paths for f in by_path[p]] for paths in by_digest.values() if len(paths) > 1]
        out += _groups(copies, name, "files hold the same content as a file of another name, and are")
        if skipped:
            out.append(f"{name}: {skipped} files were not compared by content (more than {MAX_HASH_BYTES >> 20} MiB to hash); only repeated paths were looked for")
    return out


def _groups(groups: list[list[RowFile]], name: str, what: str) -> list[str]:
    overlap = [g for g in groups if {f.split for f in g} == {"train", "test"}]
    repeated = [g for g in groups if {f.split for f in g} != {"train", "test"}]
    out = []

    def examples(chosen: list[list[RowFile]]) -> str:
        return "; ".join(" = ".join(dict.fromkeys(f.cell for f in g)) + " in rows " + ", ".join(f"{f.row} ({f.split})" for f in g) for g in chosen[:_EXAMPLES])

    if overlap:
        tests = len({f.row for g in overlap for f in g if f.split == "test"})
        out.append(
            f"{name}: {sum(len(set(f.path for f in g)) for g in overlap)} {what} used by both train and test rows ({tests} test rows; "
            f"e.g. {examples(overlap)}): the test set then scores samples the model trained on. "
            "Fix: keep each sample in one split (remove the train or the test rows that repeat it)"
        )
    if repeated:
        out.append(
            f"{name}: {sum(len(set(f.path for f in g)) for g in repeated)} {what} used by more than one row of one split "
            f"(e.g. {examples(repeated)}): those samples count more than once. Fix: remove the repeated rows, unless the repetition is meant"
        )
    return out


def _digests(paths: list[Path]) -> tuple[dict[Path, str], int]:
    """A BLAKE2 digest of each file that shares its size with another, within MAX_HASH_BYTES; and how many were not hashed."""
    by_size: dict[int, list[Path]] = defaultdict(list)
    for path in paths:
        try:
            by_size[path.stat().st_size].append(path)
        except OSError:
            continue
    out: dict[Path, str] = {}
    budget, skipped = MAX_HASH_BYTES, 0
    for size, same in sorted(by_size.items()):
        if len(same) < 2:
            continue
        if size * len(same) > budget:
            skipped += len(same)
            continue
        budget -= size * len(same)
        for path in same:
            try:
                with open(path, "rb") as handle:
                    out[path] = hashlib.file_digest(handle, "blake2b").hexdigest()
            except OSError:
                continue
    return out, skipped
