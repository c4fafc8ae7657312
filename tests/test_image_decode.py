"""prepare_images on the files the hardening issue found: a PNG with one damaged byte, a
resized near-duplicate, a corrupt EXIF block, and pictures far larger than training needs
(memory measured in a fresh process)."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from booth.dreambooth.images import prepare_images

RES = 64


def _scene(seed: int, size=(160, 120)) -> Image.Image:
    """A smooth random picture, photo-like: distinct seeds share no structure."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8))
    return coarse.resize(size, Image.Resampling.BICUBIC)


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _flip(data: bytes, offset: int) -> bytes:
    damaged = bytearray(data)
    damaged[offset] ^= 0xFF
    return bytes(damaged)


def _run(folder: Path, tmp_path: Path, resolution: int = RES):
    report = prepare_images(folder, tmp_path / "out", resolution)
    return {r.file: r for r in report.rejected}, report


def _gif_descriptor(gif: bytes) -> int:
    packed = gif[10]  # the global colour table's size follows the 13-byte header
    return 13 + (3 * 2 ** ((packed & 7) + 1) if packed & 0x80 else 0)


def test_damaged_bytes_in_a_known_format_are_reported_as_damaged(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    png = _encode(_scene(1), "PNG")
    gif = _encode(_scene(2), "GIF")
    webp = _encode(_scene(3), "WEBP", lossless=True)
    jpeg = _encode(_scene(4), "JPEG")
    files = {
        "ihdr_width.png": _flip(png, 18),     # a byte of the width: IHDR's CRC fails
        "ihdr_crc.png": _flip(png, 30),       # the IHDR checksum itself
        "chunk_length.png": _flip(png, 33),   # the length of the chunk after IHDR
        "descriptor.gif": _flip(gif, _gif_descriptor(gif)),  # the image separator
        "chunk.webp": _flip(webp, 12),        # the VP8L chunk's name
        "segment.jpg": _flip(jpeg, 4) if jpeg[3] == 0xE0 else _flip(jpeg, 3),
        "renamed_png.jpg": _flip(png, 18),    # the name says JPEG; the bytes say PNG
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / "ok.png").write_bytes(png)
    (folder / "cut.png").write_bytes(png[:40])  # ends inside the header: truncated
    rejected, report = _run(folder, tmp_path)
    assert [k.source for k in report.kept] == [str(folder / "ok.png")]
    formats = {"png": "PNG", "gif": "GIF", "webp": "WebP", "jpg": "JPEG"}
    for name in files:
        expected = "PNG" if name.startswith(("ihdr", "chunk_length", "renamed")) else \
            formats[name.rsplit(".", 1)[1]]
        assert rejected[name].code == "corrupt", (name, rejected[name].reason)
        assert expected in rejected[name].reason, (name, rejected[name].reason)
        assert "not a recognised image format" not in rejected[name].reason
    assert rejected["cut.png"].code == "truncated"


def test_a_resized_copy_is_kept_with_a_warning_naming_the_original(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    original = _scene(10, (400, 300))
    original.save(folder / "a_original.png")
    original.resize((200, 150), Image.Resampling.LANCZOS).save(folder / "b_small.jpg",
                                                                quality=85)
    original.save(folder / "c_resaved.bmp")  # same pixels: still rejected
    for seed in (11, 12, 13):
        _scene(seed, (400, 300)).save(folder / f"other{seed}.png")
    # Flat pictures of different colours must not count as near-duplicates of each other.
    Image.new("RGB", (300, 300), (250, 250, 250)).save(folder / "flat_white.png")
    Image.new("RGB", (300, 300), (200, 30, 30)).save(folder / "flat_red.png")
    rejected, report = _run(folder, tmp_path)
    assert rejected["c_resaved.bmp"].code == "duplicate"
    assert "a_original.png" in rejected["c_resaved.bmp"].reason
    assert len(report.kept) == 7
    near = [w for w in report.warnings if "nearly the same" in w]
    assert len(near) == 1 and near[0].startswith("b_small.jpg:") and "a_original.png" in near[0]


def _exif_jpeg_with_bad_ifd() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    data = bytearray(_encode(_scene(20, (120, 90)), "JPEG", exif=exif))
    ifd = data.index(b"Exif\0\0") + 6
    data[ifd + 8] = 0xFF  # the entry count: the IFD now claims 65281 entries, holds one
    return bytes(data)


def test_corrupt_exif_becomes_a_note_not_stderr(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "exif.jpg").write_bytes(_exif_jpeg_with_bad_ifd())
    code = textwrap.dedent(f"""
        import warnings
        warnings.simplefilter("default")  # what a user's Python shows
        from booth.dreambooth.images import prepare_images
        report = prepare_images({str(folder)!r}, {str(tmp_path / "out")!r}, {RES})
        print(len(report.kept), report.warnings)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", f"Pillow's warning leaked: {done.stderr}"
    assert done.stdout.startswith("1 ")  # kept: the pixels are fine
    assert "exif.jpg: Pillow warned while reading it: Corrupt EXIF data" in done.stdout


def _flat_png(path: Path, width: int, height: int) -> None:
    """A valid, highly compressible RGB PNG of any size, streamed (never held in memory)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    compress = zlib.compressobj(9)
    row = b"\0" + bytes([90, 120, 200]) * width
    idat = b"".join(compress.compress(row) for _ in range(height)) + compress.flush()
    with open(path, "wb") as out:
        out.write(b"\x89PNG\r\n\x1a\n")
        out.write(chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)))
        out.write(chunk(b"IDAT", idat) + chunk(b"IEND", b""))


# Linux keeps the parent's peak in ru_maxrss across fork+exec, so a child started by pytest
# would report pytest's own; VmHWM is this process's alone.
_MEASURE = """
import json, sys, time
from booth.dreambooth.images import prepare_images
started = time.monotonic()
report = prepare_images(sys.argv[1], sys.argv[2], int(sys.argv[3]))
status = open("/proc/self/status").read()
print(json.dumps({"seconds": time.monotonic() - started,
                  "peak_mb": int(status.split("VmHWM:")[1].split()[0]) / 1024,
                  "kept": [k.source.rsplit("/", 1)[1] for k in report.kept],
                  "rejected": {r.file: [r.code, r.reason] for r in report.rejected}}))
"""


def _measure(folder: Path, out: Path, resolution: int) -> dict:
    """prepare_images in a fresh, small process: its peak RSS is the cost of the files."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("peak memory is read from /proc (Linux)")
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(folder), str(out),
                           str(resolution)], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("side, kept", [(8660, False), (4000, True)], ids=["75MP", "16MP"])
def test_memory_is_bounded_by_the_resolution_not_the_header(tmp_path, side, kept):
    folder = tmp_path / "photos"
    folder.mkdir()
    _flat_png(folder / "big.png", side, side)
    result = _measure(folder, tmp_path / "out", 512)
    if kept:
        assert result["kept"] == ["big.png"]
    else:  # 75 MP > (10 x 512)^2: refused from the header, before decoding
        code, reason = result["rejected"]["big.png"]
        assert code == "too_many_pixels" and "5120x5120" in reason and "PNG" in reason
    # Before: the 75 MP file was decoded (893 MB, 4.5 s); the 16 MP one took 218 MB.
    assert result["peak_mb"] < (120 if kept else 60), result


def test_large_pictures_reduced_early_still_come_out_right(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    # Up to (10 x 64)^2 px, reduced 7-9x before conversion: the same checks as at full size.
    Image.fromarray(np.full((500, 640), 32768, np.uint16)).save(folder / "sixteen.png")
    palette = Image.new("P", (640, 500), 1)
    palette.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    palette.paste(0, (0, 0, 320, 500))  # left half: index 0, which is transparent
    palette.save(folder / "palette.png", transparency=0)
    stored = Image.new("RGB", (640, 480), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 320, 480))
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed turned 90 degrees clockwise: red on top
    stored.save(folder / "rotated.tif", exif=exif)
    _scene(30, (640, 480)).save(folder / "scene.png")
    _, report = _run(folder, tmp_path)
    out = {Path(k.source).name: np.asarray(Image.open(tmp_path / "out" / k.file), np.int16)
           for k in report.kept}
    assert np.all(np.abs(out["sixteen.png"] - 128) <= 1)
    assert np.all(out["palette.png"][32, 2] == 255)
    assert tuple(out["palette.png"][32, 60]) == (0, 200, 0)
    assert out["rotated.tif"][5, 32][0] > 200 and out["rotated.tif"][58, 32][2] > 200
    kept = {Path(k.source).name: k for k in report.kept}
    assert kept["rotated.tif"].original_size == [480, 640]
    direct = Image.open(folder / "scene.png").resize((RES, RES), Image.Resampling.LANCZOS,
                                                     box=(80, 0, 560, 480))
    # Box-reducing first moves the crop by under a source pixel: a small, even difference.
    assert np.abs(out["scene.png"] - np.asarray(direct, np.int16)).mean() < 4


def test_formats_decoded_whole_are_limited_by_the_resolution(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    picture = _scene(40, (800, 700))  # 0.56 MP > (10 x 64)^2 = 0.41 MP
    picture.save(folder / "big.png")
    picture.save(folder / "big_progressive.jpg", progressive=True)
    picture.save(folder / "big_baseline.jpg")  # decoded at reduced scale: no such limit
    # ...unless it is so narrow that reducing would take its short side below 64 px.
    _scene(41, (6400, 70)).save(folder / "narrow_baseline.jpg")
    rejected, report = _run(folder, tmp_path)
    assert [Path(k.source).name for k in report.kept] == ["big_baseline.jpg"]
    assert rejected["big.png"].code == rejected["big_progressive.jpg"].code == "too_many_pixels"
    assert rejected["narrow_baseline.jpg"].code == "too_many_pixels"
    assert "progressive JPEG" in rejected["big_progressive.jpg"].reason
    assert "640x640" in rejected["big.png"].reason


def test_the_same_pixels_turned_by_exif_are_not_a_duplicate(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, orientation in (("a.jpg", 1), ("b.jpg", 6)):
        exif = Image.Exif()
        exif[0x0112] = orientation
        _scene(50).save(folder / name, exif=exif, quality=95)
    rejected, report = _run(folder, tmp_path)
    assert not rejected and len(report.kept) == 2
