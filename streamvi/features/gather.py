"""Pulling the feature values out of parsed documents: one generated function per feature schema.

The extractor takes one document and returns the value at every feature path (and its ``id``) as a
tuple, in one call: each parent object on the way (``g0`` of ``g0.m0`` and ``g0.m3``) is looked up
once, then every child with ``dict.get``. Run right after each document is parsed, it touches the
document while it is still in the CPU cache, and the document can be freed at once; ``zip`` then
turns the rows of a fetch into columns. It follows the reference rules
(:func:`streamvi.features.reference.value_at`): None below an absent or null value, and
``NOT_AN_OBJECT`` below any other value that is not an object.

The generated code holds no text from the schema: keys are passed in as variables.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from streamvi.features.values import NOT_AN_OBJECT

Column = Sequence[Any]
Extractor = Callable[[dict[str, Any]], tuple[Any, ...]]


class _NotAnObjectParent:
    """Stands in for a parent value that is not an object: every child of it is NOT_AN_OBJECT."""

    def get(self, key: str, default: Any = None) -> Any:
        return NOT_AN_OBJECT


def compile_extractor(paths: Sequence[tuple[str, ...]]) -> Extractor:
    """The function document -> (id, value at each of ``paths``)."""
    names: dict[tuple[str, ...], str] = {(): "d"}
    keys: dict[str, str] = {}
    lines = ["def extract(d):"]

    def key(text: str) -> str:
        return keys.setdefault(text, f"k{len(keys)}")

    def node(path: tuple[str, ...]) -> str:
        if path not in names:
            parent = node(path[:-1])
            name = names[path] = f"p{len(names)}"
            lines.append(f"    {name} = {parent}.get({key(path[-1])})")
            lines.append(f"    if type({name}) is not dict:")
            lines.append(f"        {name} = EMPTY if {name} is None else BAD")
        return names[path]

    values = [f"d.get({key('id')})"]
    for path in paths:
        values.append(f"{node(tuple(path[:-1]))}.get({key(path[-1])})")
    lines.append(f"    return ({', '.join(values)},)")
    namespace: dict[str, Any] = {"EMPTY": {}, "BAD": _NotAnObjectParent()}
    namespace.update({variable: text for text, variable in keys.items()})
    exec(compile("\n".join(lines), "<feature extractor>", "exec"), namespace)
    extract: Extractor = namespace["extract"]
    return extract


def columns_of(rows: Sequence[tuple[Any, ...]], width: int) -> list[Column]:
    """The columns of a fetch's extracted rows (``width`` of them, also when there are no rows)."""
    return list(zip(*rows, strict=True)) if rows else [() for _ in range(width)]
