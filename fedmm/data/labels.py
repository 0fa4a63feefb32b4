"""One canonical form for class labels, so that labels that look alike are one class.

A label cell is stripped of surrounding whitespace and put in Unicode NFC (``"é"`` typed
as one code point or as ``e`` + combining accent is one class). A label that reads as a
plain decimal number is written in its shortest form, so ``1``, ``01``, ``1.0``, ``+1``
and ``1e0`` are all class ``"1"`` (and ``1.50`` is ``"1.5"``). Empty cells and the usual
spellings of a missing value (``NaN``, ``null``, ``None``, any case) are missing labels,
never a class. When two spellings meet in one class, the loader reports it
(:func:`spelling_notes`): a sign that the data were written by different tools.

>>> [canonical_label(x) for x in ("01", " 1.0 ", "Cat", "NaN", "")]
['1', '1', 'Cat', None, None]
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from collections.abc import Iterable, Mapping
from decimal import Decimal, InvalidOperation

from fedmm.errors import ConfigError

__all__ = ["MISSING_SPELLINGS", "canonical_label", "canonical_classes", "rare_lookalikes", "spelling_notes"]

MISSING_SPELLINGS = frozenset({"", "nan", "null", "none"})  # compared in lower case
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)


def canonical_label(text: str) -> str | None:
    """The class a label cell names, or None for a missing label."""
    label = unicodedata.normalize("NFC", text.strip())
    if label.lower() in MISSING_SPELLINGS:
        return None
    if _NUMBER.fullmatch(label):
        return _number(label)
    return label


def _number(text: str) -> str:
    try:
        value = Decimal(text)
    except InvalidOperation:  # pragma: no cover - the pattern only lets decimals through
        return text
    if value.is_zero():
        return "0"
    if value == value.to_integral_value() and value.adjusted() < 40:
        return str(int(value))
    return str(value.normalize())


def canonical_classes(classes: Iterable[str]) -> tuple[str, ...]:
    """The configured class names in canonical form.

    Raises
    ------
    ConfigError
        When one names a missing label, or two name the same class.
    """
    out: dict[str, str] = {}
    for name in classes:
        canonical = canonical_label(name)
        if canonical is None:
            raise ConfigError("classes", f"{name!r} is a missing label's spelling, not a class name", value=name, fix="remove it from 'classes'")
        if canonical in out:
            raise ConfigError(
                "classes", f"{out[canonical]!r} and {name!r} name the same class {canonical!r}", value=name,
                fix="list each class once",
            )
        out[canonical] = name
    return tuple(out)


def spelling_notes(spellings: dict[str, set[str]]) -> tuple[str, ...]:
    """One note for each class written in more than one way (``spellings``: class -> cells seen)."""
    notes = []
    for canonical, seen in sorted(spellings.items()):
        if len(seen) > 1:
            # NFC and NFD forms print alike: show those code point by code point
            show = ascii if len({unicodedata.normalize("NFC", s) for s in seen}) < len(seen) else repr
            notes.append(f"labels {', '.join(show(s) for s in sorted(seen))} are one class {canonical!r}")
    return tuple(notes)


def rare_lookalikes(counts: Mapping[str, int], *, rare: int = 2, likeness: float = 0.8) -> tuple[str, ...]:
    """One note for each class of at most ``rare`` records whose name is close to a larger class's: a typo
    (``Walkng`` beside ``Walking``) makes a class of its own, which nothing else would point out.

    >>> rare_lookalikes({"Walking": 20, "Walkng": 1, "Running": 20})
    ("class 'Walkng' has 1 record(s) and its name is close to 'Walking' (20): a typo? Fix it in the manifest, or set 'classes' to the intended ones",)
    """
    notes = []
    common = [c for c, n in counts.items() if n > rare]
    for name, n in sorted(counts.items()):
        if n <= rare:
            close = difflib.get_close_matches(name, common, n=1, cutoff=likeness)
            if close:
                notes.append(f"class {name!r} has {n} record(s) and its name is close to {close[0]!r} ({counts[close[0]]}): a typo? "
                             "Fix it in the manifest, or set 'classes' to the intended ones")
    return tuple(notes)
