"""codsr.imageio: awkward real files, generated edge cases, exact 16-bit round trips, atomic writes."""

from __future__ import annotations

import functools
import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageOps

from codsr import imageio
from codsr.imageio import (
    ImageReadError,
    is_temp_file,
    read_image,
    remove_temp_files,
    resolve_output_format,
    upscale_alpha,
    write_image,
)
from conftest import FIXTURES

REAL_ESRGAN = FIXTURES / "real_lq" / "RealESRGAN_inputs"
REAL47 = FIXTURES / "real_lq" / "Real47"


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def png16_reference(path: Path) -> np.ndarray:
    """Independent 16-bit decode of an RGBA 16-bit PNG through Pillow's own C decoder: Pillow keeps
    the high byte with rawmode RGBA;16B; reading the same big-endian data as RGBA;16L yields the
    low bytes instead (test-only use of the tile internals)."""
    hi = np.asarray(Image.open(path)).astype(np.int64)
    im = Image.open(path)
    im.tile = [im.tile[0]._replace(args=im.tile[0].args.replace("16B", "16L"))]
    lo = np.asarray(im).astype(np.int64)
    return hi * 256 + lo


def scalar_png_filter(rows: list[bytes], types: list[int], bpp: int) -> bytes:
    """PNG spec §9 filters written out byte by byte (reference for the vectorised decoder)."""
    out, prev = bytearray(), bytes(len(rows[0]))
    for row, t in zip(rows, types, strict=True):
        out.append(t)
        for i, x in enumerate(row):
            a = row[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if t == 0:
                pred = 0
            elif t == 1:
                pred = a
            elif t == 2:
                pred = b
            elif t == 3:
                pred = (a + b) // 2
            else:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
            out.append((x - pred) % 256)
        prev = row
    return bytes(out)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def adam7_png16(samples: np.ndarray) -> bytes:
    """Interlaced 16-bit PNG (filter None) written straight from the spec's Adam7 pass table."""
    h, w, c = samples.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    raw = b""
    for x0, y0, dx, dy in (
        (0, 0, 8, 8),
        (4, 0, 8, 8),
        (0, 4, 4, 8),
        (2, 0, 4, 4),
        (0, 2, 2, 4),
        (1, 0, 2, 2),
        (0, 1, 1, 2),
    ):
        sub = samples[y0::dy, x0::dx]
        if sub.size:
            for row in sub.astype(">u2"):
                raw += b"\x00" + row.tobytes()
    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 1)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(raw))
        + png_chunk(b"IEND", b"")
    )


def cmyk_icc_profile() -> bytes:
    """Minimal ICC v2 CMYK→Lab profile (lut8 A2B0, 2-point grid): L* = 100·(1 − K/255), a* = b* = 0,
    i.e. only black ink darkens and everything is neutral grey."""

    def s15(v: float) -> bytes:
        return struct.pack(">i", round(v * 65536))

    lut = b"mft1" + bytes(4) + bytes([4, 3, 2, 0])
    lut += b"".join(s15(v) for v in (1, 0, 0, 0, 1, 0, 0, 0, 1))
    lut += bytes(range(256)) * 4
    # Grid points in C, M, Y, K order with K varying fastest; L* byte 255 = 100, a/b byte 128 = 0.
    lut += b"".join(bytes([255 if i & 1 == 0 else 0, 128, 128]) for i in range(16))
    lut += bytes(range(256)) * 3
    wtpt = b"XYZ " + bytes(4) + s15(0.9642) + s15(1.0) + s15(0.8249)
    text = b"codsr test CMYK\0"
    desc = b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(8) + bytes(3) + bytes(67)
    tags = [(b"desc", desc), (b"wtpt", wtpt), (b"A2B0", lut)]
    body, entries = b"", b""
    first = 128 + 4 + 12 * len(tags)
    for sig, data in tags:
        body += bytes((-len(body)) % 4)
        entries += sig + struct.pack(">II", first + len(body), len(data))
        body += data
    header = (
        struct.pack(">I", first + len(body)) + bytes(4) + b"\x02\x10\x00\x00" + b"prtr" + b"CMYK" + b"Lab "
        + bytes(12) + b"acsp" + bytes(24) + bytes(4) + s15(0.9642) + s15(1.0) + s15(0.8249) + bytes(48)
    )  # fmt: skip
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + entries + body


