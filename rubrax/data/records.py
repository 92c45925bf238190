"""Reading training records (JSONL files or `datasets` rows) with errors that say where.

Every error is a `RecordError` naming the source, the line (JSONL, 1-based) or row
(datasets, 0-based) and the field: `pairs.jsonl:7: field 'label': must be 0 or 1, got 2`.
Used by the preference-pair and SFT readers (rubrax.data.pairs, rubrax.data.sft).

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


def iter_jsonl(path: str | os.PathLike) -> Iterator[Located]:
    """Yields (path, line number, object) for each non-blank line of a JSONL file."""
    source = os.fspath(path)
    with open(source, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as err:
                raise RecordError(source, lineno, None, f"not valid UTF-8 at column {err.start + 1}") from None
            except json.JSONDecodeError as err:
                raise RecordError(source, lineno, None, f"invalid JSON: {err.msg} at column {err.colno}") from None
            if not isinstance(obj, dict):
                raise RecordError(source, lineno, None, f"expected a JSON object, got {type(obj).__name__}")
            yield source, lineno, obj


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
