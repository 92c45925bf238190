"""Persistent cache of chat completions, keyed by the request.

The key is the SHA-256 of the canonical JSON of the request body: model, messages and
every sampling parameter sent (temperature, max_tokens, seed, response_format ...).
API keys and base URLs are never part of a body, so they are never hashed nor stored.

Storage is SQLite in WAL mode, one autocommitted INSERT per completion: a committed row
survives the process being killed (SIGKILL) at any point, so a crashed run never pays
twice for a call that had completed. Several processes may share one cache directory
(SQLite locks). Host side only.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections.abc import Iterator, Mapping
from typing import Any

CACHE_FILE = "chat_cache.sqlite"


def canonical_json(body: Mapping[str, Any]) -> bytes:
    """The request body as canonical JSON bytes (sorted keys, no spaces); what is hashed and sent."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def request_key(body: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a chat-completions request body."""
    return hashlib.sha256(canonical_json(body)).hexdigest()


class ResponseCache:
    """{request key: response dict} on disk (or in memory when `directory` is None)."""

    def __init__(self, directory: str | os.PathLike | None):
        if directory is None:
            self.path = None
            self._db = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        else:
            os.makedirs(directory, exist_ok=True)
            self.path = os.path.join(os.fspath(directory), CACHE_FILE)
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=60.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a commit survives a killed process (not a power cut) and costs no fsync.
            self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, value TEXT NOT NULL)")

    def get(self, key: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT value FROM responses WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, value: Mapping[str, Any]) -> None:
        self._db.execute("INSERT OR REPLACE INTO responses (key, value) VALUES (?, ?)", (key, json.dumps(value, ensure_ascii=False)))

    def __contains__(self, key: str) -> bool:
        return self._db.execute("SELECT 1 FROM responses WHERE key = ?", (key,)).fetchone() is not None

    def keys(self) -> Iterator[str]:
        return (row[0] for row in self._db.execute("SELECT key FROM responses").fetchall())

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    def close(self) -> None:
        self._db.close()
