"""prepare_dataset on a folder of good photos mixed with every kind of bad file we could think of:
each bad file rejected with its reason, each good one kept and correct, the source untouched."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from booth.tools import ToolContext, ToolError, get_tool

RES = 64


@pytest.fixture
def ctx(workspace):
    return ToolContext.from_options(workspace=workspace, base_model="unused",
                                    console=Console(file=io.StringIO()))


def _photo(seed: int, size=(120, 90)) -> Image.Image:
    """A smooth, distinct RGB picture (smooth so PNG compresses it and damage is detectable)."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([(xx * (seed + 2)) % 256, (yy * 3 + seed * 40) % 256, (xx + yy) % 256], -1)
    return Image.fromarray(rgb.astype(np.uint8))


def _bytes(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kw)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG header claiming huge dimensions, with (almost) no pixel data: cheap."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\0" * 16)) + _png_chunk(b"IEND", b""))


GOOD = ["good1.jpg", "good2.png", "sub/deeper/good3.webp", "gray.png", "sixteen.png",
        "cmyk.jpg", "palette.png", "rgba.png", "rotated.jpg", "bilevel.png", "float.tif",
        "animated.gif", "small_upscaled.png", "panorama.jpg", "phone_mpo.jpg", "good1_half.jpg"]

BAD = {  # file -> expected code
    "notes.jpg": "not_image", "empty.jpg": "empty", "zero.png": "empty",
    "truncated.jpg": "truncated", "truncated.png": "truncated", "damaged.png": "corrupt",
    "tiny.png": "too_small", "bomb.png": "too_many_pixels", "big_header.png": "too_many_pixels",
    "good1_copy.jpg": "duplicate", "good2_resaved.bmp": "duplicate",
    "broken_link.jpg": "broken_symlink", "self_link.jpg": "symlink_loop", "loop": "symlink_loop",
    "folder.jpg": "directory", "scan.pdf": "not_image", "logo.svg": "unsupported_format",
    "page.png": "not_image", "iphone.heic": "unsupported_format", "icon.ico": "unsupported_format",
    "photos.zip": "not_image", ".DS_Store": "hidden", "._good1.jpg": "hidden",
    "locked.jpg": "unreadable",
}


def _make_corpus(root: Path) -> None:
    (root / "sub" / "deeper").mkdir(parents=True)
    good1 = _bytes(_photo(1), "JPEG", quality=95)
    (root / "good1.jpg").write_bytes(good1)
    _photo(2).save(root / "good2.png")
    _photo(3).save(root / "sub/deeper/good3.webp", lossless=True)
    _photo(4).convert("L").save(root / "gray.png")
    # 16-bit grey at half scale: correct scaling gives ~128, clipping would give 255.
    Image.fromarray(np.full((90, 120), 32768, np.uint16)).save(root / "sixteen.png")
    Image.new("CMYK", (120, 90), (0, 255, 255, 0)).save(root / "cmyk.jpg")  # pure red ink
    palette = Image.new("P", (120, 90), 1)
    palette.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    palette.paste(0, (0, 0, 60, 90))  # left half: index 0, which is transparent
    palette.save(root / "palette.png", transparency=0)
    rgba = _photo(5).convert("RGBA")
    rgba.putalpha(0)
    rgba.save(root / "rgba.png")  # fully transparent: must come out white
    _rotated_jpeg(root / "rotated.jpg")
    _photo(6).convert("1").save(root / "bilevel.png")
    Image.fromarray(np.full((90, 120), 0.25, np.float32), "F").save(root / "float.tif")
    frames = [_photo(7), _photo(8)]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:], duration=100)
    _photo(9, (50, 50)).save(root / "small_upscaled.png")
    _photo(10, (300, 100)).save(root / "panorama.jpg")
    # Phones write MPO: the photo plus a second (depth/preview) frame. Not an animation.
    _photo(16).save(root / "phone_mpo.jpg", "MPO", save_all=True, append_images=[_photo(17)])
    # A resized copy: kept (it may be on purpose), with a warning naming the original.
    _photo(1).resize((60, 45)).save(root / "good1_half.jpg", quality=90)
    _make_bad_files(root, good1)


