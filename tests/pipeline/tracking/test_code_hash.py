"""pipeline.tracking.code_hash: names, the sha256sum-style hash, bytecode caches left out and deleted."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline.tracking.code_hash import code_differences, code_digests, code_sha256, drop_bytecode_caches


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_code_files_are_named_as_logged_and_caches_left_out(tmp_path: Path) -> None:
    model_code = write(tmp_path / "src" / "tracking" / "model_code.py", "set_model()\n")
    write(tmp_path / "src" / "pkg" / "a.py", "A = 1\n")
    write(tmp_path / "src" / "pkg" / "sub" / "b.py", "B = 2\n")
    write(tmp_path / "src" / "pkg" / "__pycache__" / "a.cpython-311.pyc", "cache")
    single = write(tmp_path / "src" / "single.py", "S = 3\n")

    digests = code_digests(model_code, [tmp_path / "src" / "pkg", single])
    assert sorted(digests) == ["model_code.py", "pkg/a.py", "pkg/sub/b.py", "single.py"]
    assert digests["pkg/a.py"] == hashlib.sha256(b"A = 1\n").hexdigest()

    # The same files laid out as a downloaded model (file at the root, folders under code/) hash the same.
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(model_code, model / "model_code.py")
    shutil.copytree(tmp_path / "src" / "pkg", model / "code" / "pkg")
    shutil.copy(single, model / "code" / "single.py")
    copied = code_digests(model / "model_code.py", sorted((model / "code").iterdir()))
    assert code_sha256(copied) == code_sha256(digests)

    write(model / "code" / "pkg" / "a.py", "A = 1\nprint('changed')\n")
    write(model / "code" / "pkg" / "c.py", "C = 1\n")
    changed = code_digests(model / "model_code.py", sorted((model / "code").iterdir()))
    assert code_sha256(changed) != code_sha256(digests)
    assert code_differences(digests, changed) == ["changed pkg/a.py", "added pkg/c.py"]


def test_the_hash_is_sha256sum_of_sorted_sha256sum_lines(tmp_path: Path) -> None:
    sha256sum = shutil.which("sha256sum")
    if sha256sum is None:
        pytest.skip("no sha256sum")
    model_code = write(tmp_path / "model_code.py", "m\n")
    write(tmp_path / "pkg" / "z.py", "z\n")
    write(tmp_path / "pkg" / "a" / "y.py", "y\n")
    names = ["model_code.py", "pkg/a/y.py", "pkg/z.py"]  # sorted
    lines = subprocess.run([sha256sum, *names], cwd=tmp_path, capture_output=True, check=True).stdout
    assert code_sha256(code_digests(model_code, [tmp_path / "pkg"])) == hashlib.sha256(lines).hexdigest()


def test_bytecode_caches_are_deleted(tmp_path: Path) -> None:
    write(tmp_path / "pkg" / "__pycache__" / "a.cpython-311.pyc", "cache")
    write(tmp_path / "pkg" / "sub" / "__pycache__" / "b.cpython-311.pyc", "cache")
    kept = write(tmp_path / "pkg" / "a.py", "A = 1\n")
    drop_bytecode_caches(tmp_path)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == [
        kept.relative_to(tmp_path).as_posix()
    ]
