"""The process-wide pool of ONNX Runtime sessions, shared by every embedder of a process.

An ``InferenceSession`` is expensive to build (the model is read, cut at the
requested tensors, optimised) and safe to share: ``run`` may be called from
several threads at once. Sessions are therefore built on first use, kept in a
bounded least-recently-used pool keyed by what they depend on (the model file's
sha256, the cut tensors, the providers and the thread count), and handed to
every embedder that asks for the same key: clones in a grid search,
cross-validation folds, unpickled copies on a worker. Sessions are never
pickled, and a forked child starts with an empty pool (ONNX Runtime's thread
pools do not survive a fork).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from typing import Any, Callable, Sequence

from . import graph
from .registry import ModelFileError, model_sha256, verified_bytes
from .runtime import ProviderArg, ProviderError, Runner, _normalise

__all__ = ["get_runner", "clear_sessions", "session_stats", "MAX_SESSIONS"]

logger = logging.getLogger(__name__)

#: sessions kept per process (``$DEEPFEAT_MAX_SESSIONS``); the least recently used is dropped
MAX_SESSIONS = int(os.environ.get("DEEPFEAT_MAX_SESSIONS", "8"))

_POOL: "OrderedDict[tuple, Runner]" = OrderedDict()
_LOCK = threading.Lock()
_BUILDING: dict[tuple, threading.Lock] = {}
_BUILDS = 0


#: sessions a forked child inherited: kept referenced and never touched, since
#: destroying one joins ONNX Runtime threads that do not exist in the child (a hang)
_INHERITED: list = []


def _reset_after_fork() -> None:
    global _POOL, _LOCK, _BUILDS, _BUILDING
    _INHERITED.append(_POOL)
    _POOL = OrderedDict()
    _LOCK = threading.Lock()
    _BUILDING = {}
    _BUILDS = 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _provider_key(providers: ProviderArg) -> str:
    # options dicts are not hashable; their sorted JSON is, and equal options give equal keys
    return json.dumps(_normalise(providers), sort_keys=True, default=str)


def get_runner(
    model_path: str | os.PathLike,
    model_sha256: str,
    tensors: Sequence[str],
    providers: ProviderArg = "auto",
    *,
    strict: bool = False,
    threads: int | None = None,
    locate: Callable[[], "str | os.PathLike"] | None = None,
) -> Runner:
    """The pooled :class:`~deepfeat.runtime.Runner` of a model cut at ``tensors``; built on first use.

    Parameters
    ----------
    model_path : path
        The ``.onnx`` file; checked against ``model_sha256`` before a session is built.
    model_sha256 : str
        The file's expected hash (part of the pool key).
    tensors : sequence of str
        Output tensors; the graph is cut right after them.
    providers, strict, threads
        As :func:`deepfeat.runtime.create_session` takes them.
    locate : callable, optional
        Called when ``model_path`` is missing or has another hash (an embedder
        unpickled on another machine); returns the path to use instead.

    Examples
    --------
    >>> from deepfeat.registry import file_sha256
    >>> from deepfeat.resolve import resolve_model
    >>> path, _ = resolve_model("efficientnet_lite0")
    >>> a = get_runner(path, file_sha256(path), ["pooled"], "cpu")
    >>> a is get_runner(path, file_sha256(path), ["pooled"], "cpu"), a.output_names
    (True, ['pooled'])
    """
    global _BUILDS
    key = (model_sha256, tuple(tensors), _provider_key(providers), bool(strict), threads)
    with _LOCK:
        runner = _POOL.get(key)
        if runner is not None:
            _POOL.move_to_end(key)
            return runner
        building = _BUILDING.setdefault(key, threading.Lock())
    # one lock per key: two threads asking for one session build it once, and a slow
    # build (TensorRT: minutes) does not hold up threads whose sessions are pooled
    with building:
        with _LOCK:
            runner = _POOL.get(key)
        if runner is not None:
            return runner
        path = _checked_path(model_path, model_sha256, locate)
        proto = graph.load_onnx(path, verified_bytes(path, model_sha256))  # parse what was hashed
        cut = graph.truncate(proto, list(tensors))
        try:
            runner = Runner.from_model(cut.SerializeToString(), providers, strict=strict, intra_op_threads=threads)
        except ProviderError:
            raise
        except Exception as exc:  # ONNX Runtime's message alone names neither the file nor the cut
            raise ModelFileError(
                f"ONNX Runtime cannot load the model file {path} cut at {list(tensors)} "
                f"({type(exc).__name__}: {exc})."
            ) from exc
        note = _oversubscription(threads)
        if note:
            logger.warning(note)
        with _LOCK:
            _BUILDS += 1
            logger.info("built ONNX Runtime session #%d for %s cut at %s on %s", _BUILDS, path, list(tensors),
                        runner.providers)
            _POOL[key] = runner
            _BUILDING.pop(key, None)
            while len(_POOL) > max(1, MAX_SESSIONS):
                _POOL.popitem(last=False)
        return runner


_WARNED_OVERSUBSCRIBED = False


def _oversubscription(threads: int | None) -> str | None:
    """A warning, once per process, when a worker process's session takes every core.

    ONNX Runtime's default is one thread per core. In a worker of
    ``GridSearchCV(n_jobs=k)``, joblib or Dask, k such sessions share the cores
    and run slower together than one alone.
    """
    global _WARNED_OVERSUBSCRIBED
    import multiprocessing

    if threads is not None or _WARNED_OVERSUBSCRIBED or multiprocessing.parent_process() is None:
        return None
    _WARNED_OVERSUBSCRIBED = True
    cores = os.cpu_count() or 1
    return (
        f"process {os.getpid()} is a worker of another process, and its ONNX Runtime session uses all {cores} "
        "cores: with several workers the threads exceed the cores and every worker slows down. Set "
        "ImageEmbedder(inference_threads=cores // workers), e.g. inference_threads=1 with n_jobs="
        f"{cores}, or embed once before a parallel search."
    )


def _checked_path(path: Any, sha256: str, locate: Callable[[], Any] | None) -> str:
    try:
        if model_sha256(path) == sha256:
            return os.fspath(path)
    except (OSError, ModelFileError):
        pass
    if locate is not None:
        found = locate()
        digest = model_sha256(found)
        if digest == sha256:
            return os.fspath(found)
        path = found
    else:
        digest = model_sha256(path) if os.path.isfile(path) else "(missing)"
    raise ModelFileError(
        f"The model file {os.fspath(path)} has sha256 {digest}, but the features were set up with "
        f"{sha256}. Refit the embedder, or restore the original file."
    )


def session_stats() -> dict[str, int]:
    """``{"sessions": kept now, "builds": built by this process}``.

    Examples
    --------
    >>> sorted(session_stats())
    ['builds', 'sessions']
    """
    with _LOCK:
        return {"sessions": len(_POOL), "builds": _BUILDS}


def clear_sessions() -> int:
    """Drop every pooled session of this process (freeing their memory); return how many.

    Examples
    --------
    >>> clear_sessions() >= 0
    True
    """
    with _LOCK:
        n = len(_POOL)
        _POOL.clear()
        return n
