"""Robust image reading and atomic writing for batch super-resolution (numpy + Pillow, no torch).

What goes wrong with real photo folders, and what this module does about it:

* The extension lies (a JPEG named ``.png``): the format is detected from the content (Pillow
  sniffs magic bytes); ``LoadedImage.format`` is the detected one.
* EXIF orientation: pixels are turned upright on read (``ImageOps.exif_transpose``) and the
  orientation tag is dropped from the EXIF we hand back, so outputs are never rotated twice.
* Transparency: RGBA / LA / palette-with-tRNS / colour-key images keep their alpha as a separate
  float plane instead of being flattened onto black.
* 16-bit PNGs: Pillow 13 decodes 16-bit-per-channel RGB(A) / LA PNGs to 8 bits (rawmode
  ``RGBA;16B`` keeps only the high byte). Every 16-bit PNG is therefore decoded here with
  ``zlib`` + PNG filter reversal in numpy (colour types 0, 2, 4, 6; Adam7 included) and written
  back with a small 16-bit PNG encoder, so >8-bit precision survives a round trip.
* CMYK: converted to sRGB through the embedded ICC profile when there is one (LittleCMS via
  ``ImageCms``), otherwise with Pillow's naive conversion.
* Half-written outputs: ``write_image`` writes through :func:`codsr.atomic.atomic_write` (a temp
  file in the target folder, fsync, ``os.replace``); an interrupted or failing write leaves no
  file under the final name. ``remove_temp_files`` (re-exported from :mod:`codsr.atomic`) cleans
  up after a killed process.

Array conventions: ``rgb`` is float32 H×W×3 in [0, 1], ``alpha`` float32 H×W in [0, 1] or None.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError, features

from codsr.atomic import TEMP_MARKER, atomic_write, is_temp_file, remove_temp_files

logger = logging.getLogger(__name__)

__all__ = [
    "ImageProbe",
    "ImageReadError",
    "LoadedImage",
    "FORMAT_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "TEMP_MARKER",
    "format_for_path",
    "is_temp_file",
    "probe_image",
    "read_image",
    "remove_temp_files",
    "resolve_output_format",
    "upscale_alpha",
    "write_image",
]

# Formats write_image can produce, with the extensions that name them (first = canonical).
FORMAT_EXTENSIONS: dict[str, tuple[str, ...]] = {
    "PNG": (".png",),
    "JPEG": (".jpg", ".jpeg", ".jpe", ".jfif"),
    "WEBP": (".webp",),
    "TIFF": (".tif", ".tiff"),
}
_EXTENSION_FORMAT = {ext: fmt for fmt, exts in FORMAT_EXTENSIONS.items() for ext in exts}

# The one list of file extensions (lower case) that make a file an image input, everywhere in
# codsr: batch upscaling, evaluation folders, training datasets, tagging. Everything here is
# readable by Pillow (AVIF only when this Pillow build has it).
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {ext for exts in FORMAT_EXTENSIONS.values() for ext in exts}
    | {".bmp", ".gif", ".ppm", ".pgm"}
    | ({".avif"} if features.check("avif") else set())
)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_GRAY_MODES = {"1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_HIGH_DEPTH_MODES = {"I", "F", "I;16", "I;16L", "I;16B", "I;16N"}
_EXIF_ORIENTATION = 0x0112
_EXIF_IFD = 0x8769
_EXIF_HEADER = b"Exif\x00\x00"


class ImageReadError(Exception):
    """An input file that cannot be used as an image; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")


@dataclass
class LoadedImage:
    """A decoded, upright image with everything needed to write the result back faithfully.

    ``rgb``: float32 H×W×3 in [0, 1] (grayscale sources are repeated to 3 channels);
    ``alpha``: float32 H×W in [0, 1], or None when the source has no transparency;
    ``bit_depth``: 16 for 16-bit (and 32-bit int / float) sources, else 8;
    ``is_gray``: the source stores one colour channel;
    ``format``: Pillow's name for the detected content format ("PNG", "JPEG", ...; a multi-picture
    JPEG is reported as "JPEG");
    ``icc_profile`` / ``exif``: raw bytes or None (EXIF starts with ``b"Exif\\0\\0"`` and has no
    orientation tag any more, because the pixels are already upright; a CMYK source's ICC profile
    is dropped because ``rgb`` is sRGB after conversion);
    ``source_mode``: the Pillow mode of the file as opened (a 16-bit RGBA PNG shows "RGBA": Pillow's
    own 8-bit view, see ``bit_depth``).
    """

    rgb: np.ndarray
    alpha: np.ndarray | None
    bit_depth: int
    is_gray: bool
    format: str
    icc_profile: bytes | None
    exif: bytes | None
    source_mode: str
    path: Path

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def has_alpha(self) -> bool:
        return self.alpha is not None


