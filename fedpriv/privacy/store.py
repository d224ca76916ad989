"""The ledger's storage: one SQLite file, created atomically, written in durable transactions.

Tables: ``meta`` (one row: format version, the ledger's random id), ``entries`` (the append-only,
keyed chain: kind, JSON body, tag), ``sets`` (each distinct record set once, as sorted 64-bit keys)
and ``records`` (which record id a key stands for, and the entry that first saw it). Only
``entries`` decides anything; a set is named by the digest of its bytes, which the entries carry.

Durability: a rollback journal fsynced on every commit; ``BEGIN IMMEDIATE`` for every write, so two
processes cannot both spend the last of a budget; a competing writer waits up to
:data:`BUSY_TIMEOUT_S`. Disk problems become one clear :class:`~fedpriv.errors.LedgerError`.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from fedpriv.errors import LedgerError
from fedpriv.privacy.records import RecordSet

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
# A competing process may hold the write lock while its accountant runs (PRV can take seconds).
BUSY_TIMEOUT_S = 60.0

_SCHEMA = """
CREATE TABLE meta (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    schema_version INTEGER NOT NULL,
    ledger_id TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE entries (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    body TEXT NOT NULL,
    tag TEXT NOT NULL
);
CREATE TABLE sets (
    digest TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    keys BLOB NOT NULL
);
CREATE TABLE records (
    key INTEGER PRIMARY KEY,
    record_id TEXT NOT NULL,
    first_entry INTEGER NOT NULL
);
"""
_TABLES = {
    "meta": {"id", "schema_version", "ledger_id", "created_at"},
    "entries": {"id", "kind", "body", "tag"},
    "sets": {"digest", "size", "keys"},
    "records": {"key", "record_id", "first_entry"},
}

class _SetCache(OrderedDict):
    """Record sets by digest, least recently used first, with the bytes of their keys counted."""

    def __init__(self) -> None:
        super().__init__()
        self.nbytes = 0

    def __setitem__(self, digest: str, records: RecordSet) -> None:
        if digest in self:
            self.nbytes -= super().__getitem__(digest).keys.nbytes
        super().__setitem__(digest, records)
        self.nbytes += records.keys.nbytes

    def __delitem__(self, digest: str) -> None:
        self.nbytes -= super().__getitem__(digest).keys.nbytes
        super().__delitem__(digest)

    def popitem(self, last: bool = True) -> tuple[str, RecordSet]:
        digest, records = super().popitem(last)
        self.nbytes -= records.keys.nbytes
        return digest, records

    def clear(self) -> None:
        super().clear()
        self.nbytes = 0


# Sets are content-addressed and immutable, so a process may keep the ones it read (a hospital
# reads the same few sets every round). Bounded by the bytes of their keys, not by their number:
# a ledger shared by 1,000 simulated hospitals holds thousands of small sets, which every round
# reads (a set of 100,000 records is 800 kB; 64 MiB hold 8 million records' keys).
_SET_CACHE: _SetCache = _SetCache()
_SET_CACHE_BYTES = 64 * 2**20
_SET_CACHE_LOCK = threading.Lock()


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


class LedgerStore:
    """One opened ledger file."""

    def __init__(self, path: Path, conn: sqlite3.Connection, ledger_id: str, schema_version: int) -> None:
        self.path = path
        self.ledger_id = ledger_id
        self.schema_version = schema_version
        self._conn: sqlite3.Connection | None = conn
        self._mutex = threading.RLock()

    @classmethod
    def open(cls, path: Path) -> LedgerStore:
        """Open an existing ledger file (never creating one) and check its structure."""
        conn = _connect(path)
        try:
            version, ledger_id = _check_structure(conn, path)
        except BaseException:
            conn.close()
            raise
        return cls(path, conn, ledger_id, version)

    def close(self) -> None:
        with self._mutex:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # ------------------------------------------------------------------ transactions

    @contextmanager
    def transaction(self, mode: str = "IMMEDIATE") -> Iterator[sqlite3.Connection]:
        """BEGIN ``mode`` ... COMMIT, rolled back on any error; SQLite errors become LedgerError."""
        with self._mutex:
            if self._conn is None:
                raise LedgerError(f"ledger {self.path} is closed")
            conn = self._conn
            try:
                conn.execute(f"BEGIN {mode}")
            except sqlite3.Error as exc:
                raise storage_error(self.path, exc, "use") from exc
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException as exc:
                _rollback(conn)
                if isinstance(exc, sqlite3.Error):
                    raise storage_error(self.path, exc, "use") from exc
                raise

    # ------------------------------------------------------------------ rows

    @staticmethod
    def entries(conn: sqlite3.Connection) -> list[tuple[int, str, str, str]]:
        return conn.execute("SELECT id, kind, body, tag FROM entries ORDER BY id").fetchall()

    @staticmethod
    def append(conn: sqlite3.Connection, entry_id: int, kind: str, body: str, tag: str) -> None:
        conn.execute("INSERT INTO entries (id, kind, body, tag) VALUES (?, ?, ?, ?)", (entry_id, kind, body, tag))

    def load_set(self, conn: sqlite3.Connection, digest: str, *, cached: bool = True) -> RecordSet:
        """The record set ``digest`` names; ``cached=False`` re-reads and re-checks it from the file."""
        with _SET_CACHE_LOCK:
            hit = _SET_CACHE.get(digest) if cached else None
            if hit is not None:
                _SET_CACHE.move_to_end(digest)
                return hit
        row = conn.execute("SELECT size, keys FROM sets WHERE digest = ?", (digest,)).fetchone()
        if row is None:
            raise LedgerError(f"ledger {self.path} is missing the record set {digest[:16]}... an entry refers to",
                              reason="its privacy ledger is damaged")
        size, blob = row
        if not isinstance(blob, bytes):
            raise LedgerError(f"ledger {self.path}: record set {digest[:16]}... is malformed",
                              reason="its privacy ledger is damaged")
        records = RecordSet.from_bytes(blob)
        if records.digest != digest or size != len(records):
            raise LedgerError(f"ledger {self.path}: record set {digest[:16]}... was altered (its digest or size "
                              "does not match)", reason="its privacy ledger was altered")
        with _SET_CACHE_LOCK:
            _SET_CACHE[digest] = records
            while _SET_CACHE.nbytes > _SET_CACHE_BYTES and len(_SET_CACHE) > 1:
                _SET_CACHE.popitem(last=False)
        return records

    def check_sets(self, conn: sqlite3.Connection, digests: Iterable[str]) -> None:
        """Read and check, from the file, each of these record sets that this process has not read yet.

        A set this process already read was checked against its digest then, and a digest names one
        content: the copy it keeps is the true set whatever the file holds now. LedgerError for a
        missing or altered set. (`PrivacyLedger.verify` re-reads every set instead.)
        """
        with _SET_CACHE_LOCK:
            unread = [digest for digest in digests if digest not in _SET_CACHE]
        for digest in unread:
            self.load_set(conn, digest)

    @staticmethod
    def save_set(conn: sqlite3.Connection, records: RecordSet) -> None:
        conn.execute("INSERT OR IGNORE INTO sets (digest, size, keys) VALUES (?, ?, ?)",
                     (records.digest, len(records), records.to_bytes()))

    @staticmethod
    def add_records(conn: sqlite3.Connection, keys: np.ndarray, ids: np.ndarray, entry_id: int) -> None:
        """Remember which id each new key stands for (for `fedpriv-ledger show --record`)."""
        signed = keys.astype(np.uint64).view(np.int64)
        conn.executemany("INSERT OR IGNORE INTO records (key, record_id, first_entry) VALUES (?, ?, ?)",
                         ((int(k), str(i), entry_id) for k, i in zip(signed, ids, strict=True)))

    @staticmethod
    def record_id(conn: sqlite3.Connection, key: int) -> tuple[str, int] | None:
        signed = int(np.array([key], dtype=np.uint64).view(np.int64)[0])
        row = conn.execute("SELECT record_id, first_entry FROM records WHERE key = ?", (signed,)).fetchone()
        return (str(row[0]), int(row[1])) if row else None

    @staticmethod
    def record_count(conn: sqlite3.Connection) -> int:
        return int(conn.execute("SELECT COUNT(*) FROM records").fetchone()[0])


# ---------------------------------------------------------------------- creating


def create(path: Path, ledger_id: str) -> None:
    """Create a complete new ledger at ``path`` atomically (built aside, then hard-linked in).

    ``path`` therefore either does not exist or is a complete ledger; an existing file is never
    treated as new, and two processes creating the same ledger at once share the first one linked.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".new", dir=path.parent)
        os.close(handle)
    except OSError as exc:
        raise storage_error(path, exc, "create") from exc
    try:
        conn = sqlite3.connect(temporary, isolation_level=None)
        try:
            _configure(conn)
            conn.execute("BEGIN IMMEDIATE")
            for statement in filter(str.strip, _SCHEMA.split(";")):
                conn.execute(statement)
            conn.execute("INSERT INTO meta (id, schema_version, ledger_id, created_at) VALUES (1, ?, ?, ?)",
                         (SCHEMA_VERSION, ledger_id, now()))
            conn.execute("COMMIT")
        finally:
            conn.close()
        _publish(Path(temporary), path)
    except (OSError, sqlite3.Error) as exc:
        raise storage_error(path, exc, "create") from exc
    finally:
        Path(temporary).unlink(missing_ok=True)