def _rotated_jpeg(path: Path) -> None:
    """Stored landscape, left half red and right half blue, with EXIF orientation 6 (rotate 90
    clockwise to display): displayed correctly, red is on top and blue at the bottom."""
    stored = Image.new("RGB", (120, 80), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 60, 80))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, exif=exif, quality=95)


def _make_bad_files(root: Path, good1: bytes) -> None:
    (root / "notes.jpg").write_text("shopping list: dog food, treats\n")
    (root / "empty.jpg").write_bytes(b"")
    (root / "zero.png").write_bytes(b"")
    (root / "truncated.jpg").write_bytes(_bytes(_photo(11), "JPEG")[:600])
    png = _bytes(_photo(12), "PNG")
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    middle = len(png) // 2
    (root / "damaged.png").write_bytes(png[:middle] + b"\0" * 64 + png[middle + 64:])
    _photo(13, (20, 20)).save(root / "tiny.png")
    (root / "bomb.png").write_bytes(_png_header_only(100_000, 100_000))
    (root / "big_header.png").write_bytes(_png_header_only(10_000, 10_000))  # 100 MP
    (root / "good1_copy.jpg").write_bytes(good1)
    _photo(2).save(root / "good2_resaved.bmp")
    (root / "broken_link.jpg").symlink_to(root / "gone.jpg")
    (root / "self_link.jpg").symlink_to("self_link.jpg")
    (root / "loop").symlink_to(".", target_is_directory=True)
    (root / "folder.jpg").mkdir()
    (root / "scan.pdf").write_bytes(b"%PDF-1.4\n1 0 obj << >> endobj\ntrailer\n%%EOF\n")
    (root / "logo.svg").write_text('<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>')
    (root / "page.png").write_text("<!DOCTYPE html><html><body><img src=x.png></body></html>")
    (root / "iphone.heic").write_bytes(b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + b"\0" * 64)
    _photo(14, (64, 64)).save(root / "icon.ico")
    (root / "photos.zip").write_bytes(b"PK\x03\x04" + b"\0" * 60)
    (root / ".DS_Store").write_bytes(b"\0\0\0\x01Bud1" + b"\0" * 40)
    (root / "._good1.jpg").write_bytes(b"\0\x05\x16\x07" + b"\0" * 40)
    _photo(15).save(root / "locked.jpg")


def _tree_fingerprint(root: Path) -> str:
    """Names, kinds, modes, link targets and contents of everything under root (no following)."""
    digest = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(dirs + files):
            path = Path(folder) / name
            info = path.lstat()
            digest.update(f"{path.relative_to(root)}|{info.st_mode}|{info.st_mtime_ns}".encode())
            if path.is_symlink():
                digest.update(os.readlink(path).encode())
            elif path.is_file() and os.access(path, os.R_OK):
                digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    root = tmp_path / "rex photos"
    root.mkdir()
    _make_corpus(root)
    if os.geteuid() != 0:
        (root / "locked.jpg").chmod(0)
    else:  # root reads through chmod 000: simulate the permission error at the open
        import booth.dreambooth.images as images

        real_open = images._open

        def deny(path):
            if path.name == "locked.jpg":
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path)

        monkeypatch.setattr(images, "_open", deny)
    yield root
    (root / "locked.jpg").chmod(0o644)


def _prepare(ctx, root: Path, **extra) -> dict:
    result = get_tool("prepare_dataset").run(
        ctx, {"images_dir": str(root), "class_noun": "dog", "resolution": RES, **extra})
    json.dumps(result)  # what the model receives must be JSON
    return result