@dataclass(frozen=True)
class ImageProbe:
    """What the header of a file says, without decoding pixels (used to plan output names)."""

    format: str
    has_alpha: bool
    bit_depth: int
    is_gray: bool


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


def read_image(path: str | os.PathLike[str]) -> LoadedImage:
    """Decode ``path`` into a :class:`LoadedImage` (see the module docstring for the rules).

    Raises :class:`ImageReadError` for missing, empty, non-image, truncated or corrupt files, for
    animated / multi-frame images, and for colour modes that cannot be converted to RGB.
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError(path, "no such file")
    if not path.is_file():
        raise ImageReadError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise ImageReadError(path, "empty file (0 bytes); it was probably left by an interrupted copy")
    try:
        with Image.open(path) as im:
            return _load(path, im)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageReadError(path, f"too many pixels for a safe decode ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise ImageReadError(path, "not an image Pillow can decode (unknown or unsupported content)") from exc
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error, struct.error, IndexError) as exc:
        raise ImageReadError(path, f"corrupt or truncated image data ({type(exc).__name__}: {exc})") from exc


def _load(path: Path, im: Image.Image) -> LoadedImage:
    fmt = im.format or "unknown"
    if fmt == "MPO":
        # Multi-picture JPEG (phones, stereo cameras): frame 0 is the primary photo, the rest are
        # depth maps / previews, so this is not an animation.
        im.seek(0)
        fmt = "JPEG"
    else:
        n_frames = int(getattr(im, "n_frames", 1))
        if n_frames > 1:
            raise ImageReadError(
                path,
                f"{'animated' if getattr(im, 'is_animated', False) else 'multi-frame'} {fmt} with "
                f"{n_frames} frames is not supported; extract the frame you want into a still image first",
            )
    source_mode = im.mode
    icc = im.info.get("icc_profile") or None
    if fmt == "PNG":
        header = _png_header(path)
        if header is not None and header[0] == 16:
            return _load_png16(path, im, icc)
    im.load()  # decode now so truncation errors surface here, not later in a conversion
    try:
        upright = ImageOps.exif_transpose(im)
        exif = _exif_without_orientation(upright.info.get("exif"))
    except Exception as exc:  # noqa: BLE001 - broken EXIF must not cost the user a good photo
        logger.warning("%s: ignoring unreadable EXIF (%s); orientation not applied", path, exc)
        upright, exif = im, None
    rgb, alpha, is_gray, bit_depth, icc = _to_float(path, upright, icc)
    return LoadedImage(
        rgb=rgb,
        alpha=alpha,
        bit_depth=bit_depth,
        is_gray=is_gray,
        format=fmt,
        icc_profile=icc,
        exif=exif,
        source_mode=source_mode,
        path=path,
    )


def _to_float(
    path: Path, im: Image.Image, icc: bytes | None
) -> tuple[np.ndarray, np.ndarray | None, bool, int, bytes | None]:
    """Pillow image of any still mode → (rgb, alpha, is_gray, bit_depth, icc to keep)."""
    mode = im.mode
    transparent = im.info.get("transparency") is not None
    if mode == "1":
        im, mode = im.convert("L"), "L"
    if mode in ("L", "LA", "La"):
        if mode == "La" or (mode == "L" and transparent):
            im, mode = im.convert("LA"), "LA"
        arr = np.asarray(im, dtype=np.float32) / 255.0
        if mode == "LA":
            return _gray3(arr[..., 0]), np.ascontiguousarray(arr[..., 1]), True, 8, icc
        return _gray3(arr), None, True, 8, icc
    if mode in _HIGH_DEPTH_MODES:
        raw = np.asarray(im)
        if mode == "F":
            # Float TIFFs have no agreed range; [0, 1] is the common convention for image data.
            gray = np.clip(raw.astype(np.float32), 0.0, 1.0)
        else:
            # 16-bit grayscale (and Pillow's 32-bit "I" holding 16-bit samples).
            gray = np.clip(raw.astype(np.float32) / 65535.0, 0.0, 1.0)
        return _gray3(gray), None, True, 16, icc
    if mode == "CMYK":
        return _cmyk_to_rgb(path, im, icc), None, False, 8, None
    if mode in ("P", "PA"):
        target = "RGBA" if mode == "PA" or transparent else "RGB"
        im = im.convert(target)
    elif mode == "RGB" and transparent:
        im = im.convert("RGBA")
    elif mode in ("RGBa", "RGBX"):
        im = im.convert("RGBA" if mode == "RGBa" else "RGB")
    elif mode not in ("RGB", "RGBA"):
        try:
            im = im.convert("RGB")
        except ValueError as exc:
            raise ImageReadError(path, f"colour mode {mode} cannot be converted to RGB ({exc})") from exc
    arr = np.asarray(im, dtype=np.float32) / 255.0
    if im.mode == "RGBA":
        return np.ascontiguousarray(arr[..., :3]), np.ascontiguousarray(arr[..., 3]), False, 8, icc
    return arr, None, False, 8, icc


def _gray3(gray: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2), dtype=np.float32)


def _cmyk_to_rgb(path: Path, im: Image.Image, icc: bytes | None) -> np.ndarray:
    """CMYK → sRGB, through the embedded profile when there is a usable one."""
    if icc is not None and _icc_colour_space(icc) == "CMYK":
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            dst = ImageCms.createProfile("sRGB")
            rgb_im = ImageCms.profileToProfile(
                im, src, dst, renderingIntent=ImageCms.Intent.PERCEPTUAL, outputMode="RGB"
            )
            assert rgb_im is not None  # inPlace=False always returns the new image
            return np.asarray(rgb_im, dtype=np.float32) / 255.0
        except (ImageCms.PyCMSError, OSError, ValueError) as exc:
            logger.warning(
                "%s: embedded CMYK ICC profile unusable (%s); using Pillow's naive conversion", path, exc
            )
    return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def _exif_without_orientation(raw: bytes | None) -> bytes | None:
    """EXIF bytes with the ``Exif\\0\\0`` header and no orientation tag (pixels are upright)."""
    if not raw:
        return None
    exif = Image.Exif()
    try:
        exif.load(raw)
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types on malformed EXIF
        logger.warning("dropping unreadable EXIF block (%s)", exc)
        return None
    if _EXIF_ORIENTATION in exif:
        del exif[_EXIF_ORIENTATION]
        return exif.tobytes()
    return raw if raw.startswith(_EXIF_HEADER) else _EXIF_HEADER + raw


def _icc_colour_space(icc: bytes) -> str | None:
    """The data colour space of an ICC profile ("RGB", "GRAY", "CMYK", ...) from its header."""
    if len(icc) < 20:
        return None
    return icc[16:20].decode("ascii", "replace").strip()


# --------------------------------------------------------------------------------------------
# 16-bit PNG decoding (PNG spec, 2nd ed., §7 filtering, §8 Adam7 interlace, §11 chunks)
# --------------------------------------------------------------------------------------------

_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # colour type → samples per pixel
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _png_header(path: Path) -> tuple[int, int, int] | None:
    """(bit depth, colour type, interlace) from the IHDR of a PNG file, None if not a PNG."""
    with open(path, "rb") as f:
        head = f.read(33)
    if len(head) < 29 or not head.startswith(_PNG_SIGNATURE) or head[12:16] != b"IHDR":
        return None
    return head[24], head[25], head[28]


@dataclass
class _Png:
    width: int
    height: int
    bit_depth: int
    colour_type: int
    interlace: int
    idat: bytes
    trns: bytes | None
    exif: bytes | None


def _parse_png(data: bytes) -> _Png:
    if not data.startswith(_PNG_SIGNATURE):
        raise ValueError("missing PNG signature")
    pos, idat, fields = 8, [], {}
    trns = exif = None
    while pos < len(data):
        if pos + 8 > len(data):
            raise ValueError("file ends inside a chunk header (truncated)")
        length, ctype = struct.unpack(">I4s", data[pos : pos + 8])
        end = pos + 12 + length
        if end > len(data):
            raise ValueError(f"file ends inside the {ctype.decode('latin-1')} chunk (truncated)")
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[end - 4 : end])
        if zlib.crc32(ctype + body) != crc:
            raise ValueError(f"CRC mismatch in the {ctype.decode('latin-1')} chunk (file corrupt)")
        if ctype == b"IHDR":
            w, h, depth, ctype_, _comp, _filt, interlace = struct.unpack(">IIBBBBB", body)
            fields = {
                "width": w,
                "height": h,
                "bit_depth": depth,
                "colour_type": ctype_,
                "interlace": interlace,
            }
        elif ctype == b"IDAT":
            idat.append(body)
        elif ctype == b"tRNS":
            trns = body
        elif ctype == b"eXIf":
            exif = body
        elif ctype == b"IEND":
            break
        pos = end
    if not fields:
        raise ValueError("no IHDR chunk")
    if not idat:
        raise ValueError("no image data (IDAT) chunk: file is truncated")
    return _Png(idat=b"".join(idat), trns=trns, exif=exif, **fields)


def _load_png16(path: Path, im: Image.Image, icc: bytes | None) -> LoadedImage:
    png = _parse_png(path.read_bytes())
    if png.colour_type not in _CHANNELS:
        raise ImageReadError(path, f"16-bit PNG with invalid colour type {png.colour_type}")
    samples = _decode_png16(png)
    values = samples.astype(np.float32) / 65535.0
    channels = _CHANNELS[png.colour_type]
    alpha: np.ndarray | None = None
    if png.colour_type in (4, 6):
        alpha = values[..., -1]
        values = values[..., :-1]
    elif png.trns is not None and len(png.trns) == 2 * channels:
        # Colour-key transparency: one exact 16-bit sample value (per channel) is transparent.
        key = np.frombuffer(png.trns, dtype=">u2").astype(np.uint16)
        alpha = (~np.all(samples == key, axis=-1)).astype(np.float32)
    rgb = _gray3(values[..., 0]) if png.colour_type in (0, 4) else values

    exif_raw = (_EXIF_HEADER + png.exif) if png.exif else None
    orientation = 1
    if exif_raw:
        with contextlib.suppress(Exception):  # unreadable EXIF: keep the stored orientation
            orientation = _orientation_of(exif_raw)
    rgb = _apply_orientation(rgb, orientation)
    if alpha is not None:
        alpha = _apply_orientation(alpha, orientation)
    return LoadedImage(
        rgb=np.ascontiguousarray(rgb, dtype=np.float32),
        alpha=None if alpha is None else np.ascontiguousarray(alpha, dtype=np.float32),
        bit_depth=16,
        is_gray=png.colour_type in (0, 4),
        format="PNG",
        icc_profile=icc,
        exif=_exif_without_orientation(exif_raw),
        source_mode=im.mode,
        path=path,
    )


def _orientation_of(exif_raw: bytes) -> int:
    exif = Image.Exif()
    exif.load(exif_raw)
    return int(exif.get(_EXIF_ORIENTATION, 1))


def _apply_orientation(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Turn an H×W[×C] array upright for EXIF orientation 1-8 (same result as exif_transpose)."""
    ops: dict[int, Callable[[np.ndarray], np.ndarray]] = {
        2: lambda a: a[:, ::-1],  # mirrored horizontally
        3: lambda a: a[::-1, ::-1],  # rotated 180°
        4: lambda a: a[::-1],  # mirrored vertically
        5: lambda a: a.swapaxes(0, 1),  # transpose
        6: lambda a: np.rot90(a, -1),  # needs 90° clockwise
        7: lambda a: np.rot90(a, 2).swapaxes(0, 1),  # transverse
        8: lambda a: np.rot90(a, 1),  # needs 90° counter-clockwise
    }
    op = ops.get(orientation)
    return arr if op is None else np.ascontiguousarray(op(arr))


