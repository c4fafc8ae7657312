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
- Size and memory: see booth.dreambooth.image_decode. Headers are checked before anything is
  decoded (80 MP for baseline JPEG, decoded at reduced scale; (10 x resolution)^2 for formats
  decoded whole), and files are streamed, never read whole into memory.
- A file whose first bytes are a PNG/JPEG/GIF/WebP/TIFF signature but that cannot be decoded is
  `corrupt` (or `truncated` when it does not end where its format ends), naming the format.
- Duplicates: same file bytes, or the same decoded pixels, as a file kept earlier (in sorted
  path order) are rejected, naming that file. A near-duplicate (a resized or re-encoded copy:
  same difference hash within a few bits and the same colours) is kept with a warning naming
  the earlier file: it weakens the dataset a little, but may be on purpose.
- Captions (kohya's convention): `rex.txt` beside `rex.jpg` is that photo's caption, copied
  beside its prepared image (`images/0001.txt`); one over MAX_CAPTION_BYTES, not UTF-8, empty
  or holding control characters is rejected (code `bad_caption`) and the photo is kept,
  trained with the instance prompt. A caption of a rejected photo is `caption_unused`.
- Known gap: a JPEG with damaged bytes in the middle often still decodes (libjpeg only warns),
  so it cannot be told from a good one; truncated JPEGs and damaged PNGs are caught.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, ImageOps

from booth.dreambooth.errors import DatasetError
from booth.dreambooth.image_decode import IMAGE_SUFFIXES, MAX_PIXELS, decode_photo
from booth.dreambooth.image_decode import Reject as _Reject
from booth.dreambooth.train_data import CAPTION_SUFFIX, CaptionError, read_caption

MAX_FILE_BYTES = 256 * 2**20     # above this it is a video or an archive, not a photo
MIN_SIDE_FRACTION = 0.5          # shorter side below resolution * this -> rejected
EXTREME_ASPECT = 2.0             # long/short above this -> the square crop loses a lot
# Near-duplicates (a resized or re-encoded copy): at most this many of the 64 bits of a
# difference hash differ AND the 8x8 colour thumbnails differ by at most this much on average
# (0-255). The colour test keeps flat or smooth pictures, whose hash bits are noise, apart.
NEAR_DUPLICATE_BITS = 6
NEAR_DUPLICATE_COLOUR = 8.0


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
    caption: str | None = None  # from `<photo>.txt` beside it, copied to images/NNNN.txt


@dataclass
class PrepareReport:
    kept: list[KeptImage] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def prepare_images(source_dir, out_dir, resolution: int, *, max_pixels: int = MAX_PIXELS,
                   exclude=(), console=None) -> PrepareReport:
    """Prepare every file under `source_dir` into `out_dir/images/NNNN.png` (see module doc).

    `exclude`: folders under `source_dir` not to scan (e.g. booth's own workspace); `out_dir`
    is always excluded. Raises DatasetError only when the folders themselves are unusable.
    """
    source = Path(source_dir).expanduser().resolve()
    out = Path(out_dir).resolve()
    if not source.is_dir():
        raise DatasetError(f"{source} is not a folder")
    skip = {Path(p).resolve() for p in exclude} | {out}
    inside = out == source or source in out.parents
    if inside and not any(s == out or s in out.parents for s in skip - {out}):
        # Writing there would change the folder we promise only to read.
        raise DatasetError(f"output folder {out} is inside the source folder {source}")
    report = PrepareReport()
    files = list(_scan(source, source, skip, {source}, report))
    captions = _caption_files(files)
    files = [path for path in files if path not in captions.values()]
    (out / "images").mkdir(parents=True, exist_ok=True)
    if any((out / "images").iterdir()):  # numbering would collide with what is there
        raise DatasetError(f"{out / 'images'} is not empty")
    seen = _Seen()
    with _photo_progress(console, len(files)) as advance:
        for path in files:
            rel = path.relative_to(source).as_posix()
            try:
                kept = _prepare_one(path, rel, out, resolution, max_pixels, seen,
                                    len(report.kept) + 1)
                if path in captions:
                    _copy_caption(path, captions[path].relative_to(source).as_posix(), out,
                                  kept, report)
                report.kept.append(kept)
                report.warnings += [f"{rel}: {w}" for w in kept.warnings]
            except _Reject as reject:
                report.rejected.append(Rejection(rel, reject.code, reject.reason))
                if path in captions:
                    report.rejected.append(Rejection(
                        captions[path].relative_to(source).as_posix(), "caption_unused",
                        f"caption of {rel}, which was rejected"))
            except Exception as error:  # never let one file stop the others
                report.rejected.append(Rejection(
                    rel, "error", f"unexpected error while reading it: {type(error).__name__}: "
                                  f"{error}"))
            advance()
    report.rejected.sort(key=lambda r: r.file)
    return report


def _caption_files(files: list[Path]) -> dict[Path, Path]:
    """{photo: its caption}: a `.txt` file is a caption when a file of the same name but
    another suffix lies beside it (kohya's `<image>.txt`); any other `.txt` is judged as a
    photo (and rejected as not one)."""
    texts = {path.with_suffix(""): path for path in files if path.suffix == CAPTION_SUFFIX}
    return {path: texts[path.with_suffix("")] for path in files
            if path.suffix != CAPTION_SUFFIX and path.with_suffix("") in texts}


def _copy_caption(photo: Path, rel: str, out: Path, kept: KeptImage,
                  report: PrepareReport) -> None:
    """Copy a photo's caption beside its prepared image, or reject the caption (the photo is
    then trained with the instance prompt, which its warning says)."""
    try:
        kept.caption = read_caption(photo)
    except CaptionError as error:
        report.rejected.append(Rejection(rel, "bad_caption", str(error)))
        kept.warnings.append(f"its caption {rel} was rejected ({error}): trained with the "
                             "instance prompt instead")
        return
    (out / kept.file).with_suffix(CAPTION_SUFFIX).write_text(kept.caption + "\n",
                                                             encoding="utf-8")


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


def _open(path: Path):
    return open(path, "rb")


@dataclass
class _Seen:
    """What the files kept so far look like, to find copies among the next ones."""
    bytes: dict[str, str] = field(default_factory=dict)    # sha256 of the file -> file
    pixels: dict[str, str] = field(default_factory=dict)   # hash of decoded pixels -> file
    looks: list[tuple[str, _Look]] = field(default_factory=list)


def _prepare_one(path, rel, out, resolution, max_pixels, seen: _Seen, number):
    notes: list[str] = []
    try:
        with _open(path) as fp:
            source_hash = _checked_hash(fp)
            if source_hash in seen.bytes:
                raise _Reject("duplicate",
                              f"exact duplicate of {seen.bytes[source_hash]} (same bytes)")
            decoded = decode_photo(fp, path.name, resolution, max_pixels, notes)
    except PermissionError:
        raise _Reject("unreadable", "permission denied (cannot be read)") from None
    _check_size(decoded.original_size, resolution, notes)
    if decoded.pixel_hash in seen.pixels:
        raise _Reject("duplicate",
                      f"same pixels as {seen.pixels[decoded.pixel_hash]} (a re-saved copy)")
    square = ImageOps.fit(decoded.image, (resolution, resolution), Image.Resampling.LANCZOS)
    look = _Look.of(square)
    twin = next((file for file, other in seen.looks if look.resembles(other)), None)
    if twin:
        notes.append(f"nearly the same picture as {twin} (a resized or re-encoded copy?): it "
                     "adds little to training; keep one unless they differ on purpose")
    seen.bytes[source_hash] = seen.pixels[decoded.pixel_hash] = rel
    seen.looks.append((rel, look))
    buffer = io.BytesIO()
    square.save(buffer, "PNG")
    name = f"images/{number:04d}.png"
    (out / name).write_bytes(buffer.getvalue())
    return KeptImage(name, str(path), hashlib.sha256(buffer.getvalue()).hexdigest(),
                     source_hash, list(decoded.original_size), notes)


def _checked_hash(fp) -> str:
    """sha256 of the whole file, read in chunks (never held whole in memory)."""
    size = os.fstat(fp.fileno()).st_size
    if size == 0:
        raise _Reject("empty", "empty file (0 bytes)")
    if size > MAX_FILE_BYTES:
        raise _Reject("too_large", f"file is {size / 2**20:.0f} MB, above the "
                                   f"{MAX_FILE_BYTES // 2**20} MB limit; not a photo")
    digest = hashlib.sha256()
    while chunk := fp.read(2**20):
        digest.update(chunk)
    fp.seek(0)
    return digest.hexdigest()


@dataclass
class _Look:
    """A perceptual summary of a prepared square: a 64-bit difference hash (the structure)
    and an 8x8 colour thumbnail (the colours), both blind to resizing and re-encoding."""
    bits: int
    colour: bytes

    @classmethod
    def of(cls, square: Image.Image) -> _Look:
        grey = square.convert("L").resize((9, 8), Image.Resampling.BOX).tobytes()
        bits = 0
        for row in range(8):
            for x in range(8):
                bits = bits << 1 | (grey[row * 9 + x + 1] > grey[row * 9 + x])
        return cls(bits, square.resize((8, 8), Image.Resampling.BOX).tobytes())

    def resembles(self, other: _Look) -> bool:
        differing = (self.bits ^ other.bits).bit_count()
        pairs = zip(self.colour, other.colour, strict=True)
        colour = sum(abs(a - b) for a, b in pairs) / len(self.colour)
        return differing <= NEAR_DUPLICATE_BITS and colour <= NEAR_DUPLICATE_COLOUR


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


@contextmanager
def _photo_progress(console, total: int) -> Iterator[Callable[[], None]]:
    """Yield `advance()`: a bar that disappears when done (the result lists every file)."""
    if console is None:
        yield lambda: None
        return
    from booth.dreambooth.progress import progress_bar

    with progress_bar(console, "preparing photos", transient=True) as bar:
        task = bar.add_task("prepare", total=total)
        yield lambda: bar.advance(task)
