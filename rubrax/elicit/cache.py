"""Persistent cache of chat completions, keyed by the request.

The key is the SHA-256 of the canonical JSON of the request body: model, messages and
every sampling parameter sent (temperature, max_tokens, seed, response_format ...).
API keys and base URLs are never part of a body, so they are never hashed nor stored.

Storage is an append-only log, `chat_cache.log` in the cache directory, one line per
completion: `<64 hex key>\\t<JSON value>\\n`, written with a single O_APPEND `write`
as soon as the completion arrives. A returned `write` is in the kernel's page cache, so
it survives the process being killed (SIGKILL) at any point: a crashed run never pays
twice for a call that had completed. A line cut short by a crash is cut off on the
next open. The index (key -> offset) lives in memory, about 150
bytes per entry; values are read back with `pread`. Several processes may append to one
log (O_APPEND writes of one line do not interleave on local file systems); each sees
the others' entries when it next opens the cache.

Why not SQLite: one autocommitted INSERT costs ~150 us of blocked event loop here
against ~20 us for an append, and the loop is the bottleneck at hundreds of calls/s.
Host side only.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

CACHE_FILE = "chat_cache.log"
_KEY_LEN = 64


def canonical_json(body: Mapping[str, Any]) -> bytes:
    """The request body as canonical JSON bytes (sorted keys, no spaces); what is hashed and sent."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def request_key(body: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a chat-completions request body."""
    return hashlib.sha256(canonical_json(body)).hexdigest()


class ResponseCache:
    """{request key: response dict} on disk (or in memory when `directory` is None)."""

    def __init__(self, directory: str | os.PathLike | None):
        self._index: dict[str, tuple[int, int]] = {}
        self._memory: dict[str, dict[str, Any]] | None = None
        if directory is None:
            self.path, self._fd = None, None
            self._memory = {}
            return
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(os.fspath(directory), CACHE_FILE)
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        self._load()

    def _load(self) -> None:
        offset = 0
        with open(self.path, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    # A line cut short by a crash (a live writer's line is written whole): drop it.
                    os.ftruncate(self._fd, offset)
                    break
                if len(line) > _KEY_LEN + 2 and line[_KEY_LEN : _KEY_LEN + 1] == b"\t":
                    self._index[line[:_KEY_LEN].decode("ascii", "replace")] = (offset + _KEY_LEN + 1, len(line) - _KEY_LEN - 2)
                offset += len(line)

    def get(self, key: str) -> dict[str, Any] | None:
        if self._memory is not None:
            return self._memory.get(key)
        where = self._index.get(key)
        if where is None:
            return None
        try:
            return json.loads(os.pread(self._fd, where[1], where[0]))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None  # a damaged line is a miss: the call is simply made again

    def put(self, key: str, value: Mapping[str, Any]) -> None:
        if self._memory is not None:
            self._memory[key] = dict(value)
            return
        payload = json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        line = key.encode("ascii") + b"\t" + payload + b"\n"
        written = os.write(self._fd, line)
        if written != len(line):
            raise OSError(f"short write to {self.path} ({written} of {len(line)} bytes): disk full?")
        # With O_APPEND the offset after the write is the end of our own line, even if
        # another process appended after it.
        start = os.lseek(self._fd, 0, os.SEEK_CUR) - len(line)
        self._index[key] = (start + _KEY_LEN + 1, len(payload))

    def __contains__(self, key: str) -> bool:
        return key in (self._memory if self._memory is not None else self._index)

    def keys(self) -> Iterator[str]:
        return iter(list(self._memory if self._memory is not None else self._index))

    def __len__(self) -> int:
        return len(self._memory if self._memory is not None else self._index)

    @property
    def closed(self) -> bool:
        return self.path is not None and self._fd is None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