def _decode_png16(png: _Png) -> np.ndarray:
    """IDAT of a 16-bit PNG → uint16 array H×W×channels."""
    channels = _CHANNELS[png.colour_type]
    bpp = 2 * channels
    w, h = png.width, png.height
    if png.interlace == 0:
        passes = [(0, 0, 1, 1, w, h)]
    elif png.interlace == 1:
        passes = []
        for x0, y0, dx, dy in _ADAM7:
            pw, ph = (w - x0 + dx - 1) // dx, (h - y0 + dy - 1) // dy
            if pw > 0 and ph > 0:
                passes.append((x0, y0, dx, dy, pw, ph))
    else:
        raise ValueError(f"unknown interlace method {png.interlace}")
    expected = sum(ph * (1 + pw * bpp) for *_, pw, ph in passes)
    # max_length: never inflate more than the image needs, whatever the stream claims.
    raw = zlib.decompressobj().decompress(png.idat, expected)
    if len(raw) < expected:
        raise ValueError("compressed image data ends early (file truncated)")
    out = np.empty((h, w, channels), dtype=np.uint16)
    pos = 0
    for x0, y0, dx, dy, pw, ph in passes:
        size = ph * (1 + pw * bpp)
        rows = _unfilter(raw[pos : pos + size], ph, pw, bpp)
        pos += size
        samples = np.frombuffer(rows.tobytes(), dtype=">u2").reshape(ph, pw, channels)
        out[y0::dy, x0::dx] = samples
    return out