@functools.cache
def srgb_icc() -> bytes:
    # littleCMS stamps the creation time into the profile header: build it once, so that two calls
    # in one test never differ by a second boundary falling between them.
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def test_srgb_icc_helper_is_deterministic():
    # The profile header holds the creation time (seconds at byte 35): two calls a second apart
    # used to differ, which made test_icc_and_exif_kept_per_format flaky.
    first = srgb_icc()
    time.sleep(1.05)
    assert srgb_icc() == first


def exif_with(**tags: int | str) -> Image.Exif:
    exif = Image.Exif()
    names = {"orientation": 0x0112, "make": 0x010F}
    for key, value in tags.items():
        exif[names[key]] = value
    return exif


# ---------------------------------------------------------------------------------------------
# real awkward files
# ---------------------------------------------------------------------------------------------


def test_format_detected_from_content_not_extension():
    jpeg_named_png = read_image(REAL47 / "36.png")
    png_named_jpeg = read_image(REAL47 / "54.jpeg")
    assert jpeg_named_png.format == "JPEG" and png_named_jpeg.format == "PNG"
    ref = np.asarray(Image.open(REAL47 / "36.png"), dtype=np.float32) / 255
    np.testing.assert_array_equal(jpeg_named_png.rgb, ref)
    assert jpeg_named_png.rgb.dtype == np.float32 and jpeg_named_png.alpha is None


def test_real_grayscale_png_and_jpeg():
    gray = read_image(REAL_ESRGAN / "00017_gray.png")
    ref = np.asarray(Image.open(REAL_ESRGAN / "00017_gray.png"), dtype=np.float32) / 255
    assert gray.is_gray and gray.source_mode == "L" and gray.bit_depth == 8
    for ch in range(3):
        np.testing.assert_array_equal(gray.rgb[..., ch], ref)
    wolf = read_image(REAL_ESRGAN / "wolf_gray.jpg")
    assert wolf.is_gray and wolf.icc_profile is not None and wolf.icc_profile[16:20] == b"GRAY"
    assert wolf.exif is not None and wolf.exif.startswith(b"Exif\x00\x00")
    parsed = Image.Exif()
    parsed.load(wolf.exif)
    assert 0x0112 not in parsed  # orientation tag (1) removed or never there: pixels are upright


def test_real_rgba_png_keeps_alpha():
    path = REAL_ESRGAN / "children-alpha.png"
    img = read_image(path)
    ref = np.asarray(Image.open(path), dtype=np.float32) / 255
    assert img.alpha is not None and img.alpha.shape == (350, 566)
    np.testing.assert_array_equal(img.alpha, ref[..., 3])
    np.testing.assert_array_equal(img.rgb, ref[..., :3])
    assert float(img.alpha.min()) == 0.0 and float(img.alpha.max()) == 1.0  # really transparent somewhere


def test_real_16bit_rgba_png_keeps_full_precision(tmp_path):
    path = REAL_ESRGAN / "tree_alpha_16bit.png"
    # What Pillow 13 alone gives: an 8-bit RGBA image (the reason for our own decoder).
    assert np.asarray(Image.open(path)).dtype == np.uint8
    img = read_image(path)
    assert img.bit_depth == 16 and img.format == "PNG" and img.source_mode == "RGBA" and not img.is_gray
    ref = png16_reference(path)
    got = np.rint(np.concatenate([img.rgb, img.alpha[..., None]], axis=-1) * 65535).astype(np.int64)
    np.testing.assert_array_equal(got, ref)
    # The file really uses more than 8 bits: most samples are not multiples of 257 (= v8·257).
    assert np.mean(ref % 257 != 0) > 0.5
    assert img.icc_profile is not None and img.icc_profile[16:20] == b"RGB "

    out = write_image(tmp_path / "tree.png", img.rgb, img.alpha, bit_depth=16, icc_profile=img.icc_profile)
    back = read_image(out)
    np.testing.assert_array_equal(back.rgb, img.rgb)
    np.testing.assert_array_equal(back.alpha, img.alpha)
    assert back.icc_profile == img.icc_profile
    np.testing.assert_array_equal(png16_reference(out), ref)  # Pillow agrees with our encoder