def _publish(temporary: Path, path: Path) -> None:
    """Move the finished ledger into place without ever replacing an existing file."""
    try:
        os.link(temporary, path)
    except FileExistsError:
        log.info("ledger %s was created concurrently; using that one", path)
        return
    except OSError:
        if path.exists():  # no hard links on this filesystem: a rename (a tiny race, never a reset)
            return
        os.replace(temporary, path)
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        log.debug("fsync of %s failed", directory, exc_info=True)
    finally:
        os.close(handle)


def _configure(conn: sqlite3.Connection) -> None:
    conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
    conn.execute("PRAGMA journal_mode = DELETE")
    conn.execute("PRAGMA synchronous = FULL")


def _connect(path: Path) -> sqlite3.Connection:
    uri = f"{path.resolve().as_uri()}?mode=rw"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                               check_same_thread=False)
        _configure(conn)
    except sqlite3.Error as exc:
        raise storage_error(path, exc, "open") from exc
    return conn


def _check_structure(conn: sqlite3.Connection, path: Path) -> tuple[int, str]:
    """SQLite's quick_check, the format version, the tables and their columns, one meta row."""
    try:
        (verdict,) = conn.execute("PRAGMA quick_check").fetchone()
        if verdict != "ok":
            raise LedgerError(f"ledger {path} is corrupt: {verdict}", reason="its privacy ledger is corrupt")
        rows = conn.execute("SELECT * FROM meta").fetchall()
        columns = [d[0] for d in conn.execute("SELECT * FROM meta").description or ()]
    except sqlite3.Error as exc:
        raise LedgerError(f"ledger {path} is unreadable or not a fedpriv ledger: {exc}",
                          reason="its privacy ledger is unreadable") from exc
    if len(rows) != 1:
        raise LedgerError(f"ledger {path} is corrupt: expected one meta row, found {len(rows)}",
                          reason="its privacy ledger is corrupt")
    meta = dict(zip(columns, rows[0], strict=True))
    version = meta.get("schema_version")
    if version == 1:
        raise LegacyLedger(path)
    if version != SCHEMA_VERSION:
        raise LedgerError(f"ledger {path} has format version {version!r}; this fedpriv reads {SCHEMA_VERSION}",
                          reason="its privacy ledger has an unknown format")
    for table, expected in _TABLES.items():
        found = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if found != expected:
            raise LedgerError(f"ledger {path} is not a fedpriv ledger: table {table!r} is missing or altered",
                              reason="its privacy ledger is damaged")
    if not isinstance(meta.get("ledger_id"), str) or not meta["ledger_id"]:
        raise LedgerError(f"ledger {path} is corrupt: malformed meta row", reason="its privacy ledger is corrupt")
    return int(version), meta["ledger_id"]


