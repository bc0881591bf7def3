"""Model downloads against a real HTTP server on 127.0.0.1 started by the tests.

The served file is a small ONNX CNN built here in the style of the ONNX Model
Zoo's old files (IR version 3, weights listed as graph inputs, batch fixed to
1), so the same tests also cover the graph rules that name its layers and the
truncation of such files.
"""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from deepfeat import registry, resolve
from deepfeat.download import ModelDownloadError, NoNetworkError, download_file, fetch_model
from deepfeat.registry import ModelSpec

INPUT = 64


def _zoo_style_cnn() -> bytes:
    """Conv stages at reductions 2..32 (a residual block at 4), global pool, Gemm."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []

    def conv(x, cin, cout, stride, name):
        w = (rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2 / (9 * cin))).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"{name}_w"))
        nodes.append(helper.make_node("Conv", [x, f"{name}_w"], [f"{name}_c"], kernel_shape=[3, 3],
                                      strides=[stride, stride], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"{name}_c"], [f"{name}_r"]))
        return f"{name}_r"

    x = conv("data", 3, 8, 2, "s1")          # reduction 2
    x = conv(x, 8, 16, 2, "s2")              # reduction 4
    y = conv(x, 16, 16, 1, "s2b")            # residual branch at 4
    nodes.append(helper.make_node("Add", [x, y], ["s2_add"]))
    x = conv("s2_add", 16, 24, 2, "s3")      # 8
    x = conv(x, 24, 32, 2, "s4")             # 16
    x = conv(x, 32, 48, 2, "s5")             # 32
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool"]))
    nodes.append(helper.make_node("Flatten", ["pool"], ["flat"], axis=1))
    inits.append(numpy_helper.from_array(rng.standard_normal((10, 48)).astype(np.float32), "fc_w"))
    inits.append(numpy_helper.from_array(np.zeros(10, np.float32), "fc_b"))
    nodes.append(helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["fc_out"], transB=1))
    inputs = [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, INPUT, INPUT])]
    # IR 3 style: every weight is also a graph input
    inputs += [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)) for t in inits]
    graph = helper.make_graph(nodes, "zoo_style", inputs,
                              [helper.make_tensor_value_info("fc_out", TensorProto.FLOAT, [1, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 7)])
    model.ir_version = 3
    onnx.checker.check_model(model)
    return model.SerializeToString()


MODEL = _zoo_style_cnn()
SHA = hashlib.sha256(MODEL).hexdigest()


class _Server:
    """Serves MODEL under several paths that misbehave in known ways."""

    def __init__(self):
        self.requests: list[tuple[str, str | None]] = []
        self.dropped: set[str] = set()
        self.failed: set[str] = set()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                outer.requests.append((self.path, rng))
                body = MODEL
                if self.path in ("/endless.onnx", "/liar.onnx"):
                    # the pinned file, then more: no Content-Length, or one that lies; bounded at 64 MB
                    self.send_response(200)
                    if self.path == "/liar.onnx":
                        self.send_header("Content-Length", str(10 << 30))
                    self.end_headers()
                    try:
                        self.wfile.write(body)
                        for _ in range(64):
                            self.wfile.write(b"\0" * (1 << 20))
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                    return
                if self.path == "/trickle.onnx":
                    # one byte every 50 ms: each read is within any socket timeout, the whole never is
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    try:
                        for i in range(200):
                            self.wfile.write(body[i:i + 1])
                            self.wfile.flush()
                            time.sleep(0.05)
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                    return
                if self.path == "/missing.onnx":
                    self.send_error(404)
                    return
                if self.path == "/flaky.onnx" and self.path not in outer.failed:
                    outer.failed.add(self.path)
                    self.send_error(503)
                    return
                if self.path == "/lfs.onnx":
                    # what a GitHub raw address of an LFS-tracked file serves once LFS is gone
                    body = (f"version https://git-lfs.github.com/spec/v1\noid sha256:{SHA}\n"
                            f"size {len(MODEL)}\n").encode()
                if self.path == "/corrupt.onnx":
                    body = bytearray(MODEL)
                    body[len(body) // 2] ^= 0xFF
                    body = bytes(body)
                start = 0
                if rng and self.path != "/norange.onnx":
                    start = int(rng.split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if self.path in ("/drop.onnx", "/norange.onnx") and self.path not in outer.dropped:
                    # promise the whole file, send 40% of it, hang up
                    outer.dropped.add(self.path)
                    self.wfile.write(body[start: start + int(len(body) * 0.4)])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body[start:])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


def _spec(*urls, name="tinyzoo", filename="tinyzoo-test.onnx", sha=SHA, **kw) -> ModelSpec:
    return ModelSpec(
        name=name, filename=filename, sha256=sha, urls=urls, size_bytes=len(MODEL),
        input_size=INPUT, resize_size=73, derive_layers=True, license="test", **kw,
    )


def test_download_good_file(server, tmp_path):
    path = fetch_model(_spec(server.url + "/good.onnx"), dest_dir=tmp_path, backoff=0)
    assert path == tmp_path / "tinyzoo-test.onnx"
    assert path.read_bytes() == MODEL
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["tinyzoo-test.onnx"]
    # a second call finds the checked file and does not download again
    n = len(server.requests)
    assert fetch_model(_spec(server.url + "/good.onnx"), dest_dir=tmp_path) == path
    assert len(server.requests) == n


def test_corrupted_download_is_refused_and_deleted(server, tmp_path):
    with pytest.raises(ModelDownloadError, match=r"sha256 [0-9a-f]{64}, expected " + SHA) as err:
        fetch_model(_spec(server.url + "/corrupt.onnx"), dest_dir=tmp_path, backoff=0)
    assert "deleted" in str(err.value)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_server_down_gives_the_offline_message(tmp_path):
    # a port that was free a moment ago: nothing listens there
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(NoNetworkError) as err:
        fetch_model(_spec(f"http://127.0.0.1:{port}/good.onnx"), dest_dir=tmp_path, retries=2, backoff=0)
    msg = str(err.value)
    assert msg.startswith("no network: Could not download model 'tinyzoo' (tinyzoo-test.onnx) from any of its 1")
    assert f"http://127.0.0.1:{port}/good.onnx" in msg
    assert "(2 tries)" in msg  # an unreachable server gets one retry, not `retries`
    assert f"put it in {tmp_path} or in a folder named by the environment variable DEEPFEAT_MODELS" in msg
    assert not (tmp_path / "tinyzoo-test.onnx").exists()


def test_dropped_connection_resumes_with_range(server, tmp_path):
    path = fetch_model(_spec(server.url + "/drop.onnx"), dest_dir=tmp_path, backoff=0)
    assert path.read_bytes() == MODEL
    got = [r for p, r in server.requests if p == "/drop.onnx"]
    assert got == [None, f"bytes={int(len(MODEL) * 0.4)}-"]
    assert not (tmp_path / "tinyzoo-test.onnx.part").exists()


def test_server_without_range_support_restarts_from_zero(server, tmp_path):
    path = fetch_model(_spec(server.url + "/norange.onnx"), dest_dir=tmp_path, backoff=0)
    assert path.read_bytes() == MODEL
    assert len([p for p, _ in server.requests if p == "/norange.onnx"]) == 2


def test_part_file_from_an_earlier_run_is_continued(server, tmp_path):
    (tmp_path / "tinyzoo-test.onnx.part").write_bytes(MODEL[:1000])
    path = fetch_model(_spec(server.url + "/good.onnx"), dest_dir=tmp_path, backoff=0)
    assert path.read_bytes() == MODEL
    assert server.requests == [("/good.onnx", "bytes=1000-")]


def test_http_errors(server, tmp_path):
    # 503 is retried
    assert fetch_model(_spec(server.url + "/flaky.onnx"), dest_dir=tmp_path, backoff=0).read_bytes() == MODEL
    assert [p for p, _ in server.requests] == ["/flaky.onnx", "/flaky.onnx"]
    # 404 is final: one request, a message naming the URL
    with pytest.raises(ModelDownloadError, match="HTTP 404") as err:
        download_file(server.url + "/missing.onnx", tmp_path / "m.onnx", sha256=SHA, backoff=0)
    assert "/missing.onnx" in str(err.value)
    assert [p for p, _ in server.requests].count("/missing.onnx") == 1


@pytest.fixture
def isolated_registry(server, tmp_path, monkeypatch):
    """A registry entry served by the test server, and an empty model search path."""
    monkeypatch.setitem(registry._REGISTRY, "tinyzoo", _spec(server.url + "/good.onnx"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("DEEPFEAT_MODELS", raising=False)
    monkeypatch.setattr(registry, "models_dirs", lambda: [registry.user_models_dir()])
    return tmp_path / "cache" / "deepfeat" / "models"


def test_registered_model_downloads_on_first_use_and_gets_standard_aliases(isolated_registry):
    from deepfeat import ImageEmbedder, list_layers, list_models

    before = list_models().set_index("name").loc["tinyzoo"]
    assert not before["offline"] and before["obtain"] == "download"
    path, spec = resolve.resolve_model("tinyzoo")
    assert path == isolated_registry / "tinyzoo-test.onnx"
    # aliases from the graph rules: the residual Add (not its branch) ends stage 2
    assert dict(spec.layers) == {
        "stage1": "s1_r", "stage2": "s2_add", "stage3": "s3_r", "stage4": "s4_r", "stage5": "s5_r",
        "features": "s5_r", "pooled": "pool", "logits": "fc_out",
    }
    assert list_models().set_index("name").loc["tinyzoo", "offline"]
    df = list_layers("tinyzoo", aliases_only=True).set_index("alias")
    assert df.loc["stage3", "reduction"] == 8 and df.loc["pooled", "channels"] == 48
    # the file fixes batch 1 and lists its weights as inputs; truncation handles both
    images = np.random.default_rng(1).integers(0, 255, (5, 80, 90, 3), dtype=np.uint8)
    emb = ImageEmbedder(model="tinyzoo", layers=["stage2", "pooled"], batch_size=2, progress=False)
    X = emb.fit(images).transform(images)
    assert X.shape == (5, 16 + 48) and np.isfinite(X).all()


def test_models_lists_every_entry_with_size_input_license_offline(capsys):
    from deepfeat.cli import main

    df = registry.list_models()
    assert set(df["name"]) == set(registry._REGISTRY)
    assert df["size_mb"].notna().all() and (df["size_mb"] > 1).all()
    assert df["license"].str.len().gt(0).all() and df["input_size"].ge(224).all()
    assert df["offline"].dtype == bool
    zoo = df[df["obtain"] == "download"]
    assert {"resnet50", "mobilenetv2", "densenet121"} <= set(zoo["name"])
    for name in zoo["name"]:
        spec = registry.get_model_spec(name)
        assert spec.url.startswith("https://huggingface.co/onnxmodelzoo/")
        assert len(spec.sha256) == 64 and spec.size_bytes > 10_000_000
    assert df["pooled_dim"].notna().all()
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in registry._REGISTRY)
    lines = out.splitlines()
    assert lines[0].split() == ["name", "input", "pooled", "MB", "arrives", "local", "trained", "license"]
    assert max(len(line) for line in lines) <= 100
    rows = {line.split()[0]: line for line in lines[1:-1]}
    cells = {name: line.split() for name, line in rows.items()}
    assert cells["efficientnet_lite0"][1:] == ["224", "1280", "18.6", "shipped", "yes", "measured", "here", "Apache-2.0"]
    assert cells["inception_v3"][1:5] == ["299", "2048", "95.3", "export"]
    assert cells["efficientnet_lite1"][4] == "export" and cells["alexnet"][-1] == "BSD-3-Clause"
    # how each entry's weights are known to be trained, a column of its own
    assert "zoo top-1 74.97" in rows["resnet50"] and "torchvision hash" in rows["inception_v3"]
    assert cells["resnet50"][4] == "download" and "torchvision hash" in rows["resnet50_tv"]
    assert cells["inception_v3_unverified"][-2:] == ["unverified", "Apache-2.0+BSD-3-Clause"]
    assert "zoo, no top-1" in rows["densenet121"] and "pinned export" in rows["efficientnet_lite2"]


# --- mirrors ---------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_first_mirror_404_then_the_second_serves_the_file(server, tmp_path, caplog):
    spec = _spec(server.url + "/missing.onnx", server.url + "/good.onnx")
    with caplog.at_level("WARNING", logger="deepfeat.download"):
        path = fetch_model(spec, dest_dir=tmp_path, backoff=0)
    assert path.read_bytes() == MODEL
    # a 404 is final for that mirror: one request, then the next mirror
    assert [p for p, _ in server.requests] == ["/missing.onnx", "/good.onnx"]
    assert "mirror 1 of 2 for tinyzoo failed" in caplog.text and "HTTP 404" in caplog.text


def test_mirror_serving_wrong_bytes_is_refused_and_the_next_one_tried(server, tmp_path):
    spec = _spec(server.url + "/corrupt.onnx", server.url + "/lfs.onnx", server.url + "/good.onnx")
    path = fetch_model(spec, dest_dir=tmp_path, backoff=0)
    assert path.read_bytes() == MODEL
    assert [p for p, _ in server.requests] == ["/corrupt.onnx", "/lfs.onnx", "/good.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["tinyzoo-test.onnx"]


def test_every_mirror_failing_lists_each_url_and_why(server, tmp_path):
    down = f"http://127.0.0.1:{_free_port()}/good.onnx"
    urls = (server.url + "/missing.onnx", server.url + "/lfs.onnx", down)
    with pytest.raises(ModelDownloadError) as err:
        fetch_model(_spec(*urls), dest_dir=tmp_path, retries=1, backoff=0)
    # some mirrors answered, so this is not reported as "no network"
    assert not isinstance(err.value, NoNetworkError)
    msg = str(err.value)
    assert "from any of its 3 mirror(s)" in msg
    lines = msg.splitlines()
    for url, why in zip(urls, ["HTTP 404", "a Git LFS pointer file, not the model", "cannot reach the server"]):
        i = lines.index(f"  {url}")
        assert why in lines[i + 1]
    assert f"({len(MODEL)} bytes, sha256 {SHA})" in msg
    assert "DEEPFEAT_MODELS" in msg and str(tmp_path) in msg
    assert not (tmp_path / "tinyzoo-test.onnx").exists() and not (tmp_path / "tinyzoo-test.onnx.part").exists()


def test_offline_error_lists_every_mirror_and_the_manual_path(tmp_path):
    urls = tuple(f"http://127.0.0.1:{_free_port()}/m{i}.onnx" for i in range(2))
    with pytest.raises(NoNetworkError) as err:
        fetch_model(_spec(*urls), dest_dir=tmp_path, retries=3, backoff=0)
    msg = str(err.value)
    assert msg.startswith("no network:")
    assert all(f"  {u}" in msg.splitlines() for u in urls)
    assert "put it in " + str(tmp_path) in msg and "DEEPFEAT_MODELS" in msg


def test_placement_advice_is_given_once_after_every_mirror_and_reason(server, tmp_path):
    # offline mirrors retried, a 404 and a wrong file: each mirror has its one-line reason, the advice comes once
    urls = (*(f"http://127.0.0.1:{_free_port()}/m{i}.onnx" for i in range(3)),
            server.url + "/missing.onnx", server.url + "/corrupt.onnx")
    with pytest.raises(ModelDownloadError) as err:
        fetch_model(_spec(*urls), dest_dir=tmp_path, retries=3, backoff=0)
    msg = str(err.value)
    assert msg.count("variable DEEPFEAT_MODELS") == 1 and msg.count(str(tmp_path)) == 1
    assert "put the file at" not in msg and "put the right file" not in msg
    lines = msg.splitlines()
    reasons = [lines[lines.index(f"  {u}") + 1] for u in urls]
    assert all(r.startswith("    -> ") for r in reasons)
    assert all("cannot reach the server" in r and "(2 tries)" in r for r in reasons[:3])
    assert "HTTP 404" in reasons[3] and "expected " + SHA in reasons[4]
    # the advice is the message's last sentence, after the list
    assert lines[-1].startswith("To place it by hand:")


def test_part_left_by_another_file_is_downloaded_again_from_zero(server, tmp_path):
    # 1000 bytes of something else: resuming gives a wrong file, so the mirror starts over once
    (tmp_path / "tinyzoo-test.onnx.part").write_bytes(b"x" * 1000)
    path = fetch_model(_spec(server.url + "/good.onnx"), dest_dir=tmp_path, backoff=0)
    assert path.read_bytes() == MODEL
    assert server.requests == [("/good.onnx", "bytes=1000-"), ("/good.onnx", None)]


def test_old_pickled_spec_with_one_url_still_loads():
    import pickle

    spec = _spec("http://example.invalid/a.onnx")
    fields = {k: getattr(spec, k) for k in spec.__dataclass_fields__}
    fields["layers"] = dict(spec.layers)
    del fields["urls"]
    fields["url"] = "http://example.invalid/a.onnx"  # 0.1.x had one URL field
    old = registry._rebuild_spec(fields)
    assert old.urls == ("http://example.invalid/a.onnx",) and old.url == old.urls[0]
    assert pickle.loads(pickle.dumps(old)) == old
    with pytest.raises(TypeError, match="sequence of URLs"):
        ModelSpec(name="x", filename="x.onnx", sha256=None, input_size=224, resize_size=256, urls="http://a/b")


def test_an_accepted_alternate_digest_of_another_size_downloads_through_drops(server, tmp_path):
    # the registry pins the primary upload's size; the mirror serves the other published upload
    spec = _spec(server.url + "/drop.onnx", sha="0" * 64, sha256_also=(SHA,))
    spec = ModelSpec(**{**{k: getattr(spec, k) for k in spec.__dataclass_fields__},
                        "size_bytes": int(len(MODEL) * 0.4), "layers": {}})
    assert fetch_model(spec, dest_dir=tmp_path, backoff=0).read_bytes() == MODEL


@pytest.mark.parametrize("path", ["/endless.onnx", "/liar.onnx"])
def test_a_server_sending_more_than_the_pinned_size_is_cut_off(server, tmp_path, path):
    """The pinned file followed by an endless body (no size, or a lying Content-Length of 10 GB)."""
    with pytest.raises(ModelDownloadError, match=rf"sent more than the {len(MODEL)} bytes pinned for") as err:
        download_file(server.url + path, tmp_path / "m.onnx", sha256=SHA, size=len(MODEL), backoff=0)
    assert "deleted" in str(err.value)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_without_a_pinned_size_the_hard_cap_holds(server, tmp_path):
    with pytest.raises(ModelDownloadError, match=r"sent more than the 2000000 bytes stated for"):
        download_file(server.url + "/endless.onnx", tmp_path / "m.onnx", sha256=SHA, max_bytes=2_000_000)


def test_a_trickling_mirror_meets_its_deadline_and_the_next_one_serves(server, tmp_path, caplog):
    t = time.monotonic()
    with pytest.raises(ModelDownloadError, match=r"did not finish within its deadline of 1 s") as err:
        download_file(server.url + "/trickle.onnx", tmp_path / "m.onnx", sha256=SHA, size=len(MODEL),
                      timeout=5, deadline=1.0, backoff=0)
    assert time.monotonic() - t < 4  # not the 10 s the trickle would take, nor timeout x retries
    assert "kept in" in str(err.value)
    spec = _spec(server.url + "/trickle.onnx", server.url + "/good.onnx")
    assert fetch_model(spec, dest_dir=tmp_path / "d", deadline=1.0, backoff=0).read_bytes() == MODEL
