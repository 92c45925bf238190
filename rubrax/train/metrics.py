"""Metrics to JSONL (one `{"step": s, ...}` object per line) and optionally TensorBoard.

The JSONL file is opened in append mode and flushed after every line, so a run that
crashes keeps everything written so far and a resumed run continues the same file.
Values may be Python numbers, numpy or jax scalars (converted with float()), strings
or booleans; non-finite floats are written as null so the file stays valid JSON.

Host side: no jax import (jax scalars are converted through `__float__`).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

from rubrax.data.records import read_jsonl


def _to_json(value: Any) -> Any:
    if isinstance(value, bool | str) or value is None:
        return value
    if isinstance(value, int):
        return value
    if hasattr(value, "shape") and getattr(value, "shape", ()) not in ((), (1,)):
        raise ValueError(f"metric values must be scalars, got shape {value.shape}")
    if hasattr(value, "dtype") and str(value.dtype).startswith(("int", "uint")):
        return int(value)
    if hasattr(value, "dtype") and str(value.dtype) == "bool":
        return bool(value)
    f = float(value)
    return f if math.isfinite(f) else None


class MetricsWriter:
    """Appends `{"step": step, **metrics}` lines to `path`; mirrors scalars to TensorBoard.

    `tensorboard_dir` writes TensorBoard event files when the `tensorboard` package is
    installed (silently JSONL-only otherwise). `purge_step` (a resumed run) makes
    TensorBoard drop the events of earlier invocations from that step on, as the JSONL
    file is cut back (rubrax.runs.cut_jsonl). Use as a context manager or call close().
    """

    def __init__(self, path: str | os.PathLike, tensorboard_dir: str | os.PathLike | None = None, *, purge_step: int | None = None):
        self.path = os.fspath(path)
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = _TensorBoard(os.fspath(tensorboard_dir)) if tensorboard_dir else None
        if self._tb is not None and not self._tb.available:
            self._tb = None
        if self._tb is not None and purge_step is not None:
            self._tb.purge(int(purge_step))

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self._file is None:
            raise ValueError(f"MetricsWriter({self.path!r}) is closed")
        record: dict[str, Any] = {"step": int(step)}
        for key, value in metrics.items():
            if key == "step":
                raise ValueError("'step' is reserved in metrics")
            try:
                record[str(key)] = _to_json(value)
            except (TypeError, ValueError) as err:
                raise ValueError(f"metric {key!r}: {err}") from None
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self.write_tensorboard(step, record)

    def write_tensorboard(self, step: int, record: Mapping[str, Any]) -> None:
        """The scalars of `record` to TensorBoard only (a record the JSONL file already holds)."""
        if self._tb is not None:
            self._tb.write(int(step), {k: v for k, v in record.items() if k != "step"})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a metrics JSONL file (for tests, notebooks and plots)."""
    return read_jsonl(path)


class _TensorBoard:
    """Scalar summaries through tensorboard's own event writer (no TensorFlow, no torch)."""

    def __init__(self, logdir: str):
        try:
            from tensorboard.compat.proto import event_pb2, summary_pb2
            from tensorboard.summary.writer.event_file_writer import EventFileWriter
        except ImportError:
            import warnings

            warnings.warn(
                f"tensorboard is not installed: no event files under {logdir} "
                "(pip install 'rubrax[tensorboard]'); metrics still go to JSONL",
                stacklevel=3,
            )
            self.available = False
            return
        self.available = True
        self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
        self._writer = EventFileWriter(logdir)

    def write(self, step: int, scalars: Mapping[str, Any]) -> None:
        values = [
            self._summary_pb2.Summary.Value(tag=k, simple_value=float(v))
            for k, v in scalars.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        ]
        if values:
            event = self._event_pb2.Event(
                wall_time=time.time(), step=step, summary=self._summary_pb2.Summary(value=values)
            )
            self._writer.add_event(event)
            self._writer.flush()

    def purge(self, step: int) -> None:
        """A SessionLog START at `step`: TensorBoard discards the earlier events at steps >= step."""
        event = self._event_pb2.Event(wall_time=time.time(), step=step,
                                      session_log=self._event_pb2.SessionLog(status=self._event_pb2.SessionLog.START))
        self._writer.add_event(event)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
