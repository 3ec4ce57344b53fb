"""Local-directory backend: blobs fanned out by digest prefix, links and counts in SQLite.

Layout under ``root``::

    blobs/ab/cd/abcd...(64 hex)   the bytes, exactly as uploaded, read-only
    tmp/<pid>-<hex>-<random>      uploads being written (never visible as blobs)
    trash/<hex>                   blobs a GC batch collected, unlinked once it committed
    quarantine/<hex>              blobs fsck found corrupt
    index.sqlite3                 blobs, runs (with counts), run -> blob links
    index.lock                    held (flock) by whichever process is writing the index
    reserve                       space set aside for deleting on a full volume (see below)

Atomicity: bytes go to ``tmp/``, are fsynced, then hard-linked into place inside the same SQLite
write transaction (``BEGIN IMMEDIATE``) that records the blob and its link; the temp name goes
once that has committed. A process killed in between leaves its temp file, named by its pid and
the digest: the next start (or ``fsck --repair``, for files of any other origin) removes the blob
file that no index row names, an orphan.

GC and run deletion go in batches, each its own write transaction, and release the write lock
between them for as long as the batch held it, so an upload waits at most about one batch. A batch
is bounded in time, not only in rows (:class:`_Pacer`): it takes as many rows (at most ``batch``)
as the last batches did in ``_BATCH_SECONDS`` of holding the lock, select and commit included, so
the bound holds on a slow or busy disk too. What needs no lock happens outside it: GC moves a
batch's files into ``trash/`` (a rename, a quarter of an unlink's cost, and no blocks freed) and
unlinks them once the batch has committed. The write-ahead log (truncated to ``_WAL_LIMIT_BYTES`` at
each checkpoint) stays bounded whatever is deleted: SQLite checkpoints it in the commit that
crosses 1,000 pages, under the write lock, where no writer appends meanwhile (checkpoints outside
the lock, raced by the other writers, never caught up: the log grew past 30 MB while filling).
Each batch selects what it deletes under the lock, so a put that finds (or re-creates) a blob and
a GC that deletes it are serialised: a blob being linked is never deleted.
SQLite in WAL mode makes this hold across the worker processes of one server as well.

Uploads are refused (507) once the volume's free space would drop below ``min_free_bytes``: that
reserve is what run deletion and GC write their index changes into, so a full store can always
be emptied through the API. Should something else fill the volume, the ``reserve`` file (up to
16 MiB of the reserve, allocated at start) is given up for a deletion or GC that meets a full disk,
and made again once GC has freed space.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import itertools
import logging
import os
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from mmstore_client.digest import compute_digest, digest_hex
from mmstore_client.models import BlobInfo, GcReport, RunBlobPage, RunDeleted, RunInfo

from ..errors import InsufficientStorageError
from .base import Check, FsckReport, PutResult, Storage

# blobs and links are clustered by their primary key (WITHOUT ROWID): a GC or deletion batch walks
# them in key order, so it dirties a few neighbouring pages. As rowid tables their rows lay in
# upload order, one random page per row, and a batch of 1,000 dirtied up to 1,000 pages: deleting
# one run cost 43.6 us a link at 10^4 images and 115.5 at 10^5, clustered 14.1 and 18.9.
_CLUSTERED = {
    "blobs": """(
    digest TEXT PRIMARY KEY, size INTEGER NOT NULL, mime TEXT NOT NULL, format TEXT NOT NULL,
    width INTEGER NOT NULL, height INTEGER NOT NULL, created_at REAL NOT NULL,
    refcount INTEGER NOT NULL DEFAULT 0, orphaned_at REAL
) WITHOUT ROWID""",
    "links": """(
    run TEXT NOT NULL, digest TEXT NOT NULL, created_at REAL NOT NULL, PRIMARY KEY (run, digest)
) WITHOUT ROWID""",
}
_INDEXES = """
DROP INDEX IF EXISTS blobs_garbage;
CREATE INDEX IF NOT EXISTS blobs_orphaned ON blobs (orphaned_at) WHERE refcount <= 0;
"""
_SCHEMA = (
    "".join(f"CREATE TABLE IF NOT EXISTS {name} {ddl};\n" for name, ddl in _CLUSTERED.items())
    + """