_BAND_ROWS = 256


def _unfilter(data: bytes, height: int, width: int, bpp: int) -> np.ndarray:
    """Reverse PNG scanline filters (None/Sub/Up/Average/Paeth) → uint8 array H×(W·bpp).

    Sub/Up-only bands are reversed row by row with vector ops. Average and Paeth make each byte
    depend on its left, upper and upper-left neighbours, so those bands are swept along
    anti-diagonals: all pixels with the same x + y are independent and done in one vector step
    (a band of B rows costs W + B steps instead of W·B scalar steps).
    """
    stride = width * bpp
    buf = np.frombuffer(data, dtype=np.uint8).reshape(height, stride + 1)
    ftypes = buf[:, 0]
    if ftypes.size and int(ftypes.max()) > 4:
        raise ValueError(f"invalid PNG filter type {int(ftypes.max())}")
    filt = buf[:, 1:].reshape(height, width, bpp)
    out = np.empty((height, width, bpp), dtype=np.uint8)
    prev = np.zeros((width, bpp), dtype=np.uint8)
    for r0 in range(0, height, _BAND_ROWS):
        r1 = min(height, r0 + _BAND_ROWS)
        band_types = ftypes[r0:r1]
        if int(band_types.max()) <= 2:
            for y in range(r0, r1):
                t = int(ftypes[y])
                if t == 0:
                    out[y] = filt[y]
                elif t == 1:
                    out[y] = np.cumsum(filt[y], axis=0, dtype=np.uint8)  # uint8 sums wrap mod 256
                else:
                    out[y] = filt[y] + prev
                prev = out[y]
        else:
            out[r0:r1] = _unfilter_wavefront(filt[r0:r1], band_types, prev)
            prev = out[r1 - 1]
    return out.reshape(height, stride)