class LegacyLedger(LedgerError):
    """A ledger in the first format (one budget for a whole-dataset fingerprint)."""

    def __init__(self, path: Path) -> None:
        super().__init__(
            f"ledger {path} is in fedpriv's first format (one budget for the whole record set, no record ids). "
            f"It is kept as it is; migrate it with `fedpriv-ledger migrate {path} --data ...` (every event is "
            "kept, charged to each record of that data), or read it with an older fedpriv",
            reason="its privacy ledger is in an old format and must be migrated first")
        self.path = path


def _rollback(conn: sqlite3.Connection) -> None:
    try:
        conn.execute("ROLLBACK")
    except sqlite3.Error:  # no transaction left to roll back (SQLite may already have done it)
        log.debug("rollback failed", exc_info=True)


def storage_error(path: Path, exc: OSError | sqlite3.Error, action: str) -> LedgerError:
    """One clear LedgerError for a ledger the disk will not let us use (the hospital fails closed).

    SQLite reports a full disk as SQLITE_FULL, other refused writes (a quota, a file-size limit, a
    failing disk) as SQLITE_IOERR_*, and a file or folder it may not write as SQLITE_READONLY or
    SQLITE_CANTOPEN; all come here, as do plain OS errors from creating the ledger.
    """
    text = str(exc).lower()
    code = getattr(exc, "errno", None)
    name = getattr(exc, "sqlite_errorname", "")
    if code in (errno.ENOSPC, errno.EDQUOT) or name == "SQLITE_FULL" or "disk is full" in text:
        reason, fix = "the disk is full", f"free space on the disk holding {path.parent}, or move the ledger"
    elif code == errno.EFBIG or name.startswith("SQLITE_IOERR"):
        reason, fix = ("the disk refused a write (full, over quota or a file-size limit, or failing)",
                       f"free space on the disk holding {path.parent} and check it, or move the ledger")
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS) or name.startswith("SQLITE_READONLY") \
            or "readonly" in text or "read-only" in text:
        reason, fix = "no write permission", (f"let the hospital's user write to {path.parent} (and the ledger file), "
                                              "or choose a writable ledger path")
    elif name == "SQLITE_BUSY" or "locked" in text:
        reason, fix = "another process holds it locked", "retry when the other process has finished"
    elif name == "SQLITE_CANTOPEN" or "unable to open" in text or isinstance(exc, OSError):
        reason, fix = "it cannot be opened", (f"check that {path.parent} exists and is writable by the "
                                              "hospital's user (SQLite also writes a journal file next to the ledger)")
    else:
        reason, fix = "database error", "check the ledger with `fedpriv-ledger verify`"
    return LedgerError(f"cannot {action} privacy ledger {path}: {reason} ({exc}); the hospital trains "
                       f"nothing and sends nothing until it is fixed (fail closed). Fix: {fix}",
                       reason=f"its privacy ledger cannot be used: {reason}")


def folder_write_problem(folder: Path) -> str | None:
    """Why a ledger could not be created or written in ``folder`` (None if it can), found by trying.

    Trying beats checking mode bits: it also catches read-only mounts, a full disk and ACLs.
    """
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".fedpriv-write-check-") as probe:
            probe.write(b"x" * 4096)  # a page, as SQLite would write
            probe.flush()
    except OSError as exc:
        return f"cannot write a file there ({exc.strerror or exc})"
    return None
