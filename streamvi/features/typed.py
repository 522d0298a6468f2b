"""Typed JSON decoding of a fetch (msgspec): the schema's fields straight into structs, no dicts.

From the feature schema it builds one ``msgspec.Struct`` type per object on the feature paths
(``g0`` of ``g0.m0``), every field optional (absent = None, an absent object = an empty one), and
each leaf typed as exactly the plain values its feature's block conversion takes:

- numeric and count: int | float | null; binary: bool | int | float | null;
- categorical and hashed: str | int | null; the ``id``: str | int | null;

with integers bounded to int64. A value decodes here only when orjson would parse it to the same
Python values: unknown fields, values of other types, null objects on a path, integers beyond
int64 (orjson makes some of them floats) and invalid JSON are all rejected, and the caller then
takes the general path, whose reasons and messages are the reference ones. Unknown fields are
rejected rather than skipped because msgspec skips them without orjson's checks (numbers beyond a
double, invalid UTF-8 inside strings, nesting past orjson's limit of 1024): a record orjson refuses
must never pass here, and checking the raw text for those first costs about what the general path
saves on such a fetch.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain
from operator import attrgetter
from typing import Annotated, Any, Union

import msgspec
import numpy as np

from streamvi.features.schema import FeatureSpec

_Int = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
#: A fetch with more than one value in this many that does not decode typed goes the general way.
GIVE_UP = 8
#: The plain values of each feature type's block conversion (and of the ``id``).
_PLAIN: dict[str, frozenset[Any]] = {
    "numeric": frozenset({_Int, float, None}),
    "count": frozenset({_Int, float, None}),
    "binary": frozenset({bool, _Int, float, None}),
    "categorical": frozenset({str, _Int, None}),
    "hashed": frozenset({str, _Int, None}),
    "id": frozenset({str, _Int, None}),
}


def _leaf_type(kinds: frozenset[Any]) -> Any:
    """The union of ``kinds`` as a type msgspec decodes (None stands for null)."""
    return Union[tuple(sorted(kinds, key=str))]  # noqa: UP007 (a union built at run time)


class _Node:
    """One object on the feature paths: its leaves (key -> feature type) and child objects."""

    def __init__(self) -> None:
        #: The plain values a leaf may hold: those of every feature at it, so a path of two
        #: features (a numeric and a binary) holds only what both blocks take.
        self.leaves: dict[str, frozenset[Any]] = {}
        self.children: dict[str, _Node] = {}

    def struct(self, name: str) -> type:
        """The msgspec Struct of this object (attribute ``fN`` for the N-th key, renamed to it)."""
        fields: list[tuple[str, Any, Any]] = []
        rename: dict[str, str] = {}
        for key, kind in self.leaves.items():
            rename[attribute := f"f{len(rename)}"] = key
            fields.append((attribute, _leaf_type(kind), None))
        for key, child in self.children.items():
            rename[attribute := f"f{len(rename)}"] = key
            nested = child.struct(f"{name}_{attribute}")
            fields.append((attribute, nested, msgspec.field(default_factory=nested)))
        return msgspec.defstruct(name, fields, rename=rename, forbid_unknown_fields=True, gc=False)

    def attribute_path(self, keys: Sequence[str]) -> str:
        """The dotted attribute path of ``keys`` in this object's structs."""
        names = list(self.leaves) + list(self.children)
        head = f"f{names.index(keys[0])}"
        return head if len(keys) == 1 else f"{head}.{self.children[keys[0]].attribute_path(keys[1:])}"


