"""Columnar Avro decoding: every datum of a fetch in one writer schema read field by field at once.

The datums of a fetch are joined into one buffer and walked together with numpy, one field at a
time in schema order: a position per datum, varints and fixed-width values gathered for all of
them in a few array operations, strings cut out and decoded in one loop. Only the values on the
feature paths (and the ``id``) are kept; every other field is still read and checked.

A datum is read here only when the result is certain to be what fastavro gives: a union branch,
enum symbol or boolean byte out of range, a varint longer than 9 bytes (fastavro would make
integers beyond int64 of it), a length past the datum's end, invalid UTF-8, or bytes left over
send that datum back (``rejected``), and the caller reads it with fastavro, whose dead letters
name the field. Schemas with arrays, maps, logical types, or a feature path through anything but
a record (or a union of null and one record) are not read here at all (:func:`columnar_reader`
returns None).
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import itemgetter
from typing import Any, cast

import numpy as np

from streamvi.features.avro import HEADER_BYTES, MAGIC, named_types

#: Avro types whose values a numeric, binary or count block reads as floats, and their width.
_FLOATS = {"boolean": 1, "int": 0, "long": 0, "float": 4, "double": 8}
_PRIMITIVES = {"null", "string", "bytes", *_FLOATS}
#: The Avro types whose values each block's conversion takes as floats without a type check.
_BLOCK_KINDS = {
    "numeric": frozenset({"int", "long", "float", "double", "null"}),
    "count": frozenset({"int", "long", "float", "double", "null"}),
    "binary": frozenset({"boolean", "int", "long", "float", "double", "null"}),
}
#: Bytes a datum's buffer is padded with, so that reads past its end stay inside the buffer.
_PAD = 16


class Unsupported(Exception):
    """The schema has something the columnar reader does not read."""


class Leaf:
    """The values of one path over a fetch: floats (with the nulls and the Python type) for
    booleans and numbers, a list of Python values for the others."""

    def __init__(self, n: int, kind: str) -> None:
        self.kind = kind
        self.floats = kind in _FLOATS or kind == "null"
        self.values = np.full(n, np.nan)
        self.typed: np.ndarray = self.values
        self.nulls = np.ones(n, dtype=bool)
        self.objects: list[Any] = [None] * n

    def take(self, keep: np.ndarray) -> Leaf:
        """The values of the datums at ``keep`` only."""
        out = Leaf(0, self.kind)
        out.values, out.nulls = self.values[keep], self.nulls[keep]
        out.typed = out.values if self.typed is self.values else self.typed[keep]
        out.objects = [self.objects[i] for i in keep.tolist()]
        return out

    def python(self) -> list[Any]:
        """The values as fastavro gives them (None for null or absent)."""
        if not self.floats:
            return self.objects
        values = self.typed.tolist()
        for i in np.flatnonzero(self.nulls).tolist():
            values[i] = None
        return values


class _State:
    """The joined datums of a fetch and where each one is being read."""

    def __init__(self, raw: bytes, starts: np.ndarray, ends: np.ndarray) -> None:
        self.raw = raw
        self.buf = np.frombuffer(raw + bytes(_PAD), dtype=np.uint8)
        self.pos = starts.copy()
        self.ends = ends
        self.rejected = np.zeros(len(starts), dtype=bool)
        self._high: np.ndarray | None = None

    def non_ascii(self, start: np.ndarray, end: np.ndarray) -> np.ndarray:
        """Which of the spans [start, end) hold a byte that is not ASCII."""
        if self._high is None:
            self._high = np.concatenate(([0], np.cumsum(self.buf >= 0x80)))
        last = len(self._high) - 1
        return self._high[np.minimum(end, last)] > self._high[np.minimum(start, last)]

    def at(self, sel: np.ndarray, offset: int = 0) -> np.ndarray:
        """The byte at each selected datum's position plus ``offset`` (inside the buffer)."""
        return self.buf[np.minimum(self.pos[sel] + offset, len(self.buf) - 1)]

    def advance(self, sel: np.ndarray, size: np.ndarray | int) -> np.ndarray:
        """Move the selected datums on by ``size`` bytes; return where they were. A datum moved
        past its end is rejected, and kept at the buffer's end so that positions cannot overflow."""
        start = self.pos[sel]
        moved = start + size
        self.rejected[sel] |= moved > self.ends[sel]
        self.pos[sel] = np.minimum(moved, len(self.buf))
        return start

    def varint(self, sel: np.ndarray) -> np.ndarray:
        """The zig-zag varint (Avro int or long) at each selected datum, at most 9 bytes."""
        first = self.at(sel).astype(np.uint64)
        value = first & np.uint64(0x7F)
        size = np.ones(len(sel), dtype=np.int64)
        going = np.flatnonzero(first >= 0x80)
        for k in range(1, 9):
            if not len(going):
                break
            byte = self.at(sel[going], k).astype(np.uint64)
            value[going] |= (byte & np.uint64(0x7F)) << np.uint64(7 * k)
            size[going] += 1
            going = going[byte >= 0x80]
        self.rejected[sel[going]] = True
        self.advance(sel, size)
        return (value >> np.uint64(1)).astype(np.int64) ^ -(value & np.uint64(1)).astype(np.int64)

    def span(self, sel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(start, end) of the length-prefixed bytes at each selected datum."""
        size = self.varint(sel)
        self.rejected[sel[size < 0]] = True
        size = np.maximum(size, 0)
        start = self.advance(sel, size)
        return start, start + size

    def strings(self, sel: np.ndarray, keep: bool) -> list[str] | None:
        """The strings at the selected datums (checked as UTF-8 also when not kept)."""
        start, end = self.span(sel)
        if not keep:
            wide = np.flatnonzero(self.non_ascii(start, end))
            start, end, sel = start[wide], end[wide], sel[wide]
        raw, starts, ends = self.raw, start.tolist(), end.tolist()
        try:
            out = [raw[a:b].decode("utf-8") for a, b in zip(starts, ends, strict=True)]
        except UnicodeDecodeError:  # find which, and reject those
            out = []
            for i, a, b in zip(sel.tolist(), starts, ends, strict=True):
                try:
                    out.append(raw[a:b].decode("utf-8"))
                except UnicodeDecodeError:
                    self.rejected[i] = True
                    out.append("")
        return out if keep else None

    def fixed(self, sel: np.ndarray, width: int) -> np.ndarray:
        """[m, width] bytes at each selected datum (rows of a strided view: one gather per row)."""
        start = self.advance(sel, width)
        windows = np.lib.stride_tricks.as_strided(self.buf, (len(self.buf) - width + 1, width), (1, 1))
        return windows[np.minimum(start, len(windows) - 1)]


class _Reader:
    """One Avro type of the schema, read for a selection of datums; ``leaf`` keeps the values."""

    def __init__(
        self,
        schema: Any,
        named: dict[str, Any],
        wanted: dict[tuple[str, ...], int],
        path: tuple[str, ...],
        within: frozenset[str] = frozenset(),
    ) -> None:
        if isinstance(schema, str) and schema in within:
            raise Unsupported(f"record {schema} holds itself")
        schema = named.get(schema, schema) if isinstance(schema, str) else schema
        if isinstance(schema, dict) and ("logicalType" in schema or not isinstance(schema.get("type"), str)):
            raise Unsupported("a logical type, or a type in an unknown form")
        self.kind: str = (
            "union" if isinstance(schema, list) else schema["type"] if isinstance(schema, dict) else schema
        )
        self.slot = wanted.get(path)
        self.children: dict[str, _Reader] = {}
        self.branches: list[_Reader] = []
        through = self._through(path, wanted)
        if self.kind == "record":
            if self.slot is not None:
                raise Unsupported("a feature path ends at a record")
            within = within | {schema["name"]}
            for field in schema["fields"]:
                key = field["name"]
                self.children[key] = _Reader(field["type"], named, wanted, (*path, key), within)
            return
        if self.kind == "union":
            self.branches = [_Reader(b, named, wanted if through else {}, path, within) for b in schema]
            kept = [b.kind for b in self.branches if b.kind != "null"]
            if through and self.slot is None and (len(kept) > 1 or (kept and kept[0] != "record")):
                raise Unsupported("a feature path through a union of several types, or not of a record")
            return
        if self.kind == "enum":
            self.symbols = np.array([*schema["symbols"], ""], dtype=object)
        elif self.kind == "fixed":
            self.size = int(schema["size"])
        elif self.kind not in _PRIMITIVES:
            raise Unsupported(f"type {self.kind}")
        if through and self.slot is None and self.kind != "null":
            raise Unsupported("a feature path through a value that is not a record")

    @staticmethod
    def _through(path: tuple[str, ...], wanted: dict[tuple[str, ...], int]) -> bool:
        """Whether some wanted path is ``path`` or runs through it."""
        return any(p[: len(path)] == path for p in wanted)

    def read(self, state: _State, sel: np.ndarray, leaves: list[Leaf]) -> None:
        """Read this type at every selected datum, keeping the values of a wanted path."""
        leaf = leaves[self.slot] if self.slot is not None else None
        if self.kind == "record":
            for child in self.children.values():
                child.read(state, sel, leaves)
        elif self.kind == "union":
            index = state.varint(sel)
            state.rejected[sel[(index < 0) | (index >= len(self.branches))]] = True
            for b, branch in enumerate(self.branches):
                branch.read(state, sel[index == b], leaves)
        elif self.kind == "null":
            pass
        elif self.kind in ("string", "bytes", "enum", "fixed"):
            values = self._objects(state, sel, leaf is not None)
            if leaf is not None and values is not None:
                for i, value in zip(sel.tolist(), values, strict=True):
                    leaf.objects[i] = value
        else:
            self._number(state, sel, leaf)

    def _objects(self, state: _State, sel: np.ndarray, keep: bool) -> Sequence[Any] | None:
        """The strings, enum symbols or bytes at the selected datums (None when not ``keep``)."""
        if self.kind == "string":
            return state.strings(sel, keep)
        if self.kind == "enum":
            index = state.varint(sel)
            bad = (index < 0) | (index >= len(self.symbols) - 1)
            state.rejected[sel[bad]] = True
            return self.symbols[np.where(bad, len(self.symbols) - 1, index)].tolist() if keep else None
        if self.kind == "fixed":
            data = state.fixed(sel, self.size)
            return [row.tobytes() for row in data] if keep else None
        start, end = state.span(sel)
        return [state.raw[a:b] for a, b in zip(start.tolist(), end.tolist(), strict=True)] if keep else None

    def _number(self, state: _State, sel: np.ndarray, leaf: Leaf | None) -> None:
        """Read a boolean or number at the selected datums into ``leaf`` (when a path wants it)."""
        width = _FLOATS[self.kind]
        typed: np.ndarray
        if width == 0:
            typed = state.varint(sel)
        elif width == 1:
            byte = state.fixed(sel, 1)[:, 0]
            state.rejected[sel[byte > 1]] = True
            typed = byte == 1
        else:
            typed = state.fixed(sel, width).view("<f8" if width == 8 else "<f4")[:, 0].astype(np.float64)
        if leaf is not None and not leaf.floats:  # a union of several types: Python values
            for i, value in zip(sel.tolist(), typed.tolist(), strict=True):
                leaf.objects[i] = value
        elif leaf is not None:
            if leaf.typed is leaf.values and typed.dtype != np.float64:
                leaf.typed = np.zeros(len(leaf.values), dtype=typed.dtype)
            leaf.typed[sel] = typed
            leaf.values[sel] = typed
            leaf.nulls[sel] = False


class ColumnarAvro:
    """Reads the datums of one writer schema, a fetch at a time, into the values of given paths."""

    def __init__(self, schema: dict[str, Any], paths: Sequence[tuple[str, ...]]) -> None:
        self.paths = list(dict.fromkeys(paths))
        self._slots = {path: s for s, path in enumerate(self.paths)}
        self._root = _Reader(schema, named_types(schema, {}), self._slots, ())
        self._kinds = [self._kind_of(self._root, path) for path in self.paths]

    def _kind_of(self, reader: _Reader | None, path: tuple[str, ...]) -> str:
        """The Avro type at ``path``: the non-null branch of a union, "mixed" for a union of
        several types, "null" when absent."""
        for key in (*path, None):
            while reader is not None and reader.kind == "union":
                kept = [b for b in reader.branches if b.kind != "null"]
                if len(kept) > 1:
                    return "mixed"
                reader = kept[0] if kept else reader.branches[0]
            if reader is None or key is None:
                break
            reader = reader.children.get(key)
        return "null" if reader is None else reader.kind

    def read(
        self, raw: bytes, starts: np.ndarray, ends: np.ndarray
    ) -> tuple[dict[tuple[str, ...], Leaf], np.ndarray]:
        """(path -> its values, which datums were rejected) of the datums at ``raw[starts:ends]``."""
        n = len(starts)
        leaves = [Leaf(n, kind) for kind in self._kinds]
        state = _State(raw, starts, ends)
        self._root.read(state, np.arange(n), leaves)
        state.rejected |= state.pos != ends
        return dict(zip(self.paths, leaves, strict=True)), state.rejected


def columnar_reader(schema: dict[str, Any], paths: Sequence[tuple[str, ...]]) -> ColumnarAvro | None:
    """The columnar reader of ``schema`` for ``paths``, or None when it has something it cannot read."""
    try:
        return ColumnarAvro(schema, paths)
    except Unsupported:
        return None


class LeafColumns(Sequence[Sequence[Any]]):
    """The feature columns of a fetch read by :class:`ColumnarAvro`, as the assembler takes them:
    Python values when asked for (built once), and ``floats`` for blocks of number columns."""

    def __init__(self, leaves: Sequence[Leaf], types: Sequence[str]) -> None:
        self._leaves = leaves
        self._types = types
        self._cache: dict[int, list[Any]] = {}

    def __len__(self) -> int:
        return len(self._leaves)

    def __getitem__(self, j: Any) -> Any:
        if not isinstance(j, int):
            raise TypeError("LeafColumns takes one column index")
        column = self._cache.get(j)
        if column is None:
            column = self._cache[j] = self._leaves[j].python()
        return column

    def floats(self, members: Sequence[int]) -> tuple[np.ndarray, np.ndarray | None] | None:
        """([k, n] float64 of the ``members`` columns, which entries are null), or None when one
        of them holds, in this schema, values its feature's block does not take as they are
        (booleans are binary values only)."""
        leaves = [self._leaves[j] for j in members]
        if not all(
            leaf.kind in _BLOCK_KINDS[self._types[j]] for leaf, j in zip(leaves, members, strict=True)
        ):
            return None
        return np.stack([leaf.values for leaf in leaves]), np.stack([leaf.nulls for leaf in leaves])


def read_fetch(
    readers: dict[int | None, ColumnarAvro | None],
    values: Sequence[bytes | None],
    paths: Sequence[tuple[str, ...]],
    max_bytes: int,
) -> tuple[list[tuple[np.ndarray, list[Leaf]]], list[int]]:
    """Read the values of a fetch by schema: ((indices, their leaves at ``paths``) of each group of
    values read here, indices of the values left to fastavro: empty, oversize, a bad header or a
    schema not read here, or rejected). ``readers`` is keyed by the schema id of the wire header,
    or None for values without one."""
    groups, rest = _by_schema(readers, values, max_bytes)
    out: list[tuple[np.ndarray, list[Leaf]]] = []
    skip = HEADER_BYTES if None not in readers else 0
    for key, members in groups.items():
        reader = readers[key]
        assert reader is not None
        group: list[bytes] = [values[i] for i in members]  # type: ignore[misc]
        sizes = np.fromiter(map(len, group), dtype=np.int64, count=len(group))
        ends = np.cumsum(sizes)
        found, rejected = reader.read(b"".join(group), ends - sizes + skip, ends)
        leaves = [found[path] for path in paths]
        indices = np.asarray(members)
        if rejected.any():
            rest += indices[rejected].tolist()
            keep = np.flatnonzero(~rejected)
            indices, leaves = indices[keep], [leaf.take(keep) for leaf in leaves]
        out.append((indices, leaves))
    return out, sorted(rest)


def _by_schema(
    readers: dict[int | None, ColumnarAvro | None], values: Sequence[bytes | None], max_bytes: int
) -> tuple[dict[int | None, list[int]], list[int]]:
    """The indices of the values each reader reads (by schema id), and of the others. A fetch of
    usable values all behind one header (or with none) is told at once."""
    header = None not in readers
    if values and None not in values:
        present = cast("list[bytes]", values)
        sizes = list(map(len, present))
        heads = set(map(itemgetter(slice(0, HEADER_BYTES)), present)) if header else {b""}
        if min(sizes) >= (HEADER_BYTES if header else 1) and max(sizes) <= max_bytes and len(heads) == 1:
            head = heads.pop()
            key = int.from_bytes(head[1:], "big") if header and head[0] == MAGIC else None
            if readers.get(key) is not None:
                return {key: list(range(len(values)))}, []
    groups: dict[int | None, list[int]] = {}
    rest: list[int] = []
    for i, value in enumerate(values):
        if not value or len(value) > max_bytes or (header and len(value) < HEADER_BYTES):
            rest.append(i)
            continue
        key = int.from_bytes(value[1:HEADER_BYTES], "big") if header and value[0] == MAGIC else None
        if readers.get(key) is None:
            rest.append(i)
        else:
            groups.setdefault(key, []).append(i)
    return groups, rest