# ---------------------------------------------------------------------------------------------
# generated modes
# ---------------------------------------------------------------------------------------------


def test_palette_with_transparency(tmp_path):
    im = Image.new("P", (4, 2))
    im.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    im.putdata([0, 1, 1, 0, 1, 1, 0, 1])
    im.save(tmp_path / "p.png", transparency=0)
    img = read_image(tmp_path / "p.png")
    assert img.source_mode == "P" and img.alpha is not None
    expected_alpha = np.array([[0, 1, 1, 0], [1, 1, 0, 1]], np.float32)
    np.testing.assert_array_equal(img.alpha, expected_alpha)
    np.testing.assert_allclose(img.rgb[0, 1] * 255, [200, 100, 50])
    np.testing.assert_allclose(img.rgb[0, 0] * 255, [10, 20, 30])


def test_la_and_gray_colour_key(tmp_path):
    la = np.zeros((2, 3, 2), np.uint8)
    la[..., 0], la[..., 1] = 90, [[0, 128, 255], [255, 255, 0]]
    Image.fromarray(la).save(tmp_path / "la.png")
    img = read_image(tmp_path / "la.png")
    assert img.is_gray and img.source_mode == "LA"
    np.testing.assert_array_equal(img.alpha, la[..., 1] / np.float32(255))
    np.testing.assert_array_equal(img.rgb, np.full((2, 3, 3), 90 / np.float32(255)))
    # An 8-bit L PNG with a tRNS colour key becomes gray + alpha.
    Image.fromarray(np.array([[7, 8]], np.uint8)).save(tmp_path / "key.png", transparency=7)
    keyed = read_image(tmp_path / "key.png")
    np.testing.assert_array_equal(keyed.alpha, [[0.0, 1.0]])


def test_cmyk_jpeg_without_profile_uses_pillow_conversion(tmp_path):
    Image.new("CMYK", (16, 16), (100, 0, 50, 0)).save(tmp_path / "c.jpg", quality=100)
    img = read_image(tmp_path / "c.jpg")
    assert img.source_mode == "CMYK" and img.icc_profile is None and not img.is_gray
    # K = 0: R = 255 − C, G = 255 − M, B = 255 − Y.
    np.testing.assert_allclose(img.rgb[8, 8] * 255, [155, 255, 205], atol=2)


def test_cmyk_jpeg_with_embedded_profile_goes_through_icc(tmp_path):
    Image.new("CMYK", (16, 16), (100, 0, 50, 128)).save(
        tmp_path / "c.jpg", quality=100, icc_profile=cmyk_icc_profile()
    )
    img = read_image(tmp_path / "c.jpg")
    # The profile says L* = 100·(1 − 128/255) (±JPEG), neutral; sRGB of that grey by the CIE/sRGB formulas:
    lstar = 100 * (1 - 128 / 255)
    y = ((lstar + 16) / 116) ** 3
    expected = (1.055 * y ** (1 / 2.4) - 0.055) * 255
    np.testing.assert_allclose(img.rgb[8, 8] * 255, [expected] * 3, atol=2.5)
    assert img.icc_profile is None  # pixels are sRGB now; a CMYK profile would be wrong on them
    # Pillow's naive conversion would have given (77, 127, 102): the ICC path was really used.
    assert abs(img.rgb[8, 8, 1] * 255 - 127) > 5


