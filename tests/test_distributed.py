"""deepfeat.distributed on a real distributed.LocalCluster of 2 worker processes."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest

dd = pytest.importorskip("dask.dataframe", reason="needs the dask extra: pip install 'deepfeat[dask]'")
distributed = pytest.importorskip("distributed", reason="needs the dask extra: pip install 'deepfeat[dask]'")

import cloudpickle  # noqa: E402  (installed with distributed)
import dask  # noqa: E402
import dask.bag as db  # noqa: E402
import joblib  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.model_selection import GridSearchCV, StratifiedKFold  # noqa: E402

from deepfeat import ImageEmbedder, load_image_folder  # noqa: E402

pytestmark = pytest.mark.slow  # a local Dask cluster: about a minute on 2 cores
from deepfeat.distributed import (  # noqa: E402
    clear_worker_embedders,
    embed_bag,
    embed_dataframe,
    session_builds,
    worker_embedder,
)

from .conftest import TINY_PREPROCESSING  # noqa: E402

# Worker processes cannot import this test module (pytest imports it by file
# path), so the helpers below travel by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

TIMEOUT = 60  # seconds; generous for a loaded 2-core machine


def _local_cluster():
    return distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        scheduler_port=0,
        # None would still bind the scheduler's HTTP server to port 8787; 0 = any free port
        dashboard_address="127.0.0.1:0",
        silence_logs=logging.ERROR,
    )


@pytest.fixture(scope="module")
def client():
    with _local_cluster() as cluster, distributed.Client(cluster, timeout=TIMEOUT) as c:
        c.wait_for_workers(2, timeout=TIMEOUT)
        yield c


@pytest.fixture(scope="module")
def photos(photo_folder) -> pd.DataFrame:
    _, df = photo_folder
    return df.reset_index(drop=True)


def _tiny(path, **kw) -> ImageEmbedder:
    return ImageEmbedder(model=str(path), preprocessing=TINY_PREPROCESSING, progress=False, **kw)


def _embed_tasks_by_worker(task_stream) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in task_stream.data:
        if "_embed" in str(t["key"]):
            counts[t["worker"]] = counts.get(t["worker"], 0) + 1
    return counts


# -------------------------------------------------------------- the registry
def test_worker_embedder_fits_once_and_threads_share_one_session(tiny_model_path, sample_photos):
    emb = _tiny(tiny_model_path, batch_size=7)  # parameters no other test uses
    clear_worker_embedders()
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda _: worker_embedder(emb), range(8)))
    assert all(g is got[0] for g in got)
    assert got[0] is not emb and not hasattr(emb, "layers_")  # the caller's object stays unfitted
    before = session_builds()
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda _: got[0].transform(sample_photos), range(4)))
    assert session_builds() - before == 1  # four threads, one session
    assert all(np.array_equal(o, outs[0]) for o in outs)
    # other parameters are another entry, but pooling does not change the session: it is shared
    other = worker_embedder(_tiny(tiny_model_path, batch_size=7, pooling="max"))
    assert other is not got[0]
    other.transform(sample_photos)
    assert session_builds() - before == 1
    assert clear_worker_embedders() >= 2
    assert worker_embedder(emb) is not got[0]  # refitted after clearing
    worker_embedder(emb).transform(sample_photos)
    assert session_builds() - before == 2  # and its session built again


def test_input_errors_name_the_problem(tiny_model_path, photos):
    emb = _tiny(tiny_model_path)
    with pytest.raises(TypeError, match="from_pandas"):
        embed_dataframe(photos, emb)
    two_cols = dd.from_pandas(photos.rename(columns={"path": "file"}), npartitions=2)
    with pytest.raises(ValueError, match=r"column='\.\.\.'"):
        embed_dataframe(two_cols, emb)
    with pytest.raises(KeyError, match="'nope'"):
        embed_dataframe(two_cols, emb, column="nope")
    with pytest.raises(TypeError, match="ImageEmbedder"):
        embed_dataframe(two_cols, "efficientnet_lite0", column="file")
    bag = db.from_sequence(photos["path"].tolist(), npartitions=3)
    with pytest.raises(ValueError, match="3 partitions"):
        embed_bag(bag, emb, lengths=[1, 2])
    with pytest.raises(TypeError, match="from_sequence"):
        embed_bag(photos["path"].tolist(), emb)


# ------------------------------------------------------------- on a cluster
def test_dataframe_on_two_workers_equals_single_process(client, tiny_model_path, photos, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    df = pd.concat([photos, pd.DataFrame({"path": [str(broken)], "label": ["x"]})], ignore_index=True)
    emb = _tiny(tiny_model_path, layers=["stage1", "pooled"], on_error="skip")
    expected = emb.fit_transform(df["path"])
    assert np.isnan(expected[-1]).all() and not np.isnan(expected[:-1]).any()

    ddf = dd.from_pandas(df, npartitions=8)
    client.run(clear_worker_embedders)  # sessions of earlier tests would be reused
    before = client.run(session_builds)
    with distributed.get_task_stream(client) as ts:
        feats = embed_dataframe(ddf, emb)
        assert feats.npartitions == 8 and feats.divisions == ddf.divisions
        assert list(feats.columns) == emb.get_feature_names_out().tolist()
        assert set(feats.dtypes) == {np.dtype(np.float32)}
        got = feats.compute()
    after = client.run(session_builds)

    pd.testing.assert_index_equal(got.index, df.index)
    np.testing.assert_array_equal(got.to_numpy(), expected)  # NaN rows compare equal here
    # each worker that ran partitions built its session exactly once, and reused it
    ran = _embed_tasks_by_worker(ts)
    assert sum(ran.values()) == 8 and max(ran.values()) >= 2
    assert {w: after[w] - before[w] for w in ran} == {w: 1 for w in ran}


def test_bag_on_two_workers_equals_single_process(client, tiny_model_path, photos):
    emb = _tiny(tiny_model_path, layers="stage2")
    paths = photos["path"].tolist()
    expected = emb.fit_transform(paths)
    bag = db.from_sequence(paths, npartitions=5)

    X = embed_bag(bag, emb)
    assert X.shape == expected.shape and X.dtype == np.float32
    assert sum(X.chunks[0]) == len(paths) and len(X.chunks[0]) == 5
    np.testing.assert_array_equal(X.compute(), expected)

    unknown = embed_bag(bag, emb, lengths=False)
    assert all(np.isnan(c) for c in unknown.chunks[0])
    np.testing.assert_array_equal(unknown.compute(), expected)


def test_real_model_on_real_photos_equals_single_process(client, hymenoptera):
    df = load_image_folder(hymenoptera / "val")
    df = df[df["path"].str.lower().str.endswith(".jpg")].groupby("label").head(4).reset_index(drop=True)
    emb = ImageEmbedder(layers=["stage4", "pooled"], progress=False, batch_size=4)
    expected = emb.fit_transform(df["path"])

    got = embed_dataframe(dd.from_pandas(df, npartitions=2), emb).compute()
    assert got.shape == (8, expected.shape[1])
    np.testing.assert_allclose(got.to_numpy(), expected, rtol=1e-5, atol=1e-6)


def test_workers_share_one_cache_directory(client, tiny_model_path, photos, tmp_path):
    paths = photos["path"].tolist()
    expected = _tiny(tiny_model_path, layers="stage2").fit_transform(paths)
    cache = tmp_path / "features"
    emb = _tiny(tiny_model_path, layers="stage2", cache=str(cache))

    got = embed_dataframe(dd.from_pandas(photos, npartitions=4), emb).compute()
    np.testing.assert_array_equal(got.to_numpy(), expected)

    # every vector the workers computed is in the shared directory
    local = emb.fit()
    np.testing.assert_array_equal(local.transform(paths), expected)
    assert local.cache_stats_["hits"] == len(paths) and local.cache_stats_["computed"] == 0


def test_grid_search_with_dask_backend_matches_local(client, tiny_model_path, photos):
    X = embed_dataframe(dd.from_pandas(photos, npartitions=4), _tiny(tiny_model_path, layers="stage2"))
    X = X.compute().to_numpy()
    y = photos["label"].to_numpy()
    cv = StratifiedKFold(3, shuffle=True, random_state=0)
    grid = {"C": [0.1, 1.0, 10.0]}

    def search(n_jobs):
        return GridSearchCV(LogisticRegression(max_iter=500), grid, cv=cv, n_jobs=n_jobs).fit(X, y)

    local = search(None)
    with distributed.get_task_stream(client) as ts, joblib.parallel_backend("dask"):
        remote = search(-1)
    assert len(ts.data) >= 1  # the fits ran on the cluster (joblib may batch several per task)
    assert remote.best_params_ == local.best_params_
    np.testing.assert_allclose(
        remote.cv_results_["mean_test_score"], local.cv_results_["mean_test_score"], rtol=0, atol=0
    )


# ------------------------------------------------------ a worker dies mid-job
def _gated_paths(paths: list, start: int, event_name: str | None) -> pd.Series:
    """Partition source; gated partitions wait for the test's go signal."""
    if event_name is not None:
        distributed.secede()  # free the worker's only thread while waiting
        if not distributed.Event(event_name).wait(timeout=TIMEOUT):
            raise TimeoutError(f"{event_name} was never set")
        distributed.rejoin()
    return pd.Series(paths, index=pd.RangeIndex(start, start + len(paths)), name="path")


