"""pipeline.io: whole-or-nothing writes that never delete what the stage did not write."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.io import (
    OUTPUT_MARKER,
    OutputError,
    atomic_directory,
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    check_output_folder,
)


def test_a_users_folder_is_refused_and_kept(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    refused = rf"{mine}: not replacing a folder that stage fetch did not write"
    with pytest.raises(OutputError, match=refused), atomic_directory(mine, stage="fetch") as tmp:
        (tmp / "new.txt").write_text("x")
    assert (mine / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"], "no temporary left behind"
    with atomic_directory(mine, stage="fetch", force=True) as tmp:
        (tmp / "new.txt").write_text("x")
    assert sorted(p.name for p in mine.iterdir()) == [OUTPUT_MARKER, "new.txt"]


def test_the_stages_own_output_or_an_empty_folder_is_replaced(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    for content in ("first", "second"):
        with atomic_directory(out, stage="preprocess") as tmp:
            (tmp / "data.txt").write_text(content)
        assert (out / "data.txt").read_text() == content
    with pytest.raises(OutputError, match="stage fetch did not write"):
        check_output_folder(out, "fetch")  # another stage's output is not fetch's to replace


def test_inputs_inside_outputs_and_the_reverse_are_refused_even_with_force(tmp_path: Path) -> None:
    data = tmp_path / "coco"
    (data / "src").mkdir(parents=True)
    with pytest.raises(OutputError, match="holds the input"):
        check_output_folder(data, "preprocess", inputs=[data], force=True)
    with pytest.raises(OutputError, match="holds the input"):
        check_output_folder(data, "fetch", inputs=[data / "src"], force=True)
    with pytest.raises(OutputError, match="is inside the input"):
        check_output_folder(data / "src" / "out", "preprocess", inputs=[data], force=True)


def test_a_killed_writers_temporaries_are_removed_by_the_next(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = tmp_path / f".coco.tmp-{int(dead.stdout)}-abcd1234"
    live = tmp_path / f".coco.tmp-{os.getpid()}-efgh5678"  # a writer still at work: kept
    other = tmp_path / f".cocoa.tmp-{int(dead.stdout)}-abcd1234"  # another output's: kept
    for folder in (stale, live, other):
        (folder / "images").mkdir(parents=True)
    with atomic_directory(tmp_path / "coco", stage="fetch") as tmp:
        (tmp / "a").write_text("x")
    assert not stale.exists() and live.exists() and other.exists()


def test_json_is_written_whole(tmp_path: Path) -> None:
    atomic_write_json(tmp_path / "a" / "b.json", {"x": 1}, indent=2)
    assert (tmp_path / "a" / "b.json").read_text() == '{\n  "x": 1\n}\n'


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(
    ("umask", "file_mode", "folder_mode"), [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)]
)
def test_outputs_get_the_usual_permissions_for_the_umask(
    tmp_path: Path, umask: int, file_mode: int, folder_mode: int
) -> None:
    previous = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "metrics.json", "{}")
        atomic_torch_save({"w": 1}, tmp_path / "models" / "model.pt")
        with atomic_directory(tmp_path / "coco", stage="fetch") as tmp:
            (tmp / "val2017").mkdir()
        with atomic_directory(tmp_path / "coco", stage="fetch") as tmp:  # replacing an existing output
            (tmp / "val2017").mkdir()
    finally:
        os.umask(previous)
    assert mode(tmp_path / "metrics.json") == mode(tmp_path / "models" / "model.pt") == file_mode
    assert mode(tmp_path / "coco") == mode(tmp_path / "coco" / "val2017") == folder_mode
    assert mode(tmp_path / "coco" / OUTPUT_MARKER) == file_mode
