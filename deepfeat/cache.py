"""The feature store: float32 vectors on disk, keyed by ``(fingerprint, key)``.

A cache is a directory holding one SQLite database (``features.sqlite3``). It
answers five questions and drives nothing: :meth:`FeatureCache.get_into`
(which of these keys are stored, copied straight into the caller's array),
:meth:`~FeatureCache.put` (store vectors), :meth:`~FeatureCache.claim` and
:meth:`~FeatureCache.release` (who computes which image now), and
:meth:`~FeatureCache.info`. The loop that uses them is
:func:`deepfeat.engine.embed`; keys and fingerprints come from
:mod:`deepfeat.keys`. :class:`NullStore` is the same interface storing nothing,
which is what ``cache=None`` runs on.

Vectors are stored per layer: a fingerprint names one layer's features (model
file hash, tensor, pooling, preprocessing), so ``layers=["stage4", "pooled"]``
after ``"pooled"`` reads ``pooled`` back and computes only ``stage4``.

Why SQLite, and how it is used:

* WAL journal: readers never block the single writer, so parallel
  cross-validation folds read while one of them writes.
* ``synchronous=NORMAL`` (with WAL): a commit has reached the OS before it
  returns, so a killed process (``kill -9``) loses nothing it committed; only a
  power cut can drop the last few commits, and never corrupts the file. For a
  cache, losing a few vectors to a power cut costs a recomputation, not a wrong
  answer, so the fsync per commit of ``FULL`` is not worth its price.
* Writes are ``BEGIN IMMEDIATE`` transactions of a whole batch, retried on
  "database is locked"; a batch is in the file completely or not at all.
* Every row carries a CRC-32 of its key and vector bytes, checked on every
  read, and ``PRAGMA quick_check`` runs when a process first opens the file:
  a damaged file raises :class:`CacheCorruptError` naming the file and the
  command that rebuilds it, never returns garbage.
* One connection per process and thread, re-opened when the pid changes (a
  fork) or the file was replaced; a pickled :class:`FeatureCache` holds only
  its settings, never a connection.
* Claims: an image being computed is claimed under a *scope* (the model and
  preprocessing that decode and run it), a window of about one batch at a
  time, so concurrent processes each compute a share and wait only for the
  images another one holds. A claim costs O(window) whatever the size of the
  job. Claims of a process that died (its pid is gone, or it stopped updating
  its heartbeat) are taken over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import sqlite3
import threading
import time
import uuid
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np

__all__ = [
    "FeatureCache",
    "NullStore",
    "StoreBatch",
    "CacheError",
    "CacheCorruptError",
    "DB_NAME",
    "default_cache_dir",
    "new_owner",
    "open_cache",
    "resolve_cache_dir",
]

logger = logging.getLogger(__name__)

#: file name of the database inside a cache directory
DB_NAME = "features.sqlite3"
#: bump when the tables change incompatibly; older files are refused with advice
SCHEMA_VERSION = 1
#: keys per SQL statement (SQLite's variable limit is 999 on old builds)
_SQL_CHUNK = 500
_VECTOR_DTYPE = np.dtype("<f4")

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS fingerprints (
        id INTEGER PRIMARY KEY,
        fingerprint TEXT NOT NULL UNIQUE,
        dim INTEGER NOT NULL,
        description TEXT NOT NULL,
        computed INTEGER NOT NULL DEFAULT 0,
        created REAL NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS vectors (
        fp INTEGER NOT NULL REFERENCES fingerprints(id),
        key TEXT NOT NULL,
        vector BLOB NOT NULL,
        crc INTEGER NOT NULL,
        PRIMARY KEY (fp, key)
    )""",
    """CREATE TABLE IF NOT EXISTS claims (
        fp INTEGER NOT NULL,
        key TEXT NOT NULL,
        owner TEXT NOT NULL,
        host TEXT NOT NULL,
        pid INTEGER NOT NULL,
        heartbeat REAL NOT NULL,
        PRIMARY KEY (fp, key)
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS claims_owner ON claims (owner)",
)


class CacheError(RuntimeError):
    """The feature cache cannot be used (unreadable, newer format, ...)."""


class CacheCorruptError(CacheError):
    """The cache file is damaged; the message names it and how to rebuild it."""

    def __init__(self, path: str | os.PathLike, detail: str):
        self.path = Path(path)
        self.detail = detail
        directory = self.path.parent
        super().__init__(
            f"The feature cache {self.path} is corrupt ({detail}). No vector was read from it. "
            f"Delete and rebuild it with `deepfeat cache clear {directory}` "
            "(or FeatureCache(directory).clear()); features are recomputed on the next run."
        )


# ---------------------------------------------------------------- locations
def default_cache_dir() -> Path:
    """Where ``cache=True`` keeps vectors: ``$DEEPFEAT_CACHE``, else the user cache.

    Examples
    --------
    >>> isinstance(default_cache_dir(), Path)
    True
    """
    env = os.environ.get("DEEPFEAT_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "deepfeat" / "features"


def resolve_cache_dir(cache: bool | str | os.PathLike | None) -> Path | None:
    """The cache directory a ``cache`` parameter means (``None`` for no cache).

    ``True`` is :func:`default_cache_dir`; a path to the database file itself
    means its folder.

    Examples
    --------
    >>> resolve_cache_dir(None) is None, resolve_cache_dir(False) is None
    (True, True)
    >>> resolve_cache_dir("/tmp/feats/features.sqlite3").as_posix()
    '/tmp/feats'
    """
    if cache is None or cache is False:
        return None
    if cache is True:
        return default_cache_dir()
    if isinstance(cache, (bool, np.bool_)):
        return default_cache_dir() if cache else None
    if not os.fspath(cache):
        raise ValueError("The cache parameter is an empty path; give a folder, True for the default one, or None.")
    path = Path(os.fspath(cache)).expanduser()
    if path.name == DB_NAME:
        path = path.parent
    return path


# ------------------------------------------------------------------- errors
def _is_busy(exc: sqlite3.Error) -> bool:
    name = getattr(exc, "sqlite_errorname", "")
    return name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in str(exc) or "busy" in str(exc)


def _is_corrupt(exc: sqlite3.Error) -> bool:
    name = getattr(exc, "sqlite_errorname", "")
    msg = str(exc)
    return (
        name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB"))
        or "malformed" in msg
        or "not a database" in msg
        or "corrupt" in msg
        or "could not decode" in msg.lower()  # a damaged text cell (a key) that is no longer UTF-8
    )


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # os.kill(pid, 0) would terminate it on Windows; rely on the heartbeat
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


_HOST = socket.gethostname()
_INHERITED: list[sqlite3.Connection] = []


def new_owner() -> str:
    """A claim owner id for this process: ``host:pid:random``, so a dead pid is recognised.

    Examples
    --------
    >>> new_owner().count(":") >= 2
    True
    """
    return f"{_HOST}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def _scope_id(scope: str) -> int:
    # claims live in their own id space (60-bit hashes), apart from the
    # fingerprints table's small row ids: no row per scope, no schema change
    return int(hashlib.sha256(scope.encode()).hexdigest()[:15], 16)


class StoreBatch(NamedTuple):
    """One layer's vectors for :meth:`FeatureCache.put`."""

    fingerprint: str
    keys: Sequence[str]
    vectors: np.ndarray
    description: Mapping | None = None


