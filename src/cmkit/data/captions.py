"""Captions of image sources, one per image, in the conventions people already have:

- a folder with ``metadata.jsonl`` at its root: one JSON object per line with ``file_name`` (the
  image's path below the folder) and ``text`` (the imagefolder convention of 🤗 datasets);
- a folder with a ``.txt`` beside each image (``cat.png`` and ``cat.txt``);
- tar shards with a ``{key}.txt`` member, or ``{key}.json`` holding ``{"text": ...}``
  (``"caption"`` also read);
- any labelled source through a template of its class names (``"a photo of a {class}"``).

Captions are user input: read as UTF-8 or refused, capped in size, and checked like any prompt
(`cmkit.text.check_prompt`). A source where some image has no caption is refused, naming it.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CmkitError
from ..text import check_prompt
from .streams import MAX_CAPTION_BYTES, FolderSource, TarSource

METADATA = "metadata.jsonl"
MAX_METADATA_BYTES = 512 * 2**20


def _checked(caption: str, where: str) -> str:
    try:
        return check_prompt(caption).strip()
    except ValueError as e:
        raise CmkitError(f"{where}: {e}") from None


def _read_text(path: Path) -> str:
    if path.stat().st_size > MAX_CAPTION_BYTES:
        raise CmkitError(f"{path} is larger than {MAX_CAPTION_BYTES} bytes: not a caption")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise CmkitError(f"{path} is not UTF-8 text: save its caption as UTF-8") from None


def _metadata(path: Path) -> dict[str, str]:
    if path.stat().st_size > MAX_METADATA_BYTES:
        raise CmkitError(f"{path} is larger than {MAX_METADATA_BYTES // 2**20} MB")
    table = {}
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise CmkitError(f"{path} line {number} is not UTF-8 text") from None
            except ValueError:
                raise CmkitError(f"{path} line {number} is not a JSON object") from None
            if not (isinstance(row, dict) and isinstance(row.get("file_name"), str)
                    and isinstance(row.get("text"), str)):
                raise CmkitError(f"{path} line {number} needs a \"file_name\" and a \"text\" string")
            table[Path(row["file_name"]).as_posix()] = row["text"]
    return table


def folder_captions(source: FolderSource) -> list[str]:
    metadata = source.root / METADATA
    if metadata.is_file():
        table = _metadata(metadata)
        missing = next((key for key in source.keys if key not in table), None)
        if missing is not None:
            raise CmkitError(f"{source.root / missing} has no caption in {metadata}")
        return [_checked(table[key], f"{metadata} ({key})") for key in source.keys]
    captions = []
    for key in source.keys:
        path = (source.root / key).with_suffix(".txt")
        if not path.is_file():
            raise CmkitError(f"{source.root / key} has no caption: put one in {path.name} beside it, or every caption "
                             f"in {metadata}")
        captions.append(_checked(_read_text(path), str(path)))
    return captions


def tar_captions(source: TarSource) -> list[str]:
    captions = []
    for i, caption in enumerate(source.captions):
        if caption is None:
            raise CmkitError(f"{source.where(i)} has no caption (a {source.keys[i]}.txt member, or \"text\" in its "
                             ".json)")
        if isinstance(caption, dict):
            raise CmkitError(f"{source.where(i)}: its caption is {caption['bad']}")
        captions.append(_checked(caption, source.where(i)))
    return captions


def template_captions(template: str, labels, class_names) -> list[str]:
    """``template`` with ``{class}`` replaced by each image's class name."""
    if "{class}" not in template:
        raise CmkitError(f"--caption-template must contain {{class}}, got {template!r}")
    if labels is None or not class_names:
        raise CmkitError("--caption-template needs labelled data with class names")
    names = [_checked(template.replace("{class}", name), "--caption-template") for name in class_names]
    return [names[int(label)] for label in labels]


def source_captions(source) -> list[str]:
    """The caption of every image of an opened source (`cmkit.data.streams.open_source`)."""
    if isinstance(source, FolderSource):
        return folder_captions(source)
    if isinstance(source, TarSource):
        return tar_captions(source)
    raise CmkitError(f"{source.name}: captions come from a folder (metadata.jsonl or .txt files) or tar shards "
                     "(.txt members); for labelled data use --caption-template")