def test_i16_png_and_16bit_gray_alpha_exact(tmp_path):
    values = np.array([[0, 1000, 65535], [257, 12345, 40001]], np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")  # Pillow writes I;16 gray natively
    img = read_image(tmp_path / "g16.png")
    assert img.bit_depth == 16 and img.is_gray and img.alpha is None and img.source_mode == "I;16"
    np.testing.assert_array_equal(np.rint(img.rgb[..., 0] * 65535), values)
    np.testing.assert_array_equal(img.rgb[..., 0], img.rgb[..., 2])

    alpha = np.array([[1, 2, 3], [65534, 0, 30000]]) / 65535.0
    out = write_image(tmp_path / "la16.png", img.rgb, alpha, bit_depth=16, gray=True)
    back = read_image(out)
    assert back.is_gray and back.bit_depth == 16
    np.testing.assert_array_equal(np.rint(back.rgb[..., 0] * 65535), values)
    np.testing.assert_array_equal(np.rint(back.alpha * 65535), [[1, 2, 3], [65534, 0, 30000]])


def test_16bit_rgb_round_trip_keeps_sub_8bit_steps(tmp_path):
    codes = np.array([[[1000, 1001, 1002], [65535, 0, 256]], [[3, 65534, 32768], [40000, 40001, 40002]]])
    out = write_image(tmp_path / "rgb16.png", codes / 65535.0, bit_depth=16)
    assert out == tmp_path / "rgb16.png"
    back = read_image(out)
    assert back.bit_depth == 16 and back.alpha is None
    np.testing.assert_array_equal(np.rint(back.rgb * 65535), codes)
    # 1000 and 1001 differ by less than one 8-bit step and still differ after the round trip.
    assert back.rgb[0, 0, 0] != back.rgb[0, 0, 1]
    assert back.rgb[0, 0, 0] == np.float32(1000 / 65535)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), codes >> 8)  # Pillow reads our file


def test_16bit_colour_key_transparency(tmp_path):
    samples = np.array([[[1, 2, 3], [4, 5, 6]]], np.uint16)
    ihdr = struct.pack(">IIBBBBB", 2, 1, 16, 2, 0, 0, 0)
    raw = b"\x00" + samples.astype(">u2").tobytes()
    data = (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"tRNS", np.array([4, 5, 6], ">u2").tobytes())
        + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b"")
    )  # fmt: skip
    (tmp_path / "key16.png").write_bytes(data)
    img = read_image(tmp_path / "key16.png")
    np.testing.assert_array_equal(img.alpha, [[1.0, 0.0]])
    np.testing.assert_array_equal(np.rint(img.rgb * 65535), samples)


def test_interlaced_16bit_png(tmp_path):
    rng = np.random.default_rng(3)
    samples = rng.integers(0, 65536, size=(11, 13, 4), dtype=np.uint16)
    (tmp_path / "adam7.png").write_bytes(adam7_png16(samples))
    img = read_image(tmp_path / "adam7.png")
    got = np.rint(np.concatenate([img.rgb, img.alpha[..., None]], axis=-1) * 65535)
    np.testing.assert_array_equal(got, samples)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "adam7.png")), samples >> 8)


@pytest.mark.parametrize("band_rows", [256, 3])
def test_unfilter_matches_scalar_reference_for_every_filter(monkeypatch, band_rows):
    monkeypatch.setattr(imageio, "_BAND_ROWS", band_rows)
    rng = np.random.default_rng(0)
    h, w, bpp = 12, 17, 4
    # Most rows take few distinct values so Paeth's tie-breaking rules (a before b before c) matter.
    rows = [bytes(rng.integers(0, 256 if y % 4 == 0 else 6, w * bpp, dtype=np.uint8)) for y in range(h)]
    # Rows 0-2 use only None/Sub/Up (row-wise path when band_rows=3); the rest mix all five.
    types = [1, 2, 0, 4, 3, 4, 4, 2, 1, 3, 0, 4]
    data = scalar_png_filter(rows, types, bpp)
    got = imageio._unfilter(data, h, w, bpp)
    np.testing.assert_array_equal(got, np.frombuffer(b"".join(rows), np.uint8).reshape(h, w * bpp))


