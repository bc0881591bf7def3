"""Dirty image folders: every kind of bad input gets its documented outcome.

The files are generated here. Each case is embedded in one list with good
photos around it, with ``on_error="skip"`` and ``"raise"``, with and without
the feature cache, through the Python API and the CLI, and the rows must stay
aligned with the inputs. The decoding rules themselves are tested pixel by
pixel in ``tests/test_images.py``.
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from deepfeat import ImageEmbedder, load_image_folder
from deepfeat.cache import FeatureCache
from deepfeat.cli import main
from deepfeat.images import ImageDecodeError
from deepfeat.registry import ModelFileError, get_model_spec

from .conftest import REPO, TINY_PREPROCESSING

RED = (255, 0, 0)


# ------------------------------------------------------------------ file makers
def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def blocks(seed: int, h: int = 48, w: int = 64, cell: int = 16) -> np.ndarray:
    """A picture of flat 16-px squares: JPEG keeps it almost exactly, and each seed differs."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // cell, w // cell, 3), dtype=np.uint8)
    return np.kron(small, np.ones((cell, cell, 1), np.uint8))


def png_rgb16(a: np.ndarray) -> bytes:
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w, _ = a.shape
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def png_bomb_header(w: int, h: int) -> bytes:
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))


def strip_app14(jpeg: bytes) -> bytes:
    at = jpeg.index(b"\xff\xee")
    return jpeg[:at] + jpeg[at + 2 + int.from_bytes(jpeg[at + 2 : at + 4], "big") :]


