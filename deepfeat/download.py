"""Get a registered model file that is not on disk: download it, or export it.

Downloads go to the user cache (:func:`deepfeat.registry.user_models_dir`)
through a ``.part`` file: an interrupted transfer is resumed with an HTTP
``Range`` request, failures are retried with exponential backoff, the sha256
is checked before the file gets its final name (``os.replace``, atomic on one
file system), so a reader never sees a half-written or wrong model. Entries
without a URL whose file is produced by ``deepfeat export`` (EfficientNet-Lite1
and -Lite2, ``inception_v3`` and ``resnet50_tv`` from torchvision's weights) are
exported on demand when PyTorch (and torchvision, for those) is installed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import importlib.util
import logging
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, Sequence

from .registry import ModelFileError, ModelSpec, file_sha256, user_models_dir

__all__ = ["fetch_model", "download_file", "ModelDownloadError", "NoNetworkError"]

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20
#: the most bytes taken from a server that states no size and for a file without a pinned one
MAX_DOWNLOAD_BYTES = 4 << 30
#: slowest average rate a mirror is given time for (bytes/s): the default deadline of a mirror
MIN_RATE = 64 << 10
#: HTTP statuses worth another try (the server may recover); others are final
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


class ModelDownloadError(ModelFileError):
    """A model file could not be downloaded (HTTP error, or a wrong sha256).

    ``reason`` is the cause alone, without the advice on placing the file by
    hand: a failure of several mirrors lists each mirror's reason, then gives
    the advice once.
    """

    def __init__(self, message: str, *, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


class NoNetworkError(ModelDownloadError):
    """The server could not be reached at all (offline, DNS, refused, timeout)."""


def fetch_model(
    spec: ModelSpec,
    *,
    dest_dir: str | os.PathLike | None = None,
    retries: int = 4,
    backoff: float = 1.0,
    timeout: float = 60.0,
    deadline: float | None = None,
) -> Path:
    """Put the file of a registered model into the user cache and return its path.

    Called by :func:`deepfeat.resolve.resolve_model` when the file is in
    none of :func:`deepfeat.registry.models_dirs`. A spec with ``urls`` is
    downloaded from its mirrors, in order: a mirror that cannot be reached,
    answers with an HTTP error, or serves bytes whose sha256 differs from the
    pinned one is logged and the next one is tried (each with the retries and
    resume below). A spec with an ``exporter`` is exported with PyTorch.

    Parameters
    ----------
    spec : ModelSpec
        The registered model; ``spec.sha256`` is checked.
    dest_dir : path, optional
        Directory to write to (default: the user cache directory).
    retries : int
        Further attempts after a failed one (5xx, truncated transfers); each
        resumes the ``.part`` file. A server that cannot be reached at all is
        tried once more only.
    backoff : float
        Seconds before the first retry, doubled for each further one.
    timeout : float
        Socket timeout in seconds for connecting and for each read.
    deadline : float, optional
        Seconds one mirror is given for the whole file, retries included; a
        mirror past it is left for the next one. Default: ``timeout`` plus the
        pinned size at 64 KiB/s (for a 100 MB file, about 27 minutes).

    Returns
    -------
    pathlib.Path
        The checked file.

    Raises
    ------
    NoNetworkError
        No mirror can be reached; the message lists every URL tried and says
        where to put the file by hand.
    ModelDownloadError
        Every mirror failed (HTTP error, or the wrong sha256); the message lists
        each URL and why.

    Examples
    --------
    >>> from deepfeat.registry import get_model_spec
    >>> spec = get_model_spec("resnet50")
    >>> path = fetch_model(spec)  # doctest: +SKIP
    """
    dest_dir = Path(dest_dir) if dest_dir is not None else user_models_dir()
    dest = dest_dir / spec.filename
    if spec.urls:
        return _from_mirrors(spec, dest, retries=retries, backoff=backoff, timeout=timeout, deadline=deadline)
    if spec.exporter:
        return _export_on_demand(spec, dest)
    raise ModelFileError(
        f"The file {spec.filename!r} of model {spec.name!r} is missing and cannot be "
        f"downloaded. Put it at {dest} or in a folder named by $DEEPFEAT_MODELS "
        "(or reinstall deepfeat)."
    )


def _from_mirrors(spec: ModelSpec, dest: Path, *, retries: int, backoff: float, timeout: float,
                  deadline: float | None) -> Path:
    """Try each mirror in turn; the first that serves the pinned bytes wins."""
    tried: list[str] = []
    offline = True
    # size_bytes is the primary file's; an alternate upload may have another size (the two MXNet ResNet-50
    # uploads differ by 174 bytes), but not one out of all proportion
    size = spec.size_bytes if not spec.sha256_also else None
    most = None if size is not None or not spec.size_bytes else max(4 * spec.size_bytes, spec.size_bytes + (64 << 20))
    for i, url in enumerate(spec.urls):
        try:
            return download_file(url, dest, sha256=spec.accepted_sha256 or None, size=size,
                                 retries=retries, backoff=backoff, timeout=timeout, deadline=deadline,
                                 max_bytes=most)
        except ModelDownloadError as exc:
            offline = offline and isinstance(exc, NoNetworkError)
            # the reason alone: the advice on placing the file comes once, after the list
            tried.append(f"  {url}\n    -> {exc.reason}")
            if i + 1 < len(spec.urls):
                logger.warning("mirror %d of %d for %s failed (%s); trying %s",
                               i + 1, len(spec.urls), spec.name, exc.reason, spec.urls[i + 1])
    pinned = ", ".join(([f"{spec.size_bytes} bytes"] if spec.size_bytes else [])
                       + ([f"sha256 {spec.sha256}"] if spec.sha256 else []))
    message = (
        f"Could not download model {spec.name!r} ({spec.filename}) from any of its "
        f"{len(spec.urls)} mirror(s):\n" + "\n".join(tried) + "\n"
        f"To place it by hand: download {spec.filename}{f' ({pinned})' if pinned else ''} "
        f"from one of the addresses above on a machine that can reach it, then put it in "
        f"{dest.parent} or in a folder named by the environment variable DEEPFEAT_MODELS "
        f"(e.g. DEEPFEAT_MODELS=/data/models); deepfeat checks its sha256 before use."
    )
    if offline:
        raise NoNetworkError("no network: " + message)
    raise ModelDownloadError(message)


def download_file(
    url: str,
    dest: str | os.PathLike,
    *,
    sha256: str | Sequence[str] | None,
    size: int | None = None,
    retries: int = 4,
    backoff: float = 1.0,
    timeout: float = 60.0,
    deadline: float | None = None,
    max_bytes: int | None = None,
) -> Path:
    """Download ``url`` to ``dest`` atomically, resuming and checking sha256.

    Bytes go to ``dest + ".part"``; a ``.part`` left by an earlier, interrupted
    run (or attempt) is continued with an HTTP ``Range`` request when the
    server supports it. Only a file whose sha256 matches gets the name ``dest``;
    a mismatch deletes the ``.part`` file and raises.

    Parameters
    ----------
    url : str
        ``http(s)://`` or ``file://`` URL.
    dest : path
        Final path of the file; its folder is created.
    sha256 : str, sequence of str, or None
        Expected hex digest (or the digests a publisher has published for the
        file: any one matches). ``None`` skips the check (not used for registry files).
    size : int, optional
        Expected size in bytes. A server that sends more is refused as soon as
        it does (the ``.part`` file is deleted), whatever its Content-Length.
    retries, backoff, timeout, deadline
        As in :func:`fetch_model` (``deadline`` counts for this URL).
    max_bytes : int, optional
        Without ``size``: the most bytes accepted (default: the server's
        Content-Length, or ``MAX_DOWNLOAD_BYTES``, 4 GiB, if it states none).

    Returns
    -------
    pathlib.Path
        ``dest``.

    Examples
    --------
    >>> import pathlib, tempfile
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "src.bin").write_bytes(b"model bytes")
    >>> out = download_file((d / "src.bin").as_uri(), d / "copy.bin", sha256=None)
    >>> out.read_bytes()
    b'model bytes'
    """
    dest = Path(dest)
    accepted = None if sha256 is None else ((sha256,) if isinstance(sha256, str) else tuple(sha256))
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    with _locked(dest.with_name(dest.name + ".lock")):
        # another process may have finished the same download while we waited
        if dest.is_file() and (accepted is None or file_sha256(dest) in accepted):
            return dest
        resumed = _bytes(part) > 0
        if deadline is None:
            deadline = timeout + (size or max_bytes or MAX_DOWNLOAD_BYTES) / MIN_RATE
        limits = _Limits(size=size, most=size if size is not None else (max_bytes or MAX_DOWNLOAD_BYTES),
                         deadline=time.monotonic() + deadline, seconds=deadline)
        _transfer_with_retries(url, part, dest, limits=limits, retries=retries, backoff=backoff, timeout=timeout)
        got = file_sha256(part)
        if accepted is not None and got not in accepted and resumed:
            # the kept bytes may come from another mirror or an older file: once, from byte 0
            logger.warning("resumed download of %s has the wrong sha256; downloading it again", url)
            part.unlink()
            _transfer_with_retries(url, part, dest, limits=limits, retries=retries,
                                   backoff=backoff, timeout=timeout)
            got = file_sha256(part)
        if accepted is not None and got not in accepted:
            n = _bytes(part)
            what = _describe_wrong_file(part)
            part.unlink()
            wrong = f"{n} bytes{what} with sha256 {got}, expected {' or '.join(accepted)}; the file was deleted"
            raise ModelDownloadError(
                f"Downloaded {url} ({n} bytes{what}) has sha256 {got}, expected {' or '.join(accepted)}; "
                "the file was deleted. The server sent a different or corrupted file: "
                f"try again later, or put the right file at {dest}.",
                reason=wrong,
            )
        os.replace(part, dest)
    logger.info("downloaded %s -> %s", url, dest)
    return dest


@dataclasses.dataclass(frozen=True)
class _Limits:
    """What one URL may cost: its pinned size, the most bytes taken, and a monotonic deadline."""

    size: int | None
    most: int
    deadline: float
    seconds: float

    def check_time(self, url: str, part: Path) -> None:
        if time.monotonic() > self.deadline:
            raise ModelDownloadError(
                f"Downloading {url} did not finish within its deadline of {self.seconds:.0f} s "
                f"({_bytes(part)} bytes arrived; they are kept in {part} and a later run resumes them). "
                "The server is too slow: try again later (or with fetch_model(..., deadline=SECONDS)), "
                f"or put the file at {part.with_suffix('')} by hand.",
                reason=f"did not finish within its deadline of {self.seconds:.0f} s "
                f"({_bytes(part)} bytes arrived, kept in {part} for a later run to resume)",
            )


def _transfer_with_retries(
    url: str, part: Path, dest: Path, *, limits: _Limits, retries: int, backoff: float, timeout: float
) -> None:
    attempt = 0
    while True:
        limits.check_time(url, part)
        try:
            _transfer(url, part, limits=limits, timeout=max(0.1, min(timeout, limits.deadline - time.monotonic())))
            return
        except _Retryable as exc:
            # an unreachable server (offline, DNS) rarely recovers in seconds: one retry
            if attempt >= (min(retries, 1) if exc.offline else retries):
                if exc.offline:
                    raise NoNetworkError(
                        f"no network: put the file at {dest} or set DEEPFEAT_MODELS "
                        f"to a folder holding {dest.name} (download of {url} failed "
                        f"{attempt + 1} times: {exc})",
                        reason=f"{exc} ({attempt + 1} tries)",
                    ) from exc.__cause__
                raise ModelDownloadError(
                    f"Downloading {url} failed {attempt + 1} times ({exc}). "
                    f"{_bytes(part)} bytes are kept in {part}; run again to resume, "
                    f"or put the file at {dest}.",
                    reason=f"failed {attempt + 1} times ({exc}); {_bytes(part)} bytes are kept in {part}",
                ) from exc.__cause__
            delay = min(backoff * 2**attempt, max(0.0, limits.deadline - time.monotonic()))
            logger.warning("download of %s failed (%s); retry %d of %d in %.1f s",
                           url, exc, attempt + 1, retries, delay)
            time.sleep(delay)
            attempt += 1


def _describe_wrong_file(path: Path) -> str:
    """A hint about what arrived instead: a Git LFS pointer or an HTML page are common."""
    with open(path, "rb") as f:
        head = f.read(200)
    if head.startswith(b"version https://git-lfs"):
        return ", a Git LFS pointer file, not the model: this address no longer serves the file itself"
    if head.lstrip().lower().startswith((b"<!doctype html", b"<html")):
        return ", an HTML page, not the model"
    return ""


class _Retryable(Exception):
    def __init__(self, message: str, offline: bool = False):
        super().__init__(message)
        self.offline = offline


def _transfer(url: str, part: Path, *, limits: _Limits, timeout: float) -> None:
    """One attempt: append the missing bytes to ``part``. Raises ``_Retryable``."""
    size = limits.size
    have = _bytes(part)
    if size is not None and have == size:
        return  # complete from an earlier run; the caller checks the hash
    if size is not None and have > size:
        part.unlink()
        have = 0
    req = urllib.request.Request(url, headers={"User-Agent": "deepfeat"})
    if have and url.startswith(("http://", "https://")):
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:
            # the range starts at or past the end: start over rather than guess
            part.unlink()
            raise _Retryable(f"HTTP 416 resuming at byte {have}; restarting") from exc
        if exc.code in _RETRY_STATUS:
            raise _Retryable(f"HTTP {exc.code} {exc.reason}") from exc
        raise ModelDownloadError(
            f"Downloading {url} failed: HTTP {exc.code} {exc.reason}. The address may "
            f"have moved; put the file at {part.with_suffix('')} instead.",
            reason=f"HTTP {exc.code} {exc.reason}",
        ) from exc
    except urllib.error.URLError as exc:
        # DNS failure, refused connection, no route: the network is unusable
        raise _Retryable(f"cannot reach the server: {exc.reason}", offline=True) from exc
    except (TimeoutError, ConnectionError, http.client.HTTPException) as exc:
        raise _Retryable(f"cannot reach the server: {exc!r}", offline=True) from exc
    with resp:
        status = getattr(resp, "status", 200)
        mode = "ab" if (have and status == 206) else "wb"
        if have and mode == "wb":
            logger.info("server ignored the Range request; downloading %s from the start", url)
        total = _total_size(resp, have if mode == "ab" else 0, size)
        start = have if mode == "ab" else 0
        # the pinned size bounds what is taken, whatever the server says; without one, its own
        # Content-Length (or the hard cap)
        most = limits.most if size is not None or total is None else min(total, limits.most)
        read = getattr(resp, "read1", resp.read)  # what has arrived, so a trickle still meets the deadline
        try:
            with open(part, mode) as f, _progress(total, start, part.name) as bar:
                got = start
                while chunk := read(_CHUNK):
                    got += len(chunk)
                    if got > most:
                        f.close()
                        part.unlink()
                        raise ModelDownloadError(
                            f"{url} sent more than the {most} bytes {'pinned for' if size is not None else 'stated for'} "
                            f"{part.with_suffix('').name}: not the file (the partial download was deleted)."
                        )
                    f.write(chunk)
                    bar.update(len(chunk))
                    limits.check_time(url, part)
                f.flush()
                os.fsync(f.fileno())
        except (http.client.HTTPException, ConnectionError, TimeoutError) as exc:
            # other OSErrors (disk full, permissions) are not the network's: they propagate
            raise _Retryable(f"connection lost after {_bytes(part)} bytes: {exc!r}") from exc
    got = _bytes(part)
    if total is not None and got < total:
        raise _Retryable(f"connection closed after {got} of {total} bytes")


def _total_size(resp, offset: int, size: int | None) -> int | None:
    length = resp.headers.get("Content-Length")
    if length is not None and length.isdigit():
        return offset + int(length)
    return size


def _bytes(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


@contextlib.contextmanager
def _progress(total: int | None, initial: int, name: str) -> Iterator:
    from tqdm.auto import tqdm

    # tqdm disables itself when stderr is not a terminal (disable=None)
    with tqdm(total=total, initial=initial, unit="B", unit_scale=True, desc=name,
              disable=None, leave=False) as bar:
        yield bar


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Serialise downloads of one file across processes (POSIX ``flock``)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no cross-process lock
        yield
        return
    with open(lock_path, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _export_on_demand(spec: ModelSpec, dest: Path) -> Path:
    from .export import export_registered  # imports torch only when called

    needs = ["torch"] + (["torchvision"] if (spec.exporter or "").startswith("torchvision:") else [])
    missing = [m for m in needs if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelFileError(
            f"Model {spec.name!r} is not shipped: its file is made on this machine from PyTorch weights by "
            f"`deepfeat export {spec.name}`, which needs pip install \"deepfeat[export]\" ({' and '.join(missing)} "
            f"not installed). Or put {spec.filename} at {dest} or in a folder named by $DEEPFEAT_MODELS."
        )
    logger.warning("%s is not on disk; exporting it from PyTorch to %s (once)", spec.name, dest)
    try:
        path = export_registered(spec.name, dest)
    except ImportError as exc:  # e.g. the weight package is missing
        raise ModelFileError(
            f"{exc} Or put {spec.filename} at {dest} or in a folder named by $DEEPFEAT_MODELS."
        ) from exc
    except OSError as exc:  # torchvision could not fetch the weights (offline), or the file could not be written
        raise ModelFileError(
            f"Exporting model {spec.name!r} failed: {exc}. Run `deepfeat export {spec.name}` where its weights "
            f"can be downloaded, or put {spec.filename} at {dest} or in a folder named by $DEEPFEAT_MODELS."
        ) from exc
    digest = file_sha256(path)
    # an export of torchvision weights has no pinned digest: resolve_model checks its recipe and structure
    if spec.sha256 is not None and digest not in spec.accepted_sha256:
        bad = path.with_name(path.name + ".mismatch")
        os.replace(path, bad)
        raise ModelFileError(
            f"Exporting {spec.name!r} gave sha256 {digest}, but the registry expects "
            f"{spec.sha256}. Versions of torch/onnx outside the export extra's ranges may "
            f"produce different bytes: pip install \"deepfeat[export]\"; the export was "
            f"kept at {bad} for inspection."
        )
    return path
