"""Persistent feature cache: float32 vectors on disk, keyed by image content x feature settings.

A cache is a directory holding one SQLite database (``features.sqlite3``). A
vector is stored under ``(fingerprint, key)``:

* the *key* says which image: a BLAKE2b hash of the file's bytes (``"content"``
  mode), or, in the documented fast ``"stat"`` mode, a hash of the file's real
  path, inode, size, mtime and ctime. Encoded bytes and ``uint8`` arrays are
  hashed as they are; in-memory PIL images have no stable identity and are
  never cached.
* the *fingerprint* says which features: a SHA-256 over everything that changes
  the vector (model file hash, cut tensors, pooling, preprocessing, the
  library's feature-format version), see :func:`feature_fingerprint`.

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
* Images being computed are *claimed* in a table, so concurrent processes
  (``GridSearchCV(n_jobs=2)``, two CLI runs) split the work and wait for each
  other instead of running the network twice on the same image. Claims of a
  process that died (its pid is gone, or it stopped updating its heartbeat)
  are taken over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import sqlite3
import stat as stat_module
import threading
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

__all__ = [
    "FeatureCache",
    "CacheError",
    "CacheCorruptError",
    "DB_NAME",
    "KEY_MODES",
    "cached_compute",
    "content_key",
    "default_cache_dir",
    "feature_fingerprint",
    "open_cache",
    "resolve_cache_dir",
]

logger = logging.getLogger(__name__)

#: file name of the database inside a cache directory
DB_NAME = "features.sqlite3"
#: accepted values of ``key_mode`` / ``ImageEmbedder(cache_key=...)``
KEY_MODES = ("content", "stat")
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


# --------------------------------------------------------------------- keys
def feature_fingerprint(parts: Mapping[str, Any]) -> str:
    """SHA-256 hex digest of everything that determines a feature vector.

    ``parts`` must be JSON-serialisable; key order does not matter.

    Examples
    --------
    >>> a = feature_fingerprint({"model_sha256": "ab", "pooling": "avg"})
    >>> a == feature_fingerprint({"pooling": "avg", "model_sha256": "ab"})
    True
    >>> a == feature_fingerprint({"model_sha256": "ab", "pooling": "max"})
    False
    """
    blob = json.dumps(dict(parts), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def _file_stamp(st: os.stat_result) -> tuple[int, int, int, int]:
    # ctime cannot be set by tools that preserve mtime (cp -p, rsync -t), so an
    # edit always changes the stamp
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def content_key(item: Any, mode: str = "content") -> tuple[str | None, tuple | None]:
    """Cache key of one input, and the file stamp that must still hold when storing.

    Parameters
    ----------
    item : path, bytes, ndarray or other
        What :class:`~deepfeat.ImageEmbedder` accepts.
    mode : {"content", "stat"}
        ``"content"`` hashes the file's bytes (an edited file always misses).
        ``"stat"`` hashes real path, inode, size, mtime and ctime instead, with
        no read: much faster on slow disks, but it trusts the file system's
        timestamps (an edit that keeps all of them returns the old vector).

    Returns
    -------
    key : str or None
        ``None`` when the input cannot be cached (unreadable file, PIL image).
    stamp : tuple or None
        ``(inode, size, mtime_ns, ctime_ns)`` of a file before it was read, so
        a file edited while being embedded is not stored under its old key.

    Examples
    --------
    >>> import numpy as np
    >>> key, stamp = content_key(np.zeros((2, 2, 3), np.uint8))
    >>> key[:2], stamp
    ('a:', None)
    >>> content_key(b"abc")[0] == content_key(bytearray(b"abc"))[0]
    True
    """
    if mode not in KEY_MODES:
        raise ValueError(f"mode must be one of {KEY_MODES}; got {mode!r}.")
    if isinstance(item, (str, os.PathLike)):
        path = os.fspath(item)
        try:
            st = os.stat(path)
            if not stat_module.S_ISREG(st.st_mode):
                return None, None
            stamp = _file_stamp(st)
            if mode == "stat":
                ident = "\0".join(map(str, (os.path.realpath(path),) + stamp))
                return "s:" + hashlib.blake2b(ident.encode(), digest_size=16).hexdigest(), stamp
            h = hashlib.blake2b(digest_size=16)
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        except OSError:
            return None, None  # the decoder reports the reason
        # same prefix as raw bytes: a file and its bytes decode identically
        return "c:" + h.hexdigest(), stamp
    if isinstance(item, (bytes, bytearray, memoryview)):
        return "c:" + hashlib.blake2b(bytes(item), digest_size=16).hexdigest(), None
    if isinstance(item, np.ndarray) and item.dtype != object:
        h = hashlib.blake2b(f"{item.dtype.str}{item.shape}".encode(), digest_size=16)
        h.update(np.ascontiguousarray(item).data)
        return "a:" + h.hexdigest(), None
    return None, None


def _content_keys(items: Sequence, mode: str, threads: int) -> tuple[list, list]:
    if threads > 1 and len(items) > 16:
        # hashing releases the GIL; file reads overlap
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="deepfeat-hash") as ex:
            pairs = list(ex.map(lambda it: content_key(it, mode), items, chunksize=8))
    else:
        pairs = [content_key(it, mode) for it in items]
    return [k for k, _ in pairs], [s for _, s in pairs]


def _stamp_holds(item: Any, stamp: tuple | None) -> bool:
    if stamp is None:
        return True
    try:
        return _file_stamp(os.stat(os.fspath(item))) == stamp
    except OSError:
        return False


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


def _owner_id() -> str:
    return f"{_HOST}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


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
        self._fp_ids: dict[tuple[int, str], int] = {}

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
        self.__init__(directory, **state)

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
            self._fp_ids = {}
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
    def _fp_id(
        self, con: sqlite3.Connection, fingerprint: str, dim: int | None = None, description: Mapping | None = None
    ) -> int | None:
        """Row id of ``fingerprint``; registered when ``dim`` is given (inside a write)."""
        memo = (id(con), fingerprint)
        if memo in self._fp_ids:
            return self._fp_ids[memo]
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
            return int(cur.lastrowid)
        if dim is not None and int(row[1]) != int(dim):
            raise CacheCorruptError(
                self.path, f"fingerprint {fingerprint[:12]} holds {row[1]}-d vectors, got {dim}-d ones"
            )
        self._fp_ids[memo] = int(row[0])
        return int(row[0])

    # --------------------------------------------------------------- vectors
    def _select(self, con: sqlite3.Connection, fp: int, keys: Sequence[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        dim = con.execute("SELECT dim FROM fingerprints WHERE id=?", (fp,)).fetchone()[0]
        for part in _chunks(list(keys)):
            marks = ",".join("?" * len(part))
            rows = con.execute(
                f"SELECT key, vector, crc FROM vectors WHERE fp=? AND key IN ({marks})", (fp, *part)
            ).fetchall()
            for key, blob, crc in rows:
                if len(blob) != dim * _VECTOR_DTYPE.itemsize or _crc(key, blob) != crc:
                    raise CacheCorruptError(self.path, f"checksum mismatch in the vector stored for key {key}")
                found[key] = np.frombuffer(blob, dtype=_VECTOR_DTYPE)
        return found

    def get_many(self, fingerprint: str, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """The stored vectors of ``keys`` (those present), verified against their checksums.

        Raises
        ------
        CacheCorruptError
            A row does not match its checksum or length.
        """
        if not keys or not self.path.exists():
            return {}

        def read(con):
            fp = self._fp_id(con, fingerprint)
            return {} if fp is None else self._select(con, fp, keys)

        return self._read(read)

    def put_many(
        self,
        fingerprint: str,
        keys: Sequence[str],
        vectors: np.ndarray,
        *,
        description: Mapping | None = None,
        owner: str | None = None,
    ) -> int:
        """Store one vector per key in a single transaction; return how many were new.

        Existing rows are kept (the first writer wins, so readers never see a
        vector change). ``vectors`` counts towards the fingerprint's
        ``computed`` total reported by :meth:`info`. Claims on these keys are
        dropped; ``owner``'s other claims get a fresh heartbeat.
        """
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or len(vectors) != len(keys):
            raise ValueError(f"Expected a (len(keys), dim) array for {len(keys)} keys; got shape {vectors.shape}.")
        if not np.isfinite(vectors).all():
            raise ValueError("Refusing to cache vectors with NaN or infinite values.")
        if not keys:
            return 0
        vectors = np.ascontiguousarray(vectors, dtype=_VECTOR_DTYPE)
        blobs = [v.tobytes() for v in vectors]

        def write(con):
            fp = self._fp_id(con, fingerprint, vectors.shape[1], description)
            before = con.total_changes
            con.executemany(
                "INSERT OR IGNORE INTO vectors (fp, key, vector, crc) VALUES (?, ?, ?, ?)",
                [(fp, k, b, _crc(k, b)) for k, b in zip(keys, blobs)],
            )
            new = con.total_changes - before
            con.execute("UPDATE fingerprints SET computed = computed + ? WHERE id=?", (len(keys), fp))
            for part in _chunks(list(keys)):
                con.execute(
                    f"DELETE FROM claims WHERE fp=? AND key IN ({','.join('?' * len(part))})", (fp, *part)
                )
            if owner is not None:
                con.execute("UPDATE claims SET heartbeat=? WHERE owner=?", (time.time(), owner))
            return new

        return self._write(write)

    # ---------------------------------------------------------------- claims
    def claim(
        self,
        fingerprint: str,
        keys: Sequence[str],
        *,
        owner: str,
        limit: int,
        dim: int,
        description: Mapping | None = None,
    ) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
        """Atomically sort ``keys`` into stored, claimed now by ``owner``, and claimed by others.

        Returns ``(found, mine, others)``: vectors stored meanwhile, up to
        ``limit`` keys ``owner`` must now compute (and then :meth:`put_many` or
        :meth:`release`), and keys another live process is computing. Claims of
        dead processes are taken over.
        """
        now = time.time()
        host, pid, _ = owner.rsplit(":", 2)
        pid = int(pid)

        def write(con):
            fp = self._fp_id(con, fingerprint, dim, description)
            found = self._select(con, fp, keys)
            rest = [k for k in keys if k not in found]
            held: dict[str, tuple] = {}
            for part in _chunks(rest):
                marks = ",".join("?" * len(part))
                for key, o, h, p, beat in con.execute(
                    f"SELECT key, owner, host, pid, heartbeat FROM claims WHERE fp=? AND key IN ({marks})", (fp, *part)
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
                        f"DELETE FROM claims WHERE fp=? AND key IN ({','.join('?' * len(part))})", (fp, *part)
                    )
                for key in stale:
                    del held[key]
            mine = [k for k in rest if k in held and held[k][0] == owner]
            free = [k for k in rest if k not in held]
            new = free[: max(0, limit - len(mine))]
            con.executemany(
                "INSERT INTO claims (fp, key, owner, host, pid, heartbeat) VALUES (?, ?, ?, ?, ?, ?)",
                [(fp, k, owner, host, pid, now) for k in new],
            )
            others = [k for k in rest if k in held and held[k][0] != owner]
            return found, mine + new, others

        return self._write(write)

    def release(self, owner: str, keys: Iterable[str] | None = None, fingerprint: str | None = None) -> None:
        """Drop ``owner``'s claims (all of them, or those on ``keys`` of ``fingerprint``)."""
        if not self.path.exists():
            return

        def write(con):
            if keys is None:
                con.execute("DELETE FROM claims WHERE owner=?", (owner,))
                return
            fp = self._fp_id(con, fingerprint)
            for part in _chunks(list(keys)):
                con.execute(
                    f"DELETE FROM claims WHERE owner=? AND fp=? AND key IN ({','.join('?' * len(part))})",
                    (owner, fp, *part),
                )

        self._write(write)

    # ------------------------------------------------------------ inspection
    def info(self) -> dict:
        """Size, integrity and contents of the cache, without creating it.

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


# ------------------------------------------------------------- orchestration
def cached_compute(
    cache: FeatureCache,
    fingerprint: str,
    items: Sequence,
    out: np.ndarray,
    compute: Callable[[list[int]], Iterable[tuple[np.ndarray, np.ndarray]]],
    *,
    key_mode: str = "content",
    description: Mapping | None = None,
    chunk: int = 512,
    threads: int = 4,
    poll: float = 0.05,
) -> dict[str, int]:
    """Fill ``out`` with the vectors of ``items``: from the cache, else computed once and stored.

    Parameters
    ----------
    cache : FeatureCache
    fingerprint : str
        :func:`feature_fingerprint` of the settings that produce the vectors.
    items : sequence
        The inputs, one per row of ``out``.
    out : ndarray of shape (len(items), dim)
        Filled in place; rows of inputs that fail are left to the caller.
    compute : callable
        ``compute(positions)`` runs the network on ``items[positions]`` and
        yields ``(positions, vectors)`` batches for the inputs that succeed
        (failures are the caller's to record). Each batch is stored at once.
    key_mode : {"content", "stat"}
        See :func:`content_key`.
    description : mapping, optional
        Human-readable settings stored beside a new fingerprint.
    chunk : int
        Images claimed at a time, so concurrent processes share the work.
    threads : int
        Threads hashing files.
    poll : float
        Seconds between checks while another process computes wanted images.

    Returns
    -------
    dict
        ``hits`` (rows read from the cache), ``misses`` (rows not in it when
        looked up), ``computed`` (images this call ran through the network),
        ``shared`` (misses another process computed meanwhile),
        ``uncacheable`` (inputs without a key: PIL images, unreadable files).

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> cache = FeatureCache(tempfile.mkdtemp())
    >>> arrays = [np.full((2, 2), i, np.uint8) for i in (1, 2, 1)]
    >>> def compute(pos):  # stands in for the network: the mean pixel
    ...     yield np.asarray(pos), np.array([[arrays[p].mean()] for p in pos], np.float32)
    >>> out = np.empty((3, 1), np.float32)
    >>> cached_compute(cache, "fp", arrays, out, compute)["computed"], out.ravel().tolist()
    (2, [1.0, 2.0, 1.0])
    >>> cached_compute(cache, "fp", arrays, out, compute)["hits"]
    3
    """
    keys, stamps = _content_keys(items, key_mode, threads)
    by_key: dict[str, list[int]] = {}
    loose: list[int] = []
    for i, k in enumerate(keys):
        if k is None:
            loose.append(i)
        else:
            by_key.setdefault(k, []).append(i)
    stats = {"hits": 0, "misses": 0, "computed": 0, "shared": 0, "uncacheable": len(loose)}
    dim = out.shape[1]

    def fill(found: Mapping[str, np.ndarray]) -> int:
        n = 0
        for k, v in found.items():
            out[by_key[k]] = v
            n += len(by_key[k])
        return n

    found = cache.get_many(fingerprint, list(by_key))
    stats["hits"] = fill(found)
    pending = [k for k in by_key if k not in found]
    stats["misses"] = sum(len(by_key[k]) for k in pending)

    if loose:
        for pos, vecs in compute(loose):
            out[pos] = vecs
            stats["computed"] += len(pos)

    owner = _owner_id()
    delay = poll
    try:
        while pending:
            got, mine, others = cache.claim(
                fingerprint, pending, owner=owner, limit=chunk, dim=dim, description=description
            )
            stats["shared"] += fill(got)
            done = set(got)
            if mine:
                rep = {by_key[k][0]: k for k in mine}
                for pos, vecs in compute(list(rep)):
                    pos = np.asarray(pos)
                    out[pos] = vecs
                    stats["computed"] += len(pos)
                    ks = [rep[int(p)] for p in pos]
                    done.update(ks)
                    for k in ks:  # the same image given twice
                        if len(by_key[k]) > 1:
                            out[by_key[k][1:]] = out[by_key[k][0]]
                    keep = [
                        j
                        for j, (k, p) in enumerate(zip(ks, pos))
                        if np.isfinite(out[p]).all() and _stamp_holds(items[p], stamps[p])
                    ]
                    if len(keep) < len(ks):
                        logger.info("not caching %d vectors (non-finite, or file changed while read)", len(ks) - len(keep))
                    cache.put_many(
                        fingerprint,
                        [ks[j] for j in keep],
                        np.asarray(out[pos[keep]]) if keep else np.empty((0, dim), np.float32),
                        description=description,
                        owner=owner,
                    )
                failed = [k for k in mine if k not in done]
                if failed:
                    # never cached; free them at once so nobody waits on them
                    cache.release(owner, failed, fingerprint)
                    extra = [p for k in failed for p in by_key[k][1:]]
                    if extra:  # duplicates of a failed input get their own failure record
                        for pos, vecs in compute(extra):
                            out[pos] = vecs
                            stats["computed"] += len(pos)
                    done.update(failed)
                delay = poll
            elif others and not got:
                time.sleep(delay)  # another process computes what we need
                delay = min(delay * 1.5, 0.5)
            pending = [k for k in pending if k not in done]
    finally:
        if stats["misses"]:
            cache.release(owner)
    return stats