def test_killed_worker_mid_job_still_gives_same_result(client, tiny_model_path, photos):
    # runs last in this module; the shared cluster is whole again afterwards
    emb = _tiny(tiny_model_path, layers=["stage1", "stage2"])
    paths = photos["path"].tolist()
    expected = emb.fit_transform(paths)
    size, n_open = 3, 4
    starts = list(range(0, len(paths), size))
    assert len(starts) > n_open + 2

    before = client.run(session_builds)
    go = distributed.Event(f"deepfeat-test-go-{uuid.uuid4().hex}", client=client)
    parts = [
        dask.delayed(_gated_paths)(paths[s : s + size], s, None if i < n_open else go.name)
        for i, s in enumerate(starts)
    ]
    meta = _gated_paths(paths[:1], 0, None).iloc[:0]  # the inferred string dtype
    source = dd.from_delayed(parts, meta=meta, divisions=[*starts, len(paths) - 1])
    try:
        with distributed.get_task_stream(client) as stream:
            feats = client.persist(embed_dataframe(source, emb))
            futures = distributed.futures_of(feats)

            # the open partitions finish; the rest wait at the gate
            deadline = time.monotonic() + TIMEOUT
            while sum(f.status == "finished" for f in futures) < n_open:
                if any(f.status == "error" for f in futures):
                    next(f for f in futures if f.status == "error").result()  # raises the task's error
                if time.monotonic() > deadline:
                    pytest.fail("the open partitions did not finish in time")
                time.sleep(0.05)
            assert sum(f.done() for f in futures) == n_open  # really mid-job

            # kill the worker holding the most finished partitions: their results are lost
            counts: dict[str, int] = {}
            for addrs in client.who_has([f for f in futures if f.done()]).values():
                for a in addrs:
                    counts[a] = counts.get(a, 0) + 1
            victim = max(counts, key=counts.get)
            pid = client.run(os.getpid, workers=[victim])[victim]
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + TIMEOUT
            while victim in client.scheduler_info(n_workers=-1)["workers"]:
                if time.monotonic() > deadline:
                    pytest.fail("the scheduler did not notice the killed worker")
                time.sleep(0.05)
            go.set()
            got = client.compute(feats).result(timeout=TIMEOUT)
    finally:
        go.set()  # never leave gated tasks waiting

    pd.testing.assert_index_equal(got.index, pd.RangeIndex(len(paths)))
    np.testing.assert_array_equal(got.to_numpy(), expected)
    # the lost partitions were embedded again
    assert sum(_embed_tasks_by_worker(stream).values()) >= len(starts) + counts[victim]
    client.wait_for_workers(2, timeout=TIMEOUT)  # the nanny restarted the killed worker
    after = client.run(session_builds)
    assert all(n - before.get(w, 0) in (0, 1) for w, n in after.items())  # one session per process
