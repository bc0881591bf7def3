"""The warm path: the engine's one path, per-layer storage, windowed claims, shared sessions, lazy fit.

Real parts: a real SQLite store, the tiny ONNX CNN and the shipped model, real
processes started together on real photos.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from sklearn.base import clone

from deepfeat import ImageEmbedder
from deepfeat.cache import FeatureCache, NullStore, StoreBatch, new_owner
from deepfeat.engine import Layer, embed
from deepfeat.graph import LayerError
from deepfeat.runtime import ProviderError
from deepfeat.sessions import get_runner, session_stats

from .conftest import TINY_PREPROCESSING


class _Sum:
    providers = ["none"]

    def __init__(self, calls):
        self.calls = calls

    def run(self, batch):
        self.calls.append(len(batch))
        return [batch.reshape(len(batch), -1).sum(axis=1, keepdims=True) * np.arange(1, 4, dtype=np.float32)]


def _decode(a):
    return np.asarray(a, np.float32)[None]


def _arrays(n, seed=0):
    return list(np.random.default_rng(seed).integers(0, 256, size=(n, 2, 2), dtype=np.uint8))


class _CountingStore:
    """A real FeatureCache, with the keys of every claim and look-up counted."""

    persistent = True

    def __init__(self, cache):
        self.cache, self.claims, self.lookups = cache, [], []

    def claim(self, scope, keys, *, owner):
        self.claims.append(len(keys))
        return self.cache.claim(scope, keys, owner=owner)

    def get_into(self, fingerprint, keys, out, rows, cols=slice(None)):
        self.lookups.append(len(keys))
        return self.cache.get_into(fingerprint, keys, out, rows, cols)

    def put(self, batches, **kw):
        return self.cache.put(batches, **kw)

    def release(self, *a, **kw):
        return self.cache.release(*a, **kw)


LAYER = Layer("v", "t", "avg", 3, "fp")


def test_null_store_and_cache_run_the_same_path(tmp_path):
    items = _arrays(50)
    items[7] = items[3]  # a duplicate
    calls: list = []
    plain = embed(items, [LAYER], decode=_decode, network=lambda t: _Sum(calls), store=NullStore(), batch_size=8)
    assert plain.stats == {"hits": 0, "misses": 0, "computed": 50, "shared": 0, "uncacheable": 0}
    cache = FeatureCache(tmp_path)
    cold = embed(items, [LAYER], decode=_decode, network=lambda t: _Sum(calls), store=cache, scope="s", batch_size=8)
    warm = embed(items, [LAYER], decode=_decode, network=lambda t: _Sum(calls), store=cache, scope="s", batch_size=8)
    assert np.array_equal(plain.X, cold.X) and np.array_equal(cold.X, warm.X)
    assert cold.stats == {"hits": 0, "misses": 50, "computed": 49, "shared": 0, "uncacheable": 0}
    assert warm.stats["hits"] == 50 and warm.providers is None  # no image needed the network
    assert cache.info()["claims"] == 0


def test_claim_rounds_are_windows_and_each_key_is_claimed_once(tmp_path):
    store = _CountingStore(FeatureCache(tmp_path))
    res = embed(_arrays(1000), [LAYER], decode=_decode, network=lambda t: _Sum([]), store=store, scope="s",
                batch_size=16)
    assert res.stats["computed"] == 1000
    assert max(store.claims) <= 16 and sum(store.claims) == 1000  # O(window) per round, linear in all


def test_a_waiter_rechecks_only_what_others_hold(tmp_path):
    cache = FeatureCache(tmp_path)
    items = _arrays(64)
    ref = embed(items, [LAYER], decode=_decode, network=lambda t: _Sum([]), batch_size=8).X
    from deepfeat.keys import content_keys

    keys = content_keys(items)[0]
    other = new_owner()  # this process, another owner: a live claimant
    held = keys[10:14]
    assert cache.claim("s", held, owner=other) == (held, [])

    def finish_later():
        time.sleep(0.4)
        cache.put([StoreBatch("fp", held, ref[10:14])], owner=other, scope="s", release=held)

    t = threading.Thread(target=finish_later)
    t.start()
    store = _CountingStore(cache)
    res = embed(items, [LAYER], decode=_decode, network=lambda t: _Sum([]), store=store, scope="s",
                batch_size=8, poll=0.01)
    t.join()
    assert np.array_equal(res.X, ref)
    assert res.stats["computed"] == 60 and res.stats["shared"] == 4
    first_lookup, *rechecks = store.lookups
    assert first_lookup == 64
    # after its claim each window is re-checked (<= 8 keys); while waiting, only the 4 held keys are
    assert max(rechecks) <= 8 and rechecks.count(4) >= 2


def test_vectors_are_stored_per_layer_and_only_missing_layers_run(tmp_path, tiny_model_path, sample_photos,
                                                                    network_calls):
    kw = dict(model=str(tiny_model_path), preprocessing=TINY_PREPROCESSING, progress=False, cache=tmp_path)
    asked = network_calls
    ImageEmbedder(**kw, layers="pooled").fit().transform(sample_photos)
    both = ImageEmbedder(**kw, layers=["stage2", "pooled"]).fit()
    X = both.transform(sample_photos)
    assert set(asked) == {("pooled",), ("conv2",)}  # the second pass ran only the missing layer
    assert both.cache_stats_["computed"] == 2 and both.cache_stats_["hits"] == 0
    fps = {f["description"]["layers"][0]: f for f in FeatureCache(tmp_path).info()["fingerprints"]}
    assert fps["pooled"]["computed"] == 2 and fps["stage2"]["computed"] == 2
    plain = ImageEmbedder(**{**kw, "cache": None}, layers=["stage2", "pooled"]).fit().transform(sample_photos)
    assert np.array_equal(X, plain)
    n_asked = len(asked)
    again = ImageEmbedder(**kw, layers=["pooled", "stage2"]).fit()  # another order: all read back
    assert np.array_equal(again.transform(sample_photos), X[:, [*range(8, 16), *range(8)]])
    assert again.cache_stats_["hits"] == 2 and len(asked) == n_asked


def test_fit_opens_no_session_and_copies_share_one(tiny_model_path, sample_photos):
    emb = ImageEmbedder(model=str(tiny_model_path), preprocessing=TINY_PREPROCESSING, progress=False,
                        inference_threads=3, layers="stage1")  # a session key no other test uses
    before = session_stats()["builds"]
    emb.fit()
    assert session_stats()["builds"] == before  # fit is cheap: no session
    X = emb.transform(sample_photos)
    assert session_stats()["builds"] == before + 1
    for copy in (clone(emb).fit(), pickle.loads(pickle.dumps(emb)), clone(emb).set_params(pooling="max").fit()):
        copy.transform(sample_photos)
    assert session_stats()["builds"] == before + 1  # clones, unpickled copies and other poolings share it
    assert np.array_equal(pickle.loads(pickle.dumps(emb)).transform(sample_photos), X)


def test_lazy_fit_still_refuses_what_fit_refused(tiny_model_path, tmp_path):
    kw = dict(model=str(tiny_model_path), preprocessing=TINY_PREPROCESSING, progress=False)
    with pytest.raises(LayerError, match="stage9"):
        ImageEmbedder(**kw, layers="stage9").fit()
    with pytest.raises(ProviderError, match="NoSuchExecutionProvider"):
        ImageEmbedder(**kw, providers=["NoSuchExecutionProvider"], strict_providers=True).fit()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx at all")
    with pytest.raises(ValueError, match="not a valid ONNX model"):
        ImageEmbedder(**{**kw, "model": str(bad)}).fit()


def test_session_pool_is_bounded_and_keyed(tiny_model_path, monkeypatch):
    from deepfeat import sessions
    from deepfeat.registry import file_sha256

    sha = file_sha256(tiny_model_path)
    monkeypatch.setattr(sessions, "MAX_SESSIONS", 2)
    a = get_runner(tiny_model_path, sha, ["conv1"], "cpu")
    assert get_runner(tiny_model_path, sha, ["conv1"], "cpu") is a
    assert get_runner(tiny_model_path, sha, ["conv1"], "cpu", threads=1) is not a
    get_runner(tiny_model_path, sha, ["conv2"], "cpu")
    assert session_stats()["sessions"] == 2
    assert get_runner(tiny_model_path, sha, ["conv1"], "cpu") is not a  # evicted, least recently used


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_builds_its_own_session(tiny_model_path, sample_photos, tmp_path):
    emb = ImageEmbedder(model=str(tiny_model_path), preprocessing=TINY_PREPROCESSING, progress=False).fit()
    X = emb.transform(sample_photos)  # the parent's pool holds a session now
    out = tmp_path / "child.npy"
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            before = session_stats()
            np.save(out, emb.transform(sample_photos))
            code = 0 if (before["sessions"], session_stats()["builds"]) == (0, 1) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert np.array_equal(np.load(out), X)


_WORKER = r"""
import json, os, sys, time
import numpy as np
from deepfeat import ImageEmbedder

