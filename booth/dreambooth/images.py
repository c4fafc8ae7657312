"""Preparing subject photos for DreamBooth, honestly.

Every file under the source folder ends up in exactly one of two lists: kept (EXIF-oriented,
converted to RGB, center-cropped and resized to the training resolution, written as
`images/0001.png`...) or rejected with a short code and a reason a person can act on.
The source folder is only ever read. One bad file never stops the others.

Decisions (documented here because the tool's result depends on them):
- Hidden files and folders (.DS_Store, macOS `._*` files, .git) are rejected with code
  `hidden`, so every entry of the folder is accounted for; hidden folders are not entered.
- Symlinks are followed; broken ones and links back to a folder already scanned are rejected.
- Too small: the shorter side is below half the resolution (256 px for 512). Between that and
  the resolution the photo is upscaled, with a warning that it may look soft.
- Animated images (GIF, APNG, WebP) and multi-page TIFFs: the first frame is used, with a
  warning.
- Size limit: `max_pixels` (80 MP) is checked on the header, before anything is decoded, and
  Pillow's own bomb error is caught; Pillow's global limit is left as it is.
- Duplicates: same file bytes, or the same decoded pixels, as a file kept earlier (in sorted
  path order) are rejected, naming that file.
- Known gap: a JPEG with damaged bytes in the middle often still decodes (libjpeg only warns),
  so it cannot be told from a good one; truncated JPEGs and damaged PNGs are caught.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
import struct
import warnings
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff",
                  ".heic", ".heif", ".avif", ".jfif"}
# Photo formats Pillow decodes. Anything else it happens to open (icons, PSD, EPS, FITS...) is
# refused: those are rarely photos and some need external programs to decode.
SUPPORTED_FORMATS = {"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "DIB", "TIFF", "PPM",
                     "TGA", "JPEG2000", "AVIF", "HEIF"}
MAX_PIXELS = 80_000_000          # a 200 MP phone mode is the only real photo above this
MAX_FILE_BYTES = 256 * 2**20     # a file is read whole into memory; videos stop here
MIN_SIDE_FRACTION = 0.5          # shorter side below resolution * this -> rejected
EXTREME_ASPECT = 2.0             # long/short above this -> the square crop loses a lot
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError,
                  TypeError, struct.error, zlib.error, MemoryError)


@dataclass
class Rejection:
    file: str      # path relative to the source folder
    code: str      # short, stable: not_image, empty, corrupt, truncated, too_small, ...
    reason: str    # one sentence for a person


@dataclass
class KeptImage:
    file: str            # relative to out_dir: "images/0001.png"
    source: str          # absolute path of the original
    sha256: str          # of the prepared PNG, the bytes training reads
    source_sha256: str   # of the original file
    original_size: list[int]  # width, height after EXIF orientation
    warnings: list[str] = field(default_factory=list)


@dataclass
class PrepareReport:
    kept: list[KeptImage] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class _Reject(Exception):
    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code, self.reason = code, reason


def prepare_images(source_dir, out_dir, resolution: int, *, max_pixels: int = MAX_PIXELS,
                   exclude=(), console=None) -> PrepareReport:
    """Prepare every file under `source_dir` into `out_dir/images/NNNN.png` (see module doc).

    `exclude`: folders under `source_dir` not to scan (e.g. booth's own workspace); `out_dir`
    is always excluded. Raises ValueError only when the folders themselves are unusable.
    """
    source = Path(source_dir).expanduser().resolve()
    out = Path(out_dir).resolve()
    if not source.is_dir():
        raise ValueError(f"{source} is not a folder")
    skip = {Path(p).resolve() for p in exclude} | {out}
    inside = out == source or source in out.parents
    if inside and not any(s == out or s in out.parents for s in skip - {out}):
        # Writing there would change the folder we promise only to read.
        raise ValueError(f"output folder {out} is inside the source folder {source}")
    report = PrepareReport()
    files = list(_scan(source, source, skip, {source}, report))
    (out / "images").mkdir(parents=True, exist_ok=True)
    if any((out / "images").iterdir()):  # numbering would collide with what is there
        raise ValueError(f"{out / 'images'} is not empty")
    seen_bytes: dict[str, str] = {}
    seen_pixels: dict[str, str] = {}
    with _progress(console, len(files)) as advance:
        for path in files:
            rel = path.relative_to(source).as_posix()
            try:
                kept = _prepare_one(path, rel, out, resolution, max_pixels, seen_bytes,
                                    seen_pixels, len(report.kept) + 1)
                report.kept.append(kept)
                report.warnings += [f"{rel}: {w}" for w in kept.warnings]
            except _Reject as reject:
                report.rejected.append(Rejection(rel, reject.code, reject.reason))
            except Exception as error:  # never let one file stop the others
                report.rejected.append(Rejection(
                    rel, "error", f"unexpected error while reading it: {type(error).__name__}: "
                                  f"{error}"))
            advance()
    report.rejected.sort(key=lambda r: r.file)
    return report


def _scan(root: Path, folder: Path, skip: set[Path], seen: set[Path], report: PrepareReport):
    """Yield regular files under `folder` in sorted order; record what cannot be a photo."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as error:
        report.rejected.append(Rejection(
            folder.relative_to(root).as_posix() or ".", "unreadable",
            f"folder cannot be listed ({error.strerror or error})"))
        return
    for entry in entries:
        path = Path(entry.path)
        rel = path.relative_to(root).as_posix()
        if entry.name.startswith("."):
            what = "folder, not scanned" if entry.is_dir() else "file (like .DS_Store or ._*)"
            report.rejected.append(Rejection(rel, "hidden", f"hidden {what}"))
            continue
        try:
            info = os.stat(path)  # follows symlinks
        except OSError as error:
            report.rejected.append(_link_problem(path, rel, error))
            continue
        if stat.S_ISDIR(info.st_mode):
            yield from _scan_folder(root, path, rel, skip, seen, report)
        elif stat.S_ISREG(info.st_mode):
            yield path
        else:
            report.rejected.append(Rejection(
                rel, "not_a_file", "not a regular file (a device, pipe or socket)"))


def _scan_folder(root, path: Path, rel: str, skip, seen, report):
    real = path.resolve()
    if real in skip:
        report.warnings.append(f"{rel}: not scanned (booth's own output folder)")
        return
    if real in seen:
        report.rejected.append(Rejection(
            rel, "symlink_loop", f"links to a folder already scanned ({real}); not entered again"))
        return
    seen.add(real)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        if _is_empty_folder(path):
            report.rejected.append(Rejection(
                rel, "directory", "is an empty folder named like an image, not an image file"))
            return
        report.warnings.append(f"{rel}: is a folder named like an image; scanned its contents")
    yield from _scan(root, path, skip, seen, report)


def _is_empty_folder(path: Path) -> bool:
    try:
        with os.scandir(path) as entries:
            return next(entries, None) is None
    except OSError:  # unreadable: _scan reports it when it tries to list it
        return False


def _link_problem(path: Path, rel: str, error: OSError) -> Rejection:
    if error.errno == errno.ELOOP:
        return Rejection(rel, "symlink_loop", "symbolic link loop (the link points to itself)")
    if path.is_symlink():
        return Rejection(rel, "broken_symlink",
                         f"symbolic link to a missing file ({os.readlink(path)})")
    return Rejection(rel, "unreadable", f"cannot be read ({error.strerror or error})")


def _read_file(path: Path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def _prepare_one(path, rel, out, resolution, max_pixels, seen_bytes, seen_pixels, number):
    data = _read_checked(path)
    source_hash = hashlib.sha256(data).hexdigest()
    if source_hash in seen_bytes:
        raise _Reject("duplicate", f"exact duplicate of {seen_bytes[source_hash]} (same bytes)")
    seen_bytes[source_hash] = rel
    notes: list[str] = []
    image, original_size = _decode(data, path, resolution, max_pixels, notes)
    _check_size(original_size, resolution, notes)
    pixel_hash = hashlib.sha256(repr(image.size).encode() + image.tobytes()).hexdigest()
    if pixel_hash in seen_pixels:
        raise _Reject("duplicate", f"same pixels as {seen_pixels[pixel_hash]} (a re-saved copy)")
    seen_pixels[pixel_hash] = rel
    square = ImageOps.fit(image, (resolution, resolution), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    square.save(buffer, "PNG")
    name = f"images/{number:04d}.png"
    (out / name).write_bytes(buffer.getvalue())
    return KeptImage(name, str(path), hashlib.sha256(buffer.getvalue()).hexdigest(),
                     source_hash, list(original_size), notes)


def _read_checked(path: Path) -> bytes:
    try:
        size = path.stat().st_size
        if size == 0:
            raise _Reject("empty", "empty file (0 bytes)")
        if size > MAX_FILE_BYTES:
            raise _Reject("too_large", f"file is {size / 2**20:.0f} MB, above the "
                                       f"{MAX_FILE_BYTES // 2**20} MB limit; not a photo")
        return _read_file(path)
    except PermissionError:
        raise _Reject("unreadable", "permission denied (cannot be read)") from None


def _decode(data: bytes, path: Path, resolution: int, max_pixels: int, notes: list[str]):
    """Fully decoded, oriented RGB image and its oriented size before any downscaling."""
    with warnings.catch_warnings():
        # Our own limit below replaces Pillow's warning; its hard error is still caught.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        _probe(data, path, max_pixels)
        image = Image.open(io.BytesIO(data))
        header_size = image.size
        frames = getattr(image, "n_frames", 1)
        if frames > 1 and image.format != "MPO":  # MPO: phone JPEG + depth map, not a movie
            notes.append(f"has {frames} frames (animated or multi-page); used the first")
        try:
            # JPEG only: decode straight at a reduced scale still >= resolution (much faster);
            # every byte of the stream is still decoded, so truncation is still caught.
            image.draft(None, (resolution, resolution))
            image.load()
        except _DECODE_ERRORS as error:
            raise _decode_failure(error) from None
    try:
        oriented = ImageOps.exif_transpose(image)
    except Exception as error:  # a broken EXIF block must not cost the photo
        notes.append(f"EXIF orientation unreadable ({error}); used as stored")
        oriented = image
    swapped = oriented.size != image.size
    return to_rgb(oriented), (header_size[::-1] if swapped else header_size)


def _probe(data: bytes, path: Path, max_pixels: int) -> None:
    """Identify the format and check the header and checksums, before the full decode."""
    try:
        probe = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise _Reject("too_many_pixels", f"decompression bomb refused by Pillow: {error}") \
            from None
    except UnidentifiedImageError:
        raise _Reject(*_sniff(data, path)) from None
    except _DECODE_ERRORS as error:
        raise _decode_failure(error) from None
    if probe.format not in SUPPORTED_FORMATS:
        raise _Reject("unsupported_format",
                      f"{probe.format} images are not supported; use JPEG, PNG or WebP")
    width, height = probe.size
    if width * height > max_pixels:
        raise _Reject("too_many_pixels",
                      f"header claims {width}x{height} px ({width * height / 1e6:.0f} MP), above "
                      f"the {max_pixels / 1e6:.0f} MP limit: a decompression bomb or far larger "
                      "than training needs")
    try:
        probe.verify()  # checksums (PNG CRCs) that load() alone does not check
    except _DECODE_ERRORS as error:
        raise _decode_failure(error) from None


def _decode_failure(error: Exception) -> _Reject:
    text = str(error) or type(error).__name__
    if "truncat" in text.lower():
        return _Reject("truncated", f"truncated: the file ends early ({text})")
    return _Reject("corrupt", f"corrupt: cannot be decoded ({text})")


_HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"}


def _sniff(data: bytes, path: Path) -> tuple[str, str]:
    """Code and reason for a file Pillow cannot identify, from its first bytes."""
    head = data[:1024]
    lowered = head.lstrip().lower()
    named = (f"named {path.suffix} but " if path.suffix.lower() in IMAGE_SUFFIXES else "")
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


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any Pillow mode: 16-bit scaled (not clipped), alpha over white."""
    import numpy as np

    mode = image.mode
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(image), mode), "L").convert("RGB")
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
        raise _Reject("unsupported_mode", f"colour mode {mode} cannot be converted ({error})") \
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


def _check_size(size: tuple[int, int], resolution: int, notes: list[str]) -> None:
    short, long = min(size), max(size)
    minimum = int(resolution * MIN_SIDE_FRACTION)
    if short < minimum:
        raise _Reject("too_small", f"too small: {size[0]}x{size[1]} px; the shorter side must be "
                                   f"at least {minimum} px (half the {resolution} px resolution)")
    if short < resolution:
        notes.append(f"upscaled from {short} px to {resolution} px; it may look soft")
    if long / short > EXTREME_ASPECT:
        kept = short / long
        notes.append(f"aspect ratio {long / short:.1f}:1: the square center crop keeps only "
                     f"{kept:.0%} of it; check the subject is in the middle")


class _progress:
    """A rich progress bar on `console`, or nothing when there is no console."""

    def __init__(self, console, total: int):
        self.console, self.total = console, total

    def __enter__(self):
        if self.console is None:
            return lambda: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.bar = Progress(TextColumn("preparing photos"), BarColumn(), MofNCompleteColumn(),
                            console=self.console, transient=True)
        self.bar.__enter__()
        task = self.bar.add_task("prepare", total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc):
        if self.console is not None:
            self.bar.__exit__(*exc)
