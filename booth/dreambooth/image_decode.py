"""Decoding one photo with memory bounded by the training resolution, and saying why a file
cannot be used (a code and a reason) from what its bytes are, not what it is named.

Memory (figures from benchmarks/odd_images.py):
- No header may claim more than `max_pixels` (80 MP).
- What gets decoded may be at most (WHOLE_DECODE_SIDE x resolution)^2 pixels, 26 MP at 512 px,
  checked on the header before a byte is decoded. Baseline JPEG is decoded by libjpeg at
  1/2, 1/4 or 1/8 scale (`draft`, short side still >= resolution), so a 48 MP phone photo
  decodes at 3 MP; only a very narrow one can exceed the limit. Every other format, and
  progressive JPEG (its decoder keeps every coefficient of the whole picture, ~3 bytes a
  pixel, whatever the scale), is decoded whole: a 24 MP camera export passes, a 75 MP PNG of
  219 KB is refused at once.
- Right after decoding, the picture is reduced by an integer factor (a box filter) to just
  above the resolution; orientation, colour conversion and cropping work on that small copy,
  and the duplicate hash reads the decoded pixels in bands, never as one more full copy.
- Pillow's warnings (e.g. "Corrupt EXIF data") become notes on the file, never stderr.
"""

from __future__ import annotations

import hashlib
import io
import struct
import warnings
import zlib
from dataclasses import dataclass

from PIL import ExifTags, Image, ImageCms, UnidentifiedImageError

# Photo formats Pillow decodes. Anything else it happens to open (icons, PSD, EPS, FITS...) is
# refused: those are rarely photos and some need external programs to decode.
SUPPORTED_FORMATS = {"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "DIB", "TIFF", "PPM",
                     "TGA", "JPEG2000", "AVIF", "HEIF"}
MAX_PIXELS = 80_000_000   # a 200 MP phone mode is the only real photo above this
WHOLE_DECODE_SIDE = 10    # formats decoded whole: at most (10 x resolution)^2 pixels
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff",
                  ".heic", ".heif", ".avif", ".jfif"}
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError,
                 TypeError, struct.error, zlib.error, MemoryError)
_HASH_BAND_BYTES = 4 * 2**20


class Reject(Exception):
    """This file cannot be used: a short stable code and one sentence for a person."""

    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code, self.reason = code, reason


@dataclass
class Decoded:
    image: Image.Image               # RGB, oriented, short side >= resolution if the photo is
    original_size: tuple[int, int]   # width, height as displayed (oriented), before reducing
    pixel_hash: str                  # of the decoded pixels: equal for a re-saved copy


@dataclass
class _File:
    name: str       # for messages: its suffix tells what it claims to be
    head: bytes     # the first 1 KB: what it really is
    tail: bytes     # the last 4 KB: whether it ends where its format ends
    size: int


