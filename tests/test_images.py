"""Decoding rules of deepfeat.images.load_image, one test per documented rule.

Every file is generated here with Pillow (or written byte by byte where Pillow
cannot write the format), so each expected pixel value is known exactly.
"""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from deepfeat.images import (
    ALPHA_BACKGROUND,
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    describe,
    load_image,
    preprocess,
)

RED = (255, 0, 0)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def pixels(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img).astype(int)


def reason_of(item, **kw) -> str:
    with pytest.raises(ImageDecodeError) as info:
        load_image(item, **kw)
    err = info.value
    assert str(err) == f"{err.source}: {err.reason}"
    return err.reason


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_rgb16(a: np.ndarray) -> bytes:
    """A 48-bit RGB PNG (Pillow cannot write one), written chunk by chunk."""
    h, w, _ = a.shape
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    body = png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def png_header_only(w: int, h: int) -> bytes:
    """A PNG that declares w x h gray pixels but holds almost no data (a bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))


# ---------------------------------------------------------------- 1. reading
def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "gone.jpg"
    with pytest.raises(ImageDecodeError) as info:
        load_image(path)
    assert info.value.source == str(path)
    assert "file not found" in info.value.reason


def test_empty_file_and_empty_bytes(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert reason_of(tmp_path / "empty.jpg") == "empty file (0 bytes)"
    assert reason_of(b"") == "empty file (0 bytes)"


def test_directory_and_fifo_are_refused_without_blocking(tmp_path):
    (tmp_path / "folder.jpg").mkdir()
    assert "is a directory" in reason_of(tmp_path / "folder.jpg")
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    os.mkfifo(tmp_path / "pipe.jpg")  # opening it for reading would block forever
    assert "not a regular file" in reason_of(tmp_path / "pipe.jpg")


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX permissions")
def test_permission_denied(tmp_path):
    if os.geteuid() == 0:
        pytest.skip(
            "running as root, which reads chmod-000 files; tests/test_bad_input.py checks this case "
            "in a child process that drops to an unprivileged user"
        )
    path = tmp_path / "locked.png"
    path.write_bytes(encode(Image.new("RGB", (4, 4)), "PNG"))
    path.chmod(0)
    try:
        assert reason_of(path) == "permission denied"
    finally:
        path.chmod(0o644)


# -------------------------------------------------------------- 2. not an image
@pytest.mark.parametrize(
    "data, words",
    [
        (b"<!DOCTYPE html>\n<html><body>403 Forbidden</body></html>", "HTML/XML page"),
        (b"  <?xml version='1.0'?><svg/>", "HTML/XML page"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "PDF document"),
        (b"PK\x03\x04\x14\x00\x00\x00", "ZIP archive"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "HEIF/AVIF"),
        (bytes(range(7, 200)), "not an image file Pillow can read"),
    ],
)
def test_non_images_are_named(tmp_path, data, words):
    path = tmp_path / "photo.jpg"  # the name says JPEG; the content decides
    path.write_bytes(data)
    assert words in reason_of(path)


# --------------------------------------------------------- 3. decompression bombs
def test_bomb_guard_reads_only_the_header():
    bomb = png_header_only(60_000, 60_000)  # 3.6 gigapixels declared in 100 bytes
    reason = reason_of(bomb)
    assert "too many pixels" in reason and "3,600,000,000" in reason
    assert f"{DEFAULT_MAX_PIXELS:,}" in reason and "max_pixels" in reason


def test_max_pixels_is_configurable():
    img = encode(Image.new("L", (300, 200), 7), "PNG")
    reason = reason_of(img, max_pixels=59_999)
    assert "300x200 = 60,000 exceeds the limit of 59,999" in reason
    assert load_image(img, max_pixels=60_000).size == (300, 200)


def test_pillow_guard_still_applies_when_max_pixels_is_off():
    reason = reason_of(png_header_only(60_000, 60_000), max_pixels=None)
    assert "too many pixels" in reason and "PIL.Image.MAX_IMAGE_PIXELS" in reason


# ------------------------------------------------------------ 4. truncated data
def _photo_like(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))


TRUNCATABLE = {
    "jpeg": dict(fmt="JPEG", quality=90),
    "progressive-jpeg": dict(fmt="JPEG", quality=90, progressive=True),
    "png": dict(fmt="PNG"),
    "gif": dict(fmt="GIF"),
    "webp": dict(fmt="WEBP", quality=90),
    "tiff": dict(fmt="TIFF"),
    "bmp": dict(fmt="BMP"),
}


@pytest.mark.parametrize("load_truncated", [False, True], ids=["pillow-default", "LOAD_TRUNCATED_IMAGES"])
@pytest.mark.parametrize("kind", sorted(TRUNCATABLE))
def test_truncated_files_are_refused(kind, load_truncated, monkeypatch):
    # a library imported by the user may set LOAD_TRUNCATED_IMAGES = True; the rule must still hold
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", load_truncated)
    opts = dict(TRUNCATABLE[kind])
    whole = encode(_photo_like(), opts.pop("fmt"), **opts)
    assert load_image(whole).size == (64, 48)
    for frac in (0.3, 0.7, 0.95):
        assert "truncated file" in reason_of(whole[: int(len(whole) * frac)]), frac


def test_corrupt_header_is_refused():
    data = bytearray(encode(_photo_like(), "PNG"))
    data[16:24] = b"\xff" * 8  # width and height fields of IHDR
    assert "corrupt image header: a PNG signature" in reason_of(bytes(data))


# ---------------------------------------------------------- 5. multi-frame files
def _frames():
    return [Image.new("RGB", (8, 6), c) for c in (RED, (0, 255, 0), (0, 0, 255))]


@pytest.mark.parametrize(
    "fmt, kw",
    [("GIF", {"duration": 40, "loop": 0}), ("PNG", {}), ("WEBP", {"lossless": True}), ("TIFF", {})],
    ids=["animated-gif", "apng", "animated-webp", "multipage-tiff"],
)
def test_first_frame_of_multi_frame_files(fmt, kw):
    first, *rest = _frames()
    data = encode(first, fmt, save_all=True, append_images=rest, **kw)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    assert (pixels(load_image(data)) == RED).all()


def test_pil_image_is_used_at_its_current_frame():
    first, *rest = _frames()
    img = Image.open(io.BytesIO(encode(first, "GIF", save_all=True, append_images=rest)))
    img.seek(2)
    assert tuple(pixels(load_image(img))[0, 0]) == (0, 0, 255)


# ---------------------------------------------------------- 6. EXIF orientation
def _with_orientation(img: Image.Image, value: int, fmt: str = "PNG") -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return encode(img, fmt, exif=exif.tobytes())


def test_exif_orientation_6_turns_a_phone_photo_upright():
    # orientation 6: the stored top row is the right-hand column of the upright picture
    stored = np.zeros((2, 4, 3), np.uint8)
    stored[0, 0] = RED
    img = load_image(_with_orientation(Image.fromarray(stored), 6))
    assert img.size == (2, 4)  # landscape as stored, portrait as seen
    up = pixels(img)
    assert tuple(up[0, -1]) == RED and up.sum() == 255


@pytest.mark.parametrize("value", range(1, 9))
def test_every_exif_orientation(value):
    upright = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 12
    # the stored pixels are the upright picture under the inverse of what the tag asks for
    undo = {
        2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270,
    }
    stored = Image.fromarray(upright)
    if value in undo:
        stored = stored.transpose(undo[value])
    assert (pixels(load_image(_with_orientation(stored, value))) == upright).all()


def test_exif_orientation_in_a_jpeg():
    stored = np.zeros((32, 64, 3), np.uint8)
    stored[:16, :16] = RED  # stored top-left block
    img = load_image(_with_orientation(Image.fromarray(stored), 8, "JPEG"))
    # orientation 8: the stored top-left corner is the bottom-left of the upright picture
    assert img.size == (32, 64)
    assert np.abs(pixels(img)[-8, 8] - RED).max() < 40 and pixels(img)[8, 8].max() < 40


def test_corrupt_exif_does_not_refuse_the_image():
    data = encode(Image.new("RGB", (6, 4), RED), "JPEG", exif=b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\xff\xff")
    with pytest.warns(UserWarning, match="Corrupt EXIF"):
        img = load_image(data)
    assert img.size == (6, 4)


# ------------------------------------------------------------- 7. modes -> RGB
def test_cmyk_jpeg_with_adobe_inverted_data():
    data = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).info.get("adobe")  # Pillow writes Photoshop-style inverted CMYK
    assert np.abs(pixels(load_image(data)) - RED).max() <= 2


def test_cmyk_jpeg_without_adobe_marker():
    # Pillow stores 255 - value with an APP14 "Adobe" marker; dropping the marker leaves
    # plain (non-inverted) CMYK, so the values written are the inverse of the intended red
    inverted = encode(Image.new("CMYK", (16, 16), (255, 0, 0, 255)), "JPEG", quality=95)
    app14 = inverted.index(b"\xff\xeeAdobe"[:2])
    length = int.from_bytes(inverted[app14 + 2 : app14 + 4], "big")
    plain = inverted[:app14] + inverted[app14 + 2 + length :]
    assert "adobe" not in Image.open(io.BytesIO(plain)).info
    assert np.abs(pixels(load_image(plain)) - RED).max() <= 2


def test_cmyk_tiff():
    assert (pixels(load_image(encode(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "TIFF"))) == RED).all()


def test_16_bit_gray_png_is_scaled_not_clipped():
    values = np.array([[0, 257, 32896], [65535, 128, 1000]], np.uint16)
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    got = pixels(load_image(data))[:, :, 0]
    assert got.tolist() == [[0, 1, 128], [255, 0, 4]]  # round(v / 257)


def test_16_bit_pgm_opened_as_mode_I_is_scaled_the_same_way():
    values = np.array([[0, 65535], [32896, 200]], ">u2")
    img = Image.open(io.BytesIO(b"P5\n2 2\n65535\n" + values.tobytes()))
    assert img.mode == "I"
    assert pixels(load_image(img))[:, :, 1].tolist() == [[0, 255], [128, 1]]


def test_32_bit_int_outside_16_bit_range_is_stretched():
    img = Image.fromarray(np.array([[-5, 95], [195, 95]], np.int32))
    assert pixels(load_image(img))[:, :, 2].tolist() == [[0, 128], [255, 128]]


def test_16_bit_rgb_png_keeps_the_high_bytes():
    values = np.zeros((2, 2, 3), np.uint16)
    values[..., 0] = 65535
    values[0, 0] = (0x1234, 0xABCD, 0x00FF)
    got = pixels(load_image(png_rgb16(values)))
    assert tuple(got[0, 0]) == (0x12, 0xAB, 0x00) and tuple(got[1, 1]) == RED


def test_float_image_is_stretched_and_nan_is_black():
    a = np.array([[0.25, 0.5], [0.75, np.nan]], np.float32)
    data = encode(Image.fromarray(a), "TIFF")
    assert pixels(load_image(data))[:, :, 0].tolist() == [[0, 128], [255, 0]]


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparency_is_composited_on_white(fmt):
    img = Image.new("P", (4, 2), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.paste(1, (2, 0, 4, 2))  # right half: opaque red; left half: transparent black
    got = pixels(load_image(encode(img, fmt, transparency=0)))
    assert (got[:, :2] == ALPHA_BACKGROUND).all() and (got[:, 2:] == RED).all()


def test_palette_without_transparency_uses_its_colours():
    img = Image.new("P", (2, 2), 1)
    img.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert (pixels(load_image(encode(img, "PNG"))) == (10, 20, 30)).all()


def test_rgba_and_la_alpha_composited_on_white():
    rgba = encode(Image.new("RGBA", (2, 2), (255, 0, 0, 128)), "PNG")
    assert (pixels(load_image(rgba)) == (255, 127, 127)).all()  # 50 % red over white
    la = encode(Image.new("LA", (2, 2), (0, 0)), "PNG")
    assert (pixels(load_image(la)) == ALPHA_BACKGROUND).all()
    rgba_array = np.zeros((2, 2, 4), np.uint8)  # a transparent uint8 array
    assert (pixels(load_image(rgba_array)) == ALPHA_BACKGROUND).all()


@pytest.mark.parametrize("mode, value", [("L", 77), ("1", 1)])
def test_grayscale_and_bilevel_are_replicated(mode, value):
    got = pixels(load_image(encode(Image.new(mode, (3, 3), value), "PNG")))
    expected = 77 if mode == "L" else 255
    assert (got == expected).all()


def test_lab_is_converted_with_littlecms():
    # L=128/255 (50 %), a=b=0 (Pillow stores them offset by 128): a mid grey in sRGB
    got = pixels(load_image(Image.new("LAB", (2, 2), (128, 128, 128))))
    assert np.ptp(got) == 0 and 110 <= got[0, 0, 0] <= 125


def test_arrays():
    assert (pixels(load_image(np.full((3, 5), 9, np.uint8))) == 9).all()
    assert load_image(np.zeros((3, 5, 1), np.uint8)).size == (5, 3)
    assert "uint8" in reason_of(np.zeros((3, 5, 3), np.float32))
    assert "got (3, 5, 2)" in reason_of(np.zeros((3, 5, 2), np.uint8))
    assert "not a path" in reason_of(12345)


def test_error_pickles_with_its_parts():
    import pickle

    err = pickle.loads(pickle.dumps(ImageDecodeError("a.jpg", "empty file (0 bytes)")))
    assert (err.source, err.reason, str(err)) == ("a.jpg", "empty file (0 bytes)", "a.jpg: empty file (0 bytes)")


def test_describe():
    assert describe(b"abc") == "<3 bytes>"
    assert describe(Image.new("RGB", (2, 3))) == "<PIL.Image RGB 2x3>"


def test_a_callers_lazy_image_is_left_usable():
    img = Image.open(io.BytesIO(encode(Image.new("RGB", (4, 4), RED), "PNG")))
    load_image(img)
    assert "load_read" not in img.__dict__ and img.getpixel((0, 0)) == RED


# ----------------------------------------------------------------- preprocess
KW = dict(input_size=32, resize_size=36, mean=(0.0,) * 3, std=(1.0,) * 3)


def test_preprocess_matches_resize_then_center_crop():
    img = _photo_like(1)
    w, h = img.size
    s = 36 / min(w, h)
    nw, nh = round(w * s), round(h * s)
    left, top = (nw - 32) // 2, (nh - 32) // 2
    ref = np.asarray(img.resize((nw, nh), Image.Resampling.BILINEAR).crop((left, top, left + 32, top + 32)))
    diff = np.abs(preprocess(img, **KW) - ref.transpose(2, 0, 1).astype(np.float32))
    # resampling only the crop box rounds differently by at most two grey levels
    assert diff.max() <= 2 and diff.mean() < 0.25


def test_preprocess_on_real_photos_stays_within_rounding_of_resize_then_crop(sample_photos):
    for arr in sample_photos:
        img = Image.fromarray(arr)
        w, h = img.size
        s = 256 / min(w, h)
        nw, nh = round(w * s), round(h * s)
        left, top = (nw - 224) // 2, (nh - 224) // 2
        ref = np.asarray(img.resize((nw, nh), Image.Resampling.BILINEAR).crop((left, top, left + 224, top + 224)))
        kw = dict(input_size=224, resize_size=256, mean=(0.0,) * 3, std=(1.0,) * 3)
        diff = np.abs(preprocess(img, **kw) - ref.transpose(2, 0, 1))
        assert diff.max() <= 2 and diff.mean() < 0.05


def test_preprocess_very_elongated_image_resamples_only_the_crop():
    # a full resize of this 1 x 400,000 strip would be 36 x 14,400,000 pixels (1.5 GB of RGB)
    ramp = (np.arange(400_000) // 1_000 % 256).astype(np.uint8)[:, None]
    img = Image.fromarray(np.repeat(ramp[:, :, None], 3, axis=2))
    x = preprocess(img, **KW)
    assert x.shape == (3, 32, 32)
    # the crop is the middle of the strip: rows around 200,000 hold value 200 // 1 % 256
    assert np.abs(x - 200).max() <= 1


def test_preprocess_elongated_random_image_agrees_with_a_full_resize():
    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 256, (3000, 20, 3), dtype=np.uint8))  # 150:1
    w, h = img.size
    s = 36 / w
    nw, nh = 36, round(h * s)
    left, top = (nw - 32) // 2, (nh - 32) // 2
    ref = np.asarray(img.resize((nw, nh), Image.Resampling.BILINEAR).crop((left, top, left + 32, top + 32)))
    assert np.abs(preprocess(img, **KW) - ref.transpose(2, 0, 1)).max() <= 2


def test_jpeg_draft_decodes_large_jpegs_at_reduced_scale_within_tolerance():
    from sklearn.datasets import load_sample_image

    photo = Image.fromarray(load_sample_image("china.jpg"))  # 640 x 427
    big = photo.resize((photo.width * 4, photo.height * 4), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    big.save(buf, "JPEG", quality=92)
    data = buf.getvalue()
    drafted = load_image(data, draft_side=256)
    full = load_image(data)
    assert full.size == (2560, 1708)
    # DCT scaling by 1/4 keeps the shorter side at or above the requested 256
    assert drafted.size == (640, 427)
    kw = dict(input_size=224, resize_size=256, mean=(0.0,) * 3, std=(1.0,) * 3)
    diff = np.abs(preprocess(drafted, **kw) - preprocess(full, **kw))
    assert diff.mean() < 2.0 and diff.max() < 40
    # small JPEGs and other formats are decoded in full
    assert load_image(data, draft_side=1000).size == (2560, 1708)
    png = io.BytesIO()
    big.save(png, "PNG")
    assert load_image(png.getvalue(), draft_side=256).size == (2560, 1708)
