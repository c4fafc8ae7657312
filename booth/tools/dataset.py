"""The `prepare_dataset` tool: a folder of subject photos -> a prepared dataset in the workspace.

Layout written: `datasets/<name>/images/0001.png ...` and `datasets/<name>/manifest.json`,
which the train tool reads (name, source, class_noun, instance_token, instance_prompt,
class_prompt, resolution, images[file, source, sha256, caption], rejected, warnings);
a photo's caption (`<photo>.txt` beside it) is copied as `images/0001.txt`.

Re-preparing a name that exists: the dataset is rebuilt and swapped in when it came from the
same source folder (the usual "I added photos" case); a dataset of the same name made from a
different folder is refused, since replacing it would silently lose another subject.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path
from typing import Annotated

from booth.schema import PATH
from booth.tools.context import ToolContext
from booth.tools.registry import Param, ToolError, tool
from booth.tools.workspace import NAME_PATTERN, check_name, remove_inside

MIN_PHOTOS, MAX_PHOTOS = 3, 30      # DreamBooth practice: 3-20 photos, a few more is fine
_RESULT_REJECTED_LIMIT = 40         # the full list is in manifest.json; keep the reply short


@tool
def prepare_dataset(
    ctx: ToolContext,
    images_dir: Annotated[str, Param("Folder of the photos (~ allowed)",
                                     min_length=1, max_length=1000,
                                     pattern=PATH)],
    class_noun: Annotated[str, Param("The subject's class, e.g. 'dog'",
                                     min_length=1, max_length=50,
                                     pattern=r"^[^\n\r]*[^\s][^\n\r]*$")],
    instance_token: Annotated[str, Param("Rare identifier word",
                                         pattern=r"^[A-Za-z0-9_<>-]{1,32}$")] = "sks",
    resolution: Annotated[int, Param("Pixels", minimum=64, maximum=1024,
                                     multiple_of=8)] = 512,
    name: Annotated[str | None, Param("Dataset name (default: the folder's)",
                                      pattern=NAME_PATTERN)] = None,
) -> dict:
    """Check and crop photos of one subject into a dataset; lists rejected files and why."""
    from booth.dreambooth.images import prepare_images

    source = _source_folder(images_dir)
    _refuse_workspace(source, ctx.workspace.root)
    class_noun = _clean_noun(class_noun)
    name = check_name(name or default_name(source), "dataset name")
    target = ctx.workspace.dataset_dir(name)
    _check_replace(target, source)
    started = time.monotonic()
    staging = target.parent / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    try:
        report = prepare_images(source, staging, resolution, exclude=[ctx.workspace.root],
                                console=ctx.console)
        if not report.kept:
            raise ToolError(_nothing_usable(source, report))
        manifest = _manifest(name, source, class_noun, instance_token, resolution, report)
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        replaced = _swap_in(staging, target)
    finally:
        remove_inside(staging, target.parent)
    return _result(manifest, target, replaced, time.monotonic() - started)


def _source_folder(images_dir: str) -> Path:
    source = Path(images_dir).expanduser()
    if not source.exists():
        raise ToolError(f"images_dir {images_dir!r} does not exist ({source.absolute()})")
    if not source.is_dir():
        raise ToolError(f"images_dir {images_dir!r} is a file, not a folder: give the folder "
                        "that holds the photos")
    return source.resolve()


def _refuse_workspace(source: Path, root: Path) -> None:
    """booth's own folders hold generated images, never the user's subject."""
    root = root.resolve()
    if source == root or root in source.parents:
        raise ToolError(f"images_dir {str(source)!r} is booth's workspace (or inside it): give "
                        "the folder of the subject's own photos")


def _clean_noun(class_noun: str) -> str:
    noun = " ".join(class_noun.split())
    noun = re.sub(r"^(a|an|the)\s+", "", noun, flags=re.IGNORECASE)
    if not noun:
        raise ToolError("class_noun is empty: say what the subject is, e.g. 'dog'")
    return noun


def default_name(source: Path) -> str:
    """A dataset name from the folder's name, reduced to what workspace names allow."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", source.name).strip("-._")[:64].rstrip("-._")
    cleaned = cleaned.replace("..", ".")
    return cleaned or "dataset"