def decode_photo(fp, name: str, resolution: int, max_pixels: int, notes: list[str]) -> Decoded:
    """Decode the open file `fp` (seekable), or raise Reject; warnings go to `notes`."""
    file = _read_ends(fp, name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # Our own limits replace Pillow's bomb warning; its hard error is still caught.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        decoded = _decode(fp, file, resolution, max_pixels, notes)
    for text in dict.fromkeys(" ".join(str(w.message).split()) for w in caught):
        notes.append(f"Pillow warned while reading it: {text}")
    return decoded


def _read_ends(fp, name: str) -> _File:
    head = fp.read(1024)
    size = fp.seek(0, io.SEEK_END)
    fp.seek(max(0, size - 4096))
    tail = fp.read()
    fp.seek(0)
    return _File(name, head, tail, size)


def _decode(fp, file: _File, resolution: int, max_pixels: int, notes: list[str]) -> Decoded:
    _probe(fp, file, resolution, max_pixels)
    fp.seek(0)
    image = Image.open(fp)
    header_size, source_mode = image.size, image.mode
    frames = getattr(image, "n_frames", 1)
    if frames > 1 and image.format != "MPO":  # MPO: phone JPEG + depth map, not a movie
        notes.append(f"has {frames} frames (animated or multi-page); used the first")
    try:
        # JPEG only: decode at a reduced scale still >= resolution (much faster, less memory);
        # every byte of the stream is still decoded, so truncation is still caught.
        image.draft(None, (resolution, resolution))
        image.load()
    except DECODE_ERRORS as error:
        raise decode_failure(error, file) from None
    orientation = _orientation(image, notes)
    pixel_hash = _pixel_hash(image, orientation)  # turned otherwise, it is another picture
    image = to_rgb(_reduce(image, resolution), source_mode)  # the full-size copy goes here
    if orientation in _TRANSPOSE:
        image = image.transpose(_TRANSPOSE[orientation])
    swapped = orientation in (5, 6, 7, 8)
    return Decoded(image, header_size[::-1] if swapped else header_size, pixel_hash)


def _probe(fp, file: _File, resolution: int, max_pixels: int) -> None:
    """Identify the format and check the header and checksums, before the full decode."""
    try:
        probe = Image.open(fp)
    except Image.DecompressionBombError as error:
        raise Reject("too_many_pixels", f"decompression bomb refused by Pillow: {error}") \
            from None
    except UnidentifiedImageError:
        raise _unidentified(file) from None
    except DECODE_ERRORS as error:
        raise decode_failure(error, file) from None
    if probe.format not in SUPPORTED_FORMATS:
        raise Reject("unsupported_format",
                     f"{probe.format} images are not supported; use JPEG, PNG or WebP")
    _check_pixels(probe, resolution, max_pixels)
    try:
        probe.verify()  # checksums (PNG CRCs) that load() alone does not check
    except DECODE_ERRORS as error:
        raise decode_failure(error, file) from None


def _check_pixels(probe: Image.Image, resolution: int, max_pixels: int) -> None:
    width, height = probe.size
    pixels = width * height
    if pixels > max_pixels:
        raise Reject("too_many_pixels",
                     f"header claims {width}x{height} px ({pixels / 1e6:.0f} MP), above the "
                     f"{max_pixels / 1e6:.0f} MP limit: a decompression bomb or far larger "
                     "than training needs")
    side = WHOLE_DECODE_SIDE * resolution
    decoded = pixels / _draft_scale(probe, resolution) ** 2
    if decoded > side * side:
        baseline = probe.format in ("JPEG", "MPO") and not probe.info.get("progressive")
        what = "JPEG" if baseline else (
            "progressive JPEG" if probe.format in ("JPEG", "MPO") else probe.format)
        hint = "crop or downscale it" if baseline else (
            "downscale it, or save it as a baseline JPEG (decoded at reduced size)")
        raise Reject("too_many_pixels",
                     f"{what} of {width}x{height} px would be decoded at {decoded / 1e6:.1f} MP; "
                     f"for {resolution} px training booth decodes at most {side * side / 1e6:.1f}"
                     f" MP ({side}x{side}): {hint}")


def _draft_scale(probe: Image.Image, resolution: int) -> int:
    """How much smaller libjpeg will decode it: 1, 2, 4 or 8 (short side stays >= resolution).
    Progressive JPEG keeps every coefficient whatever the scale, so it counts as 1."""
    if probe.format not in ("JPEG", "MPO") or probe.info.get("progressive"):
        return 1
    scale = 1
    while scale < 8 and min(probe.size) // (scale * 2) >= resolution:
        scale *= 2
    return scale


def _reduce(image: Image.Image, resolution: int) -> Image.Image:
    """Shrink by the largest integer factor that keeps the short side >= resolution."""
    factor = min(image.size) // resolution
    if factor < 2:
        return image
    if image.mode == "1":
        image = image.convert("L")
    elif image.mode in ("P", "PA"):  # palette indices cannot be averaged; colours can
        has_alpha = image.mode == "PA" or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
    elif image.mode.startswith("I;16"):
        image = image.convert("I")  # to_rgb still scales it as 16-bit (source_mode)
    return image.reduce(factor)


def _pixel_hash(image: Image.Image, orientation: int) -> str:
    digest = hashlib.sha256(f"{image.mode} {image.size} {orientation}".encode())
    if image.mode in ("P", "PA"):  # indices alone say nothing of the colours
        digest.update(bytes(image.getpalette() or []) + repr(image.info.get("transparency"))
                      .encode())
    width, height = image.size
    band = max(1, _HASH_BAND_BYTES // max(1, width * 4))
    for top in range(0, height, band):
        digest.update(image.crop((0, top, width, min(height, top + band))).tobytes())
    return digest.hexdigest()


# EXIF orientation values (how the stored picture must be turned to be displayed).
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
              6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}


def _orientation(image: Image.Image, notes: list[str]) -> int:
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception as error:  # a broken EXIF block must not cost the photo
        notes.append(f"EXIF orientation unreadable ({error}); used as stored")
        return 1
    if value not in (1, *_TRANSPOSE):
        notes.append(f"EXIF orientation {value!r} is not a valid value; used as stored")
        return 1
    return value


def decode_failure(error: Exception, file: _File) -> Reject:
    text = str(error) or type(error).__name__
    fmt = _magic_format(file.head)
    ends = _ends_properly(fmt, file)
    if ends is False or (ends is None and "truncat" in text.lower()):
        return Reject("truncated", f"truncated: the {fmt or 'file'} ends early ({text})")
    return Reject("corrupt", f"corrupt: damaged {fmt or 'image'} data that cannot be decoded "
                             f"({text})")


def _magic_format(head: bytes) -> str | None:
    """The format the first bytes announce (signatures that text cannot start with)."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "WebP"
    if head.startswith((b"II*\0", b"MM\0*")):
        return "TIFF"
    return None


def _ends_properly(fmt: str | None, file: _File) -> bool | None:
    """Whether the file ends where its format says it ends (None: cannot tell)."""
    if fmt == "PNG":
        return b"IEND\xaeB`\x82" in file.tail
    if fmt == "JPEG":
        return file.tail.rstrip(b"\0\xff\r\n").endswith(b"\xff\xd9")
    if fmt == "GIF":
        return file.tail.rstrip(b"\0\r\n").endswith(b";")
    if fmt == "WebP":
        return int.from_bytes(file.head[4:8], "little") + 8 <= file.size
    return None


_HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"}


def _unidentified(file: _File) -> Reject:
    """Why Pillow could not identify a file, from its first bytes."""
    fmt = _magic_format(file.head)
    if fmt:  # the signature is there, so it is that image, damaged
        if _ends_properly(fmt, file) is False:
            return Reject("truncated", f"truncated: starts like a {fmt} image but ends early, "
                                       "before its header is complete")
        return Reject("corrupt", f"corrupt: starts like a {fmt} image, but its header is "
                                 "damaged (Pillow cannot read it)")
    return Reject(*_sniff(file))


def _sniff(file: _File) -> tuple[str, str]:
    head = file.head
    lowered = head.lstrip().lower()
    suffix = "." + file.name.rsplit(".", 1)[-1].lower() if "." in file.name else ""
    named = f"named {suffix} but " if suffix in IMAGE_SUFFIXES else ""
    if head.startswith(b"%PDF"):
        return "not_image", f"{named}a PDF document, not an image; export it as JPEG or PNG"
    if head[4:8] == b"ftyp":
        if head[8:12] in _HEIF_BRANDS:
            return "unsupported_format", ("HEIC/HEIF photo, which this Pillow cannot read; "
                                          "export it as JPEG (iPhone: Settings > Camera > "
                                          "Formats > Most Compatible)")
        return "not_image", f"{named}a video (MP4/MOV), not a photo"
    if b"<svg" in lowered:
        return "unsupported_format", "SVG vector drawing; render it to PNG first"
    if lowered.startswith((b"<!doctype html", b"<html")) or b"<html" in lowered[:200]:
        return "not_image", f"{named}an HTML page (a saved web page, not the image itself)"
    if head.startswith(b"PK\x03\x04"):
        return "not_image", f"{named}a ZIP archive; unpack it first"
    if b"\0" not in head:
        try:
            head.decode("utf-8")
            return "not_image", f"{named}a text file, not an image"
        except UnicodeDecodeError:
            pass
    return "not_image", f"{named}not a recognised image format"


def to_rgb(image: Image.Image, source_mode: str | None = None) -> Image.Image:
    """8-bit RGB from any Pillow mode: 16-bit scaled (not clipped), alpha over white.
    `source_mode`: the mode as decoded, when `image` was converted since (I;16 -> I)."""
    import numpy as np

    mode = image.mode
    if mode.startswith("I") or mode == "F":
        values = _to_uint8(np.asarray(image), source_mode or mode)
        return Image.fromarray(values, "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    icc = image.info.get("icc_profile")
    if icc and mode in ("RGB", "CMYK"):
        try:  # e.g. Display P3 phone photos, print CMYK: map the colours, not just the numbers
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"),
                                             outputMode="RGB")
        except Exception:  # a broken profile: fall back to the plain conversion
            pass
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise Reject("unsupported_mode", f"colour mode {mode} cannot be converted ({error})") \
            from None


def _to_uint8(values, mode: str):
    """Scale 16/32-bit or float pixels to 0..255 by their range, never by clipping."""
    import numpy as np

    values = np.nan_to_num(values.astype(np.float64))
    top = float(values.max()) if values.size else 0.0
    if mode.startswith("I;16"):
        scale = 65535.0  # the format says 16-bit, however dark this picture is
    elif mode == "F" and top <= 1.0:
        scale = 1.0      # floats in 0..1
    elif top <= 255:
        scale = 255.0    # 8-bit values stored in a wider type
    elif top <= 65535:
        scale = 65535.0  # 16-bit data opened as 32-bit "I"
    else:
        scale = top
    return np.clip(np.rint(values / scale * 255), 0, 255).astype(np.uint8)