def with_orientation(img: Image.Image, value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return encode(img, "JPEG", quality=95, subsampling=0, exif=exif.tobytes())


@dataclass
class Case:
    """One input and what the rules say must come out of it."""

    name: str
    reason: str | None = None  # a failure: this text is in the reason
    expect: np.ndarray | None = None  # a success: the RGB picture the rules say it is
    wrong: np.ndarray | None = None  # a plausible misreading that must be farther away
    lossy: bool = False


def make_cases(root: Path) -> tuple[list[str], list[Case]]:
    """Write the dirty folder; return the input list (a listing, as a user makes it) and the cases.

    The good photos ``good_*`` sit between the bad files so a misaligned row
    shows up as a wrong vector.
    """
    root.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []
    files: dict[str, bytes] = {}

    def ok(name, data, expect, wrong=None, lossy=False):
        files[name] = data
        cases.append(Case(name, expect=expect, wrong=wrong, lossy=lossy))

    def bad(name, data, reason):
        if data is not None:
            files[name] = data
        cases.append(Case(name, reason=reason))

    photo = blocks(1)
    whole_jpeg = encode(Image.fromarray(photo), "JPEG", quality=90)
    ok("good_1.png", encode(Image.fromarray(blocks(11)), "PNG"), blocks(11))
    bad("truncated_download.jpg", whole_jpeg[: len(whole_jpeg) // 2], "truncated file")
    bad("truncated.png", encode(Image.fromarray(photo), "PNG")[:-40], "truncated file")
    bad("truncated.webp", encode(Image.fromarray(photo), "WEBP")[:-30], "truncated file")
    page = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head></html>\n"
    bad("error_page.jpg", page, "HTML/XML page")
    bad("zero_bytes.jpg", b"", "empty file (0 bytes)")
    ok("good_2.png", encode(Image.fromarray(blocks(12)), "PNG"), blocks(12))
    # CMYK: Photoshop-style (Adobe marker, inverted data) and plain; misreading inverts the colours
    cmyk = Image.fromarray(photo).convert("CMYK")
    ok("cmyk_adobe.jpg", encode(cmyk, "JPEG", quality=95), photo, 255 - photo, lossy=True)
    # Pillow stores 255 - x under an APP14 marker; without the marker x is read back as it is
    inverted = Image.frombytes("CMYK", cmyk.size, (255 - np.asarray(cmyk)).tobytes())
    plain = strip_app14(encode(inverted, "JPEG", quality=95))
    ok("cmyk_plain.jpg", plain, photo, 255 - photo, lossy=True)
    # 16-bit: gray (Pillow mode I;16) and 48-bit RGB; clipping instead of scaling gives white
    gray8 = blocks(2)[:, :, 0]
    gray_rgb = np.repeat(gray8[:, :, None], 3, axis=2)
    ok("gray16.png", encode(Image.fromarray(gray8.astype(np.uint16) * 257), "PNG"), gray_rgb,
       np.full_like(gray_rgb, 255))
    rgb16 = blocks(3).astype(np.uint16) * 257
    ok("rgb16.png", png_rgb16(rgb16), blocks(3))
    # palette with transparency: index 0 transparent (-> white), index 1 red
    pal = Image.new("P", (64, 48), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.paste(1, (0, 0, 32, 48))
    composited = np.zeros((48, 64, 3), np.uint8)
    composited[:, :32] = RED
    composited[:, 32:] = 255
    black_bg = composited.copy()
    black_bg[:, 32:] = 0
    ok("palette_transparent.png", encode(pal, "PNG", transparency=0), composited, black_bg)
    ok("palette_transparent.gif", encode(pal, "GIF", transparency=0), composited, black_bg)
    la = np.zeros((48, 64, 2), np.uint8)
    la[:, :, 0] = gray8
    la[:, :, 1] = 255
    la[:, :20, 1] = 0  # a transparent strip
    la_expect = gray_rgb.copy()
    la_expect[:, :20] = 255
    ok("gray_alpha.png", encode(Image.fromarray(la, "LA"), "PNG"), la_expect)
    ok("grayscale.jpg", encode(Image.fromarray(gray8), "JPEG", quality=95), gray_rgb, lossy=True)
    # an EXIF-rotated phone photo: stored landscape, tagged "rotate 90 clockwise to view"
    upright = blocks(4, h=64, w=48)
    stored = np.asarray(Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90))
    ok("phone_photo_exif6.jpg", with_orientation(Image.fromarray(stored), 6), upright, stored, lossy=True)
    # an animated GIF: the first frame
    frames = [Image.fromarray(blocks(s)).quantize(64) for s in (5, 6, 7)]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    ok("animated.gif", gif, np.asarray(frames[0].convert("RGB")), np.asarray(frames[1].convert("RGB")))
    bad("bomb.png", png_bomb_header(60_000, 60_000), "too many pixels")
    corrupt = bytearray(encode(Image.fromarray(photo), "PNG"))
    corrupt[16:24] = b"\xff" * 8
    bad("corrupt_header.png", bytes(corrupt), "corrupt image header")
    bad("random_bytes.png", np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes(),
        "not an image file")
    bad("invoice.pdf.jpg", b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog >>\nendobj\n", "PDF document")
    bad("deleted_after_listing.jpg", whole_jpeg, "file not found")
    ok("good_3.png", encode(Image.fromarray(blocks(13)), "PNG"), blocks(13))

    for name, data in files.items():
        (root / name).write_bytes(data)
    listing = load_image_folder(root)["path"].tolist()  # the listing the user made
    by_name = {Path(p).name: p for p in listing}
    (root / "deleted_after_listing.jpg").unlink()  # ... and the file goes away before it is read

    # inputs a CSV can name but a folder listing cannot: a path that never existed, a directory
    (root / "a_folder.jpg").mkdir()
    cases.insert(3, Case("never_existed.jpg", reason="file not found"))
    cases.insert(9, Case("a_folder.jpg", reason="is a directory"))
    paths = [by_name.get(c.name, str(root / c.name)) for c in cases]
    return paths, cases


# ---------------------------------------------------------------- embedders
def tiny_embedder(tiny_model_path, **kw) -> ImageEmbedder:
    # stage2 unpooled keeps the layout, so a rotated or shifted picture gives another vector
    params = dict(
        model=str(tiny_model_path), preprocessing=TINY_PREPROCESSING, layers="stage2", pooling="none",
        batch_size=3, progress=False,
    )
    params.update(kw)
    return ImageEmbedder(**params)


def check_outcomes(X: np.ndarray, failures: pd.DataFrame, paths: list[str], cases: list[Case], ref) -> None:
    """Every row is its own input's documented outcome."""
    assert X.shape[0] == len(paths)
    failed = {int(p): (s, r) for p, s, r in failures.itertuples(index=False)}
    for i, (path, case) in enumerate(zip(paths, cases)):
        if case.reason is not None:
            assert np.isnan(X[i]).all(), case.name
            assert i in failed, f"{case.name} is not in failures_"
            source, reason = failed[i]
            assert source == path and case.reason in reason, (case.name, reason)
            continue
        assert i not in failed, (case.name, failed.get(i))
        assert np.isfinite(X[i]).all(), case.name
        want = ref(case.expect)
        if case.lossy:
            assert np.linalg.norm(X[i] - want) < 0.1 * np.linalg.norm(want), case.name
        else:
            np.testing.assert_allclose(X[i], want, rtol=1e-5, atol=1e-5, err_msg=case.name)
        if case.wrong is not None:  # the misreading is not what came out
            assert np.linalg.norm(X[i] - want) < np.linalg.norm(X[i] - ref(case.wrong)), case.name
    assert len(failed) == sum(c.reason is not None for c in cases)


@pytest.fixture
def reference(tiny_model_path):
    emb = tiny_embedder(tiny_model_path).fit()
    return lambda rgb: emb.transform([np.ascontiguousarray(rgb)])[0]


# ------------------------------------------------------- the whole dirty folder
@pytest.mark.parametrize("use_cache", [False, True], ids=["no-cache", "cache"])
def test_every_case_gets_its_documented_outcome(tmp_path, tiny_model_path, reference, use_cache):
    paths, cases = make_cases(tmp_path / "dirty")
    n_ok = sum(c.reason is None for c in cases)
    cache = tmp_path / "cache" if use_cache else None
    emb = tiny_embedder(tiny_model_path, on_error="skip", cache=cache).fit()
    X = emb.transform(paths)
    check_outcomes(X, emb.failures_, paths, cases, reference)
    if not use_cache:
        return
    assert emb.cache_stats_["computed"] == n_ok and emb.cache_stats_["hits"] == 0
    # failed inputs are never stored
    assert FeatureCache(cache).info()["vectors"] == n_ok
    # a second run reads every good row back and meets the same failures, still aligned
    again = tiny_embedder(tiny_model_path, on_error="skip", cache=cache).fit()
    X2 = again.transform(paths)
    assert again.cache_stats_["hits"] == n_ok and again.cache_stats_["computed"] == 0
    check_outcomes(X2, again.failures_, paths, cases, reference)
    np.testing.assert_array_equal(X2, X)


@pytest.mark.parametrize("use_cache", [False, True], ids=["no-cache", "cache"])
def test_raise_names_the_file_and_the_reason(tmp_path, tiny_model_path, use_cache):
    paths, cases = make_cases(tmp_path / "dirty")
    emb = tiny_embedder(tiny_model_path, cache=tmp_path / "cache" if use_cache else None).fit()
    good = paths[0]
    for path, case in zip(paths, cases):
        if case.reason is None:
            continue
        with pytest.raises(ImageDecodeError) as info:
            emb.transform([good, path, good])
        assert info.value.source == path and case.reason in info.value.reason, case.name
        assert str(info.value).startswith(f"{path}: ")


def test_failed_file_is_not_cached_and_is_cached_once_fixed(tmp_path, tiny_model_path, reference):
    good, broken = tmp_path / "good.png", tmp_path / "download.jpg"
    good.write_bytes(encode(Image.fromarray(blocks(21)), "PNG"))
    full = encode(Image.fromarray(blocks(22)), "PNG")
    broken.write_bytes(full[: len(full) // 3])  # an interrupted download
    cache = tmp_path / "cache"
    items = [str(good), str(broken)]

    emb = tiny_embedder(tiny_model_path, on_error="skip", cache=cache).fit()
    X = emb.transform(items)
    assert np.isnan(X[1]).all() and "truncated file" in emb.failures_["reason"].iloc[0]
    assert FeatureCache(cache).info()["vectors"] == 1

    X = emb.transform(items)  # still broken: recomputed, fails again, still not stored
    assert emb.cache_stats_["hits"] == 1 and np.isnan(X[1]).all()
    assert FeatureCache(cache).info()["vectors"] == 1

    broken.write_bytes(full)  # the download is repeated
    X = emb.transform(items)
    assert emb.failures_.empty and emb.cache_stats_["computed"] == 1 and emb.cache_stats_["hits"] == 1
    np.testing.assert_allclose(X[1], reference(blocks(22)), rtol=1e-5, atol=1e-5)
    assert FeatureCache(cache).info()["vectors"] == 2
    X = emb.transform(items)
    assert emb.cache_stats_["hits"] == 2 and emb.cache_stats_["computed"] == 0


def test_duplicate_of_a_failed_input_fails_in_its_own_row(tmp_path, tiny_model_path):
    bad = tmp_path / "x.jpg"
    bad.write_bytes(b"<html></html>")
    good = tmp_path / "good.png"
    good.write_bytes(encode(Image.fromarray(blocks(1)), "PNG"))
    emb = tiny_embedder(tiny_model_path, on_error="skip", cache=tmp_path / "cache").fit()
    X = emb.transform([str(bad), str(good), str(bad)])
    assert emb.failures_["position"].tolist() == [0, 2]
    assert np.isnan(X[[0, 2]]).all() and np.isfinite(X[1]).all()


# ------------------------------------------------------------ a 100-megapixel scan
@pytest.fixture(scope="session")
def scan_100mp(tmp_path_factory) -> Path:
    """A 10000 x 10000 gray scan (flat, so it compresses to 0.5 MB), written once."""
    path = tmp_path_factory.mktemp("scan") / "scan_100mp.png"
    Image.new("L", (10_000, 10_000), 90).save(path, compress_level=1)
    return path


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow warns above 89 MP
@pytest.mark.parametrize("use_cache", [False, True], ids=["no-cache", "cache"])
def test_100_megapixel_scan(scan_100mp, tmp_path, tiny_model_path, reference, use_cache):
    cache = tmp_path / "cache" if use_cache else None
    small = tmp_path / "small.png"
    small.write_bytes(encode(Image.new("RGB", (64, 48), (90, 90, 90)), "PNG"))
    items = [str(small), str(scan_100mp), str(small)]
    # the default limit (about 179 MP) lets it through: same picture as a small flat gray one
    emb = tiny_embedder(tiny_model_path, cache=cache).fit()
    X = emb.transform(items)
    np.testing.assert_allclose(X[1], reference(np.full((48, 64, 3), 90, np.uint8)), rtol=1e-5, atol=1e-5)
    if use_cache:
        emb.transform(items)
        assert emb.cache_stats_["hits"] == 3
        # max_pixels guards decoding: a vector already in the cache needs none and is returned
        hit = tiny_embedder(tiny_model_path, max_pixels=50_000_000, cache=cache).fit()
        np.testing.assert_array_equal(hit.transform(items), X)
        cache = tmp_path / "another_cache"
    # a lower max_pixels refuses it by its header, with the numbers in the message
    low = tiny_embedder(tiny_model_path, max_pixels=50_000_000, cache=cache).fit()
    with pytest.raises(ImageDecodeError, match=r"10000x10000 = 100,000,000 exceeds the limit of 50,000,000"):
        low.transform(items)
    low.set_params(on_error="skip")
    X = low.transform(items)
    assert np.isnan(X[1]).all() and np.isfinite(X[[0, 2]]).all()
    assert low.failures_["source"].tolist() == [str(scan_100mp)]


# ----------------------------------------------------------- permission denied
_AS_UNPRIVILEGED = textwrap.dedent(
    """
    import ctypes, os, sys
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP; the exec below loses them
            sys.exit(77)
    os.execv(sys.executable, [sys.executable] + sys.argv[1:])
    """
)


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX permissions")
@pytest.mark.parametrize("on_error", ["skip", "raise"])
def test_permission_denied(tmp_path, tiny_model_path, on_error, capsys):
    good = tmp_path / "good.png"
    good.write_bytes(encode(Image.fromarray(blocks(1)), "PNG"))
    locked = tmp_path / "locked.png"
    locked.write_bytes(encode(Image.fromarray(blocks(2)), "PNG"))
    csv = tmp_path / "list.csv"
    pd.DataFrame({"path": [str(good), str(locked), str(good)]}).to_csv(csv, index=False)
    out, fails = tmp_path / "out.parquet", tmp_path / "failures.csv"
    args = ["embed", str(csv), "-o", str(out), "--model", str(tiny_model_path), "--no-progress",
            "--on-error", on_error, "--failures", str(fails)]
    locked.chmod(0)
    try:
        if os.geteuid() != 0:
            rc = main(args)
            err = capsys.readouterr().err
        else:
            # root reads chmod-000 files; a child without CAP_DAC_OVERRIDE is refused like any user
            if not sys.platform.startswith("linux"):
                pytest.skip("running as root; dropping file capabilities needs Linux")
            res = subprocess.run([sys.executable, "-c", _AS_UNPRIVILEGED, "-m", "deepfeat", *args],
                                 capture_output=True, text=True)
            if res.returncode == 77:
                pytest.skip("running as root without CAP_SETPCAP: cannot drop the read override")
            rc, err = res.returncode, res.stderr
    finally:
        locked.chmod(0o644)
    failures = pd.read_csv(fails)
    assert failures["source"].tolist() == [str(locked)]
    assert failures["reason"].tolist() == ["permission denied"]
    if on_error == "skip":
        assert rc == 0, err
        df = pd.read_parquet(out)
        assert df["path"].tolist() == [str(good), str(locked), str(good)]
        feats = df.drop(columns=["path"]).to_numpy()
        assert np.isnan(feats[1]).all() and np.isfinite(feats[[0, 2]]).all()
    else:
        assert rc == 1 and not out.exists()
        assert f"cannot embed {locked} (input 2 of 3): permission denied" in err


# --------------------------------------------------------------------- the CLI
@pytest.mark.parametrize("use_cache", [False, True], ids=["no-cache", "cache"])
def test_cli_skip_exits_0_with_aligned_rows_and_a_report(tmp_path, tiny_model_path, capsys, use_cache):
    paths, cases = make_cases(tmp_path / "dirty")
    csv = tmp_path / "inputs.csv"
    pd.DataFrame({"path": paths}).to_csv(csv, index=False)
    out, fails = tmp_path / "out.parquet", tmp_path / "failed.csv"
    args = ["embed", str(csv), "-o", str(out), "--model", str(tiny_model_path), "--no-progress",
            "--on-error", "skip", "--failures", str(fails)]
    if use_cache:
        args += ["--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 0
    err = capsys.readouterr().err
    n_bad = sum(c.reason is not None for c in cases)
    assert f"deepfeat: {n_bad} of {len(paths)} inputs failed and have NaN rows:" in err
    df = pd.read_parquet(out)
    assert df["path"].tolist() == paths
    feats = df.drop(columns=["path"]).to_numpy()
    bad_rows = [i for i, c in enumerate(cases) if c.reason is not None]
    assert np.isnan(feats[bad_rows]).all()
    assert np.isfinite(np.delete(feats, bad_rows, axis=0)).all()
    report = pd.read_csv(fails)
    assert report["position"].tolist() == bad_rows
    for (_, row), i in zip(report.iterrows(), bad_rows):
        assert row["source"] == paths[i] and cases[i].reason in row["reason"]
        assert f"  {paths[i]}: {row['reason']}" in err


@pytest.mark.parametrize("use_cache", [False, True], ids=["no-cache", "cache"])
def test_cli_raise_exits_nonzero_naming_the_file(tmp_path, tiny_model_path, capsys, use_cache):
    paths, cases = make_cases(tmp_path / "dirty")
    csv = tmp_path / "inputs.csv"
    pd.DataFrame({"path": paths}).to_csv(csv, index=False)
    out = tmp_path / "out.parquet"
    args = ["embed", str(csv), "-o", str(out), "--model", str(tiny_model_path), "--no-progress"]
    if use_cache:
        args += ["--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 1
    err = capsys.readouterr().err
    # the bad input met first (with a cache, inputs it cannot key are run first)
    named = re.search(r"cannot embed (.+) \(input (\d+) of (\d+)\): (.+)", err)
    assert named, err
    i = int(named.group(2)) - 1
    assert named.group(1) == paths[i] and int(named.group(3)) == len(paths)
    assert cases[i].reason is not None and cases[i].reason in named.group(4)
    assert "--on-error skip" in err and not out.exists()


_KILL_AFTER = textwrap.dedent(
    """
    import os, signal, sys
    from deepfeat import cli, runtime

    limit = int(sys.argv[1])
    run, calls = runtime.Runner.run, [0]

    def run_then_die(self, batch):
        calls[0] += 1
        if calls[0] > limit:  # the power goes out while batch `limit + 1` runs
            os.kill(os.getpid(), signal.SIGKILL)
        return run(self, batch)

    runtime.Runner.run = run_then_die
    sys.exit(cli.main(sys.argv[2:]))
    """
)


def test_killed_cli_embed_resumes_from_the_cache(tmp_path, tiny_model_path, capsys):
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(14):
        (root / f"img_{i:02d}.png").write_bytes(encode(Image.fromarray(blocks(100 + i)), "PNG"))
    (root / "img_05b.jpg").write_bytes(b"<html>not an image</html>")  # a bad file in the middle
    (root / "img_09b.jpg").write_bytes(b"")
    n_good = 14
    cache = tmp_path / "cache"
    args = ["embed", str(root), "-o", str(tmp_path / "out.parquet"), "--model", str(tiny_model_path),
            "--no-progress", "--batch-size", "2", "--on-error", "skip", "--cache-dir", str(cache)]

    killed = subprocess.run([sys.executable, "-c", _KILL_AFTER, "3", *args], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (tmp_path / "out.parquet").exists()
    stored = FeatureCache(cache).info()["vectors"]
    assert 0 < stored < n_good  # some batches were committed before the kill, not all

    assert main(args) == 0
    out = capsys.readouterr().out
    hits, computed = map(int, re.search(r"(\d+) hits, (\d+) computed", out).groups())
    assert hits == stored and computed == n_good - stored  # only what was not stored is recomputed
    resumed = pd.read_parquet(tmp_path / "out.parquet")

    fresh = tmp_path / "fresh.parquet"
    assert main(args[:2] + ["-o", str(fresh)] + args[4:-2]) == 0
    expected = pd.read_parquet(fresh)
    pd.testing.assert_frame_equal(resumed, expected, check_exact=False, rtol=1e-5, atol=1e-6)
    assert resumed.drop(columns=["path", "label"]).isna().all(axis=1).sum() == 2


# ----------------------------------------------------------------- model files
@pytest.fixture
def corrupt_registered_model(tmp_path, monkeypatch):
    """A copy of the shipped model with one weight byte changed, found first via $DEEPFEAT_MODELS."""
    spec = get_model_spec("efficientnet_lite0")
    src = REPO / "models" / spec.filename
    if not src.is_file():
        pytest.skip(f"{src} not present")
    models = tmp_path / "models"
    models.mkdir()
    data = bytearray(src.read_bytes())
    data[len(data) // 2] ^= 0xFF  # still a loadable ONNX file: only the checksum can tell
    (models / spec.filename).write_bytes(bytes(data))
    monkeypatch.setenv("DEEPFEAT_MODELS", str(models))
    return models / spec.filename


def test_model_with_wrong_sha256_is_refused_before_any_image(corrupt_registered_model, tmp_path, capsys):
    images = [str(tmp_path / "never_read.jpg")]  # reading it would raise ImageDecodeError instead
    with pytest.raises(ModelFileError) as info:
        ImageEmbedder(progress=False).fit_transform(images)
    msg = str(info.value)
    assert str(corrupt_registered_model) in msg and "sha256" in msg and "reinstall" in msg

    root = tmp_path / "folder"
    root.mkdir()
    (root / "a.png").write_bytes(encode(Image.new("RGB", (8, 8)), "PNG"))
    assert main(["embed", str(root), "-o", str(tmp_path / "o.parquet"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "sha256" in err and str(corrupt_registered_model) in err and "cannot embed" not in err


@pytest.mark.parametrize(
    "content",
    [b"", b"<!DOCTYPE html><html>Sign in to download</html>", "half"],
    ids=["empty", "html", "truncated"],
)
def test_onnx_file_that_is_not_a_model_is_refused_before_any_image(tmp_path, tiny_model_path, content, capsys):
    path = tmp_path / "model.onnx"
    if content == "half":
        content = tiny_model_path.read_bytes()[: tiny_model_path.stat().st_size // 2]
    path.write_bytes(content)
    with pytest.raises(ValueError, match="is not a valid ONNX model") as info:
        ImageEmbedder(model=str(path), progress=False).fit_transform([str(tmp_path / "never_read.jpg")])
    assert not isinstance(info.value, ImageDecodeError) and str(path) in str(info.value)
    csv = tmp_path / "l.csv"
    pd.DataFrame({"path": [str(tmp_path / "never_read.jpg")]}).to_csv(csv, index=False)
    assert main(["embed", str(csv), "-o", str(tmp_path / "o.parquet"), "--model", str(path)]) == 1
    err = capsys.readouterr().err
    assert "is not a valid ONNX model" in err and "never_read" not in err