def _chunks(seq: Sequence, n: int = _SQL_CHUNK) -> Iterator[Sequence]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def _crc(key: str, blob: bytes) -> int:
    return zlib.crc32(blob, zlib.crc32(key.encode()))


# -------------------------------------------------------------------- store
class FeatureCache:
    """A directory of cached feature vectors, safe for concurrent processes.

    Parameters
    ----------
    directory : str or path-like
        Folder of the cache; created on first write. The database is
        ``directory / "features.sqlite3"`` (plus SQLite's ``-wal``/``-shm``
        files while in use).
    timeout : float, default=60
        Seconds to keep retrying when another process holds the write lock.
    claim_timeout : float, default=120
        Seconds without a heartbeat after which another process's claim on an
        image is taken over (a dead process on this host is detected at once).
    check : bool, default=True
        Run ``PRAGMA quick_check`` when this process first opens the file.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> cache = FeatureCache(tempfile.mkdtemp())
    >>> cache.put_many("fp", ["k1", "k2"], np.eye(2, 3, dtype=np.float32))
    2
    >>> found = cache.get_many("fp", ["k2", "k3"])
    >>> sorted(found), found["k2"].tolist()
    (['k2'], [0.0, 1.0, 0.0])
    >>> cache.info()["vectors"]
    2
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        timeout: float = 60.0,
        claim_timeout: float = 120.0,
        check: bool = True,
    ):
        self.directory = Path(os.fspath(directory)).expanduser()
        self.path = self.directory / DB_NAME
        self.timeout = float(timeout)
        self.claim_timeout = float(claim_timeout)
        self.check = bool(check)
        self._local = threading.local()

    #: the engine computes image keys only for a store that keeps vectors
    persistent = True

    def __repr__(self) -> str:
        return f"FeatureCache({os.fspath(self.directory)!r})"

    # pickles (and joblib/loky copies) carry the settings, never a connection
    def __getstate__(self) -> dict:
        return {
            "directory": os.fspath(self.directory),
            "timeout": self.timeout,
            "claim_timeout": self.claim_timeout,
            "check": self.check,
        }

    def __setstate__(self, state: dict) -> None:
        directory = state.pop("directory")
        FeatureCache.__init__(self, directory, **state)

    # ------------------------------------------------------------ connection
    def _con(self) -> sqlite3.Connection:
        local = self._local
        con = getattr(local, "con", None)
        if con is not None:
            if local.pid != os.getpid():
                # inherited through fork: SQLite forbids using it in the child,
                # and closing it could drop this process's POSIX locks on the
                # file, so it is kept referenced and never touched
                _INHERITED.append(con)
                con = None
            else:
                try:
                    same = os.stat(self.path).st_ino == local.ino
                except OSError:
                    same = False
                if not same:  # cleared or replaced by another process
                    con.close()
                    con = None
        if con is None:
            con = self._connect()
            local.con, local.pid, local.ino = con, os.getpid(), os.stat(self.path).st_ino
            local.fp_ids = {}  # per connection, so per thread: row ids are only memoised once committed
        return con

    def _connect(self) -> sqlite3.Connection:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheError(f"Cannot create the feature cache folder {self.directory}: {exc}") from exc
        deadline = time.monotonic() + self.timeout
        while True:
            con = None
            try:
                con = sqlite3.connect(
                    self.path, timeout=min(self.timeout, 5.0), isolation_level=None, check_same_thread=False
                )
                con.execute("PRAGMA journal_mode=WAL").fetchone()
                con.execute("PRAGMA synchronous=NORMAL")
                # 64 MiB of pages: random-key inserts and look-ups stay in memory as the file grows;
                # a 64 MiB WAL between checkpoints copies each index page once per many batches
                # (it halved the per-key cost of storing at 300k keys), and is cut back after
                con.execute("PRAGMA cache_size=-65536")
                con.execute("PRAGMA wal_autocheckpoint=16384")
                con.execute("PRAGMA journal_size_limit=67108864")
                if self.check:
                    rows = [r[0] for r in con.execute("PRAGMA quick_check(5)").fetchall()]
                    if rows != ["ok"]:
                        raise CacheCorruptError(self.path, "quick_check: " + " ".join(" ".join(rows).split()))
                self._transact(con, self._init_schema)
                return con
            except sqlite3.OperationalError as exc:
                if con is not None:
                    con.close()
                if _is_busy(exc) and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                raise self._error(exc) from exc
            except sqlite3.DatabaseError as exc:
                if con is not None:
                    con.close()
                raise self._error(exc) from exc
            except BaseException:
                if con is not None:
                    con.close()
                raise

    def _init_schema(self, con: sqlite3.Connection) -> None:
        for stmt in _SCHEMA:
            con.execute(stmt)
        row = con.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()
        if row is None:
            con.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) != SCHEMA_VERSION:
            raise CacheError(
                f"The feature cache {self.path} has format version {row[0]}; this deepfeat reads "
                f"version {SCHEMA_VERSION}. Clear it with `deepfeat cache clear {self.directory}` "
                "or use another cache folder."
            )

    def _error(self, exc: sqlite3.Error) -> CacheError:
        if _is_corrupt(exc):
            return CacheCorruptError(self.path, f"{type(exc).__name__}: {exc}")
        if getattr(exc, "sqlite_errorname", "").startswith("SQLITE_FULL") or "disk is full" in str(exc):
            return CacheError(
                f"The feature cache {self.path} cannot grow: the disk is full ({exc}). Nothing of the failed "
                "batch was stored. Free some space, or point cache= (--cache-dir) at a folder on another disk."
            )
        return CacheError(f"Feature cache {self.path}: {type(exc).__name__}: {exc}")

    @staticmethod
    def _transact(con: sqlite3.Connection, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        con.execute("BEGIN IMMEDIATE")
        try:
            result = fn(con)
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                try:
                    con.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # the original error is the one to report
            raise
        return result

    def _write(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run ``fn`` in one ``BEGIN IMMEDIATE`` transaction, retrying while locked."""
        deadline = time.monotonic() + self.timeout
        delay = 0.002
        while True:
            con = self._con()
            try:
                return self._transact(con, fn)
            except sqlite3.OperationalError as exc:
                if _is_busy(exc) and time.monotonic() < deadline:
                    time.sleep(delay)
                    delay = min(delay * 2, 0.1)
                    continue
                raise self._error(exc) from exc
            except sqlite3.DatabaseError as exc:
                raise self._error(exc) from exc

    def _read(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        deadline = time.monotonic() + self.timeout
        while True:
            con = self._con()
            try:
                return fn(con)
            except sqlite3.OperationalError as exc:
                # readers only wait while a crashed writer's WAL is recovered
                if _is_busy(exc) and time.monotonic() < deadline:
                    time.sleep(0.01)
                    continue
                raise self._error(exc) from exc
            except sqlite3.DatabaseError as exc:
                raise self._error(exc) from exc

    def close(self) -> None:
        """Close this thread's connection (it re-opens on next use)."""
        con = getattr(self._local, "con", None)
        if con is not None and self._local.pid == os.getpid():
            con.close()
        self._local = threading.local()

    # ---------------------------------------------------------- fingerprints
    def _fp_row(
        self, con: sqlite3.Connection, fingerprint: str, dim: int | None = None, description: Mapping | None = None
    ) -> tuple[int, int] | None:
        """``(row id, dim)`` of ``fingerprint``; registered when ``dim`` is given (inside a write)."""
        memos = self._local.fp_ids
        known = memos.get(fingerprint)
        if known is not None:
            fp, stored = known
        else:
            row = con.execute("SELECT id, dim FROM fingerprints WHERE fingerprint=?", (fingerprint,)).fetchone()
            if row is None:
                if dim is None:
                    return None
                desc = json.dumps(dict(description or {}), sort_keys=True)
                cur = con.execute(
                    "INSERT INTO fingerprints (fingerprint, dim, description, created) VALUES (?, ?, ?, ?)",
                    (fingerprint, int(dim), desc, time.time()),
                )
                # not memoised: the transaction may still roll back
                return int(cur.lastrowid or 0), int(dim)
            fp, stored = int(row[0]), int(row[1])
            memos[fingerprint] = (fp, stored)
        if dim is not None and stored != int(dim):
            raise CacheCorruptError(
                self.path, f"fingerprint {fingerprint[:12]} holds {stored}-d vectors, got {dim}-d ones"
            )
        return fp, stored

    # --------------------------------------------------------------- vectors
    def get_into(
        self,
        fingerprint: str,
        keys: Sequence[str],
        out: np.ndarray,
        rows: Sequence[int] | np.ndarray,
        cols: slice = slice(None),
    ) -> np.ndarray:
        """Copy the stored vectors of ``keys`` into ``out[rows[i], cols]``; return which were found.

        One indexed lookup per chunk of 500 keys; each row is checked against
        its checksum and copied straight into ``out``, with no intermediate
        dictionary or array.

        Returns
        -------
        ndarray of bool, shape (len(keys),)

        Raises
        ------
        CacheCorruptError
            A row does not match its checksum or length.

        Examples
        --------
        >>> import tempfile, numpy as np
        >>> cache = FeatureCache(tempfile.mkdtemp())
        >>> cache.put_many("fp", ["a"], np.ones((1, 2), np.float32))
        1
        >>> out = np.zeros((3, 4), np.float32)
        >>> cache.get_into("fp", ["b", "a"], out, [0, 2], slice(2, 4)).tolist(), out[2].tolist()
        ([False, True], [0.0, 0.0, 1.0, 1.0])
        """
        found = np.zeros(len(keys), dtype=bool)
        if not len(keys) or not self.path.exists():
            return found

        def read(con):
            row = self._fp_row(con, fingerprint)
            if row is None:
                return
            fp, dim = row
            nbytes = dim * _VECTOR_DTYPE.itemsize
            for start in range(0, len(keys), _SQL_CHUNK):
                part = keys[start : start + _SQL_CHUNK]
                index = {k: start + i for i, k in enumerate(part)}
                marks = ",".join("?" * len(part))
                hit, blobs = [], []
                for key, blob, crc in con.execute(
                    f"SELECT key, vector, crc FROM vectors WHERE fp=? AND key IN ({marks})", (fp, *part)
                ):
                    if len(blob) != nbytes or _crc(key, blob) != crc:
                        raise CacheCorruptError(self.path, f"checksum mismatch in the vector stored for key {key}")
                    hit.append(index[key])
                    blobs.append(blob)
                if hit:
                    # one copy of the whole chunk into place
                    block = np.frombuffer(b"".join(blobs), dtype=_VECTOR_DTYPE).reshape(len(hit), dim)
                    out[np.asarray(rows)[hit], cols] = block
                    found[hit] = True

        self._read(read)
        return found

    def get_many(self, fingerprint: str, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """The stored vectors of ``keys`` (those present) as a dict, verified against their checksums.

        Raises
        ------
        CacheCorruptError
            A row does not match its checksum or length.
        """
        if not keys or not self.path.exists():
            return {}

        def dim_of(con):
            row = self._fp_row(con, fingerprint)
            return None if row is None else row[1]

        dim = self._read(dim_of)
        if dim is None:
            return {}
        keys = list(keys)
        out = np.empty((len(keys), dim), dtype=_VECTOR_DTYPE)
        found = self.get_into(fingerprint, keys, out, np.arange(len(keys)))
        return {k: out[i] for i, k in enumerate(keys) if found[i]}

    def put(self, batches: Sequence["StoreBatch"], *, owner: str | None = None, scope: str | None = None,
            release: Sequence[str] = ()) -> int:
        """Store several layers' vectors in one transaction; return how many rows were new.

        Existing rows are kept (the first writer wins, so readers never see a
        vector change). Each batch's vectors count towards its fingerprint's
        ``computed`` total reported by :meth:`info`. In the same transaction,
        ``owner``'s claims on ``release`` (under ``scope``) are dropped, so
        other processes see the vectors and the freed claims at once.
        """
        checked = []
        for b in batches:
            vectors = np.asarray(b.vectors)
            if vectors.ndim != 2 or len(vectors) != len(b.keys):
                raise ValueError(
                    f"Expected a (len(keys), dim) array for {len(b.keys)} keys; got shape {vectors.shape}."
                )
            if not np.isfinite(vectors).all():
                raise ValueError("Refusing to cache vectors with NaN or infinite values.")
            if len(b.keys):
                vectors = np.ascontiguousarray(vectors, dtype=_VECTOR_DTYPE)
                checked.append((b, vectors, [v.tobytes() for v in vectors]))
        if not checked and not (owner and release):
            return 0

        def write(con):
            new = 0
            for b, vectors, blobs in checked:
                fp, _ = self._fp_row(con, b.fingerprint, vectors.shape[1], b.description)
                before = con.total_changes
                con.executemany(
                    "INSERT OR IGNORE INTO vectors (fp, key, vector, crc) VALUES (?, ?, ?, ?)",
                    [(fp, k, blob, _crc(k, blob)) for k, blob in zip(b.keys, blobs)],
                )
                new += con.total_changes - before
                con.execute("UPDATE fingerprints SET computed = computed + ? WHERE id=?", (len(b.keys), fp))
            if owner is not None:
                if release:
                    self._drop_claims(con, owner, _scope_id(scope or ""), release)
                # the owner is alive: its other claims get a fresh heartbeat
                con.execute("UPDATE claims SET heartbeat=? WHERE owner=?", (time.time(), owner))
            return new

        return self._write(write)

    def put_many(
        self, fingerprint: str, keys: Sequence[str], vectors: np.ndarray, *, description: Mapping | None = None
    ) -> int:
        """Store one vector per key of one fingerprint in a single transaction; return how many were new.

        See :meth:`put` for several layers and claims in one transaction.
        """
        return self.put([StoreBatch(fingerprint, list(keys), vectors, description)])

    # ---------------------------------------------------------------- claims
    def claim(self, scope: str, keys: Sequence[str], *, owner: str) -> tuple[list[str], list[str]]:
        """Atomically claim the free ``keys`` for ``owner``: return ``(mine, others)``.

        ``mine`` are the keys ``owner`` must now compute (then :meth:`put` with
        ``release=`` or :meth:`release`), including those it already held;
        ``others`` are keys another live process is computing. Claims of dead
        processes are taken over. Pass a window of about one batch: the cost is
        O(len(keys)), and a small window lets other processes take the next one.
        """
        if not len(keys):
            return [], []
        now = time.time()
        host, pid_text, _ = owner.rsplit(":", 2)
        pid = int(pid_text)
        sid = _scope_id(scope)

        def write(con):
            # the owner is alive: its claims still being computed get a fresh heartbeat
            con.execute("UPDATE claims SET heartbeat=? WHERE owner=?", (now, owner))
            held: dict[str, tuple] = {}
            for part in _chunks(list(keys)):
                marks = ",".join("?" * len(part))
                for key, o, h, p, beat in con.execute(
                    f"SELECT key, owner, host, pid, heartbeat FROM claims WHERE fp=? AND key IN ({marks})",
                    (sid, *part),
                ):
                    held[key] = (o, h, p, beat)
            stale = []
            alive: dict[tuple[str, int], bool] = {}
            for key, (o, h, p, beat) in held.items():
                if o == owner:
                    continue
                dead = now - beat > self.claim_timeout
                if not dead and h == _HOST:
                    if (h, p) not in alive:
                        alive[(h, p)] = _pid_alive(p)
                    dead = not alive[(h, p)]
                if dead:
                    stale.append(key)
            if stale:
                logger.info("taking over %d claims of processes that died or stalled", len(stale))
                for part in _chunks(stale):
                    con.execute(
                        f"DELETE FROM claims WHERE fp=? AND key IN ({','.join('?' * len(part))})", (sid, *part)
                    )
                for key in stale:
                    del held[key]
            free = [k for k in keys if k not in held]
            con.executemany(
                "INSERT INTO claims (fp, key, owner, host, pid, heartbeat) VALUES (?, ?, ?, ?, ?, ?)",
                [(sid, k, owner, host, pid, now) for k in free],
            )
            mine = [k for k in keys if k not in held or held[k][0] == owner]
            others = [k for k in keys if k in held and held[k][0] != owner]
            return mine, others

        return self._write(write)

    @staticmethod
    def _drop_claims(con: sqlite3.Connection, owner: str, sid: int, keys: Iterable[str]) -> None:
        for part in _chunks(list(keys)):
            con.execute(
                f"DELETE FROM claims WHERE owner=? AND fp=? AND key IN ({','.join('?' * len(part))})",
                (owner, sid, *part),
            )

    def release(self, owner: str, keys: Iterable[str] | None = None, scope: str | None = None) -> None:
        """Drop ``owner``'s claims: all of them, or those on ``keys`` under ``scope``."""
        if not self.path.exists():
            return

        def write(con):
            if keys is None:
                con.execute("DELETE FROM claims WHERE owner=?", (owner,))
            else:
                self._drop_claims(con, owner, _scope_id(scope or ""), keys)

        self._write(write)

    # ------------------------------------------------------------ inspection
    def info(self, full: bool = False) -> dict:
        """Size, integrity and contents of the cache, without creating it.

        Parameters
        ----------
        full : bool, default=False
            Also run SQLite's complete ``PRAGMA integrity_check`` (reads every
            page and index; ``quick_check``, run on every open, skips the
            index-to-table cross-check).

        Returns
        -------
        dict
            ``path``, ``exists``, ``bytes`` (database plus WAL), ``vectors``,
            ``claims`` (images being computed right now) and ``fingerprints``:
            one dict per feature setting with its description, ``dim``,
            ``vectors`` stored and ``computed`` (vectors handed in by
            writers, so ``computed > vectors`` means work was duplicated).

        Raises
        ------
        CacheCorruptError
            The file fails ``PRAGMA quick_check`` or is not a database.
        """
        files = [self.path.with_name(self.path.name + s) for s in ("", "-wal", "-shm")]
        out: dict[str, Any] = {
            "path": str(self.path),
            "exists": self.path.exists(),
            "bytes": sum(f.stat().st_size for f in files if f.exists()),
            "vectors": 0,
            "claims": 0,
            "fingerprints": [],
        }
        if not out["exists"]:
            return out

        def read(con):
            if full:
                problems = [r[0] for r in con.execute("PRAGMA integrity_check(5)").fetchall()]
                if problems != ["ok"]:
                    raise CacheCorruptError(self.path, "integrity_check: " + " ".join(" ".join(problems).split()))
            rows = con.execute(
                "SELECT f.fingerprint, f.dim, f.description, f.computed, f.created, "
                "(SELECT COUNT(*) FROM vectors v WHERE v.fp = f.id) FROM fingerprints f ORDER BY f.created"
            ).fetchall()
            claims = con.execute("SELECT COUNT(*) FROM claims").fetchone()[0]
            return rows, claims

        rows, out["claims"] = self._read(read)
        for fingerprint, dim, desc, computed, created, count in rows:
            out["fingerprints"].append(
                {
                    "fingerprint": fingerprint,
                    "dim": dim,
                    "vectors": count,
                    "computed": computed,
                    "created": created,
                    "description": json.loads(desc),
                }
            )
        out["vectors"] = sum(f["vectors"] for f in out["fingerprints"])
        return out

    def clear(self) -> list[Path]:
        """Delete the database files (works on a corrupt file too); return those removed.

        Only ``features.sqlite3`` and its ``-wal``/``-shm``/``-journal``
        companions are deleted, never anything else in the folder. Processes
        still using the cache keep their open file until they next touch it,
        then start on a fresh one.
        """
        self.close()
        removed = []
        for suffix in ("-wal", "-shm", "-journal", ""):
            f = self.path.with_name(self.path.name + suffix)
            try:
                f.unlink()
                removed.append(f)
            except FileNotFoundError:
                pass
        _forget(self.directory)
        return removed


class NullStore:
    """The store interface that stores nothing: what ``cache=None`` runs on.

    Nothing is found, every claim is granted, nothing is kept; the engine runs
    the same path as with a :class:`FeatureCache`, and computes no image keys
    (``persistent`` is false).

    Examples
    --------
    >>> import numpy as np
    >>> store = NullStore()
    >>> store.get_into("fp", ["a"], np.zeros((1, 1)), [0]).tolist(), store.claim("s", ["a"], owner="h:1:x")
    ([False], (['a'], []))
    """

    persistent = False

    def get_into(self, fingerprint, keys, out, rows, cols=slice(None)) -> np.ndarray:
        return np.zeros(len(keys), dtype=bool)

    def put(self, batches, *, owner=None, scope=None, release=()) -> int:
        return 0

    def claim(self, scope, keys, *, owner) -> tuple[list[str], list[str]]:
        return list(keys), []

    def release(self, owner, keys=None, scope=None) -> None:
        return None

    def __repr__(self) -> str:
        return "NullStore()"


# --------------------------------------------------------- per-process pool
_OPEN: dict[tuple[int, str], FeatureCache] = {}
_OPEN_LOCK = threading.Lock()


def open_cache(directory: str | os.PathLike) -> FeatureCache:
    """The process-wide :class:`FeatureCache` of ``directory``, opened and checked once.

    Estimator clones (cross-validation folds) in one process share it, so the
    integrity check runs once per process, not once per fold.

    Examples
    --------
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> open_cache(d) is open_cache(d)
    True
    """
    key = (os.getpid(), os.path.abspath(os.fspath(directory)))
    with _OPEN_LOCK:
        cache = _OPEN.get(key)
        if cache is None:
            cache = FeatureCache(directory)
            _OPEN[key] = cache
    cache._con()  # fail here, with the file's name, if it cannot be used
    return cache


def _forget(directory: Path) -> None:
    with _OPEN_LOCK:
        for key in [k for k in _OPEN if k[1] == os.path.abspath(directory)]:
            _OPEN.pop(key)._local = threading.local()


