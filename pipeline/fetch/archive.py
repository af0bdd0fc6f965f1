"""Safe extraction of zip archives (the form cocodataset.org ships COCO in).

Every entry is checked before anything is written: an absolute name, a drive letter, a
``..`` component or a symbolic link rejects the whole archive (`UnsafeArchiveError`), so a
hostile or broken archive cannot write outside the destination. Extraction streams each
member and lets `zipfile` check its CRC-32, so a corrupt archive fails naming the member.
"""

from __future__ import annotations

import shutil
import stat
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm


class ArchiveError(ValueError):
    """An archive that cannot be extracted (not a zip, truncated, bad CRC); names the file."""


class UnsafeArchiveError(ArchiveError):
    """An archive with an entry that would land outside the destination or is a link."""


def unsafe_reason(info: zipfile.ZipInfo) -> str | None:
    """Why ``info`` must not be extracted, or ``None`` when it is a plain relative entry."""
    name = info.filename
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    if ".." in name.replace("\\", "/").split("/"):
        return "'..' in path"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "symbolic link"
    return None


def extract_zip(
    archive: str | Path,
    dest: str | Path,
    *,
    select: Callable[[str], bool] | None = None,
    progress: bool = True,
) -> int:
    """Extract the members of ``archive`` whose names pass ``select`` into ``dest``.

    All members (selected or not) are checked first with `unsafe_reason`. Returns the
    number of files written. Raises `UnsafeArchiveError` or `ArchiveError` naming the
    archive (and member); files already written stay in ``dest``, which the caller builds
    inside a temporary directory.
    """
    archive, dest = Path(archive), Path(dest)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as err:
        raise ArchiveError(f"{archive}: not a readable zip archive ({err})") from None
    with zf:
        members = zf.infolist()
        for info in members:
            reason = unsafe_reason(info)
            if reason:
                raise UnsafeArchiveError(f"{archive}: refusing to extract entry {info.filename!r}: {reason}")
        chosen = [i for i in members if not i.is_dir() and (select is None or select(i.filename))]
        root = dest.resolve()
        with tqdm(
            total=sum(i.file_size for i in chosen), unit="B", unit_scale=True, unit_divisor=1024,
            desc=f"extract {archive.name}", disable=not progress, leave=False,
        ) as bar:  # fmt: skip
            for info in chosen:
                target = dest / info.filename
                if not target.resolve().is_relative_to(root):  # belt and braces after unsafe_reason
                    raise UnsafeArchiveError(f"{archive}: entry {info.filename!r} resolves outside {dest}")
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with zf.open(info) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                except (zipfile.BadZipFile, EOFError, zlib.error) as err:
                    raise ArchiveError(f"{archive}: member {info.filename!r} is corrupt ({err})") from None
                bar.update(info.file_size)
    return len(chosen)
