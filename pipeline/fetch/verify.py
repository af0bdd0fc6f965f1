"""Cheap checks that a downloaded file is the kind of file its name says.

A host can answer 200 with something other than the file: an HTML error, login or quota page,
an XML storage error. Its size then matches what the server announced, so only the content
gives it away. `content_problem(path, name)` checks what the name promises:

=====================  =================================================================
name ends with         check
=====================  =================================================================
``.zip``               the zip structure: the end-of-central-directory record and the
                       central directory are read (as `zipfile.is_zipfile` and
                       `zipfile.ZipFile` do), every member must lie inside the file, and
                       the first and last members' local headers must be where the
                       directory says (bytes lost or added before it shift them).
                       Nothing is decompressed (unlike `zipfile.ZipFile.testzip`), so a
                       19 GB zip costs a directory read; the members' CRC-32s are checked
                       at extraction (`pipeline.fetch.archive`).
``.jpg`` ``.jpeg``     starts with the JPEG or the PNG signature
``.png``
anything else          not checked
=====================  =================================================================

`start_problem(name, head)` checks only the first bytes, for a partial download.
"""

from __future__ import annotations

import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

HEAD_BYTES = 64  # enough for every signature below and for a readable excerpt
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., file name length, extra field length
_SHOWN_CHARS = 14  # as many as "<!DOCTYPE html"


@dataclass(frozen=True)
class _Kind:
    """What a file's name promises: a noun for messages and the byte strings it may start with."""

    noun: str
    signatures: tuple[bytes, ...]


_ZIP = _Kind("a zip", (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08"))  # a member, an empty zip, a spanned one
_IMAGE = _Kind("a JPEG or PNG image", (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"))
_KINDS = {".zip": _ZIP, ".jpg": _IMAGE, ".jpeg": _IMAGE, ".png": _IMAGE}
# Text a host sends instead of a file, by how it starts (lower-cased, leading blanks removed).
_TEXT_REPLIES = {
    b"<!doctype html": "an HTML page",
    b"<html": "an HTML page",
    b"<?xml": "an XML document",
}


def content_problem(path: str | Path, name: str | None = None) -> str | None:
    """Why ``path`` is not a whole file of the kind ``name`` (default: its own name) says, or ``None``.

    The answer completes a sentence about the file: ``"starts with '<!DOCTYPE html' -- an
    HTML page, not a zip"``, ``"is not a readable zip (...)"``.
    """
    path = Path(path)
    kind = _KINDS.get(Path(name or path.name).suffix.lower())
    if kind is None:
        return None
    with open(path, "rb") as handle:
        head = handle.read(HEAD_BYTES)
    if kind is not _ZIP:
        return _start_problem(kind, head)
    # The structure decides (a zip may follow other bytes); the start says best what came instead.
    problem = _zip_problem(path)
    return problem and (_start_problem(kind, head) or problem)


def start_problem(name: str, head: bytes) -> str | None:
    """Why a file named ``name`` cannot begin with ``head`` (its first bytes so far), or ``None``."""
    kind = _KINDS.get(Path(name).suffix.lower())
    if kind is None or len(head) < max(map(len, kind.signatures)):
        return None  # too short to tell
    return _start_problem(kind, head)


def _start_problem(kind: _Kind, head: bytes) -> str | None:
    if not head:
        return f"is empty, not {kind.noun}"
    if head.startswith(kind.signatures):
        return None
    text = head.lstrip()
    shown = text[:_SHOWN_CHARS].decode("latin-1")
    what = next((what for start, what in _TEXT_REPLIES.items() if text.lower().startswith(start)), None)
    return f"starts with {shown!r}{f' -- {what}' if what else ''}, not {kind.noun}"


def _zip_problem(path: Path) -> str | None:
    """Why ``path`` is not a structurally whole zip: its directory, member bounds, two local headers."""
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        return f"is not a readable zip ({err})"
    for info in members:
        if info.header_offset < 0 or info.header_offset + _LOCAL_HEADER.size + info.compress_size > size:
            return f"is damaged or cut short: member {info.filename!r} lies outside its {size} bytes"
    if not members:
        return None
    # Bytes lost or added before the directory shift every member before them: the first and
    # the last member's local headers are then not where the directory says.
    ends = (min(members, key=_offset), max(members, key=_offset))
    with open(path, "rb") as handle:
        return next(filter(None, (_local_header_problem(handle, info, size) for info in ends)), None)


def _offset(info: zipfile.ZipInfo) -> int:
    return info.header_offset


def _local_header_problem(handle: BinaryIO, info: zipfile.ZipInfo, size: int) -> str | None:
    """Why ``info``'s local header and data are not where and as long as the directory says, or ``None``."""
    handle.seek(info.header_offset)
    header = handle.read(_LOCAL_HEADER.size)
    if len(header) < _LOCAL_HEADER.size or _LOCAL_HEADER.unpack(header)[0] != b"PK\x03\x04":
        return f"is damaged: no local header for member {info.filename!r} where its directory says"
    _, name_length, extra_length = _LOCAL_HEADER.unpack(header)
    if info.header_offset + _LOCAL_HEADER.size + name_length + extra_length + info.compress_size > size:
        return f"is cut short: member {info.filename!r} runs past its end ({size} bytes)"
    return None
