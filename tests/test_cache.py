"""The on-disk feature cache: keys, staleness, concurrency, crashes and corruption.

Real parts throughout: a tiny ONNX CNN (conftest) and the real model on real
JPEGs; other processes are real processes, killed with SIGKILL.
"""

import json
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from sklearn.utils._param_validation import InvalidParameterError

from deepfeat import ImageEmbedder
from deepfeat.cache import (
    DB_NAME,
    CacheCorruptError,
    CacheError,
    FeatureCache,
    new_owner,
    open_cache,
)
from deepfeat.engine import Layer, embed
from deepfeat.keys import content_key
from deepfeat.cli import main

from .conftest import TINY_PREPROCESSING, build_tiny_cnn

N_PHOTOS = 30


@pytest.fixture(scope="module")
def photos(hymenoptera):
    """30 real JPEGs (15 ants, 15 bees) and their labels."""
    paths, labels = [], []
    for label in ("ants", "bees"):
        files = sorted(p for p in (hymenoptera / "train" / label).glob("*.jpg") if " " not in p.name)
        paths += [str(p) for p in files[: N_PHOTOS // 2]]
        labels += [label] * (N_PHOTOS // 2)
    return paths, np.asarray(labels)


@pytest.fixture
def tiny_kw(tiny_model_path):
    return dict(model=str(tiny_model_path), preprocessing=TINY_PREPROCESSING, progress=False)


def _reference(tiny_kw, items, **kw):
    return ImageEmbedder(**tiny_kw, **kw).fit().transform(items)


def _only_fingerprint(directory):
    (fp,) = FeatureCache(directory).info()["fingerprints"]
    return fp


def _run(args, **kw):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=300, **kw)


# ------------------------------------------------------------------ the store
def test_store_round_trip_is_exact_and_first_writer_wins(tmp_path):
    cache = FeatureCache(tmp_path)
    vecs = np.random.default_rng(0).normal(size=(700, 33)).astype(np.float32)  # > one SQL chunk
    keys = [f"k{i}" for i in range(700)]
    assert cache.put_many("fp", keys, vecs, description={"model": "m"}) == 700
    found = cache.get_many("fp", keys + ["absent"])
    assert set(found) == set(keys)
    assert all(np.array_equal(found[k], v) for k, v in zip(keys, vecs))
    assert found["k0"].dtype == np.float32
    assert cache.get_many("other-fp", keys) == {}
    # a second write of the same keys changes nothing that readers can see
    assert cache.put_many("fp", keys[:5], vecs[:5] + 1) == 0
    assert np.array_equal(cache.get_many("fp", ["k0"])["k0"], vecs[0])
    info = cache.info()
    assert info["vectors"] == 700 and info["claims"] == 0
    (fp,) = info["fingerprints"]
    assert (fp["dim"], fp["vectors"], fp["computed"], fp["description"]) == (33, 700, 705, {"model": "m"})


def test_store_refuses_non_finite_vectors_and_wrong_shapes(tmp_path):
    cache = FeatureCache(tmp_path)
    with pytest.raises(ValueError, match="NaN"):
        cache.put_many("fp", ["a"], np.array([[np.nan, 1.0]], np.float32))
    with pytest.raises(ValueError, match="keys"):
        cache.put_many("fp", ["a", "b"], np.zeros((1, 2), np.float32))
    assert cache.get_many("fp", ["a"]) == {}


def test_info_and_get_do_not_create_a_cache(tmp_path):
    cache = FeatureCache(tmp_path / "none")
    assert cache.get_many("fp", ["a"]) == {}
    assert cache.info()["exists"] is False
    assert not (tmp_path / "none").exists()


def test_pickle_holds_settings_only_and_reopens(tmp_path):
    cache = FeatureCache(tmp_path, timeout=7)
    cache.put_many("fp", ["a"], np.ones((1, 3), np.float32))
    state = cache.__getstate__()
    assert state == {"directory": str(tmp_path), "timeout": 7.0, "claim_timeout": 120.0, "check": True}
    copy = pickle.loads(pickle.dumps(cache))
    assert copy.get_many("fp", ["a"])["a"].tolist() == [1.0, 1.0, 1.0]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_opens_its_own_connection(tmp_path):
    cache = FeatureCache(tmp_path)
    cache.put_many("fp", ["parent"], np.zeros((1, 2), np.float32))  # parent connection is open
    pid = os.fork()
    if pid == 0:  # child: same object, must not reuse the parent's connection
        code = 1
        try:
            cache.put_many("fp", ["child"], np.ones((1, 2), np.float32))
            code = 0 if set(cache.get_many("fp", ["parent", "child"])) == {"parent", "child"} else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert cache.get_many("fp", ["child"])["child"].tolist() == [1.0, 1.0]


def _filled_cache(directory, n=300, dim=64):
    cache = FeatureCache(directory)
    vecs = np.random.default_rng(1).normal(size=(n, dim)).astype(np.float32)
    keys = [f"k{i}" for i in range(n)]
    cache.put_many("fp", keys, vecs)
    cache.close()  # last connection: WAL checkpointed into the main file
    return keys, vecs


@pytest.mark.parametrize("damage", ["header", "truncated", "page", "vector"])
def test_corrupt_file_is_detected_never_read(tmp_path, damage):
    keys, vecs = _filled_cache(tmp_path)
    db = tmp_path / DB_NAME
    data = bytearray(db.read_bytes())
    if damage == "header":
        data[:16] = b"garbage garbage!"
    elif damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "page":
        data[8192:12288] = np.random.default_rng(2).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    else:  # one flipped bit inside a stored vector: SQLite's structure is intact, the checksum is not
        at = bytes(data).find(vecs[150].tobytes())
        assert at > 0
        data[at + 10] ^= 0x01
    db.write_bytes(bytes(data))
    with pytest.raises(CacheCorruptError) as err:
        FeatureCache(tmp_path).get_many("fp", keys)
    msg = str(err.value)
    assert str(db) in msg and f"deepfeat cache clear {tmp_path}" in msg
    # the advertised fix works: clear, then the cache is usable and empty
    FeatureCache(tmp_path).clear()
    fresh = FeatureCache(tmp_path)
    assert fresh.get_many("fp", keys) == {} and fresh.info()["vectors"] == 0


def test_cache_of_another_format_version_is_refused(tmp_path):
    _filled_cache(tmp_path)
    con = sqlite3.connect(tmp_path / DB_NAME)
    con.execute("UPDATE meta SET value='99' WHERE name='schema_version'")
    con.commit()
    con.close()
    with pytest.raises(CacheError, match="format version 99.*deepfeat cache clear"):
        FeatureCache(tmp_path).get_many("fp", ["k0"])


# ------------------------------------------------------------------- keys
def test_content_keys(tmp_path, photos):
    a, b = photos[0][:2]
    copy = tmp_path / "copy.jpg"
    copy.write_bytes(Path(a).read_bytes())
    assert content_key(a)[0] == content_key(copy)[0] == content_key(Path(a).read_bytes())[0]
    assert content_key(a)[0] != content_key(b)[0]
    # stat keys depend on the file, not only its bytes
    assert content_key(a, "stat")[0] != content_key(copy, "stat")[0]
    assert content_key(tmp_path / "missing.jpg") == (None, None)
    assert content_key(tmp_path)[0] is None  # a folder
    assert content_key(Image.new("RGB", (4, 4)))[0] is None
    arr = np.zeros((4, 4, 3), np.uint8)
    assert content_key(arr)[0] != content_key(arr.reshape(4, 12, 1))[0]  # shape is part of the key
    with pytest.raises(ValueError, match="content.*stat"):
        content_key(a, "fast")


# --------------------------------------------------------------- embedder
def test_cached_vectors_equal_computed_ones_and_stats_count(tmp_path, tiny_kw, photos, sample_photos):
    items = photos[0][:12] + sample_photos  # paths and uint8 arrays are both cached
    ref = _reference(tiny_kw, items)
    emb = ImageEmbedder(**tiny_kw, cache=tmp_path / "c").fit()
    assert emb.cache_stats_ == {"hits": 0, "misses": 0, "computed": 0, "shared": 0, "uncacheable": 0}
    cold = emb.transform(items)
    assert emb.cache_stats_ == {"hits": 0, "misses": 14, "computed": 14, "shared": 0, "uncacheable": 0}
    warm = clone(emb).fit().transform(items)
    assert np.array_equal(cold, ref) and np.array_equal(warm, ref)
    # a subset, reordered, with a repeat: all from the cache
    subset = [items[5], items[0], items[5]]
    assert np.array_equal(emb.transform(subset), ref[[5, 0, 5]])
    assert emb.cache_stats_ == {"hits": 3, "misses": 0, "computed": 0, "shared": 0, "uncacheable": 0}
    fp = _only_fingerprint(tmp_path / "c")
    assert (fp["vectors"], fp["computed"], fp["dim"]) == (14, 14, emb.n_features_out_)
    assert fp["description"]["model"] == tiny_kw["model"]


def test_same_image_twice_in_one_call_runs_once(tmp_path, tiny_kw, photos):
    a, b = photos[0][:2]
    emb = ImageEmbedder(**tiny_kw, cache=tmp_path).fit()
    X = emb.transform([a, b, a, a])
    assert emb.cache_stats_["computed"] == 2
    assert np.array_equal(X, _reference(tiny_kw, [a, b, a, a]))


@pytest.mark.parametrize(
    "change",
    [
        {"pooling": "max"},
        {"layers": ["stage2"]},
        {"layers": ["stage1", "pooled"]},
        {"image_size": 40},
        {"preprocessing": {**TINY_PREPROCESSING, "mean": (0.0, 0.0, 0.0)}},
        {"preprocessing": {**TINY_PREPROCESSING, "interpolation": "bicubic"}},
        "other model file",
    ],
)
def test_any_setting_change_misses_never_stale(tmp_path, tiny_kw, photos, change):
    items = photos[0][:6]
    base = ImageEmbedder(**tiny_kw, cache=tmp_path / "c").fit()
    base.transform(items)
    if change == "other model file":  # same graph and file name, other weights
        other = tmp_path / "m" / Path(tiny_kw["model"]).name
        other.parent.mkdir()
        import onnx

        onnx.save(build_tiny_cnn(seed=1), str(other))
        kw = {**tiny_kw, "model": str(other)}
    else:
        kw = {**tiny_kw, **change}
    emb = ImageEmbedder(**kw, cache=tmp_path / "c").fit()
    assert emb.cache_fingerprint_ != base.cache_fingerprint_
    X = emb.transform(items)
    assert emb.cache_stats_["hits"] == 0 and emb.cache_stats_["computed"] == 6
    assert np.array_equal(X, _reference(kw, items))
    base.transform(items)  # the first setting's vectors are still there
    assert base.cache_stats_["hits"] == 6


@pytest.mark.parametrize("cache_key", ["content", "stat"])
def test_edited_file_never_returns_its_old_vector(tmp_path, tiny_kw, photos, cache_key):
    src = np.asarray(Image.open(photos[0][0]).convert("RGB"))[:64, :64]
    path = tmp_path / "x.bmp"  # uncompressed: the edit keeps the file size
    Image.fromarray(src).save(path)
    emb = ImageEmbedder(**tiny_kw, cache=tmp_path / "c", cache_key=cache_key).fit()
    before = emb.transform([str(path)])
    st = os.stat(path)
    edited = src.copy()
    edited[:32] = 255 - edited[:32]
    Image.fromarray(edited).save(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # as `cp -p` or `touch -r` would
    assert (os.stat(path).st_size, os.stat(path).st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    after = emb.transform([str(path)])
    assert emb.cache_stats_["computed"] == 1
    assert np.array_equal(after, _reference(tiny_kw, [edited]))
    assert not np.array_equal(after, before)


def test_failed_images_are_never_cached(tmp_path, tiny_kw, photos):
    good = photos[0][0]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"this is not a JPEG at all")
    items = [good, str(bad), good, str(bad)]
    emb = ImageEmbedder(**tiny_kw, cache=tmp_path / "c", on_error="skip").fit()
    for run in range(2):
        X = emb.transform(items)
        assert np.isnan(X[[1, 3]]).all() and np.isfinite(X[[0, 2]]).all()
        assert emb.failures_["position"].tolist() == [1, 3]
        assert str(bad) in emb.failures_["source"].tolist()
        assert emb.cache_stats_["computed"] == (1 if run == 0 else 0)
        assert emb.cache_stats_["hits"] == (0 if run == 0 else 2)
    assert _only_fingerprint(tmp_path / "c")["vectors"] == 1
    # with on_error="raise" the error propagates and no claim is left behind
    strict = ImageEmbedder(**tiny_kw, cache=tmp_path / "c").fit()
    with pytest.raises(ValueError, match="bad.jpg"):
        strict.transform([photos[0][1], str(bad)])
    assert FeatureCache(tmp_path / "c").info()["claims"] == 0


def test_pil_images_are_computed_not_cached(tmp_path, tiny_kw, photos):
    imgs = [Image.open(p).convert("RGB") for p in photos[0][:2]]
    emb = ImageEmbedder(**tiny_kw, cache=tmp_path).fit()
    X = emb.transform(imgs)
    assert emb.cache_stats_ == {"hits": 0, "misses": 0, "computed": 2, "shared": 0, "uncacheable": 2}
    assert np.array_equal(X, _reference(tiny_kw, imgs))
    assert FeatureCache(tmp_path).info()["vectors"] == 0


def test_estimator_contract_with_cache(tmp_path, tiny_kw, photos, monkeypatch):
    items = photos[0][:3]
    emb = ImageEmbedder(**tiny_kw, cache=tmp_path / "c", cache_key="stat")
    assert clone(emb).get_params()["cache"] == tmp_path / "c"
    emb.fit().transform(items)
    back = pickle.loads(pickle.dumps(emb))
    assert back.cache_dir_ == tmp_path / "c"
    df = back.set_output(transform="pandas").transform(items)
    assert isinstance(df, pd.DataFrame) and back.cache_stats_["hits"] == 3
    monkeypatch.setenv("DEEPFEAT_CACHE", str(tmp_path / "env"))
    assert ImageEmbedder(**tiny_kw, cache=True).fit().cache_dir_ == tmp_path / "env"
    assert ImageEmbedder(**tiny_kw, cache=False).fit().cache_dir_ is None
    with pytest.raises(InvalidParameterError, match="cache_key"):
        ImageEmbedder(**tiny_kw, cache_key="fast").fit()
    with pytest.raises(InvalidParameterError, match="'cache'"):
        ImageEmbedder(**tiny_kw, cache=3).fit()
    with pytest.raises(ValueError, match="empty path"):
        ImageEmbedder(**tiny_kw, cache="").fit()


def test_corrupt_cache_fails_at_fit_with_the_fix(tmp_path, tiny_kw):
    _filled_cache(tmp_path)
    (tmp_path / DB_NAME).write_bytes(b"\0" * 8192)
    with pytest.raises(CacheCorruptError, match="deepfeat cache clear"):
        ImageEmbedder(**tiny_kw, cache=tmp_path).fit()


# ------------------------------------------------- cross-validation, counted
@pytest.mark.parametrize("n_jobs", [1, 2])
def test_grid_search_runs_the_network_once_per_image(tmp_path, tiny_kw, photos, n_jobs):
    paths, y = photos
    pipe = Pipeline(
        [("embed", ImageEmbedder(**tiny_kw, cache=tmp_path / "c")), ("scale", StandardScaler()), ("clf", SVC())]
    )
    heads = [LogisticRegression(max_iter=1000), SVC(), KNeighborsClassifier(3)]
    grid = GridSearchCV(pipe, {"clf": heads}, cv=5, n_jobs=n_jobs).fit(paths, y)
    # 3 heads x 5 folds + refit = 16 fits and 31 transforms, in n_jobs processes
    fp = _only_fingerprint(tmp_path / "c")
    assert fp["computed"] == N_PHOTOS  # network runs, whichever process ran them
    assert fp["vectors"] == N_PHOTOS
    refit = grid.best_estimator_.named_steps["embed"]
    assert refit.cache_stats_ == {"hits": N_PHOTOS, "misses": 0, "computed": 0, "shared": 0, "uncacheable": 0}
    if n_jobs == 1:  # same scores as without a cache
        pipe_nc = clone(pipe).set_params(embed__cache=None)
        plain = GridSearchCV(pipe_nc, {"clf": heads}, cv=5).fit(paths, y)
        assert np.array_equal(grid.cv_results_["mean_test_score"], plain.cv_results_["mean_test_score"])


# ------------------------------------------------- processes and SIGKILL
# deepfeat.cache needs only numpy and the standard library: child processes
# load that one file, which starts them in a fraction of a second
_LOAD_CACHE = f'''
import importlib.util, sys
_spec = importlib.util.spec_from_file_location("deepfeat_cache", {str(Path(FeatureCache.__init__.__code__.co_filename))!r})
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)
FeatureCache, new_owner = _mod.FeatureCache, _mod.new_owner
'''

_VECTORS = '''
import numpy as np

DIM, BATCH = 2048, 64


def expected(i, j):
    return np.sin(np.arange(DIM) * (i + 1) * 0.001 + j).astype(np.float32)
'''

_KILLED_WRITER = _LOAD_CACHE + _VECTORS + '''

cache = FeatureCache(sys.argv[1])
i = 0
while True:
    keys = [f"b{i}-{j}" for j in range(BATCH)]
    cache.put_many("fp", keys, np.stack([expected(i, j) for j in range(BATCH)]))
    print(i, flush=True)  # printed only after the commit returned
    i += 1
'''


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
@pytest.mark.parametrize("kill_after", [2, 11])
def test_kill_9_mid_write_loses_nothing_committed_returns_nothing_wrong(tmp_path, kill_after):
    script = tmp_path / "writer.py"
    script.write_text(_KILLED_WRITER)
    cache_dir = tmp_path / "c"
    proc = subprocess.Popen([sys.executable, str(script), str(cache_dir)], stdout=subprocess.PIPE, text=True)
    committed = -1
    while committed < kill_after:
        line = proc.stdout.readline()
        assert line, "writer died on its own"
        committed = int(line)
    proc.send_signal(signal.SIGKILL)  # most of its time is spent inside put_many
    proc.wait()
    committed = max([committed] + [int(x) for x in proc.stdout.read().split()])
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL

    ns: dict = {}
    exec(_VECTORS, ns)
    cache = FeatureCache(cache_dir)  # opens, passes quick_check
    batch = ns["BATCH"]
    wanted = [f"b{i}-{j}" for i in range(committed + 3) for j in range(batch)]
    found = cache.get_many("fp", wanted)
    for i in range(committed + 1):  # every committed batch is there
        assert all(f"b{i}-{j}" in found for j in range(batch)), f"committed batch {i} lost"
    batches = {}
    for key, vec in found.items():  # whatever is there is right, and batches are whole
        i, j = map(int, key[1:].split("-"))
        assert np.array_equal(vec, ns["expected"](i, j)), key
        batches[i] = batches.get(i, 0) + 1
    assert set(batches.values()) == {batch}
    assert cache.info()["vectors"] == len(found)
    cache.put_many("fp", ["after"], np.ones((1, ns["DIM"]), np.float32))  # and it takes writes again


_CLAIMER = _LOAD_CACHE + '''
import time

keys = sys.argv[2].split(",")
mine, others = FeatureCache(sys.argv[1]).claim("scope", keys, owner=new_owner())
print(len(mine), flush=True)
time.sleep(300)
'''


@pytest.mark.skipif(os.name != "posix", reason="dead-pid detection is POSIX-only (elsewhere: the heartbeat timeout)")
def test_claims_of_a_killed_process_are_taken_over_at_once(tmp_path):
    arrays = [np.full((2, 2), i, np.uint8) for i in range(10)]
    keys = [content_key(a)[0] for a in arrays]
    script = tmp_path / "claimer.py"
    script.write_text(_CLAIMER)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), ",".join(keys)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "10"
        cache = FeatureCache(tmp_path, claim_timeout=3600)
        me = new_owner()
        mine, others = cache.claim("scope", keys, owner=me)
        assert (mine, others) == ([], keys)  # a live process's claims are respected
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    mine, others = cache.claim("scope", keys, owner=me)
    assert (mine, others) == (keys, [])  # its pid is gone: no waiting for the timeout
    cache.release(me)
    assert cache.info()["claims"] == 0
    res = embed(arrays, [Layer("v", "t", "avg", 1, "fp")], decode=_first_pixel, network=_identity, store=cache,
                scope="scope")
    assert res.stats["computed"] == 10 and res.X.ravel().tolist() == list(range(10))


def _first_pixel(a):
    return np.full((1, 1, 1), a[0, 0], np.float32)


class _Identity:
    """A "network" that returns its input's first value: the engine's no-op stand-in."""

    providers = ["none"]

    def run(self, batch):
        return [batch.reshape(len(batch), -1)[:, :1]]


def _identity(tensors):
    return _Identity()


_SHARED_WRITER = '''
import json, os, sys, time
import numpy as np
from deepfeat.cache import FeatureCache
from deepfeat.engine import Layer, embed

cache_dir, order, go = sys.argv[1:]
arrays = [np.full((3, 3), i % 256, np.uint8) + np.eye(3, dtype=np.uint8) * (i // 256) for i in range(300)]
if order == "reversed":
    arrays = arrays[::-1]


class Sum:
    providers = ["none"]

    def run(self, batch):
        time.sleep(0.002)  # let the other process in between batches
        return [batch.reshape(len(batch), -1).sum(axis=1, keepdims=True) * np.arange(5, dtype=np.float32)]


open(cache_dir + "-ready-" + order, "w").close()
while not os.path.exists(go):
    time.sleep(0.005)
res = embed(arrays, [Layer("v", "t", "avg", 5, "fp")], decode=lambda a: a[None].astype(np.float32),
            network=lambda t: Sum(), store=FeatureCache(cache_dir), scope="scope", batch_size=4, poll=0.01)
np.save(cache_dir + "-" + order + ".npy", res.X[::-1] if order == "reversed" else res.X)
print(json.dumps(res.stats))
'''


def test_two_processes_split_the_work_and_agree(tmp_path):
    script = tmp_path / "shared.py"
    script.write_text(_SHARED_WRITER)
    cache_dir, go = tmp_path / "c", tmp_path / "go"
    procs = [
        subprocess.Popen([sys.executable, str(script), str(cache_dir), order, str(go)], stdout=subprocess.PIPE, text=True)
        for order in ("forward", "reversed")
    ]
    deadline = time.monotonic() + 120
    while not all(Path(f"{cache_dir}-ready-{o}").exists() for o in ("forward", "reversed")):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "writers did not start"
        time.sleep(0.01)
    go.touch()  # start both at once
    stats = []
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0
        stats.append(json.loads(out))
    a = np.load(f"{cache_dir}-forward.npy")
    b = np.load(f"{cache_dir}-reversed.npy")
    arrays = [np.full((3, 3), i % 256, np.uint8) + np.eye(3, dtype=np.uint8) * (i // 256) for i in range(300)]
    expected = np.stack([np.arange(5, dtype=np.float32) * x.sum() for x in arrays])
    assert np.array_equal(a, expected) and np.array_equal(b, expected)
    fp = _only_fingerprint(cache_dir)
    assert fp["vectors"] == 300
    assert fp["computed"] == 300  # claims: no image computed twice
    assert sum(s["computed"] for s in stats) == 300
    assert all(s["hits"] + s["computed"] + s["shared"] == 300 for s in stats)
    assert FeatureCache(cache_dir).info()["claims"] == 0


def test_two_cli_processes_on_one_cache(tmp_path, tiny_model_path, photos):
    paths = photos[0]
    csv = tmp_path / "images.csv"
    pd.DataFrame({"path": paths}).to_csv(csv, index=False)
    cache_dir = tmp_path / "c"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "deepfeat", "embed", str(csv), "-o", str(tmp_path / f"out{i}.parquet"),
             "--model", str(tiny_model_path), "--cache-dir", str(cache_dir), "--batch-size", "4", "--no-progress"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        assert "cache " in out
    one, two = (pd.read_parquet(tmp_path / f"out{i}.parquet") for i in range(2))
    pd.testing.assert_frame_equal(one, two)
    feats = one.drop(columns=["path"]).to_numpy()
    ref = ImageEmbedder(model=str(tiny_model_path), progress=False).fit().transform(paths)
    assert np.array_equal(feats, ref)
    fp = _only_fingerprint(cache_dir)
    assert fp["vectors"] == fp["computed"] == len(paths)


# ----------------------------------------------------------------------- CLI
def test_cli_cache_info_and_clear(tmp_path, tiny_model_path, photos, capsys):
    csv = tmp_path / "images.csv"
    pd.DataFrame({"path": photos[0][:5]}).to_csv(csv, index=False)
    cache_dir = tmp_path / "c"
    args = ["embed", str(csv), "-o", str(tmp_path / "o.parquet"), "--model", str(tiny_model_path), "--no-progress"]
    assert main(args + ["--cache-dir", str(cache_dir)]) == 0
    assert "0 hits, 5 computed" in capsys.readouterr().out
    assert main(args + ["--cache-dir", str(cache_dir)]) == 0
    assert "5 hits, 0 computed" in capsys.readouterr().out
    assert main(["cache", "info", str(cache_dir)]) == 0
    out = capsys.readouterr().out
    assert "5 vectors" in out and "integrity (quick_check) ok" in out and "tiny.onnx" in out

    open_cache(cache_dir).close()
    FeatureCache(cache_dir).close()
    (cache_dir / DB_NAME).write_bytes(b"not sqlite" * 1000)
    for f in cache_dir.glob(DB_NAME + "-*"):
        f.unlink()
    # a new process opens the damaged file, as a later run would (connections this
    # process still holds may keep serving SQLite's cached pages)
    res = subprocess.run([sys.executable, "-m", "deepfeat", "cache", "info", str(cache_dir)],
                         capture_output=True, text=True)
    assert res.returncode == 1
    assert "corrupt" in res.stderr and f"deepfeat cache clear {cache_dir}" in res.stderr
    assert main(["cache", "clear", str(cache_dir)]) == 0
    assert "removed features.sqlite3" in capsys.readouterr().out
    assert main(["cache", "info", str(cache_dir)]) == 0
    assert "no feature cache" in capsys.readouterr().out
