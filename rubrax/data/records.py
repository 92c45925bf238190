"""Reading training records (JSONL files or `datasets` rows) with errors that say where.

Every error is a `RecordError` naming the source, the line (JSONL, 1-based) or row
(datasets, 0-based) and the field: `pairs.jsonl:7: field 'label': must be 0 or 1, got 2`.
Used by every reader of rubrax: pairs, SFT, rubrics, responses, metrics, scores.

Host side only: no jax.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any


class RecordError(ValueError):
    """A malformed input record: `source`, `line` (or row) and `field` say which."""

    def __init__(self, source: str, line: int | None, field: str | None, message: str):
        self.source, self.line, self.field = source, line, field
        where = source if line is None else f"{source}:{line}"
        what = f" field {field!r}:" if field else ""
        super().__init__(f"{where}:{what} {message}")


Located = tuple[str, int, Mapping[str, Any]]  # (source, line or row, record)


def _find_bad_text(obj: Any, path: str = "") -> str | None:
    """Path of the first string (key or value) holding undecodable bytes (surrogate escapes)."""
    if isinstance(obj, str):
        return path if any("\udc80" <= ch <= "\udcff" for ch in obj) else None
    if isinstance(obj, list):
        for i, v in enumerate(obj):
            found = _find_bad_text(v, f"{path}[{i}]")
            if found is not None:
                return found
    if isinstance(obj, dict):
        for k, v in obj.items():
            sub = f"{path}.{k}" if path else k
            if _find_bad_text(k, sub) is not None:
                return sub
            found = _find_bad_text(v, sub)
            if found is not None:
                return found
    return None


def _decode_line(raw: bytes, source: str, lineno: int, error: type[RecordError]) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        # name the field that holds the bad bytes when the rest of the line is JSON
        try:
            field = _find_bad_text(json.loads(raw.decode("utf-8", errors="surrogateescape")))
        except json.JSONDecodeError:
            field = None
        raise error(source, lineno, field, f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise error(source, lineno, None, f"invalid JSON: {err.msg} at column {err.colno}") from None
    if not isinstance(obj, dict):
        raise error(source, lineno, None, f"expected a JSON object, got {type(obj).__name__}")
    return obj


def iter_jsonl(path: str | os.PathLike, *, error: type[RecordError] = RecordError) -> Iterator[Located]:
    """Yields (path, line number, object) for each non-blank line of a JSONL file.

    The one JSONL reader of rubrax: a bad line raises `error` (a RecordError) naming the
    file, the line and, for undecodable bytes, the field that holds them.
    """
    source = os.fspath(path)
    with open(source, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if raw.strip():
                yield source, lineno, _decode_line(raw, source, lineno, error)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of a JSONL file, in order (errors as in `iter_jsonl`)."""
    return [rec for _, _, rec in iter_jsonl(path)]


def iter_rows(records: Iterable[Mapping[str, Any]], source: str = "<records>") -> Iterator[Located]:
    """Yields (source, row index, record) for an in-memory sequence or a `datasets.Dataset`."""
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            raise RecordError(source, i, None, f"expected a mapping, got {type(rec).__name__}")
        yield source, i, rec


def iter_source(data: str | os.PathLike | Iterable[Mapping[str, Any]], source: str | None = None) -> Iterator[Located]:
    """A JSONL path or an iterable of records (list of dicts, `datasets.Dataset`)."""
    if isinstance(data, str | os.PathLike):
        return iter_jsonl(data)
    return iter_rows(data, source_name(data, source))


def source_name(data: Any, source: str | None = None) -> str:
    if source is not None:
        return source
    if isinstance(data, str | os.PathLike):
        return os.fspath(data)
    return _dataset_name(data) if hasattr(data, "info") else "<records>"


def _dataset_name(ds: Any) -> str:
    name = getattr(getattr(ds, "info", None), "dataset_name", None)
    split = getattr(ds, "split", None)
    return f"{name or 'dataset'}[{split}]" if split else f"{name or 'dataset'}"


def text_field(rec: Mapping[str, Any], key: str, source: str, line: int) -> str:
    """rec[key] as a non-empty (not all-whitespace) string, else a RecordError."""
    if key not in rec or rec[key] is None:
        raise RecordError(source, line, key, "missing")
    value = rec[key]
    if not isinstance(value, str):
        raise RecordError(source, line, key, f"must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RecordError(source, line, key, "must not be empty")
    return value


def append_jsonl(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Appends one record and flushes it to disk, so a crash loses at most this record."""
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_jsonl(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> None:
    """Writes records atomically (temporary file + rename): the old file survives a crash."""
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
