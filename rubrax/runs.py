"""Run folders that survive anything: one writer, fingerprinted inputs, exact resume.

Every job that writes a run folder (RL, SFT/BT, sim) or a resumable output file (rubric
and eval jobs) opens it through `open_run`, which

 1. takes an advisory lock (`fcntl.flock` on `<folder>/.lock`, or `<out>.lock` next to an
    output file), held until the job ends. A second process gets `RunLocked`, naming
    the holder's pid. The kernel drops the lock when its holder dies (even by SIGKILL),
    so the lock of a dead process is simply taken over; the stale pid in the file is
    only reported, never trusted;
 2. compares the inputs' fingerprint (the settings that determine the outputs, the
    SHA-256 of the input files, model and endpoint settings; never an API key) with
    the one recorded by the earlier invocation (`<folder>/run.json` or
    `<out>.run.json`). A difference raises `InputsChanged`, naming every changed key,
    unless `restart` (remove the job's outputs and start afresh) or `allow_changed`
    (continue; accepted only when every changed key is one the job lists as safe,
    such as total_steps);
 3. records the new fingerprint (atomically) before anything else is written.

`cut_jsonl` cuts an append-only JSONL file back to the records a checkpoint covers.

Host side only: no jax.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

log = logging.getLogger("rubrax.runs")

FINGERPRINT_VERSION = 1
_HASH_LIMIT = 256 << 20  # bigger files (model weights) are identified by size and mtime


class RunError(RuntimeError):
    """A run folder cannot be used as asked; the message says why and what to do."""


class RunLocked(RunError):
    def __init__(self, where: str, pid: int | None, host: str | None):
        self.where, self.pid = where, pid
        holder = f"process {pid}" + (f" on {host}" if host and host != socket.gethostname() else "") if pid else "another process"
        super().__init__(
            f"{where} is in use by {holder} (advisory lock {_lock_path(where)}): one writer per run folder. "
            "Wait for it to finish, stop it, or choose another output."
        )


class InputsChanged(RunError):
    def __init__(self, where: str, changes: Sequence[str], unsafe: Sequence[str], allow_changed: bool):
        self.where, self.changes = where, list(changes)
        shown = "; ".join(changes[:12]) + (f"; ... ({len(changes) - 12} more)" if len(changes) > 12 else "")
        if allow_changed:
            how = (f"--allow-changed accepts only settings that are safe to change on resume; "
                   f"{', '.join(unsafe[:6])} {'is' if len(unsafe) == 1 else 'are'} not. Use --restart to start afresh")
        else:
            how = "use --restart to start afresh (its outputs are removed), or --allow-changed to continue deliberately"
        super().__init__(f"{where} was started with other inputs: {shown}. Refusing to mix two configurations in one output; {how}.")


# --------------------------------------------------------------------------- the lock


def _lock_path(where: str) -> str:
    return os.path.join(where, ".lock") if os.path.isdir(where) else where + ".lock"


def _read_holder(fd: int) -> tuple[int | None, str | None]:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return int(info["pid"]), info.get("host")
    except (ValueError, KeyError, TypeError):
        return None, None


class RunLock:
    """An exclusive advisory lock on a run folder (or output file), held until `release`."""

    def __init__(self, where: str | os.PathLike):
        self.where = os.fspath(where)
        self.path = _lock_path(self.where)
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            pid, host = _read_holder(fd)
            os.close(fd)
            if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise RunLocked(self.where, pid, host) from None
            raise
        old_pid, _ = _read_holder(fd)
        if old_pid and old_pid != os.getpid():
            log.info("%s: taking over the lock of process %d, which has ended", self.where, old_pid)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
        self._fd = fd
        return self

    def probe(self) -> None:
        """RunLocked if another process holds the lock now; takes nothing, writes nothing."""
        if not os.path.exists(self.path):
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise RunLocked(self.where, *_read_holder(fd)) from None
            raise
        finally:
            os.close(fd)

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # a released lock names nobody
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self if self.held else self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


# --------------------------------------------------------------------------- fingerprints


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file ("sha256:..."); for a folder, of its files' digests by relative name.

    Files over 256 MiB (model weights) are identified by "stat:<size>:<mtime_ns>" instead:
    hashing gigabytes at every start would cost minutes.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        h = hashlib.sha256()
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                full = os.path.join(root, name)
                h.update(f"{os.path.relpath(full, path)}\0{file_digest(full)}\n".encode())
        return "sha256:" + h.hexdigest()
    st = os.stat(path)
    if st.st_size > _HASH_LIMIT:
        return f"stat:{st.st_size}:{st.st_mtime_ns}"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def value_digest(value: Any) -> str:
    """SHA-256 of a JSON-able value's canonical form: a long setting (prompt templates) in one line."""
    return "sha256:" + hashlib.sha256(json.dumps(_jsonable(value), sort_keys=True).encode()).hexdigest()