def test_exif_rotated_jpeg_is_upright(tmp_path):
    # Stored 64 wide × 32 tall, red block at the stored top-left; orientation 6 means "rotate 90°
    # clockwise to display", so upright it is 32 wide × 64 tall with the red block at the top-right.
    stored = np.zeros((32, 64, 3), np.uint8)
    stored[...] = (0, 0, 255)
    stored[:16, :16] = (255, 0, 0)
    Image.fromarray(stored).save(tmp_path / "rot.jpg", quality=95, exif=exif_with(orientation=6, make="cam"))
    img = read_image(tmp_path / "rot.jpg")
    assert img.rgb.shape == (64, 32, 3)
    np.testing.assert_allclose(img.rgb[2, 29] * 255, [255, 0, 0], atol=8)  # top-right: red
    np.testing.assert_allclose(img.rgb[2, 2] * 255, [0, 0, 255], atol=8)  # top-left: blue
    parsed = Image.Exif()
    parsed.load(img.exif)
    assert 0x0112 not in parsed and parsed[0x010F] == "cam"


@pytest.mark.parametrize("orientation", range(1, 9))
def test_16bit_png_orientation_matches_exif_transpose(tmp_path, orientation):
    rng = np.random.default_rng(orientation)
    samples = rng.integers(0, 65536, size=(3, 5, 3), dtype=np.uint16)
    exif = exif_with(orientation=orientation).tobytes()
    (tmp_path / "o.png").write_bytes(imageio._encode_png16(samples, icc=None, exif=exif))
    img = read_image(tmp_path / "o.png")
    expected = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "o.png")))  # 8-bit view
    np.testing.assert_array_equal(np.rint(img.rgb * 65535).astype(np.int64) >> 8, expected)
    parsed = Image.Exif()
    if img.exif:
        parsed.load(img.exif)
    assert 0x0112 not in parsed


# ---------------------------------------------------------------------------------------------
# broken inputs
# ---------------------------------------------------------------------------------------------


