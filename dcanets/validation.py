"""pydantic types, error formatting and flag parsing shared by ``TrainConfig``, the ``dcanets tune``
schema and the commands.

pydantic checks the values; this module makes its answers read like the rest of dcanets: one
``path: message`` per problem (``space.lr.low: must be > 0, got 0``), never a pydantic dump, so
a user fixes a YAML file or a flag from the message alone. The numeric types reject booleans
(YAML's ``yes`` is not an epoch count) and accept numeric strings (command-line flags).
``k=v,k=v`` flags (``--opt-kwargs rho=0.01``) are read by :func:`parse_kv`, everywhere.
"""
from __future__ import annotations

import argparse
import json
import math
import numbers
import os
from typing import Any, Callable, Dict, Iterable, List, NoReturn, Optional, Tuple, Type

from pydantic import BaseModel, BeforeValidator, Field, TypeAdapter, ValidationError
from pydantic_core import ErrorDetails, PydanticCustomError
from typing_extensions import Annotated

from dcanets.names import did_you_mean

Problem = Tuple[str, str]  # (dotted path, message)


def fail(message: str) -> NoReturn:
    """Raise from a validator with ``message`` as the whole error text."""
    raise PydanticCustomError("dcanets", "{message}", {"message": message})


def is_number(value: Any) -> bool:
    """A real number (numpy's included), but not a bool: YAML's ``yes`` is not an epoch count."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _parse_number(value: Any) -> Optional[float]:
    if is_number(value):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _as_number(value: Any) -> Any:
    number = _parse_number(value)
    if number is None:
        fail(f"must be a number, got {value!r}")
    if not math.isfinite(number):
        fail(f"must be a finite number, got {value!r}")
    return number


def _integer(value: Any, what: str) -> int:
    number = _parse_number(value)
    if number is None or not math.isfinite(number) or not float(number).is_integer():
        fail(f"must be {what}, got {value!r}")
    return int(number)


def _as_integer(value: Any) -> int:
    return _integer(value, "an integer")


def _as_count(value: Any) -> int:
    number = _integer(value, "an integer >= 1")
    if number < 1:
        fail(f"must be an integer >= 1, got {value!r}")
    return number


def _as_path_text(value: Any) -> Any:
    return os.fspath(value) if isinstance(value, os.PathLike) else value


Number = Annotated[float, BeforeValidator(_as_number)]
Integer = Annotated[int, BeforeValidator(_as_integer)]
Count = Annotated[int, Field(ge=1), BeforeValidator(_as_count)]
# bounds inside the Annotated (not nested around it), so the JSON Schema says exclusiveMinimum/minimum
Positive = Annotated[float, Field(gt=0), BeforeValidator(_as_number)]
NonNegative = Annotated[float, Field(ge=0), BeforeValidator(_as_number)]
PathText = Annotated[str, BeforeValidator(_as_path_text)]  # a str or a pathlib.Path, kept as str

# pydantic error type -> our message; "{got}" is the offending value's repr
_TEMPLATES = {
    "missing": "required",
    "greater_than": "must be > {gt}, got {got}",
    "greater_than_equal": "must be >= {ge}, got {got}",
    "less_than": "must be < {lt}, got {got}",
    "less_than_equal": "must be <= {le}, got {got}",
    "literal_error": "must be one of {expected}, got {got}",
    "string_type": "must be a string, got {got}",
    "bool_type": "must be true or false, got {got}",
    "bool_parsing": "must be true or false, got {got}",
    "dict_type": "must be a mapping, got {got}",
    "model_type": "must be a mapping, got {got}",
    "model_attributes_type": "must be a mapping, got {got}",
    "list_type": "must be a list, got {got}",
    "too_short": "must not be empty",
    "string_pattern_mismatch": "must match {pattern}, got {got}",
}


def _message(error: ErrorDetails) -> str:
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    template = _TEMPLATES.get(kind)
    if template is None:
        return error["msg"]
    return template.format(got=repr(error.get("input")), **{k: plain(v) for k, v in ctx.items()})


def plain(value: Any) -> Any:
    """``0.0`` -> ``0`` in bounds: ``must be > 0``, as a user would write it."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def dotted(loc: Iterable[Any], prefix: str = "") -> str:
    """``("space", "model", "values", 1)`` -> ``space.model.values[1]``."""
    path = prefix
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def unknown_key(name: Any, known: Iterable[str], what: str = "unknown key", listing: str = "allowed") -> str:
    """``unknown key; did you mean: lr; allowed: model, lr, ...``: the fix is in the message."""
    known = list(known)
    return f"{what}{did_you_mean(name, known)}; {listing}: {', '.join(known)}"