class TypedJson:
    """Decodes JSON values of a fetch to structs of the schema's fields, and reads their columns."""

    def __init__(self, features: Sequence[FeatureSpec]) -> None:
        root = _Node()
        root.leaves["id"] = _PLAIN["id"]
        for feature in features:
            node = root
            for key in feature.keys[:-1]:
                node = node.children.setdefault(key, _Node())
            key = feature.keys[-1]
            node.leaves[key] = node.leaves.get(key, _PLAIN[feature.type]) & _PLAIN[feature.type]
        self._decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(root.struct("Event"))
        self._paths = [root.attribute_path(f.keys) for f in features]
        self._id = attrgetter(root.attribute_path(("id",)))

    @staticmethod
    def supports(features: Sequence[FeatureSpec]) -> bool:
        """Whether a schema has a typed form: no feature's path starts at the ``id`` field."""
        return all(f.keys[0] != "id" for f in features)

    def decode(
        self, values: Sequence[bytes | None], max_bytes: int
    ) -> tuple[list[tuple[list[int], list[Any]]], list[int]]:
        """((indices, structs) of the values that decode typed, indices of the others: absent,
        empty or oversize, or not decoding). When more than one in ``GIVE_UP`` of those tried
        does not decode (after the first two failures), the fetch is left to the general path
        whole, which is then faster."""
        decode, n = self._decoder.decode, len(values)
        sizes = list(map(len, values)) if None not in values else []  # type: ignore[arg-type]
        if sizes and min(sizes) > 0 and max(sizes) <= max_bytes:
            try:
                return [(list(range(n)), list(map(decode, values)))], []  # type: ignore[arg-type]
            except (msgspec.DecodeError, RecursionError):  # ValidationError is a DecodeError
                pass
        indices: list[int] = []
        structs: list[Any] = []
        rest: list[int] = []
        for i, value in enumerate(values):
            struct = self._one(value, max_bytes)
            if struct is not None:
                indices.append(i)
                structs.append(struct)
                continue
            rest.append(i)
            if len(rest) * GIVE_UP > max(i + 1, GIVE_UP * 2):  # so far, more than one in GIVE_UP
                return [], list(range(n))
        return ([(indices, structs)] if indices else []), rest

    def _one(self, value: bytes | None, max_bytes: int) -> Any:
        """The struct of one value, or None."""
        if not value or len(value) > max_bytes:
            return None
        try:
            return self._decoder.decode(value)
        except (msgspec.DecodeError, RecursionError):
            return None

    def columns(self, structs: Sequence[Any]) -> StructColumns:
        return StructColumns(structs, self._paths)

    def ids(self, structs: Sequence[Any]) -> list[Any]:
        """The raw ``id`` of every struct."""
        return list(map(self._id, structs))


class StructColumns(Sequence[Sequence[Any]]):
    """The feature columns of a fetch of structs, each read out when first asked for; ``floats``
    reads several at once straight into an array."""

    def __init__(self, structs: Sequence[Any], paths: Sequence[str]) -> None:
        self._structs = structs
        self._paths = paths
        self._cache: dict[int, list[Any]] = {}

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, j: Any) -> Any:
        if not isinstance(j, int):
            raise TypeError("StructColumns takes one column index")
        column = self._cache.get(j)
        if column is None:
            column = self._cache[j] = list(map(attrgetter(self._paths[j]), self._structs))
        return column

    def floats(self, members: Sequence[int]) -> tuple[np.ndarray, None]:
        """[k, n] float64 of the ``members`` columns (None becomes NaN, and JSON has no other NaN);
        their leaf types hold only numbers, bools and None, so no value needs checking first. The
        columns under one object are read together: that object once per struct, then its fields."""
        n = len(self._structs)
        out = np.empty((len(members), n))
        under: dict[str, list[tuple[int, str]]] = {}
        for r, j in enumerate(members):
            parent, _, leaf = self._paths[j].rpartition(".")
            under.setdefault(parent, []).append((r, leaf))
        for parent, leaves in under.items():
            objects = list(map(attrgetter(parent), self._structs)) if parent else self._structs
            getter = attrgetter(*(leaf for _, leaf in leaves))
            rows = map(getter, objects)
            flat = chain.from_iterable(rows) if len(leaves) > 1 else rows
            values = np.fromiter(flat, dtype=np.float64, count=n * len(leaves)).reshape(n, len(leaves))
            out[[r for r, _ in leaves]] = values.T
        return out, None