CREATE TABLE IF NOT EXISTS runs (
    run TEXT PRIMARY KEY, blob_count INTEGER NOT NULL DEFAULT 0, bytes INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL, updated_at REAL NOT NULL
);
"""
    + _INDEXES
)
# Only garbage is indexed (partial index): linking or unlinking a live blob then updates no index
# entry. The former index on (refcount, orphaned_at) moved an entry at every link, so deleting a run
# cost more per link as the store grew.
_BLOB_COLUMNS = "digest, size, mime, format, width, height"
_HEX_RE = re.compile(r"[0-9a-f]{64}")
_WAL_LIMIT_BYTES = 16 << 20  # the log is cut back to this at each checkpoint
_PAGE = 1000  # rows per query when streaming the index (fsck)
_RESERVE_BYTES = 16 << 20  # the reserve file's most (see the module's docstring)
_T = TypeVar("_T")
_CHUNK = 50  # rows between two looks at the clock in a GC or deletion batch
_BATCH_SECONDS = 0.05  # what a batch aims to hold the write lock for, select and commit included
_FIRST_BATCH = 100  # rows of a process's first GC or deletion batch, before any pace is measured

log = logging.getLogger(__name__)


def _blob(row: tuple) -> BlobInfo:
    return BlobInfo(digest=row[0], size=row[1], mime=row[2], format=row[3], width=row[4], height=row[5])


def _run(row: tuple) -> RunInfo:
    return RunInfo(run=row[0], blob_count=row[1], bytes=row[2], created_at=row[3], updated_at=row[4])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _rows_in(db: sqlite3.Connection, query: str, values: list[str]) -> Iterator[tuple]:
    """The rows of ``query``, whose ``{marks}`` is an IN list, over ``values``, 500 at a time."""
    for i in range(0, len(values), 500):
        chunk = values[i : i + 500]
        yield from db.execute(query.format(marks=",".join("?" * len(chunk))), chunk)


def _remove_empty_chain(leaf: Path) -> None:
    for d in (leaf, leaf.parent):
        try:
            d.rmdir()
        except OSError:  # not empty (the common case), or gone
            return


@functools.cache  # one per process, its threads made when first used
def _rmdir_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(16, thread_name_prefix="mmstore-rmdir")


def _is_full(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.OperationalError):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


class _Pacer:
    """The rows of a GC's or deletion's next batch, so that a batch holds the write lock about
    ``_BATCH_SECONDS`` on this disk at this moment: a fixed count held it 40 ms or 400 ms
    depending on the store's size and the disk's load (its commit alone 40-100 ms for 1,000 rows
    at 10^5 images on a busy disk), so the count follows the time each row took in the last batch
    (halving at once, at most doubling). ``batches`` and ``longest`` count since :meth:`start`."""

    def __init__(self, most: int) -> None:
        self.most = most
        self.rows = min(most, _FIRST_BATCH)
        self.batches = 0
        self.longest = 0.0

    def start(self) -> _Pacer:
        """For a new GC or deletion: the pace so far kept, the counts reset."""
        self.batches, self.longest = 0, 0.0
        return self

    def held(self, seconds: float, rows: int, limit: int) -> None:
        """A batch selected at most ``limit`` rows, did ``rows`` of them and held the lock ``seconds``."""
        self.batches += 1
        self.longest = max(self.longest, seconds)
        log.debug("batch of %d rows held the write lock %.1f ms", rows, seconds * 1e3)
        if rows < limit and seconds <= _BATCH_SECONDS:
            return  # the end of the work, within the budget: its fixed costs say nothing of a full batch
        fits = int(_BATCH_SECONDS / max(seconds, 1e-6) * max(rows, 1))
        self.rows = max(1, min(self.most, 2 * self.rows, fits))

    @staticmethod
    def pause(held: float, released: float) -> None:
        """Between two batches: stay off the write lock as long as the batch held it (counted from
        its release: the work done outside the lock since is part of the pause), so uploads queued
        meanwhile get it (neither a thread lock nor flock is fair to waiters)."""
        time.sleep(max(released + held - time.monotonic(), 0.001))


class LocalStorage(Storage):
    def __init__(
        self, root: Path, *, fsync: bool = True, batch: int = 1000, min_free_bytes: int = 64 << 20
    ) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self.batch = batch
        self.min_free_bytes = min_free_bytes
        self.blob_dir = self.root / "blobs"
        self._blob_dir_str = str(self.blob_dir)
        self.tmp_dir = self.root / "tmp"
        self.trash_dir = self.root / "trash"
        self.quarantine_dir = self.root / "quarantine"
        for d in (self.blob_dir, self.tmp_dir, self.trash_dir, self.quarantine_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / "index.sqlite3"
        self._local = threading.local()
        # Writers queue here, not in SQLite's busy handler, which sleeps and polls (1 to 100 ms at a
        # time: with two worker processes writing, p99s of seconds): threads of this process on a
        # lock, processes on an flock of the index's lock file, both woken as soon as it is free.
        self._write_lock = threading.Lock()
        self._write_lock_file = os.open(self.root / "index.lock", os.O_RDWR | os.O_CREAT, 0o644)
        # one pace per kind of batch, kept from one GC or deletion to the next
        self._delete_pacer, self._gc_pacer = _Pacer(batch), _Pacer(batch)
        self._db().executescript(_SCHEMA)
        self._cluster_tables()
        self._recover_dead_uploads()
        self._empty_trash(self.trash_dir.iterdir())
        self.reserve_path = self.root / "reserve"
        self._make_reserve()

    def _cluster_tables(self) -> None:
        """Rewrite a store made before blobs and links were clustered (see ``_CLUSTERED``): each
        table copied into its clustered twin, in one write transaction, so a crash leaves the old
        table whole and the next start does it again; a second worker starting meanwhile finds it
        done once it holds the lock. Takes a few seconds per million rows, once."""

        def rowid_tables(db: sqlite3.Connection) -> list[str]:
            rows = db.execute(
                "SELECT name, sql FROM sqlite_master WHERE type = 'table' AND name IN ('blobs', 'links')"
            ).fetchall()
            return [name for name, sql in rows if "WITHOUT ROWID" not in sql.upper()]

        if not rowid_tables(self._db()):
            return
        with self._write() as db:
            for name in rowid_tables(db):
                started = time.monotonic()
                db.execute(f"CREATE TABLE {name}_clustered {_CLUSTERED[name]}")
                columns = ", ".join(r[1] for r in db.execute(f"PRAGMA table_info({name})"))
                db.execute(f"INSERT INTO {name}_clustered ({columns}) SELECT {columns} FROM {name}")
                db.execute(f"DROP TABLE {name}")
                db.execute(f"ALTER TABLE {name}_clustered RENAME TO {name}")
                log.info("index table %s clustered by its key in %.1f s", name, time.monotonic() - started)
            for statement in _INDEXES.split(";"):  # DROP TABLE took blobs' index with it
                if statement.strip():
                    db.execute(statement)

    # -- plumbing -----------------------------------------------------------------------
    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.db_path, timeout=60, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL" if not self.fsync else "PRAGMA synchronous=FULL")
            db.execute(f"PRAGMA journal_size_limit={_WAL_LIMIT_BYTES}")
            self._local.db = db
        return db

    @contextlib.contextmanager
    def _full_disk_is_507(self) -> Iterator[None]:
        try:
            yield
        except (OSError, sqlite3.OperationalError) as exc:
            if not _is_full(exc):
                raise
            raise InsufficientStorageError(
                f"the volume of {self.root} is full: delete runs (DELETE /v1/runs/{{run}}) and collect "
                "them (POST /v1/gc), or free space on the volume",
            ) from exc

    @contextlib.contextmanager
    def _locked(self) -> Iterator[sqlite3.Connection]:
        """The write lock (across threads and processes), no transaction."""
        with self._write_lock:
            fcntl.flock(self._write_lock_file, fcntl.LOCK_EX)
            try:
                yield self._db()
            finally:
                fcntl.flock(self._write_lock_file, fcntl.LOCK_UN)

    @staticmethod
    @contextlib.contextmanager
    def _transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # SQLite rolls back by itself after some errors (a full disk)
                db.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One serialised write transaction (across threads and processes)."""
        with self._full_disk_is_507(), self._locked() as db, self._transaction(db):
            yield db

    def blob_path(self, digest: str) -> Path:
        h = digest_hex(digest)
        return self.blob_dir / h[:2] / h[2:4] / h

    @staticmethod
    def _remove_empty_dirs(leaves: Iterable[Path]) -> None:
        """Remove fan-out folders left empty. No lock: rmdir fails on a folder that is not empty,
        and a put whose folder went between its mkdir and its link makes it again (:meth:`_place`).
        From several threads: a removal costs milliseconds on some volumes (ext4 mounted with
        ``discard``: 3 ms each, 0.4 ms with 16 at once), so never under the write lock, nor one by one.
        """
        list(_rmdir_pool().map(_remove_empty_chain, leaves))

    @staticmethod
    def _empty_trash(files: Iterable[Path]) -> None:
        """Unlink collected blobs (no lock: nothing names them any more; an unlink frees blocks, ext4
        with ``discard`` trims them: 80 us each on this disk, four times a rename)."""
        for f in files:
            f.unlink(missing_ok=True)

    def _recover_dead_uploads(self) -> None:
        """Delete what killed uploads left: their temp files, and the blob file of one killed
        between placing it and committing its index row (its temp name says which)."""
        for f in self.tmp_dir.iterdir():
            pid, _, rest = f.name.partition("-")
            if pid.isdigit() and _pid_alive(int(pid)):
                continue
            h = rest.split("-", 1)[0]
            if _HEX_RE.fullmatch(h):
                self._remove_orphan(self.blob_dir / h[:2] / h[2:4] / h)
            f.unlink(missing_ok=True)

    def _remove_orphan(self, path: Path) -> bool:
        """Remove ``path`` from blobs/ if no index row names it; True if it was an orphan."""
        with self._locked() as db:
            known = db.execute("SELECT 1 FROM blobs WHERE digest = ?", (f"blake3:{path.name}",)).fetchone()
            if known is not None:
                return False
            try:
                path.unlink()
            except FileNotFoundError:
                return False
        self._remove_empty_dirs([path.parent])
        return True

    def _make_reserve(self) -> None:
        size = min(self.min_free_bytes, _RESERVE_BYTES)
        if not size or self.reserve_path.exists():
            return
        st = os.statvfs(self.root)
        if st.f_bavail * st.f_frsize < 2 * size:
            return  # no room to set aside now; the next GC tries again
        tmp = self.tmp_dir / f"{os.getpid()}-reserve-{uuid.uuid4().hex[:12]}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.posix_fallocate(fd, 0, size)
            finally:
                os.close(fd)
            os.replace(tmp, self.reserve_path)
        except OSError:
            tmp.unlink(missing_ok=True)

    def _freeing(self, action: Callable[[], _T]) -> _T:
        """``action`` (a deletion or GC), given the reserve file's space if it meets a full disk."""
        try:
            return action()
        except InsufficientStorageError:
            if not self.reserve_path.exists():
                raise
            self.reserve_path.unlink(missing_ok=True)
        return action()

    def _check_free_space(self, nbytes: int) -> None:
        st = os.statvfs(self.root)
        free = st.f_bavail * st.f_frsize
        if free - nbytes < self.min_free_bytes:
            raise InsufficientStorageError(
                f"the volume of {self.root} has {free} bytes free: an upload of {nbytes} would leave "
                f"less than the {self.min_free_bytes} kept for deleting (MMSTORE_MIN_FREE_BYTES). "
                "Delete runs (DELETE /v1/runs/{run}) and collect them (POST /v1/gc), or grow the volume",
                free_bytes=free,
            )

    def _write_temp(self, digest: str, data: bytes) -> Path:
        tmp = self.tmp_dir / f"{os.getpid()}-{digest_hex(digest)}-{uuid.uuid4().hex[:12]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def _place(self, tmp: Path, final: Path) -> None:
        """Hard-link the temp file into blobs/ (the temp name stays until the index commits)."""
        os.chmod(tmp, 0o444)
        for attempt in itertools.count():
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(tmp, final)
            except FileExistsError:  # an orphan (no index row: see put) of a killed upload; replace it
                final.unlink()
            except FileNotFoundError:  # a GC removed the folder as it emptied: make it again
                if attempt >= 3:
                    raise
            else:
                break
        self._fsync_dir(final.parent)

    def _fsync_dir(self, path: Path) -> None:
        if self.fsync:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _link(self, db: sqlite3.Connection, run: str, info: BlobInfo, now: float) -> None:
        cur = db.execute(
            "INSERT OR IGNORE INTO links (run, digest, created_at) VALUES (?, ?, ?)",
            (run, info.digest, now),
        )
        db.execute(
            "INSERT OR IGNORE INTO runs (run, created_at, updated_at) VALUES (?, ?, ?)",
            (run, now, now),
        )
        if cur.rowcount:
            db.execute(
                "UPDATE runs SET blob_count = blob_count + 1, bytes = bytes + ?, updated_at = ? "
                "WHERE run = ?",
                (info.size, now, run),
            )
            db.execute(
                "UPDATE blobs SET refcount = refcount + 1, orphaned_at = NULL WHERE digest = ?",
                (info.digest,),
            )

    # -- Storage ------------------------------------------------------------------------
    def put(
        self, run: str, digest: str, data: bytes, info: BlobInfo, *, check: Check | None = None
    ) -> PutResult:
        if check is not None:
            check()
        with self._full_disk_is_507():
            self._check_free_space(len(data))
            tmp = self._write_temp(digest, data)
        try:
            with self._write() as db:
                row = db.execute(f"SELECT {_BLOB_COLUMNS} FROM blobs WHERE digest = ?", (digest,)).fetchone()
                created = row is None
                final = self.blob_path(digest)
                # a row whose file is gone: a GC killed between its unlink and its commit; put it back
                if created or not final.exists():
                    self._place(tmp, final)
                if created:
                    db.execute(
                        f"INSERT INTO blobs ({_BLOB_COLUMNS}, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (digest, info.size, info.mime, info.format, info.width, info.height, time.time()),
                    )
                else:
                    info = _blob(row)
                self._link(db, run, info, time.time())
        finally:
            tmp.unlink(missing_ok=True)
        return PutResult(info, created=created)

    def link_existing(self, run: str, digest: str, *, check: Check | None = None) -> BlobInfo | None:
        if self.info(digest) is None:  # common case for new uploads: no write lock taken
            return None
        if check is not None:
            check()  # nothing to retract: a stored blob passed its check before it was written
        with self._write() as db:
            row = db.execute(f"SELECT {_BLOB_COLUMNS} FROM blobs WHERE digest = ?", (digest,)).fetchone()
            if row is None or not self.blob_path(digest).exists():
                return None
            info = _blob(row)
            self._link(db, run, info, time.time())
            return info

    def info(self, digest: str) -> BlobInfo | None:
        row = self._db().execute(f"SELECT {_BLOB_COLUMNS} FROM blobs WHERE digest = ?", (digest,)).fetchone()
        return _blob(row) if row else None

    def exists(self, digest: str) -> bool:
        """Whether the blob's file is there (a stat: what a cached GET/HEAD answer is checked by)."""
        h = digest_hex(digest)
        return os.path.exists(f"{self._blob_dir_str}/{h[:2]}/{h[2:4]}/{h}")

    def read(self, digest: str, start: int, length: int) -> bytes:
        # os.open + pread: a quarter less CPU per small GET than open()/seek()/read() (bench/)
        h = digest_hex(digest)
        fd = os.open(f"{self._blob_dir_str}/{h[:2]}/{h[2:4]}/{h}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            parts, got = [], 0
            while got < length:
                chunk = os.pread(fd, length - got, start + got)
                if not chunk:
                    break
                parts.append(chunk)
                got += len(chunk)
            return parts[0] if len(parts) == 1 else b"".join(parts)
        finally:
            os.close(fd)

    def missing(self, digests: list[str]) -> list[str]:
        query = "SELECT digest FROM blobs WHERE digest IN ({marks})"
        present = {r[0] for r in _rows_in(self._db(), query, digests)}
        return [d for d in dict.fromkeys(digests) if d not in present]

    def runs(self) -> list[RunInfo]:
        rows = self._db().execute(
            "SELECT run, blob_count, bytes, created_at, updated_at FROM runs ORDER BY run"
        )
        return [_run(r) for r in rows]

    def run(self, run: str) -> RunInfo | None:
        row = (
            self._db()
            .execute("SELECT run, blob_count, bytes, created_at, updated_at FROM runs WHERE run = ?", (run,))
            .fetchone()
        )
        return _run(row) if row else None

    def run_blobs(self, run: str, *, limit: int, cursor: str | None) -> RunBlobPage | None:
        if self.run(run) is None:
            return None
        rows = (
            self._db()
            .execute(
                f"SELECT {', '.join('b.' + c.strip() for c in _BLOB_COLUMNS.split(','))} "
                "FROM links l JOIN blobs b ON b.digest = l.digest "
                "WHERE l.run = ? AND l.digest > ? ORDER BY l.digest LIMIT ?",
                (run, cursor or "", limit + 1),
            )
            .fetchall()
        )
        blobs = [_blob(r) for r in rows[:limit]]
        next_cursor = blobs[-1].digest if len(rows) > limit else None
        return RunBlobPage(run=run, blobs=blobs, next_cursor=next_cursor)

    def delete_run(self, run: str) -> RunDeleted | None:
        return self._freeing(lambda: self._delete_run(run))

    def _delete_run(self, run: str) -> RunDeleted | None:
        """Unlink the run's blobs, one batch per transaction; the run goes with its last link.

        Until then the run is listed with what it still links (its counts drop batch by batch); an
        upload into it while it is being deleted is unlinked too, as if it came first. A deletion
        cut short (a crash) is finished by deleting the run again.
        """
        unlinked = orphaned = 0
        pacer = self._delete_pacer.start()
        while True:
            started = time.monotonic()
            limit = pacer.rows  # the pace is shared: another deletion may change it meanwhile
            with self._write() as db:
                if not unlinked and db.execute("SELECT 1 FROM runs WHERE run = ?", (run,)).fetchone() is None:
                    return None
                rows = db.execute(
                    "SELECT l.digest, COALESCE(b.size, 0), COALESCE(b.refcount, 0) FROM links l "
                    "LEFT JOIN blobs b ON b.digest = l.digest WHERE l.run = ? LIMIT ?",
                    (run, limit),
                ).fetchall()
                now = time.time()
                unlinked_before = unlinked
                for chunk in self._within_budget(rows, started):
                    db.executemany(
                        "DELETE FROM links WHERE run = ? AND digest = ?", ((run, r[0]) for r in chunk)
                    )
                    db.executemany(
                        "UPDATE blobs SET refcount = refcount - 1, "
                        "orphaned_at = CASE WHEN refcount <= 1 THEN ? ELSE orphaned_at END WHERE digest = ?",
                        ((now, r[0]) for r in chunk),
                    )
                    unlinked += len(chunk)
                    orphaned += sum(1 for r in chunk if r[2] <= 1)
                    db.execute(
                        "UPDATE runs SET blob_count = blob_count - ?, bytes = bytes - ?, updated_at = ? "
                        "WHERE run = ?",
                        (len(chunk), sum(r[1] for r in chunk), now, run),
                    )
                # every link the run had left was in this batch, and the batch unlinked all of them
                done = len(rows) < limit and unlinked - unlinked_before == len(rows)
                if done:
                    db.execute("DELETE FROM runs WHERE run = ?", (run,))
            released = time.monotonic()
            pacer.held(released - started, unlinked - unlinked_before, limit)
            if done:
                log.info(
                    "run %s deleted: %d links in %d batches, the longest held the write lock %.1f ms",
                    run,
                    unlinked,
                    pacer.batches,
                    pacer.longest * 1e3,
                )
                return RunDeleted(run=run, unlinked=unlinked, orphaned=orphaned)
            pacer.pause(released - started, released)

    def gc(self, grace_seconds: float) -> GcReport:
        report = self._freeing(lambda: self._gc(grace_seconds))
        self._make_reserve()
        return report

    def _gc(self, grace_seconds: float) -> GcReport:
        """Delete garbage older than the grace period, one batch per transaction.

        Within a batch the files go (into trash/) before the rows commit: a crash in between leaves
        rows of garbage without files (the next start empties trash/), which the next GC deletes and
        a put of the same bytes re-creates (never a file that no row names, which only fsck would
        find). The trash is unlinked once the batch has committed, outside the lock: a put of the
        same bytes meanwhile places a new file in blobs/, which no unlink of trash/ touches.
        """
        cutoff = time.time() - grace_seconds
        deleted = freed = 0
        pacer = self._gc_pacer.start()
        with self._full_disk_is_507():
            while True:
                started = time.monotonic()
                gone: list[tuple[str, int]] = []
                limit = pacer.rows
                with self._locked() as db, self._transaction(db):
                    rows = db.execute(
                        "SELECT digest, size FROM blobs WHERE refcount <= 0 AND orphaned_at <= ? LIMIT ?",
                        (cutoff, limit),
                    ).fetchall()
                    for chunk in self._within_budget(rows, started):
                        for digest, _ in chunk:
                            with contextlib.suppress(FileNotFoundError):  # a GC cut short took it
                                os.rename(self.blob_path(digest), self.trash_dir / digest_hex(digest))
                        db.executemany("DELETE FROM blobs WHERE digest = ?", ((r[0],) for r in chunk))
                        gone += chunk
                released = time.monotonic()
                pacer.held(released - started, len(gone), limit)
                self._empty_trash(self.trash_dir / digest_hex(digest) for digest, _ in gone)
                self._remove_empty_dirs({self.blob_path(digest).parent for digest, _ in gone})
                deleted += len(gone)
                freed += sum(size for _, size in gone)
                if len(rows) < limit and len(gone) == len(rows):
                    break
                pacer.pause(released - started, released)
            self._db().execute("PRAGMA wal_checkpoint(PASSIVE)")  # the log is cut back at its next reset
            log.info(
                "gc: %d blobs in %d batches, the longest held the write lock %.1f ms",
                deleted,
                pacer.batches,
                pacer.longest * 1e3,
            )
            in_grace = (
                self._db()
                .execute("SELECT COUNT(*) FROM blobs WHERE refcount <= 0 AND orphaned_at > ?", (cutoff,))
                .fetchone()[0]
            )
        return GcReport(
            deleted=deleted, bytes_freed=freed, garbage_in_grace=in_grace, grace_seconds=grace_seconds
        )

    @staticmethod
    def _within_budget(rows: list[tuple], started: float) -> Iterator[list[tuple]]:
        """``rows`` in chunks, until the batch has held the write lock for ``_BATCH_SECONDS``: a
        batch is bounded in time as well as in rows, however slow the disk is at the moment."""
        for i in range(0, len(rows), _CHUNK):
            if i and time.monotonic() - started > _BATCH_SECONDS:
                return
            yield rows[i : i + _CHUNK]

    def fsck(self, *, quarantine: bool, progress: Callable[[int], None] | None = None) -> FsckReport:
        """Re-hash every indexed blob, page by page (memory bounded whatever the store's size), then
        list blobs/ folder by folder for files no index row names (orphans).

        ``quarantine`` repairs: corrupt blobs move to quarantine/ and are forgotten, orphans and
        empty folders are removed. A garbage row whose file is gone (a GC cut short) is not
        reported: the next GC deletes it.
        """
        corrupt: dict[str, int] = {}
        missing: list[str] = []
        checked = 0
        db = self._db()
        last = ""
        while rows := db.execute(
            "SELECT digest, size, refcount FROM blobs WHERE digest > ? ORDER BY digest LIMIT ?", (last, _PAGE)
        ).fetchall():
            last = rows[-1][0]
            for digest, size, refcount in rows:
                checked += 1
                try:
                    data = self.blob_path(digest).read_bytes()
                except FileNotFoundError:
                    if refcount > 0:
                        missing.append(digest)
                else:
                    if compute_digest(data) != digest:
                        corrupt[digest] = size
                if progress:
                    progress(size)
        if quarantine:
            self._quarantine(corrupt)
        orphans = list(self._orphans(remove=quarantine))
        return FsckReport(checked=checked, corrupt=list(corrupt), missing=missing, orphans=orphans)

    def _orphans(self, *, remove: bool) -> Iterator[str]:
        """Files in blobs/ that no index row names (``blake3:<hex>``, or the path of a stray name)."""
        db = self._db()
        for top in sorted(os.scandir(self.blob_dir), key=lambda e: e.name):
            if not top.is_dir(follow_symlinks=False):
                yield os.path.relpath(top.path, self.root)
                continue
            for leaf in sorted(os.scandir(top.path), key=lambda e: e.name):
                names = [e.name for e in os.scandir(leaf.path)] if leaf.is_dir(follow_symlinks=False) else []
                query = "SELECT digest FROM blobs WHERE digest IN ({marks})"
                known = {r[0][7:] for r in _rows_in(db, query, [f"blake3:{n}" for n in names])}
                for name in names:
                    if name in known:
                        continue
                    path = Path(leaf.path) / name
                    well_placed = _HEX_RE.fullmatch(name) and name[:2] == top.name and name[2:4] == leaf.name
                    if not well_placed:
                        yield os.path.relpath(path, self.root)
                    elif remove:
                        if self._remove_orphan(path):  # confirmed under the lock: not an upload under way
                            yield f"blake3:{name}"
                    elif self._is_orphan(path):
                        yield f"blake3:{name}"
                if remove and not names:
                    self._remove_empty_dirs([Path(leaf.path)])

    def _is_orphan(self, path: Path) -> bool:
        """Under the write lock, where no upload is between placing its file and committing."""
        with self._locked() as db:
            known = db.execute("SELECT 1 FROM blobs WHERE digest = ?", (f"blake3:{path.name}",)).fetchone()
            return known is None and path.exists()

    def _quarantine(self, corrupt: dict[str, int]) -> None:
        """Move corrupt blobs aside and forget them, so clients get 404 (and re-upload), never bad bytes.

        Their links are found in one pass over the index, outside the lock, then removed (with the
        runs' counts) unless the blob was uploaded again meanwhile.
        """
        if not corrupt:
            return
        with self._write() as db:
            for digest in corrupt:
                os.replace(self.blob_path(digest), self.quarantine_dir / digest_hex(digest))
                db.execute("DELETE FROM blobs WHERE digest = ?", (digest,))
        stale = list(
            _rows_in(self._db(), "SELECT run, digest FROM links WHERE digest IN ({marks})", list(corrupt))
        )
        with self._write() as db:
            for run, digest in stale:
                if db.execute("SELECT 1 FROM blobs WHERE digest = ?", (digest,)).fetchone():
                    continue  # uploaded again since: that link holds good bytes
                if db.execute("DELETE FROM links WHERE run = ? AND digest = ?", (run, digest)).rowcount:
                    db.execute(
                        "UPDATE runs SET blob_count = blob_count - 1, bytes = bytes - ? WHERE run = ?",
                        (corrupt[digest], run),
                    )

    def check_writable(self) -> None:
        probe = self.tmp_dir / f"{os.getpid()}-readyz"
        probe.write_bytes(b"ok")
        probe.unlink()
        self._db().execute("SELECT 1").fetchone()