def problems_of(exc: ValidationError, model: Optional[Type[BaseModel]] = None, prefix: str = "",
                unknown: Tuple[str, str] = ("unknown key", "allowed")) -> List[Problem]:
    """One ``(path, message)`` per pydantic error; an unknown key of ``model`` is reported as
    ``unknown[0]`` with did-you-mean and the list of its fields after ``unknown[1]``."""
    out = []
    for error in exc.errors(include_url=False):
        loc = error["loc"]
        if error["type"] == "extra_forbidden" and model is not None and len(loc) == 1:
            message = unknown_key(loc[0], model.model_fields, *unknown)
        else:
            message = _message(error)
        out.append((dotted(loc, prefix), message))
    return out


def format_problems(problems: Iterable[Problem]) -> str:
    return "; ".join(f"{path}: {message}" if path else message for path, message in problems)


def argparse_type(annotation: Any, name: str) -> Callable[[str], Any]:
    """An argparse ``type=`` that validates a flag with a pydantic type (``--num-samples 0`` fails
    at parse time with the schema's own message)."""
    adapter = TypeAdapter(annotation)

    def convert(text: str) -> Any:
        try:
            return adapter.validate_python(text)
        except ValidationError as exc:
            raise argparse.ArgumentTypeError(format_problems(problems_of(exc))) from None

    convert.__name__ = name  # argparse names the type in its usage errors
    return convert


def _items(text: str) -> List[str]:
    """``a=1,b=(2, 3)`` -> ``['a=1', 'b=(2, 3)']``: commas inside brackets or quotes do not split."""
    items, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(depth - 1, 0)
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return items


def _value(text: str) -> Any:
    """A flag's value as Python would read it (timm's ``ParseKwargs``: ``1e-3``, ``None``,
    ``(0.9, 0.99)``), else as YAML reads it (``true``, ``auto``, ``[1, 2]``)."""
    import ast

    from dcanets import safe_yaml

    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return safe_yaml.load(text)  # bounded: no alias bomb in a flag value
    return list(value) if isinstance(value, tuple) else value  # a list: YAML (best.yaml, model.yaml) keeps it


def parse_kv(text: str) -> Dict[str, Any]:
    """``'rho=0.01,lam=20'`` or a JSON object -> dict (values read as Python literals, else as YAML
    scalars)."""
    import yaml

    text = text.strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"bad JSON in '{text}': {exc}") from None
        if not isinstance(value, dict):
            raise ValueError(f"expected a JSON object, got '{text}'")
        return value
    out: Dict[str, Any] = {}
    for item in _items(text):
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"bad key=value item '{item}' in '{text}'; use e.g. 'rho=0.01,lam=20'")
        try:
            out[key.strip()] = _value(val.strip())
        except yaml.YAMLError as exc:
            raise ValueError(f"bad value '{val.strip()}' for '{key.strip()}' in '{text}' ({yaml_problem(exc)}); "
                             "quote lists and mappings as JSON, e.g. '{\"k\": [1, 2]}'") from None
    return out


def kv_argument(text: str) -> Dict[str, Any]:
    """:func:`parse_kv` as an argparse ``type=``: a bad flag is argparse's one-line usage error."""
    try:
        return parse_kv(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def yaml_problem(exc: Exception) -> str:
    """A YAML error in one line: what and where (pyyaml's own message spans several lines)."""
    problem = getattr(exc, "problem", None) or str(exc)
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return " ".join(f"{problem}{where}".split())


__all__ = [
    "Problem", "fail", "is_number", "Number", "Integer", "Count", "Positive", "NonNegative", "PathText", "plain",
    "dotted", "unknown_key", "problems_of", "format_problems", "argparse_type", "parse_kv", "kv_argument",
    "yaml_problem",
]
