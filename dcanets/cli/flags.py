"""Flag spellings the commands share: timm's names for the same settings, ``k=v`` lists written
timm's way or dcanets', and what a mistyped flag probably meant.

Why aliases: a timm user types ``--smoothing 0.1 -b 64 --data-dir /data`` from habit (timm's
``train.py``); where a ``TrainConfig`` field means the same thing, that spelling is accepted beside
the field's own flag (``--label-smoothing``). :data:`TIMM_ALIASES` is the one table: a field gets an
alias by one entry there (an entry whose field does not exist is skipped), and docs/training.md
lists them. Fields named as timm names them (``--warmup-epochs``, ``--sched``, ``--lr``, ...) need
no entry: their flag is already timm's.
"""
from __future__ import annotations

import argparse
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from dcanets.names import did_you_mean
from dcanets.validation import parse_kv

#: TrainConfig field -> timm train.py flags with the same meaning (``--no-aug`` comes with ``--aug``)
TIMM_ALIASES: Dict[str, Tuple[str, ...]] = {
    "batch_size": ("-b",),
    "label_smoothing": ("--smoothing",),
    "data": ("--data-dir",),
    "augment": ("--aug",),
}


def field_flags(name: str, fields: Iterable[str]) -> List[str]:
    """The flags of a field: ``--field-name``, then its timm aliases (only for existing fields)."""
    flags = ["--" + name.replace("_", "-")]
    if name in set(fields):
        flags += [a for a in TIMM_ALIASES.get(name, ()) if a not in flags]
    return flags


class KeyValues(argparse.Action):
    """``--model-kwargs a=1 b=2`` (timm's spelling), ``a=1,b=2`` or JSON, merged into one dict;
    a bad item is argparse's one-line error naming the flag."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: Optional[str] = None) -> None:
        merged: Dict[str, Any] = {}
        for item in values if isinstance(values, list) else [values]:
            try:
                merged.update(parse_kv(item))
            except ValueError as exc:
                raise argparse.ArgumentError(self, str(exc)) from None
        setattr(namespace, self.dest, merged)


class Joined(argparse.Action):
    """``--decay-milestones 30 60`` (timm's spelling) or ``30,60``: one comma-separated text."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: Optional[str] = None) -> None:
        setattr(namespace, self.dest, ",".join(values if isinstance(values, list) else [values]))


def unrecognized(extras: Sequence[str], known: Iterable[str]) -> str:
    """argparse's "unrecognized arguments" with the closest flag for each unknown one."""
    known = list(known)
    flags = [e.split("=", 1)[0] for e in extras if e.startswith("-")] or list(extras[:1])
    parts = []
    for flag in flags:
        hint = did_you_mean(flag, known).removeprefix("; ")
        parts.append(f"{flag} ({hint})" if hint else flag)
    return f"unrecognized argument{'s' if len(parts) > 1 else ''}: {', '.join(parts)}"


__all__ = ["TIMM_ALIASES", "Joined", "KeyValues", "field_flags", "unrecognized"]