def add_run_flags(parser: Any) -> None:
    """--restart / --allow-changed, for every command that writes a resumable output."""
    g = parser.add_argument_group("resume")
    g.add_argument("--restart", action="store_true", help="remove this job's earlier outputs and start afresh")
    g.add_argument("--allow-changed", action="store_true",
                   help="resume although settings changed, when every change is safe (e.g. more steps or more inputs)")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if hasattr(value, "__dataclass_fields__"):
        import dataclasses

        return _jsonable({f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}:{value.__qualname__}"
    return re.sub(r" at 0x[0-9a-f]+", "", repr(value))  # an address would differ at every start


_SECRET_NAME = re.compile(r"(^|_)(api_?key|secret|password|passwd|token|access_token|auth_token|bearer)$", re.I)


def _secret_values() -> set[str]:
    """Values of environment variables named like secrets: none may appear in a fingerprint."""
    return {v for k, v in os.environ.items() if len(v) >= 8 and re.search(r"KEY|TOKEN|SECRET|PASSWORD", k, re.I)}


def _check_no_secrets(tree: Any, secrets: set[str], path: str = "") -> None:
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            if _SECRET_NAME.search(str(k)) and v is not None:
                raise ValueError(f"fingerprint: {path + str(k)!r} looks like a secret; fingerprint the name of its variable instead")
            _check_no_secrets(v, secrets, f"{path}{k}.")
    elif isinstance(tree, list):
        for v in tree:
            _check_no_secrets(v, secrets, path)
    elif isinstance(tree, str) and any(sec in tree for sec in secrets):
        raise ValueError(f"fingerprint: {path[:-1]!r} holds the value of a secret environment variable; it must not be stored")


def fingerprint(config: Mapping[str, Any], files: Mapping[str, str | os.PathLike | None] = ()) -> dict[str, Any]:
    """The inputs of a run: `config` (JSON-able settings) and the digests of `files` by name."""
    cfg = _jsonable(dict(config))
    _check_no_secrets(cfg, _secret_values())
    digests = {name: (None if p is None else file_digest(p)) for name, p in dict(files).items()}
    return {"version": FINGERPRINT_VERSION, "config": cfg, "files": digests}


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping) and tree:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def diff_fingerprints(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) of every difference, in key order."""
    a, b = _flatten({"config": old.get("config", {}), "files": old.get("files", {})}), _flatten(
        {"config": new.get("config", {}), "files": new.get("files", {})})
    missing = object()
    return [(k, a.get(k, missing), b.get(k, missing)) for k in sorted(set(a) | set(b)) if a.get(k, missing) != b.get(k, missing)]


def _describe(key: str, old: Any, new: Any) -> str:
    key = key.removeprefix("config.")
    short = lambda v: "(unset)" if not isinstance(v, str | int | float | bool | type(None) | list) else (  # noqa: E731
        (v[:19] + "...") if isinstance(v, str) and v.startswith(("sha256:", "stat:")) else json.dumps(v)[:60])
    if key.startswith("files."):
        return f"input file {key[6:]} changed ({short(old)} -> {short(new)})"
    return f"{key}: {short(old)} -> {short(new)}"


def _write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fingerprint_path(where: str, folder: bool | None = None) -> str:
    folder = os.path.isdir(where) if folder is None else folder
    return os.path.join(where, "run.json") if folder else where + ".run.json"


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def open_run(
    where: str | os.PathLike,
    fp: Mapping[str, Any],
    *,
    folder: bool,
    outputs: Iterable[str] = (),
    safe: Iterable[str] = (),
    restart: bool = False,
    allow_changed: bool = False,
) -> RunLock:
    """Locks `where` and checks or records its fingerprint; returns the held lock.

    folder: `where` is a run folder (created if needed) or an output file (its lock and
    fingerprint sit beside it). outputs: the paths the job writes (removed by
    `restart`; for a file job, `where` itself is always one). safe: fnmatch patterns of
    dotted config keys that `allow_changed` may accept ("loop.total_steps").
    """
    where = os.fspath(where)
    if folder:
        os.makedirs(where, exist_ok=True)
    lock = RunLock(where).acquire()
    try:
        _check_or_record(where, dict(fp), folder, list(outputs), tuple(safe), restart, allow_changed)
    except BaseException:
        lock.release()
        raise
    return lock


def _check_or_record(where, fp, folder, outputs, safe, restart, allow_changed) -> None:
    path = fingerprint_path(where, folder)
    if restart:
        for out in ([] if folder else [where]) + outputs:
            _remove(out)
        if os.path.exists(path):
            os.remove(path)
        log.warning("%s: --restart: earlier outputs removed, starting afresh", where)
    elif os.path.exists(path):
        described = _compare(where, fp, safe, allow_changed, folder)
        if described:
            log.warning("%s: continuing with changed settings (--allow-changed): %s", where, "; ".join(described))
    elif _has_outputs(where, folder, outputs):
        log.warning("%s: earlier outputs but no recorded fingerprint (an older rubrax?); assuming the same inputs", where)
    _write_json_atomic(path, fp)


def check_run(where: str | os.PathLike, fp: Mapping[str, Any], *, folder: bool, outputs: Iterable[str] = (),
              safe: Iterable[str] = (), restart: bool = False, allow_changed: bool = False, probe_lock: bool = False) -> None:
    """`open_run`'s checks alone, taking and writing nothing: early (before costly set-up), or on
    the other processes of a multi-host run. `probe_lock`: RunLocked first if the folder is in use."""
    where = os.fspath(where)
    if probe_lock:
        RunLock(where).probe()
    if not restart and os.path.exists(fingerprint_path(where, folder)):
        _compare(where, fp, tuple(safe), allow_changed, folder)


def _compare(where: str, fp: Mapping[str, Any], safe: Sequence[str], allow_changed: bool, folder: bool) -> list[str]:
    """The accepted changes against the recorded fingerprint; InputsChanged for refused ones."""
    path = fingerprint_path(where, folder)
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunError(f"{path}: unreadable fingerprint ({err}); use --restart to start afresh") from None
    changes = diff_fingerprints(old, fp)
    unsafe = [k.removeprefix("config.") for k, _, _ in changes
              if not any(fnmatch.fnmatchcase(k.removeprefix("config."), pat) for pat in safe)]
    described = [_describe(*c) for c in changes]
    if changes and (not allow_changed or unsafe):
        raise InputsChanged(where, described, unsafe, allow_changed)
    return described


def _has_outputs(where: str, folder: bool, outputs: Sequence[str]) -> bool:
    return any(os.path.exists(p) for p in outputs) or (not folder and os.path.exists(where))


@contextlib.contextmanager
def run_folder(where: str | os.PathLike, fp: Mapping[str, Any], **kwargs: Any):
    """`open_run` as a context manager: the lock is released when the block ends."""
    lock = open_run(where, fp, **kwargs)
    try:
        yield lock
    finally:
        lock.release()


# --------------------------------------------------------------------------- exact resume


def cut_jsonl(path: str | os.PathLike, keep: Callable[[dict[str, Any]], bool], *, truncate: bool = True) -> list[dict[str, Any]]:
    """Cuts a JSONL file back to its longest prefix of records for which `keep` holds.

    A half-written last line (a killed writer) is cut too. Returns the records kept
    (`truncate=False` only reads them: another process is the writer). Used on resume:
    the lines written after the checkpoint are about to be written again.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        return []
    kept, good = [], 0
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            try:
                rec = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                break
            if not isinstance(rec, dict) or not keep(rec):
                break
            kept.append(rec)
            good += len(raw)
    if truncate and good < os.path.getsize(path):
        with open(path, "r+b") as f:
            f.truncate(good)
            f.flush()
            os.fsync(f.fileno())
    return kept