def test_animated_images_are_rejected(tmp_path):
    frames = [Image.new("RGB", (4, 4), (i * 60, 0, 0)) for i in range(3)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    frames[0].save(tmp_path / "anim.png", save_all=True, append_images=frames[1:])  # APNG
    for name, fmt in (("anim.gif", "GIF"), ("anim.png", "PNG")):
        with pytest.raises(ImageReadError, match=rf"animated {fmt} with 3 frames") as info:
            read_image(tmp_path / name)
        assert info.value.path == tmp_path / name and name in str(info.value)
    frames[0].save(tmp_path / "still.gif")
    assert read_image(tmp_path / "still.gif").rgb[0, 0, 0] == 0.0


def test_truncated_empty_and_non_image_files(tmp_path):
    full = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(full, "PNG")
    (tmp_path / "cut8.png").write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    cut16 = imageio._encode_png16(
        np.random.default_rng(1).integers(0, 65536, (32, 32, 3), dtype=np.uint16), icc=None, exif=None
    )
    (tmp_path / "cut16.png").write_bytes(cut16[: len(cut16) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.png").write_text("this is not an image\n")
    cases = {
        "cut8.png": "truncated",
        "cut16.png": "truncated",
        "empty.jpg": "empty file",
        "notes.png": "not an image",
        "missing.png": "no such file",
    }
    for name, reason in cases.items():
        with pytest.raises(ImageReadError, match=reason) as info:
            read_image(tmp_path / name)
        assert info.value.path == tmp_path / name and reason in info.value.reason


def test_16bit_png_with_short_compressed_stream(tmp_path):
    raw = b"".join(b"\x00" + bytes(range(12)) for _ in range(4))  # 4 rows of 2 RGB16 pixels
    stream = zlib.compress(raw)[:10]  # chunk CRCs are fine, the zlib stream stops early
    ihdr = struct.pack(">IIBBBBB", 2, 4, 16, 2, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", stream) + png_chunk(b"IEND", b"")
    )
    (tmp_path / "short.png").write_bytes(data)
    with pytest.raises(ImageReadError, match="ends early"):
        read_image(tmp_path / "short.png")


@pytest.mark.filterwarnings("ignore:Corrupt EXIF")
def test_broken_exif_does_not_cost_the_photo(tmp_path):
    Image.new("RGB", (4, 4), (0, 51, 102)).save(
        tmp_path / "e.png", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff\x01"
    )
    img = read_image(tmp_path / "e.png")
    np.testing.assert_array_equal(img.rgb[0, 0] * 255, [0, 51, 102])
    out = write_image(tmp_path / "o.jpg", img.rgb, exif=img.exif)
    assert Image.open(out).size == (4, 4)


def test_corrupt_crc_in_16bit_png(tmp_path):
    data = bytearray(imageio._encode_png16(np.zeros((4, 4, 3), np.uint16), icc=None, exif=None))
    idat = data.index(b"IDAT")
    data[idat + 6] ^= 0xFF  # flip a byte inside the compressed data
    (tmp_path / "bad.png").write_bytes(bytes(data))
    with pytest.raises(ImageReadError, match="CRC mismatch in the IDAT chunk"):
        read_image(tmp_path / "bad.png")


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------


def test_gray_written_as_gray_with_rounding(tmp_path):
    rgb = np.zeros((2, 2, 3), np.float32)
    rgb[0, 0] = 0.6 / 255  # rounds to 1 (truncation would give 0)
    rgb[1, 1] = (0.5, 0.25, 1.0)  # luma 0.299·0.5 + 0.587·0.25 + 0.114·1 = 0.41025 → 104.6 → 105
    out = write_image(tmp_path / "g.png", rgb, gray=True)
    im = Image.open(out)
    assert im.mode == "L"
    np.testing.assert_array_equal(np.asarray(im), [[1, 0], [0, 105]])
    out16 = write_image(tmp_path / "g16.tif", np.full((2, 2), 1000 / 65535), bit_depth=16, gray=True)
    assert out16.suffix == ".tif" and Image.open(out16).mode == "I;16"
    np.testing.assert_array_equal(np.asarray(Image.open(out16)), np.full((2, 2), 1000))
    assert read_image(out16).bit_depth == 16


def test_format_fallbacks_change_extension(tmp_path):
    rgb, alpha = np.full((4, 4, 3), 0.5), np.full((4, 4), 0.25)
    out = write_image(tmp_path / "a.jpg", rgb, alpha)
    assert out == tmp_path / "a.png" and not (tmp_path / "a.jpg").exists()
    assert Image.open(out).mode == "RGBA" and Image.open(out).getpixel((0, 0)) == (128, 128, 128, 64)
    assert write_image(tmp_path / "b.webp", rgb, bit_depth=16) == tmp_path / "b.png"
    assert write_image(tmp_path / "c.tif", rgb, bit_depth=16) == tmp_path / "c.png"  # colour 16-bit TIFF
    assert write_image(tmp_path / "d.webp", rgb, alpha) == tmp_path / "d.webp"  # WebP keeps alpha
    assert Image.open(tmp_path / "d.webp").mode == "RGBA"
    assert resolve_output_format("tiff", has_alpha=False, bit_depth=16, gray=True) == "TIFF"
    with pytest.raises(ValueError, match="extension '.gif'"):
        write_image(tmp_path / "e.gif", rgb)


@pytest.mark.parametrize("name", ["m.png", "m.jpg", "m.webp", "m.tif", "m16.png"])
def test_icc_and_exif_kept_per_format(tmp_path, name):
    rgb = np.full((8, 12, 3), 0.5, np.float32)
    exif = exif_with(orientation=8, make="codsr-cam")
    exif.get_ifd(0x8769)[0xA002] = 3  # stale PixelXDimension from the low-resolution input
    out = write_image(
        tmp_path / name, rgb, icc_profile=srgb_icc(), exif=exif.tobytes(), bit_depth=16 if "16" in name else 8
    )
    im = Image.open(out)
    assert im.info.get("icc_profile") == srgb_icc()
    written = im.getexif()
    assert written[0x010F] == "codsr-cam" and 0x0112 not in written
    if name != "m.tif":  # Pillow's TIFF writer stores the EXIF tags in IFD0 without the sub-IFD
        assert written.get_ifd(0x8769)[0xA002] == 12


def test_gray_icc_profile_dropped_when_stored_as_rgb(tmp_path):
    gray_icc = read_image(REAL_ESRGAN / "wolf_gray.jpg").icc_profile
    rgb = np.full((4, 4, 3), 0.5, np.float32)
    as_gray = write_image(tmp_path / "g.jpg", rgb, gray=True, icc_profile=gray_icc)
    assert Image.open(as_gray).info.get("icc_profile") == gray_icc
    as_rgb = write_image(tmp_path / "c.jpg", rgb, gray=False, icc_profile=gray_icc)
    assert Image.open(as_rgb).info.get("icc_profile") is None
    webp = write_image(tmp_path / "w.webp", rgb, gray=True, icc_profile=gray_icc)  # WebP stores RGB
    assert Image.open(webp).info.get("icc_profile") is None


class _Boom(Exception):
    pass


@pytest.mark.parametrize("error", [_Boom, KeyboardInterrupt])
def test_atomic_write_leaves_nothing_when_the_writer_fails(tmp_path, monkeypatch, error):
    target = tmp_path / "out.png"
    target.write_bytes(b"previous complete file")

    def half_write(self, fp, format=None, **params):  # noqa: A002
        fp.write(b"\x89PNG\r\n\x1a\n partial")
        raise error("disk went away")

    monkeypatch.setattr(Image.Image, "save", half_write)
    with pytest.raises(error):
        write_image(target, np.zeros((4, 4, 3)))
    assert target.read_bytes() == b"previous complete file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]
    with pytest.raises(error):
        write_image(tmp_path / "new.png", np.zeros((4, 4, 3)))
    assert not (tmp_path / "new.png").exists() and len(list(tmp_path.iterdir())) == 1


def test_write_validation_and_temp_file_cleanup(tmp_path):
    with pytest.raises(ValueError, match="NaN"):
        write_image(tmp_path / "x.png", np.full((2, 2, 3), np.nan))
    with pytest.raises(TypeError, match="float array"):
        write_image(tmp_path / "x.png", np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(ValueError, match="alpha shape"):
        write_image(tmp_path / "x.png", np.zeros((2, 2, 3)), np.zeros((3, 3)))
    assert not any(tmp_path.iterdir())

    (tmp_path / "sub").mkdir()
    stale = [tmp_path / ".a.png.codsr-tmp-0123abcd", tmp_path / "sub" / ".b.jpg.codsr-tmp-deadbeef"]
    keep = [tmp_path / "a.png", tmp_path / ".a.png.codsr-tmp-xyz", tmp_path / "a.png.codsr-tmp-0123abcd"]
    for p in stale + keep:
        p.write_bytes(b"x")
    assert is_temp_file(stale[0]) and not is_temp_file(keep[1]) and not is_temp_file(keep[2])
    assert remove_temp_files(tmp_path) == sorted(stale)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in stale)


def test_upscale_alpha():
    flat = upscale_alpha(np.full((3, 4), 0.25, np.float32), (9, 12))
    assert flat.shape == (9, 12) and flat.dtype == np.float32
    np.testing.assert_allclose(flat, 0.25, atol=1e-6)
    near = upscale_alpha(np.array([[0.0, 1.0]]), (2, 4), method="nearest")
    np.testing.assert_array_equal(near, [[0, 0, 1, 1], [0, 0, 1, 1]])
    step = upscale_alpha(np.array([[0.0, 0.0, 1.0, 1.0]] * 4), (8, 8))  # bicubic overshoots → clipped
    assert step.min() == 0.0 and step.max() == 1.0 and 0.0 < step[0, 4] < 1.0
    fine = upscale_alpha(np.array([[1000 / 65535, 1000 / 65535]]), (2, 4))
    np.testing.assert_allclose(fine, 1000 / 65535, rtol=1e-5)  # no 8-bit quantisation
    with pytest.raises(ValueError, match="method"):
        upscale_alpha(np.zeros((2, 2)), (4, 4), method="magic")
