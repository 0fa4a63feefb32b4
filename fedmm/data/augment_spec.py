"""The augmentation spec of a run: ``augment = "image:shift+rotate, audio:specaugment"``.

:func:`parse_augment` checks a spec and turns it into a plan ``{kind: ops}``;
:class:`fedmm.data.augment.Augmenter` applies a plan to training batches.

>>> parse_augment("image:shift+rotate, sensor:jitter")
{<ModalityKind.IMAGE: 'image'>: ('shift', 'rotate'), <ModalityKind.SENSOR: 'sensor'>: ('jitter',)}
>>> format_augment(parse_augment(" audio:gain "))
'audio:gain'
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence

from fedmm.data.schema import ModalityKind
from fedmm.errors import ConfigError

__all__ = ["OPS", "parse_augment", "format_augment"]

#: The ops available per modality kind, in the order they are applied.
OPS: dict[ModalityKind, tuple[str, ...]] = {
    ModalityKind.IMAGE: ("shift", "crop", "rotate", "noise"),
    ModalityKind.AUDIO: ("gain", "shift", "noise", "specaugment"),
    ModalityKind.TEXT: ("dropout", "swap"),
    ModalityKind.SENSOR: ("jitter", "scale"),
    ModalityKind.TABULAR: ("noise",),
}

_EXAMPLE = '"image:shift+rotate, audio:specaugment+gain, sensor:jitter"'


def _hint(word: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f"did you mean '{close[0]}'? " if close else ""


def _check_ops(kind: ModalityKind, ops: Sequence[str], spec: str) -> None:
    """Raise :class:`ConfigError` for an op that ``kind`` does not have or one listed twice."""
    valid = OPS[kind]
    seen: set[str] = set()
    for op in ops:
        if op not in valid:
            elsewhere = [str(k) for k, k_ops in OPS.items() if op in k_ops]
            note = f" ('{op}' is an op of {', '.join(elsewhere)})" if elsewhere else ""
            raise ConfigError(
                "augment", f"unknown {kind} op '{op}'{note}", value=spec,
                fix=f"{_hint(op, valid)}{kind} ops are: {', '.join(valid)}",
            )
        if op in seen:
            raise ConfigError("augment", f"{kind} op '{op}' is listed twice", value=spec, fix="list each op once")
        seen.add(op)


def parse_augment(spec: str) -> dict[ModalityKind, tuple[str, ...]]:
    """Parse a run-config augmentation spec into a plan ``{kind: ops}``.

    ``spec`` is a comma-separated list of ``KIND:op+op`` entries, e.g.
    ``"image:shift+rotate, audio:specaugment+gain, sensor:jitter"``; whitespace
    around the parts is ignored and an empty (or blank) spec means no
    augmentation (``{}``). Ops keep the order written (the :class:`Augmenter`
    applies them in :data:`OPS` order).

    Raises
    ------
    ConfigError
        (key ``augment``) for an entry that is not ``KIND:op+op``, an unknown
        kind or op (with the closest valid name and the valid options), or a
        kind or op listed twice.
    """
    plan: dict[ModalityKind, tuple[str, ...]] = {}
    if not spec.strip():
        return plan
    kinds = [str(k) for k in OPS]
    for raw in spec.split(","):
        entry = raw.strip()
        parts = entry.split(":")
        if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
            what = "an empty entry" if not entry else f"malformed entry '{entry}'"
            raise ConfigError(
                "augment", what, value=spec,
                fix=f"write comma-separated KIND:op+op entries, e.g. {_EXAMPLE}; kinds are: {', '.join(kinds)}",
            )
        name = parts[0].strip()
        if name not in kinds:
            raise ConfigError(
                "augment", f"unknown modality kind '{name}' in entry '{entry}'", value=spec,
                fix=f"{_hint(name, kinds)}kinds are: {', '.join(kinds)}",
            )
        kind = ModalityKind(name)
        if kind in plan:
            raise ConfigError(
                "augment", f"modality kind '{kind}' has two entries", value=spec,
                fix=f"merge them into one entry, e.g. {kind}:{'+'.join(OPS[kind][:2])}",
            )
        ops = tuple(op.strip() for op in parts[1].split("+"))
        if "" in ops:
            raise ConfigError(
                "augment", f"malformed entry '{entry}' (an empty op)", value=spec,
                fix=f"join ops with single '+', e.g. {kind}:{'+'.join(OPS[kind][:2])}",
            )
        _check_ops(kind, ops, spec)
        plan[kind] = ops
    return plan


def format_augment(plan: Mapping[ModalityKind, Sequence[str]]) -> str:
    """The spec string of a plan (the inverse of :func:`parse_augment`)."""
    return ", ".join(f"{kind}:{'+'.join(ops)}" for kind, ops in plan.items())


