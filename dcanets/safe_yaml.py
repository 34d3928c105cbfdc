"""The one way dcanets reads YAML: ``yaml.safe_load`` with limits on size, aliases and nesting.

Why limits: ``safe_load`` runs no code, but a few lines of anchors and aliases (``&a [x, x]``,
``&b [*a, *a]``, ...) describe a structure whose expansion doubles with each line. PyYAML builds
it with shared references in no time; whatever walks it afterwards (pydantic validating
``model_kwargs``, ``json.dumps`` of a config) visits every expanded value and hangs for hours
(a 10-line ``--config`` reached 4.7 GB). A self-referencing anchor never ends at all. A config,
a search file or a ``model.yaml`` is small, so a file is refused in one line when it is larger
than :data:`MAX_BYTES`, nests deeper than :data:`MAX_DEPTH` or expands to more than
:data:`MAX_VALUES` values; the error is a ``yaml.YAMLError``, so every caller reports it as it
reports a syntax error. Every YAML file or flag value dcanets reads goes through :func:`load`.
"""
from __future__ import annotations

from typing import Any, Dict, Set

import yaml

MAX_BYTES = 4 * 1024 * 1024  # a config of this size is not a config
MAX_VALUES = 100_000  # scalars, lists and mappings, counted with every alias expanded
MAX_DEPTH = 200  # PyYAML composes nested nodes recursively: deeper would end in a RecursionError


class YAMLLimitError(yaml.YAMLError):
    """A document over one of the limits; ``problem`` is the one-line reason (as PyYAML's errors)."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


def load(text: str | bytes) -> Any:
    """``yaml.safe_load(text)``, refusing a document over the limits (:class:`YAMLLimitError`)."""
    if len(text) > MAX_BYTES:
        raise YAMLLimitError(f"the document has {len(text)} bytes, more than the {MAX_BYTES} dcanets reads")
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise YAMLLimitError(f"the document nests deeper than {MAX_DEPTH} levels") from None
        if node is None:
            return None
        expanded_size(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def expanded_size(node: yaml.Node) -> int:
    """The number of values ``node`` stands for with every alias expanded; raises
    :class:`YAMLLimitError` past :data:`MAX_VALUES` or :data:`MAX_DEPTH`, or for an anchor that
    contains itself. Each node is sized once (an alias is the same node object as its anchor), so
    this takes time linear in the document, not in its expansion."""
    sizes: Dict[int, int] = {}
    open_: Set[int] = set()  # the nodes being sized: meeting one again is a cycle

    def size(n: yaml.Node, depth: int) -> int:
        if id(n) in sizes:
            return sizes[id(n)]
        if id(n) in open_:
            raise YAMLLimitError("an anchor contains an alias of itself (its expansion never ends)")
        if depth > MAX_DEPTH:
            raise YAMLLimitError(f"the document nests deeper than {MAX_DEPTH} levels")
        open_.add(id(n))
        children = ([c for pair in n.value for c in pair] if isinstance(n, yaml.MappingNode) else
                    n.value if isinstance(n, yaml.SequenceNode) else [])
        total = 1 + sum(size(c, depth + 1) for c in children)
        if total > MAX_VALUES:
            raise YAMLLimitError(f"its aliases expand to more than {MAX_VALUES} values (an alias bomb?); "
                                 "write the values out instead of repeating anchors")
        open_.discard(id(n))
        sizes[id(n)] = total
        return total

    return size(node, 0)


__all__ = ["MAX_BYTES", "MAX_DEPTH", "MAX_VALUES", "YAMLLimitError", "expanded_size", "load"]