def _unfilter_wavefront(filt: np.ndarray, ftypes: np.ndarray, prev: np.ndarray) -> np.ndarray:
    """Reverse filters for one band of rows (h×w×bpp) given the reconstructed row above it."""
    h, w, bpp = filt.shape
    # Skewed layout: pixel (y, x) lives at S[y + 1, x + y + 2]; row 0 holds the row above the
    # band, column 0/1 pad the left edge, so every neighbour of diagonal d is at column d or d+1.
    skew = np.zeros((h + 1, w + h + 1, bpp), dtype=np.int16)
    fskew = np.zeros_like(skew)
    skew[0, 1 : 1 + w] = prev
    for y in range(h):
        fskew[y + 1, y + 2 : y + 2 + w] = filt[y]
    t = ftypes.astype(np.int16)[:, None]
    present = set(np.unique(ftypes).tolist())
    for d in range(w + h - 1):
        y0, y1 = max(0, d - w + 1), min(h - 1, d)
        rows, above = slice(y0 + 1, y1 + 2), slice(y0, y1 + 1)
        a = skew[rows, d + 1]  # left
        b = skew[above, d + 1]  # up
        c = skew[above, d]  # up-left
        tt = t[y0 : y1 + 1]
        pred = np.zeros_like(a)
        if 1 in present:
            pred = np.where(tt == 1, a, pred)
        if 2 in present:
            pred = np.where(tt == 2, b, pred)
        if 3 in present:
            pred = np.where(tt == 3, (a + b) >> 1, pred)
        if 4 in present:
            pa, pb, pc = np.abs(b - c), np.abs(a - c), np.abs(a + b - 2 * c)
            paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
            pred = np.where(tt == 4, paeth, pred)
        skew[rows, d + 2] = (fskew[rows, d + 2] + pred) & 0xFF
    out = np.empty((h, w, bpp), dtype=np.uint8)
    for y in range(h):
        out[y] = skew[y + 1, y + 2 : y + 2 + w]
    return out


# --------------------------------------------------------------------------------------------
# header probe (for output planning)
# --------------------------------------------------------------------------------------------