model, pre, cache, go, out, paths = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6:]
emb = ImageEmbedder(model=model, preprocessing=pre, cache=cache, progress=False, inference_threads=1, n_jobs=1).fit()
open(out + ".ready", "w").close()
while not os.path.exists(go):
    time.sleep(0.002)
X = emb.transform(paths)
np.save(out, X)
print(json.dumps(emb.cache_stats_))
"""


@pytest.mark.slow
def test_two_processes_on_one_cold_cache_each_compute_a_share(tmp_path, tiny_model_path, hymenoptera):
    paths = sorted(str(p) for p in hymenoptera.glob("*/*/*.jpg"))[:160]
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    go = tmp_path / "go"
    outs = [tmp_path / f"out{i}.npy" for i in range(2)]
    pre = json.dumps(TINY_PREPROCESSING)
    procs = [
        subprocess.Popen([sys.executable, str(script), str(tiny_model_path), pre, str(tmp_path / "c"), str(go),
                          str(o), *paths], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for o in outs
    ]
    deadline = time.monotonic() + 120
    while not all(Path(f"{o}.ready").exists() for o in outs):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "workers did not start"
        time.sleep(0.01)
    go.touch()
    stats = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        stats.append(json.loads(out))
    ref = ImageEmbedder(model=str(tiny_model_path), preprocessing=TINY_PREPROCESSING, progress=False).fit()
    expected = ref.transform(paths)
    assert all(np.array_equal(np.load(o), expected) for o in outs)
    computed = [s["computed"] for s in stats]
    assert sum(computed) == 160  # no image ran twice
    assert all(40 <= c <= 120 for c in computed), computed  # each did 25-75 %
    info = FeatureCache(tmp_path / "c").info()
    assert info["vectors"] == 160 and info["claims"] == 0


def test_content_keys_are_hashed_once_per_file_version(tmp_path, monkeypatch):
    from deepfeat import keys

    monkeypatch.setattr(keys, "_SETTLED", 0.0)  # remember at once (default: files older than 2 s)
    monkeypatch.setattr(keys, "_HASHED", {})
    path = tmp_path / "x.bin"
    path.write_bytes(b"a" * 1000)
    first = keys.content_key(path)[0]
    assert len(keys._HASHED) == 1 and keys.content_key(path)[0] == first
    st = os.stat(path)
    time.sleep(0.05)  # past the file system's clock tick
    path.write_bytes(b"b" * 1000)  # same size, and the old mtime put back: only ctime tells
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    edited = keys.content_key(path)[0]
    assert edited != first and edited == keys.content_key(b"b" * 1000)[0]
    monkeypatch.setattr(keys, "_SETTLED", 3600.0)  # a file changed within the hour is never remembered
    keys._HASHED.clear()
    keys.content_key(path)
    assert keys._HASHED == {}


def _file_pixels(path):
    from deepfeat.images import ImageDecodeError

    data = Path(path).read_bytes()
    if not data:
        raise ImageDecodeError(str(path), "empty file")
    return np.frombuffer(data, np.uint8)[:4].astype(np.float32).reshape(1, 2, 2)


def test_a_copy_of_a_failing_image_runs_on_its_own(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    for p in (a, b):
        p.write_bytes(bytes([1, 2, 3, 4]))

    def decode(path):  # `a` becomes unreadable after its key was made
        if Path(path).name == "a.bin":
            raise __import__("deepfeat.images", fromlist=["x"]).ImageDecodeError(str(path), "gone")
        return _file_pixels(path)

    res = embed([str(a), str(b)], [LAYER], decode=decode, network=lambda t: _Sum([]), store=FeatureCache(tmp_path / "c"),
                scope="s", on_error="skip")
    assert [f[0] for f in res.failures] == [0] and np.isnan(res.X[0]).all()
    assert res.X[1].tolist() == [10.0, 20.0, 30.0]  # 1+2+3+4, times 1, 2, 3


def test_a_file_edited_while_read_gives_its_copies_nothing(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    for p in (a, b):
        p.write_bytes(bytes([1, 2, 3, 4]))

    def decode(path):
        if Path(path).name == "a.bin":  # edited between its key and its decode
            time.sleep(0.02)
            Path(path).write_bytes(bytes([9, 9, 9, 9, 9]))
        return _file_pixels(path)

    cache = FeatureCache(tmp_path / "c")
    res = embed([str(a), str(b)], [LAYER], decode=decode, network=lambda t: _Sum([]), store=cache, scope="s")
    assert res.X[0].tolist() == [36.0, 72.0, 108.0] and res.X[1].tolist() == [10.0, 20.0, 30.0]
    assert cache.info()["vectors"] == 0  # neither vector was stored under the old content's key


def test_an_embedder_pickled_before_the_engine_still_transforms(tiny_model_path, sample_photos):
    emb = ImageEmbedder(model=str(tiny_model_path), preprocessing=TINY_PREPROCESSING, progress=False).fit()
    X = emb.transform(sample_photos)
    state = emb.__getstate__()
    for private in ("_plan", "_scope"):  # what deepfeat 0.1.0 did not have
        state.pop(private)
    old = ImageEmbedder.__new__(ImageEmbedder)
    old.__setstate__(state)
    assert np.array_equal(old.transform(sample_photos), X)


class _Fragile(_Sum):
    """Fails on batches of more than 3 images (as out of memory would), and on one poisoned image alone."""

    def run(self, batch):
        if len(batch) > 3:
            raise MemoryError("Failed to allocate memory for the batch")
        if (batch == 99).all(axis=(1, 2, 3)).any():
            raise RuntimeError("kernel failed")
        return super().run(batch)


def test_a_failing_batch_costs_only_the_image_that_fails_alone(tmp_path):
    items = _arrays(20, seed=3)
    items[13] = np.full((2, 2), 99, np.uint8)
    ref = embed(items, [LAYER], decode=_decode, network=lambda t: _Sum([]), batch_size=8).X
    cache = FeatureCache(tmp_path)
    res = embed(items, [LAYER], decode=_decode, network=lambda t: _Fragile([]), store=cache, scope="s",
                batch_size=8, on_error="skip")
    assert [f[0] for f in res.failures] == [13] and "inference failed on none" in res.failures[0][2]
    assert "kernel failed" in res.failures[0][2]
    ok = np.arange(20) != 13
    assert np.array_equal(res.X[ok], ref[ok]) and np.isnan(res.X[13]).all()
    assert res.stats["computed"] == 19 and cache.info()["vectors"] == 19 and cache.info()["claims"] == 0
    with pytest.raises(MemoryError):  # on_error="raise": the error as it came
        embed(_arrays(8, seed=4), [LAYER], decode=_decode, network=lambda t: _Fragile([]), batch_size=8)


def test_a_network_that_runs_nothing_is_an_error_not_a_column_of_nan():
    class Broken(_Sum):
        def run(self, batch):
            raise RuntimeError("CUDA failure 999: unknown error")

    with pytest.raises(RuntimeError, match="could not run any image, even alone.*CUDA failure 999"):
        embed(_arrays(4), [LAYER], decode=_decode, network=lambda t: Broken([]), on_error="skip")