def test_every_bad_file_rejected_with_reason_and_every_good_one_kept(ctx, corpus):
    before = _tree_fingerprint(corpus)
    result = _prepare(ctx, corpus)
    assert _tree_fingerprint(corpus) == before, "the source folder was modified"

    codes = {r["file"]: r["code"] for r in result["rejected"]}
    assert codes == BAD
    assert all(len(r["reason"]) > 10 for r in result["rejected"])
    assert "good1.jpg" in _reason(result, "good1_copy.jpg")
    assert "good2.png" in _reason(result, "good2_resaved.bmp")
    assert "text file" in _reason(result, "notes.jpg")
    assert "PDF" in _reason(result, "scan.pdf")
    assert "HEIC" in _reason(result, "iphone.heic")
    assert "20x20" in _reason(result, "tiny.png")

    manifest = json.loads((Path(result["folder"]) / "manifest.json").read_text())
    sources = [Path(i["source"]).relative_to(corpus).as_posix() for i in manifest["images"]]
    assert sorted(sources) == sorted(GOOD)
    assert result["kept"] == len(GOOD)
    for image in manifest["images"]:
        path = Path(result["folder"]) / image["file"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == image["sha256"]
        with Image.open(path) as decoded:
            assert (decoded.format, decoded.mode, decoded.size) == ("PNG", "RGB", (RES, RES))
    warnings = " ".join(result["warnings"])
    assert "animated.gif" in warnings and "frames" in warnings
    assert "small_upscaled.png" in warnings and "upscaled" in warnings
    assert "panorama.jpg" in warnings and "aspect ratio" in warnings
    assert "phone_mpo.jpg" not in warnings
    near = [w for w in result["warnings"] if "nearly the same picture" in w]
    assert near == [w for w in near if w.startswith("good1_half.jpg:") and "good1.jpg" in w]
    assert len(near) == 1, near


def _reason(result: dict, file: str) -> str:
    return next(r["reason"] for r in result["rejected"] if r["file"] == file)


def _output(ctx, result: dict, source_name: str) -> np.ndarray:
    manifest = json.loads((Path(result["folder"]) / "manifest.json").read_text())
    entry = next(i for i in manifest["images"] if i["source"].endswith(source_name))
    return np.asarray(Image.open(Path(result["folder"]) / entry["file"]), dtype=np.int16)


def test_good_files_converted_correctly(ctx, corpus):
    result = _prepare(ctx, corpus)
    rotated = _output(ctx, result, "rotated.jpg")
    top, bottom = rotated[5, 32], rotated[58, 32]
    assert top[0] > 200 and top[2] < 60, f"EXIF orientation not applied: top {top}"
    assert bottom[2] > 200 and bottom[0] < 60, f"EXIF orientation not applied: bottom {bottom}"
    sixteen = _output(ctx, result, "sixteen.png")
    assert np.all(np.abs(sixteen - 128) <= 1), "16-bit image clipped instead of scaled"
    assert np.all(np.abs(_output(ctx, result, "float.tif") - 64) <= 1)
    cmyk = _output(ctx, result, "cmyk.jpg")[32, 32]
    assert cmyk[0] > 200 and cmyk[1] < 60 and cmyk[2] < 60, f"CMYK red came out as {cmyk}"
    palette = _output(ctx, result, "palette.png")
    assert np.all(palette[32, 2] == 255), "transparent palette pixels must be white"
    assert tuple(palette[32, 60]) == (0, 200, 0)
    assert np.all(_output(ctx, result, "rgba.png") == 255), "alpha must be composited on white"
    gray = _output(ctx, result, "gray.png")
    assert np.all(gray[..., 0] == gray[..., 1]) and np.all(gray[..., 1] == gray[..., 2])


def test_prompts_names_and_warnings(ctx, tmp_path):
    folder = tmp_path / "My Owl!! (2024)"
    folder.mkdir()
    _photo(1).save(folder / "a.png")
    result = _prepare(ctx, folder, class_noun="owl", instance_token="zwx")
    assert result["dataset"] == "My-Owl-2024"
    assert result["instance_prompt"] == "a photo of zwx owl"
    assert result["class_prompt"] == "a photo of an owl"
    assert any("only 1 usable photo" in w for w in result["warnings"])
    manifest = json.loads((Path(result["folder"]) / "manifest.json").read_text())
    assert manifest["source"] == str(folder)
    for key in ("name", "class_noun", "instance_token", "resolution", "images", "rejected"):
        assert key in manifest


def test_user_mistakes_are_clear_errors(ctx, tmp_path, monkeypatch):
    tool = get_tool("prepare_dataset")
    with pytest.raises(ToolError, match="does not exist"):
        tool.run(ctx, {"images_dir": str(tmp_path / "nope"), "class_noun": "dog"})
    (tmp_path / "file.jpg").write_text("x")
    with pytest.raises(ToolError, match="not a folder"):
        tool.run(ctx, {"images_dir": str(tmp_path / "file.jpg"), "class_noun": "dog"})
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.jpg").write_text("not a photo")
    with pytest.raises(ToolError, match=r"no usable image.*a\.jpg: .*text file"):
        tool.run(ctx, {"images_dir": str(junk), "class_noun": "dog", "resolution": RES})
    with pytest.raises(ToolError, match="multiple of 8"):
        tool.run(ctx, {"images_dir": str(junk), "class_noun": "dog", "resolution": 100})
    assert ctx.workspace.names("datasets") == []  # nothing left behind by failures
    monkeypatch.setenv("HOME", str(tmp_path))
    home = tmp_path / "pics"
    home.mkdir()
    _photo(1).save(home / "a.png")
    assert tool.run(ctx, {"images_dir": "~/pics", "class_noun": "dog",
                          "resolution": RES})["kept"] == 1


def test_reprepare_replaces_same_source_and_refuses_another(ctx, tmp_path):
    folder = tmp_path / "rex"
    folder.mkdir()
    _photo(1).save(folder / "a.png")
    assert _prepare(ctx, folder)["kept"] == 1
    _photo(2).save(folder / "b.png")
    again = _prepare(ctx, folder)
    assert again["kept"] == 2 and again["replaced_existing"]
    assert sorted(p.name for p in (Path(again["folder"]) / "images").iterdir()) == [
        "0001.png", "0002.png"]
    other = tmp_path / "other" / "rex"
    other.mkdir(parents=True)
    _photo(3).save(other / "c.png")
    with pytest.raises(ToolError, match="already exists"):
        _prepare(ctx, other)
    assert _prepare(ctx, other, name="rex-2")["dataset"] == "rex-2"
    assert ctx.workspace.names("datasets") == ["rex", "rex-2"]


def test_workspace_inside_the_source_folder_is_not_scanned(tmp_path):
    folder = tmp_path / "project"
    folder.mkdir()
    _photo(1).save(folder / "a.png")
    ctx = ToolContext.from_options(workspace=str(folder / "booth-workspace"),
                                   base_model="unused", console=Console(file=io.StringIO()))
    first = _prepare(ctx, folder, name="one")
    second = _prepare(ctx, folder, name="two")  # would find one's PNGs if it looked inside
    assert first["kept"] == second["kept"] == 1
    assert any("not scanned" in w for w in second["warnings"])
    shutil.rmtree(folder / "booth-workspace")


def test_the_workspace_itself_is_never_taken_for_subject_photos(tmp_path):
    workspace = tmp_path / "ws"
    ctx = ToolContext.from_options(workspace=str(workspace), base_model="unused",
                                   console=Console(file=io.StringIO()))
    photos = tmp_path / "photos"
    photos.mkdir()
    _photo(1).save(photos / "a.png")
    _prepare(ctx, photos, name="one")
    for inside in (workspace, workspace / "datasets"):
        with pytest.raises(ToolError, match="booth's workspace"):
            _prepare(ctx, inside, name="two")
    assert not (workspace / "datasets" / "two").exists()
