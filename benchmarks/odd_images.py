"""Fault run of prepare_images: ~70 kinds of odd image file, each accounted for, none a crash.

Builds the files in a temporary folder (truncated, damaged chunks, wrong extensions, empty,
huge declared sizes, 16-bit, CMYK, palettes with transparency, animations, EXIF rotation and
corrupt EXIF, HTML named .jpg, link loops, a pipe...), runs prepare_images on the folder in a
fresh process and prints, per file, the code (`kept` or the rejection code) and the reason or
warnings; then the totals: crashes, files unaccounted for, seconds and peak memory.

Peak memory is that process's VmHWM: on Linux `ru_maxrss` keeps the parent's peak across
fork+exec, and the parent here has just built 50 MP pictures. With --per-file every file is
also run alone, in its own process, to show what each costs.

    python benchmarks/odd_images.py                 # at 512 px
    python benchmarks/odd_images.py --per-file --resolution 768
"""

from __future__ import annotations

import argparse
import io
import json
import os
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def photo(seed: int, size=(800, 600), grain: bool = True) -> Image.Image:
    """A smooth random picture with some texture: photo-like, distinct for each seed."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8))
    smooth = coarse.resize(size, Image.Resampling.BICUBIC)
    if not grain:
        return smooth
    noise = rng.integers(-6, 7, (size[1], size[0], 3))
    return Image.fromarray(np.clip(np.asarray(smooth, np.int16) + noise, 0, 255)
                           .astype(np.uint8))


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def flipped(data: bytes, offset: int) -> bytes:
    damaged = bytearray(data)
    damaged[offset] ^= 0xFF
    return bytes(damaged)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def raw_png(width: int, height: int, depth: int, colour: int, row: bytes) -> bytes:
    """A PNG whose every row is `row` (streamed through zlib: any size costs little)."""
    compress = zlib.compressobj(9)
    idat = b"".join(compress.compress(b"\0" + row) for _ in range(height)) + compress.flush()
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat)
            + png_chunk(b"IEND", b""))


def exif_jpeg(seed: int, orientation: int, damage_count: bool = False) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = bytearray(encoded(photo(seed), "JPEG", exif=exif))
    if damage_count:  # the IFD claims 65281 entries and holds one: "Corrupt EXIF data"
        data[data.index(b"Exif\0\0") + 6 + 8] = 0xFF
    return bytes(data)


def gif_descriptor(gif: bytes) -> int:
    packed = gif[10]
    return 13 + (3 * 2 ** ((packed & 7) + 1) if packed & 0x80 else 0)


def frames(seed: int, fmt: str, **options) -> bytes:
    first, *rest = [photo(seed + i, (400, 300)) for i in range(3)]
    return encoded(first, fmt, save_all=True, append_images=rest, **options)


def build(folder: Path) -> None:
    """Write every kind of odd file into `folder` (one entry per kind, at its top level)."""
    jpeg, png = encoded(photo(1), "JPEG", quality=92), encoded(photo(2), "PNG")
    gif, webp = encoded(photo(3), "GIF"), encoded(photo(4), "WEBP", lossless=True)
    data = {
        # good ones, in the formats people have
        "good.jpg": jpeg, "good.png": png, "good_lossy.webp": encoded(photo(5), "WEBP"),
        "good.webp": webp, "good.bmp": encoded(photo(6), "BMP"),
        "good.tif": encoded(photo(7), "TIFF", compression="tiff_lzw"),
        "good.tga": encoded(photo(8), "TGA"), "good.ppm": encoded(photo(9), "PPM"),
        "good_interlaced.png": encoded(photo(10), "PNG", interlace=1),
        "good_progressive.jpg": encoded(photo(11), "JPEG", progressive=True),
        "grey.jpg": encoded(photo(12).convert("L"), "JPEG"),
        "alpha.webp": encoded(photo(13).convert("RGBA"), "WEBP"),
        "phone.mpo": encoded(photo(14), "MPO", save_all=True, append_images=[photo(15)]),
        "trailing_garbage.jpg": encoded(photo(16), "JPEG") + b"\0garbage after the end" * 9,
        # damaged bytes
        "truncated.jpg": jpeg[: len(jpeg) // 3], "truncated.png": png[: len(png) // 2],
        "truncated_header.png": png[:20], "truncated.webp": webp[: len(webp) // 2],
        "truncated.gif": gif[: len(gif) // 2],
        "damaged_ihdr.png": flipped(png, 18), "damaged_ihdr_crc.png": flipped(png, 30),
        "damaged_chunk_length.png": flipped(png, 33),
        "damaged_idat.png": flipped(png, len(png) // 2),
        "damaged_middle.jpg": jpeg[:len(jpeg) // 2] + b"\0" * 64 + jpeg[len(jpeg) // 2 + 64:],
        "damaged_sof.jpg": flipped(jpeg, jpeg.index(b"\xff\xc0") + 5),
        "damaged_descriptor.gif": flipped(gif, gif_descriptor(gif)),
        "damaged_chunk.webp": flipped(webp, 12), "signature_only.png": png[:8],
        # names that lie, and things that are not images
        "jpeg_named.png": encoded(photo(17), "JPEG"), "png_named.jpg": encoded(photo(18), "PNG"),
        "page.jpg": b"<!DOCTYPE html><html><body><img src='dog.jpg'></body></html>",
        "notes.png": b"shopping list: dog food\n", "scan.jpg": b"%PDF-1.4\n%%EOF\n",
        "logo.svg": b'<svg xmlns="http://www.w3.org/2000/svg"/>',
        "iphone.heic": b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + b"\0" * 64,
        "clip.jpg": b"\0\0\0\x18ftypisom\0\0\0\0isomavc1" + b"\0" * 64,
        "photos.zip": b"PK\x03\x04" + b"\0" * 60, "random.jpg": os.urandom(4096),
        "icon.ico": encoded(photo(19, (64, 64)), "ICO"), "empty.jpg": b"", "one_byte.png": b"\x89",
        ".DS_Store": b"\0\0\0\x01Bud1" + b"\0" * 40,
        # sizes
        "huge_header.png": raw_png(100_000, 100_000, 8, 2, b"")[:33] + png_chunk(b"IEND", b""),
        "flat_75mp.png": raw_png(8660, 8660, 8, 2, bytes([90, 120, 200]) * 8660),
        "flat_20mp.png": raw_png(4472, 4472, 8, 2, bytes([90, 120, 200]) * 4472),
        "tiny.png": encoded(photo(20, (40, 30)), "PNG"), "one_pixel.png": encoded(
            Image.new("RGB", (1, 1)), "PNG"),
        "soft_300px.png": encoded(photo(21, (400, 300)), "PNG"),
        "panorama.jpg": encoded(photo(22, (3000, 700)), "JPEG"),
        # pixel formats
        "sixteen_grey.png": encoded(Image.fromarray(np.full((600, 800), 40000, np.uint16)),
                                    "PNG"),
        "sixteen_rgb.png": raw_png(800, 600, 16, 2, b"\x80\x00\x40\x00\xc0\x00" * 800),
        "cmyk.jpg": encoded(Image.new("CMYK", (800, 600), (0, 200, 200, 0)), "JPEG"),
        "cmyk.tif": encoded(Image.new("CMYK", (800, 600), (200, 0, 200, 0)), "TIFF"),
        "palette_transparent.png": encoded(photo(23).quantize(64), "PNG", transparency=0),
        "rgba_clear.png": encoded(Image.new("RGBA", (800, 600), (255, 0, 0, 0)), "PNG"),
        "grey_alpha.png": encoded(photo(24).convert("LA"), "PNG"),
        "bilevel.png": encoded(photo(25).convert("1"), "PNG"),
        "float.tif": encoded(Image.fromarray(np.full((600, 800), 0.5, np.float32), "F"), "TIFF"),
        "int32.tif": encoded(Image.fromarray(np.full((600, 800), 3000, np.int32), "I"), "TIFF"),
        "narrow_52mp.jpg": encoded(photo(27, (64800, 800), grain=False), "JPEG"),
        "broken_icc.jpg": encoded(photo(26), "JPEG", icc_profile=b"not a profile" * 20),
        # several frames, orientation, metadata
        "animated.gif": frames(40, "GIF", duration=100), "animated.png": frames(43, "PNG"),
        "animated.webp": frames(46, "WEBP"), "multipage.tif": frames(49, "TIFF"),
        "exif_rotated.jpg": exif_jpeg(30, 6), "exif_orientation_9.jpg": exif_jpeg(31, 9),
        "corrupt_exif.jpg": exif_jpeg(32, 1, damage_count=True),
        # copies
        "good_copy.jpg": jpeg, "good_resaved.bmp": encoded(photo(2), "BMP"),
        "good_half_size.jpg": encoded(photo(1).resize((400, 300)), "JPEG", quality=85),
    }
    for name, content in data.items():
        (folder / name).write_bytes(content)
    _big_jpegs(folder)
    (folder / "broken_link.jpg").symlink_to(folder / "gone.jpg")
    (folder / "self_link.jpg").symlink_to("self_link.jpg")
    (folder / "loop").symlink_to(".", target_is_directory=True)
    (folder / "folder.jpg").mkdir()
    (folder / ".hidden").mkdir()
    os.mkfifo(folder / "pipe.jpg")


def _big_jpegs(folder: Path) -> None:
    # A real 50 MP photo-sized JPEG, baseline (decoded at 1/8 scale) and progressive (whole).
    big = photo(60, (8660, 5774), grain=False)
    big.save(folder / "baseline_50mp.jpg", quality=85)
    big.save(folder / "progressive_50mp.jpg", quality=85, progressive=True)


def run_child(source: str, out: str, resolution: int) -> None:
    """In a fresh process: prepare the folder, print the report, the time and the peak."""
    import time

    sys.path.insert(0, str(ROOT))  # this checkout's booth, whatever is installed
    from booth.dreambooth.images import prepare_images

    started = time.monotonic()
    report = prepare_images(source, out, resolution)
    seconds = time.monotonic() - started
    status = Path("/proc/self/status")
    if status.is_file():
        peak_kb = int(status.read_text().split("VmHWM:")[1].split()[0])
    else:  # not Linux: ru_maxrss (bytes on macOS)
        import resource

        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(json.dumps({"report": report.to_dict(), "seconds": seconds, "peak_mb": peak_kb / 1024}))


def prepare_in_child(source: Path, out: Path, resolution: int) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", str(source), str(out), str(resolution)],
        capture_output=True, text=True, cwd=ROOT, timeout=1800)
    if done.returncode != 0:
        return {"crashed": done.stderr.strip().splitlines()[-1:] or ["no output"]}
    result = json.loads(done.stdout)
    result["stderr"] = done.stderr
    return result


def outcomes(result: dict, source: Path) -> dict[str, tuple[str, str]]:
    report = result["report"]
    found = {}
    for kept in report["kept"]:
        name = Path(kept["source"]).relative_to(source).as_posix()
        found[name] = ("kept", "; ".join(kept["warnings"]) or "ok")
    for rejected in report["rejected"]:
        found[rejected["file"]] = (rejected["code"], rejected["reason"])
    return found


def per_file_costs(source: Path, work: Path, resolution: int) -> dict[str, str]:
    """Each file alone in a fresh process: its seconds and peak memory."""
    costs = {}
    for entry in sorted(os.listdir(source)):
        alone = work / f"alone-{len(costs)}"
        alone.mkdir()
        os.rename(source / entry, alone / entry)
        try:
            result = prepare_in_child(alone, work / f"out-{len(costs)}", resolution)
        finally:
            os.rename(alone / entry, source / entry)
        costs[entry] = ("CRASH" if "crashed" in result else
                        f"{result['seconds']:6.2f} s {result['peak_mb']:6.0f} MB")
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--per-file", action="store_true",
                        help="also run each file alone to show its own time and memory")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args.child[0], args.child[1], int(args.child[2]))
        return
    with tempfile.TemporaryDirectory(prefix="odd-images-") as work:
        source = Path(work) / "photos"
        source.mkdir()
        build(source)
        entries = sorted(os.listdir(source))
        result = prepare_in_child(source, Path(work) / "out", args.resolution)
        costs = per_file_costs(source, Path(work), args.resolution) if args.per_file else {}
    if "crashed" in result:
        print(f"prepare_images crashed: {result['crashed']}")
        sys.exit(1)
    found = outcomes(result, source)
    for name in entries:
        code, reason = found.get(name, ("MISSING", "not in the report"))
        cost = f"{costs[name]}  " if name in costs else ""
        print(f"{name:28} {code:18} {cost}{reason}")
    errors = [name for name, (code, _) in found.items() if code == "error"]
    unaccounted = sorted(set(entries) - set(found))
    kept = sum(1 for code, _ in found.values() if code == "kept")
    print(f"\n{len(entries)} files at {args.resolution} px: {kept} kept, {len(found) - kept} "
          f"rejected; crashes {len(errors)}, files unaccounted {len(unaccounted)}"
          f"{' ' + str(unaccounted) if unaccounted else ''}, stderr lines "
          f"{len(result['stderr'].splitlines())}")
    print(f"{result['seconds']:.1f} s, peak memory {result['peak_mb']:.0f} MB (whole folder, "
          "one process)")
    sys.exit(1 if errors or unaccounted else 0)


if __name__ == "__main__":
    main()