def names_token(text: str, token: str) -> bool:
    """Whether `text` holds the identifier as a word of its own ("sks," counts, "sksdog" does
    not), in any case: CLIP's tokenizer lowercases."""
    edge = r"[\w<>-]"
    return re.search(rf"(?<!{edge}){re.escape(token)}(?!{edge})", text, re.IGNORECASE) is not None


def article(noun: str) -> str:
    """'a' or 'an' for `noun`: by its first vowel sound, with the common exceptions."""
    word = noun.lower()
    if word.startswith(("uni", "use", "usu", "euro", "one", "once")):
        return "a"
    if word.startswith(("hour", "honest", "honor", "heir")):
        return "an"
    return "an" if word[:1] in "aeiou" else "a"


def _check_replace(target: Path, source: Path) -> None:
    if target == source or target in source.parents:
        raise ToolError(f"images_dir {source} is inside the dataset {target.name} that would be "
                        "replaced; choose another dataset name")
    manifest = target / "manifest.json"
    if not target.exists():
        return
    try:
        previous = json.loads(manifest.read_text()).get("source")
    except (OSError, ValueError):
        previous = None
    if previous != str(source):
        raise ToolError(
            f"dataset {target.name!r} already exists, prepared from "
            f"{previous or 'an unknown folder'}; pass another name (or the same images_dir "
            "to refresh it)")


def _swap_in(staging: Path, target: Path) -> bool:
    """Move the finished dataset into place; the old one is removed only after that."""
    if not target.exists():
        staging.rename(target)
        return False
    old = target.parent / f".old-{target.name}-{uuid.uuid4().hex[:8]}"
    target.rename(old)
    try:
        staging.rename(target)
    except OSError:
        old.rename(target)
        raise
    remove_inside(old, target.parent)
    return True


def _manifest(name, source, class_noun, instance_token, resolution, report) -> dict:
    warnings = list(report.warnings)
    count = len(report.kept)
    if count < MIN_PHOTOS:
        warnings.append(f"only {count} usable photo(s): DreamBooth works best with 3-20 photos "
                        "of the subject from different angles")
    elif count > MAX_PHOTOS:
        warnings.append(f"{count} photos: DreamBooth usually uses 3-20; more slows training "
                        "and is only worth it if they all show the same subject")
    warnings += [f"{Path(k.source).name}: its caption does not name the identifier "
                 f"{instance_token!r}, so that photo does not teach the subject's name"
                 for k in report.kept if k.caption and not names_token(k.caption, instance_token)]
    return {
        "name": name,
        "source": str(source),
        "class_noun": class_noun,
        "instance_token": instance_token,
        "instance_prompt": f"a photo of {instance_token} {class_noun}",
        "class_prompt": f"a photo of {article(class_noun)} {class_noun}",
        "resolution": resolution,
        "images": [
            {"file": k.file, "source": k.source, "sha256": k.sha256,
             "source_sha256": k.source_sha256, "original_size": k.original_size,
             **({"caption": k.caption} if k.caption else {})}
            for k in report.kept
        ],
        "rejected": [{"file": r.file, "code": r.code, "reason": r.reason}
                     for r in report.rejected],
        "warnings": warnings,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _nothing_usable(source: Path, report) -> str:
    if not report.rejected:
        return f"{source} holds no files: put the subject's photos (JPEG, PNG, WebP) in it"
    reasons = "; ".join(f"{r.file}: {r.reason}" for r in report.rejected[:8])
    more = len(report.rejected) - 8
    return (f"no usable image in {source} ({len(report.rejected)} file(s) rejected): {reasons}"
            + (f"; and {more} more" if more > 0 else ""))


def _result(manifest: dict, target: Path, replaced: bool, seconds: float) -> dict:
    rejected = manifest["rejected"]
    result = {
        "dataset": manifest["name"],
        "folder": str(target),
        "kept": len(manifest["images"]),
        "files": [str(target / image["file"]) for image in manifest["images"]],
        "rejected": rejected[:_RESULT_REJECTED_LIMIT],
        "rejected_count": len(rejected),
        "warnings": manifest["warnings"],
        "instance_prompt": manifest["instance_prompt"],
        "class_prompt": manifest["class_prompt"],
        "resolution": manifest["resolution"],
        "replaced_existing": replaced,
        "seconds": round(seconds, 2),
    }
    if len(rejected) > _RESULT_REJECTED_LIMIT:
        result["note"] = f"all {len(rejected)} rejections are listed in manifest.json"
    return result