def probe_image(path: str | os.PathLike[str]) -> ImageProbe | None:
    """Format / alpha / depth / grayness from the file header only; None if it is not readable."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            fmt = "JPEG" if im.format == "MPO" else (im.format or "unknown")
            mode = im.mode
            transparent = im.info.get("transparency") is not None
            bit_depth = 16 if mode in _HIGH_DEPTH_MODES else 8
            is_gray = mode in _GRAY_MODES
            if fmt == "PNG":
                header = _png_header(path)
                if header is not None and header[0] == 16:
                    bit_depth = 16
                    is_gray = header[1] in (0, 4)
            return ImageProbe(fmt, mode in _ALPHA_MODES or transparent, bit_depth, is_gray)
    except Exception:  # noqa: BLE001 - any failure just means "unknown"; read_image reports it
        return None


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def format_for_path(path: str | os.PathLike[str]) -> str:
    """Output format named by a file extension (``.jpg`` → "JPEG"); ValueError if none."""
    ext = Path(path).suffix.lower()
    try:
        return _EXTENSION_FORMAT[ext]
    except KeyError:
        known = ", ".join(sorted(_EXTENSION_FORMAT))
        raise ValueError(
            f"{path}: cannot tell the output format from extension {ext!r}; use one of {known}"
        ) from None


def resolve_output_format(fmt: str, *, has_alpha: bool, bit_depth: int, gray: bool) -> str:
    """The format actually written when ``fmt`` cannot hold the image (the documented fallbacks).

    * alpha + JPEG → PNG (JPEG has no alpha channel);
    * 16-bit + JPEG/WEBP → PNG (8-bit formats);
    * 16-bit + TIFF → PNG unless the image is plain grayscale (Pillow writes 16-bit TIFF only as
      single-channel ``I;16``).
    """
    fmt = fmt.upper()
    if fmt not in FORMAT_EXTENSIONS:
        raise ValueError(f"unsupported output format {fmt!r}; use one of {', '.join(FORMAT_EXTENSIONS)}")
    if has_alpha and fmt == "JPEG":
        return "PNG"
    if bit_depth == 16 and fmt in ("JPEG", "WEBP"):
        return "PNG"
    if bit_depth == 16 and fmt == "TIFF" and (has_alpha or not gray):
        return "PNG"
    return fmt


def write_image(
    path: str | os.PathLike[str],
    rgb: np.ndarray,
    alpha: np.ndarray | None = None,
    *,
    bit_depth: int = 8,
    gray: bool = False,
    icc_profile: bytes | None = None,
    exif: bytes | None = None,
    format: str | None = None,  # noqa: A002 - mirrors Pillow's keyword
    quality: int = 95,
) -> Path:
    """Write ``rgb`` (float H×W×3 or H×W in [0, 1]) and optional ``alpha`` atomically; returns the final path.

    ``format`` defaults to the one named by the extension. When that format cannot hold the image
    (see :func:`resolve_output_format`) the PNG fallback is used and the extension is replaced by
    ``.png``: the returned path is the file actually written. ``gray=True`` writes one channel
    (``L`` / ``LA`` / 16-bit gray), converting RGB with the ITU-R 601 luma weights Pillow uses.
    ``bit_depth=16`` keeps 16 bits per sample (PNG, or gray TIFF). Values are clipped to [0, 1]
    and rounded (not truncated). ICC profiles are embedded when their colour space matches what
    is stored (a GRAY profile is dropped when gray is written as RGB, e.g. WebP); EXIF is embedded
    without the orientation tag and with the pixel-dimension tags set to the written size. JPEG is
    written with 4:4:4 chroma at quality ≥ 90; WebP is lossy at ``quality``; TIFF uses deflate and
    keeps only the descriptive IFD0 EXIF tags (make, model, date, artist, ...), not the Exif/GPS
    sub-directories (Pillow's TIFF writer cannot re-write them).
    """
    path = Path(path)
    requested = (format or format_for_path(path)).upper()
    if bit_depth not in (8, 16):
        raise ValueError(f"{path}: bit_depth must be 8 or 16, got {bit_depth}")
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"{path}: quality must be in 1..100, got {quality}")
    colour = _validated_pixels(path, rgb, "rgb")
    if colour.ndim == 2:
        colour = colour[..., None]
    if colour.shape[2] not in (1, 3):
        raise ValueError(f"{path}: rgb must be H×W×3 or H×W, got shape {np.shape(rgb)}")
    planes: list[np.ndarray]
    if gray:
        luma = (
            colour[..., 0] if colour.shape[2] == 1 else colour @ np.array([0.299, 0.587, 0.114], np.float32)
        )
        planes = [np.clip(luma, 0.0, 1.0)]
    else:
        planes = [colour[..., 0]] * 3 if colour.shape[2] == 1 else [colour[..., i] for i in range(3)]
    if alpha is not None:
        a = _validated_pixels(path, alpha, "alpha")
        if a.shape != colour.shape[:2]:
            raise ValueError(
                f"{path}: alpha shape {a.shape} does not match the image size {colour.shape[:2]}"
            )
        planes.append(a)
    fmt = resolve_output_format(requested, has_alpha=alpha is not None, bit_depth=bit_depth, gray=gray)
    final = path
    if fmt != requested:
        final = path.with_suffix(FORMAT_EXTENSIONS[fmt][0])
        logger.info("%s: %s cannot hold this image; writing %s instead", path, requested, final.name)

    scale = 65535.0 if bit_depth == 16 else 255.0
    samples = np.rint(np.stack(planes, axis=-1) * scale).astype(np.uint16 if bit_depth == 16 else np.uint8)
    height, width = samples.shape[:2]
    stored_gray = gray and fmt != "WEBP"  # WebP has no grayscale mode; Pillow stores RGB
    icc = _matching_icc(icc_profile, stored_gray, path)
    exif_out = _exif_for_output(exif, width, height, path)

    if bit_depth == 16 and fmt == "PNG":
        data = _encode_png16(samples, icc=icc, exif=exif_out.tobytes() if exif_out is not None else None)
        atomic_write(final, lambda f: f.write(data))
        return final

    image = _to_pil(samples)
    params: dict[str, object] = {}
    if icc is not None:
        params["icc_profile"] = icc
    if exif_out is not None:
        params["exif"] = exif_out
    if fmt == "JPEG":
        params.update(quality=int(quality), subsampling=0 if quality >= 90 else -1)
    elif fmt == "WEBP":
        params.update(quality=int(quality))
    elif fmt == "TIFF":
        params.update(compression="tiff_adobe_deflate")
        if exif_out is not None:
            params["exif"] = _tiff_safe_exif(exif_out)
    elif fmt == "PNG":
        params.update(compress_level=6)
    atomic_write(final, lambda f: image.save(f, format=fmt, **params))
    return final


def _validated_pixels(path: Path, arr: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(arr)
    if not np.issubdtype(a.dtype, np.floating):
        raise TypeError(f"{path}: {name} must be a float array in [0, 1], got dtype {a.dtype}")
    if a.ndim not in (2, 3) or (name == "alpha" and a.ndim != 2) or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{path}: {name} has unusable shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{path}: {name} contains NaN or infinite values (the processing step diverged?)")
    return np.clip(a.astype(np.float32, copy=False), 0.0, 1.0)


def _to_pil(samples: np.ndarray) -> Image.Image:
    # Pillow infers the mode from dtype and channel count: uint16 H×W → "I;16" (only plain gray
    # reaches here at 16 bits, for TIFF), uint8 H×W / ×2 / ×3 / ×4 → L / LA / RGB / RGBA.
    if samples.shape[2] == 1:
        return Image.fromarray(np.ascontiguousarray(samples[..., 0]))
    return Image.fromarray(np.ascontiguousarray(samples))


def _matching_icc(icc: bytes | None, stored_gray: bool, path: Path) -> bytes | None:
    """Keep a profile only if it describes the stored channels (a mismatch confuses viewers)."""
    if not icc:
        return None
    space = _icc_colour_space(icc)
    if (space == "GRAY") == stored_gray and space in ("GRAY", "RGB"):
        return icc
    logger.info(
        "%s: not embedding the %s ICC profile in a %s image", path, space, "gray" if stored_gray else "RGB"
    )
    return None


def _exif_for_output(exif: bytes | None, width: int, height: int, path: Path) -> Image.Exif | None:
    if not exif:
        return None
    out = Image.Exif()
    try:
        out.load(exif)
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types on malformed EXIF
        logger.warning("%s: not embedding unreadable EXIF (%s)", path, exc)
        return None
    out.pop(_EXIF_ORIENTATION, None)  # the pixels we write are upright
    for tag, value in ((0x0100, width), (0x0101, height)):
        if tag in out:
            out[tag] = value
    sub = out.get_ifd(_EXIF_IFD)
    for tag, value in ((0xA002, width), (0xA003, height)):
        if tag in sub:
            sub[tag] = value
    return out


# IFD0 tags that describe the picture rather than the TIFF layout. Pillow's libtiff writer fails
# on EXIF sub-IFD pointers taken from another file, so TIFF output keeps only these.
_TIFF_EXIF_TAGS = (0x010E, 0x010F, 0x0110, 0x0131, 0x0132, 0x013B, 0x8298)


def _tiff_safe_exif(exif: Image.Exif) -> Image.Exif:
    safe = Image.Exif()
    for tag in _TIFF_EXIF_TAGS:
        if tag in exif:
            safe[tag] = exif[tag]
    return safe


def _encode_png16(samples: np.ndarray, *, icc: bytes | None, exif: bytes | None) -> bytes:
    """uint16 H×W×C (C = 1, 2, 3, 4) → 16-bit PNG bytes, adaptive filtering per scanline."""
    height, width, channels = samples.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    bpp = 2 * channels
    raw = np.ascontiguousarray(samples.astype(">u2")).view(np.uint8).reshape(height, width * bpp)
    comp = zlib.compressobj(6)
    parts: list[bytes] = []
    prev = np.zeros(width * bpp, dtype=np.uint8)
    for r0 in range(0, height, 64):
        block = raw[r0 : r0 + 64]
        filtered = _filter_rows(block, prev, bpp)
        parts.append(comp.compress(filtered.tobytes()))
        prev = block[-1]
    parts.append(comp.flush())
    idat = b"".join(parts)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    out = [_PNG_SIGNATURE, chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0))]
    if icc:
        out.append(chunk(b"iCCP", b"ICC profile\x00\x00" + zlib.compress(icc)))
    if exif:
        out.append(chunk(b"eXIf", exif[len(_EXIF_HEADER) :] if exif.startswith(_EXIF_HEADER) else exif))
    step = 1 << 20
    out.extend(chunk(b"IDAT", idat[i : i + step]) for i in range(0, max(len(idat), 1), step))
    out.append(chunk(b"IEND", b""))
    return b"".join(out)


def _filter_rows(block: np.ndarray, prev: np.ndarray, bpp: int) -> np.ndarray:
    """Filter a block of scanlines, choosing per row the filter with the smallest sum of |byte|
    (as signed), the heuristic libpng uses; rows are (1 + stride) bytes with the type first."""
    x = block.astype(np.int16)
    b = np.vstack([prev[None].astype(np.int16), x[:-1]])
    a = np.zeros_like(x)
    a[:, bpp:] = x[:, :-bpp]
    c = np.zeros_like(b)
    c[:, bpp:] = b[:, :-bpp]
    pa, pb, pc = np.abs(b - c), np.abs(a - c), np.abs(a + b - 2 * c)
    paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
    candidates = np.stack([x, x - a, x - b, x - ((a + b) >> 1), x - paeth]) & 0xFF  # 5×rows×stride
    signed = np.minimum(candidates, 256 - candidates)
    choice = signed.sum(axis=2).argmin(axis=0)
    rows = candidates[choice, np.arange(x.shape[0])].astype(np.uint8)
    return np.concatenate([choice.astype(np.uint8)[:, None], rows], axis=1)


# --------------------------------------------------------------------------------------------
# alpha
# --------------------------------------------------------------------------------------------

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def upscale_alpha(alpha: np.ndarray, size: tuple[int, int], method: str = "bicubic") -> np.ndarray:
    """Resize an H×W alpha plane to ``size`` = (height, width) in float precision, clipped to [0, 1].

    ``size`` is (height, width) so ``upscale_alpha(alpha, sr_rgb.shape[:2])`` just works. A learned
    alpha upscaler (e.g. running the SR model on alpha as gray) is the caller's choice.
    """
    if method not in _RESAMPLE:
        raise ValueError(f"unknown alpha resize method {method!r}; use one of {', '.join(_RESAMPLE)}")
    a = np.asarray(alpha, dtype=np.float32)
    if a.ndim != 2:
        raise ValueError(f"alpha must be H×W, got shape {a.shape}")
    height, width = (int(v) for v in size)
    if height <= 0 or width <= 0:
        raise ValueError(f"target size must be positive (height, width), got {size}")
    if (height, width) == a.shape:
        return a.copy()
    resized = Image.fromarray(np.ascontiguousarray(a)).resize((width, height), _RESAMPLE[method])
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)
