"""Stage fetch end to end: coco-mini served like cocodataset.org from a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from stages.fetch import main
from tests.coco_host import ERROR_PAGE, lay_out_like_cocodataset, serve
from tests.conftest import free_port
from tests.params_files import write_params_file

SPLITS = ("train2017", "val2017")


@pytest.fixture(scope="module")
def coco_host_root(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    return lay_out_like_cocodataset(shared_data / "coco-mini", tmp_path_factory.mktemp("cocodataset"))


def params(tmp_path: Path, **data: object) -> str:
    return str(write_params_file(tmp_path / "params.yaml", {"data": data}))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_whole_zips(coco_host_root: Path, shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "data" / "coco"
    with serve(coco_host_root) as host:
        assert main(["--params", params(tmp_path, source="coco", base_url=host.url), "--out", str(out)]) == 0
    assert sorted(path for path, _ in host.requests) == [
        "annotations/annotations_trainval2017.zip", "zips/train2017.zip", "zips/val2017.zip",
    ]  # fmt: skip
    mini = shared_data / "coco-mini"
    for split in SPLITS:
        name = f"annotations/instances_{split}.json"
        assert (out / name).read_bytes() == (mini / name).read_bytes()
        assert sorted(p.name for p in (out / split).iterdir()) == sorted(
            p.name for p in (mini / split).iterdir()
        )
    assert (out / "val2017" / "000000005001.jpg").read_bytes() == (
        mini / "val2017" / "000000005001.jpg"
    ).read_bytes()
    assert sorted(p.name for p in out.iterdir()) == [".fpn-output", "annotations", "train2017", "val2017"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["coco"]  # no temporary, no downloads left


def test_max_images_downloads_only_those_images(
    coco_host_root: Path, shared_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "coco"
    with serve(coco_host_root) as host:
        argv = [
            "--params",
            params(tmp_path, source="coco", base_url=host.url, max_images=5, download_workers=3),
        ]
        assert main([*argv, "--out", str(out)]) == 0
    fetched = [path for path, _ in host.requests]
    assert not any(path.startswith("zips/") for path in fetched)
    for split in SPLITS:
        original = json.loads(
            (shared_data / "coco-mini" / "annotations" / f"instances_{split}.json").read_text()
        )
        subset = json.loads((out / "annotations" / f"instances_{split}.json").read_text())
        first = original["images"][:5]
        assert subset["images"] == first
        ids = {image["id"] for image in first}
        assert subset["annotations"] == [a for a in original["annotations"] if a["image_id"] in ids]
        assert subset["categories"] == original["categories"]
        assert sorted(p.name for p in (out / split).iterdir()) == sorted(
            image["file_name"] for image in first
        )
        assert sorted(p for p in fetched if p.startswith(f"{split}/")) == sorted(
            f"{split}/{i['file_name']}" for i in first
        )


def test_failed_image_download_keeps_the_others_for_the_next_run(
    coco_host_root: Path, shared_data: Path, tmp_path: Path, capsys
) -> None:
    host_root = tmp_path / "host"
    shutil.copytree(coco_host_root, host_root, symlinks=True)
    first_val = json.loads((shared_data / "coco-mini" / "annotations" / "instances_val2017.json").read_text())
    lost = host_root / "val2017" / first_val["images"][2]["file_name"]
    lost.unlink()  # the host lacks one image for now
    out, cache = tmp_path / "coco", tmp_path / "cache"
    with serve(host_root) as host:
        argv = ["--params", params(tmp_path, source="coco", base_url=host.url, max_images=4, retries=0)]
        argv += ["--out", str(out), "--downloads", str(cache)]
        assert main(argv) == 1  # the host, not the input
        assert (
            f"1 of 4 downloads failed:\n  {host.url}/val2017/{lost.name}: HTTP 404" in capsys.readouterr().err
        )
        assert not out.exists()
        lost.symlink_to(shared_data / "coco-mini" / "val2017" / lost.name)
        first_run = len(host.requests)
        assert main(argv) == 0
    again = [path for path, _ in host.requests[first_run:] if not path.startswith("annotations/")]
    assert again == [f"val2017/{lost.name}"]  # the 7 images of the first run were kept
    assert len(list((out / "val2017").iterdir())) == len(list((out / "train2017").iterdir())) == 4
    assert (cache / "annotations_trainval2017.zip").is_file()  # a named --downloads folder is kept


def test_interrupted_download_resumes_on_the_next_run(coco_host_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "coco"
    zip_size = (coco_host_root / "zips" / "val2017.zip").stat().st_size
    with serve(coco_host_root, drop_first={"zips/val2017.zip": 3_000_000}) as host:
        argv = ["--params", params(tmp_path, source="coco", base_url=host.url, retries=0), "--out", str(out)]
        assert main(argv) == 1  # the connection dropped and no retry was allowed
        assert not out.exists() and leftovers(tmp_path) == []  # no half output
        part = tmp_path / "coco.downloads" / "val2017.zip.part"
        assert part.stat().st_size == 3_000_000
        assert main(argv) == 0
    assert ("zips/val2017.zip", "bytes=3000000-") in host.requests
    assert [p for p, _ in host.requests].count(
        "annotations/annotations_trainval2017.zip"
    ) == 1  # kept, not fetched again
    assert len(list((out / "val2017").iterdir())) == 80 and zip_size > 3_000_000
    assert not (tmp_path / "coco.downloads").exists()


def test_an_error_page_in_the_downloads_cache_is_downloaded_again(
    coco_host_root: Path, tmp_path: Path
) -> None:
    out, cache = tmp_path / "coco", tmp_path / "cache"
    cache.mkdir()  # holding what earlier versions renamed into place as if verified:
    (cache / "annotations_trainval2017.zip").write_bytes(ERROR_PAGE)
    with serve(coco_host_root) as host:
        argv = ["--params", params(tmp_path, source="coco", base_url=host.url, max_images=2)]
        assert main([*argv, "--out", str(out), "--downloads", str(cache)]) == 0
    assert [p for p, _ in host.requests].count("annotations/annotations_trainval2017.zip") == 1
    assert zipfile.is_zipfile(cache / "annotations_trainval2017.zip")
    assert len(list((out / "val2017").iterdir())) == 2


def test_an_error_page_served_once_is_downloaded_again_in_the_same_run(
    coco_host_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "coco"
    with (
        serve(coco_host_root, error_page_first={"zips/val2017.zip": 1}) as host,
        caplog.at_level(logging.WARNING),
    ):
        assert main(["--params", params(tmp_path, source="coco", base_url=host.url), "--out", str(out)]) == 0
    assert [p for p, _ in host.requests].count("zips/val2017.zip") == 2
    assert "starts with '<!DOCTYPE html' -- an HTML page, not a zip; downloading it again" in caplog.text
    assert len(list((out / "val2017").iterdir())) == 80
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coco", "params.yaml"]  # downloads removed


def test_a_host_that_always_serves_an_error_page_fails_naming_the_cached_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "host"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "annotations_trainval2017.zip").write_bytes(ERROR_PAGE)
    out, cache = tmp_path / "coco", tmp_path / "cache"
    with serve(root) as host:
        argv = ["--params", params(tmp_path, source="coco", base_url=host.url, max_images=2)]
        assert main([*argv, "--out", str(out), "--downloads", str(cache)]) == 1  # the host, not the input
    assert [p for p, _ in host.requests] == ["annotations/annotations_trainval2017.zip"] * 2
    err = capsys.readouterr().err
    rejected = cache / "annotations_trainval2017.zip.rejected"
    assert f"error: {host.url}/annotations/annotations_trainval2017.zip: " in err
    assert f"the copy downloaded to {cache / 'annotations_trainval2017.zip'}" in err
    assert "starts with '<!DOCTYPE html' -- an HTML page, not a zip" in err
    assert f"kept as {rejected}" in err and "delete it" in err
    assert rejected.read_bytes() == ERROR_PAGE
    assert not (cache / "annotations_trainval2017.zip").exists() and not out.exists()


def test_hostile_zip_is_refused_and_leaves_nothing(tmp_path: Path, capsys) -> None:
    root = tmp_path / "host"
    (root / "annotations").mkdir(parents=True)
    with zipfile.ZipFile(root / "annotations" / "annotations_trainval2017.zip", "w") as zf:
        zf.writestr("annotations/instances_val2017.json", "{}")
        zf.writestr("../../escaped.txt", "owned")
    out = tmp_path / "data" / "coco"
    with serve(root) as host:
        assert main(["--params", params(tmp_path, source="coco", base_url=host.url), "--out", str(out)]) == 2
    assert "refusing to extract entry '../../escaped.txt'" in capsys.readouterr().err
    assert not out.exists() and leftovers(out.parent) == []
    assert not list(tmp_path.rglob("escaped.txt"))


def test_offline_fails_at_once_saying_what_to_change(tmp_path: Path, repo_root: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = subprocess.run(
        [sys.executable, "-m", "stages.fetch", "--params", params(tmp_path, source="coco", base_url=url),
         "--out", str(tmp_path / "coco")],
        cwd=repo_root, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    err = result.stderr
    assert f"cannot reach {url}/annotations/annotations_trainval2017.zip" in err
    assert "data.base_url" in err and "data.source: local" in err and "--local-dir" in err
    assert not (tmp_path / "coco").exists()


def test_local_source_copies_and_subsets(shared_data: Path, tmp_path: Path, capsys) -> None:
    mini = shared_data / "coco-mini"
    out = tmp_path / "coco"
    argv = ["--params", params(tmp_path, source="local", max_images=3), "--out", str(out)]
    assert main([*argv, "--local-dir", str(mini)]) == 0
    for split in SPLITS:
        assert len(json.loads((out / "annotations" / f"instances_{split}.json").read_text())["images"]) == 3
        assert len(list((out / split).iterdir())) == 3
    assert main(argv) == 2
    assert (
        "data.source is 'local': name the COCO-layout folder with --local-dir DIR" in capsys.readouterr().err
    )
    assert main([*argv, "--local-dir", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: --local-dir is not a directory" in capsys.readouterr().err


def test_synthetic_source_and_local_dir_mismatch(tmp_path: Path, capsys) -> None:
    out = tmp_path / "coco"
    argv = ["--params", params(tmp_path, synthetic_train_images=3, synthetic_val_images=2), "--out", str(out)]
    assert main(argv) == 0
    assert len(json.loads((out / "annotations" / "instances_val2017.json").read_text())["images"]) == 2
    assert main([*argv, "--local-dir", str(tmp_path)]) == 2
    assert "--local-dir is given but data.source is 'synthetic'" in capsys.readouterr().err
    assert (
        out / "annotations" / "instances_train2017.json"
    ).is_file()  # a failed run keeps the previous output
