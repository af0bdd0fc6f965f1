"""pipeline.preprocess.stage on hand-made bad input: what is skipped, converted, clipped, and what is fatal."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.coco_format import CocoFormatError
from pipeline.config import PreprocessConfig
from pipeline.dataset import read_index
from pipeline.preprocess import stage
from pipeline.preprocess.prepare_image import ImageResult, ImageSpec, ImageTask, prepare_chunk
from pipeline.preprocess.stage import PreprocessCrash, PreprocessError, preprocess_dataset
from tests.image_files import with_header_size

SPLITS = ("train2017", "val2017")
SERIAL = PreprocessConfig(workers=1)


def jpeg(mode: str, size: tuple[int, int] = (64, 48), seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def png16(value: int, size: tuple[int, int] = (64, 48)) -> bytes:
    """A 16-bit grey PNG (PIL mode I;16) of one ``value`` in 0..65535."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0]), value, dtype=np.uint16)).save(buffer, "PNG")
    return buffer.getvalue()


def write_coco(
    root: Path,
    split: str,
    images: dict[str, bytes | None],
    annotations: list[dict[str, Any]],
    sizes: dict[str, tuple[int, int]] | None = None,
) -> None:
    """``images``: file name -> bytes (None: listed but absent). Ids are 1.. in order; 64x48 unless in ``sizes``."""
    (root / split).mkdir(parents=True, exist_ok=True)
    entries = []
    for i, (name, data) in enumerate(images.items(), start=1):
        width, height = (sizes or {}).get(name, (64, 48))
        entries.append({"id": i, "file_name": name, "width": width, "height": height})
        if data is not None:
            (root / split / name).write_bytes(data)
    coco = {
        "images": entries,
        "annotations": [
            {"id": k, "iscrowd": 0, "area": 1.0, **a} for k, a in enumerate(annotations, start=1)
        ],
        "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
    }
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))


@pytest.fixture
def messy(tmp_path: Path) -> Path:
    root = tmp_path / "coco"
    good = jpeg("RGB")
    images = {
        "ok.jpg": good,
        "gray.jpg": jpeg("L", seed=1),
        "cmyk.jpg": jpeg("CMYK", seed=2),
        "truncated.jpg": good[: len(good) // 2],
        "corrupt.jpg": b"\xff\xd8\xff\xe0 this is not a JPEG at all",
        "missing.jpg": None,
    }
    annotations = [
        {"image_id": 1, "category_id": 3, "bbox": [8, 8, 16, 12]},  # kept
        {"image_id": 1, "category_id": 7, "bbox": [50, 40, 30, 30]},  # clipped to the image
        {"image_id": 1, "category_id": 7, "bbox": [100, 100, 10, 10]},  # outside: clipped to nothing, dropped
        {"image_id": 1, "category_id": 3, "bbox": [10, 10, 0, 5]},  # zero width: dropped
        {"image_id": 1, "category_id": 3, "bbox": [0, 0, 30, 30], "iscrowd": 1},  # crowd: kept aside
        {"image_id": 2, "category_id": 7, "bbox": [1, 2, 3, 4]},  # on the grayscale image
        {"image_id": 99, "category_id": 3, "bbox": [1, 1, 5, 5]},  # no such image
        {"image_id": 1, "category_id": 5, "bbox": [1, 1, 5, 5]},  # no such category
        {"image_id": 1, "category_id": 3, "bbox": [1, 1, 5]},  # malformed bbox
        {"image_id": 1, "category_id": 3, "bbox": ["a", 1, 5, 5]},  # malformed bbox
    ]
    write_coco(root, "train2017", images, annotations)
    write_coco(
        root,
        "val2017",
        {"v.jpg": jpeg("RGB", seed=3)},
        [{"image_id": 1, "category_id": 7, "bbox": [4, 4, 8, 8]}],
    )
    return root


def run(root: Path, out: Path, cfg: PreprocessConfig = SERIAL):
    return preprocess_dataset(root, out, splits=SPLITS, cfg=cfg, progress=False)


def shard_rows(out: Path, split: str) -> dict[int, dict[str, Any]]:
    """Every row of the split's shards (read with plain pyarrow), by image id."""
    index = read_index(out, split)
    rows = [row for name in index.shard_files for row in pq.read_table(out / split / name).to_pylist()]
    return {row["image_id"]: row for row in rows}


def stored_image(row: dict[str, Any]) -> Image.Image:
    image = Image.open(io.BytesIO(row["image"]))
    image.load()
    return image


def test_bad_input_is_reported_and_skipped(messy: Path, tmp_path: Path) -> None:
    out = tmp_path / "pre"
    summary = run(messy, out)
    counts = summary.counts["train2017"]
    assert counts["images_listed"] == 6
    assert counts["images_written"] == 3 and counts["images_skipped"] == 3 and counts["images_missing"] == 1
    assert counts["images_converted"] == 2
    assert counts["annotations_skipped"] == 4
    assert (counts["boxes"], counts["crowd_boxes"], counts["boxes_clipped"], counts["boxes_dropped"]) == (
        3,
        1,
        2,
        2,
    )

    report = json.loads((out / "report.json").read_text())
    assert report["counts"] == summary.counts
    by_kind: dict[str, list[str]] = {}
    for p in report["problems"]:
        assert p["message"].startswith(p["file"])
        by_kind.setdefault(p["kind"], []).append(Path(p["file"]).name)
    assert sorted(by_kind["corrupt_image"]) == ["corrupt.jpg", "truncated.jpg"]
    assert by_kind["missing_image"] == ["missing.jpg"]
    assert sorted(by_kind["converted"]) == ["cmyk.jpg", "gray.jpg"]
    assert by_kind["annotation_without_image"] == by_kind["unknown_category"] == ["instances_train2017.json"]
    assert by_kind["bad_annotation"] == ["instances_train2017.json"] * 2
    assert len(by_kind["degenerate_box"]) == 2

    index = read_index(out, "train2017")
    assert index.annotation_file == str(messy / "annotations" / "instances_train2017.json")
    rows = shard_rows(out, "train2017")
    assert sorted(rows) == index.image_ids.tolist() == [1, 2, 3]
    ok = rows[1]
    # Original pixels (64x48, not resized), flat xyxy.
    assert (ok["file"], ok["width"], ok["height"]) == ("ok.jpg", 64, 48)
    assert ok["boxes"] == [8.0, 8.0, 24.0, 20.0, 50.0, 40.0, 64.0, 48.0]
    assert ok["labels"] == [1, 2]  # COCO ids 3, 7 -> labels 1, 2
    assert ok["crowd_boxes"] == [0.0, 0.0, 30.0, 30.0]
    assert ok["image"] == (messy / "train2017" / "ok.jpg").read_bytes()  # the original bytes
    assert index.num_boxes.tolist() == [2, 1, 0]
    for row in rows.values():
        image = stored_image(row)
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (row["width"], row["height"]))

    categories = json.loads((out / "categories.json").read_text())
    assert categories == [{"label": 1, "id": 3, "name": "cat"}, {"label": 2, "id": 7, "name": "dog"}]
    manifest = json.loads((out / "manifest.json").read_text())
    digest = hashlib.sha256()
    for part in (
        "train2017/shard-00000.parquet", "train2017/index.parquet", "train2017/split.json",
        "val2017/shard-00000.parquet", "val2017/index.parquet", "val2017/split.json", "categories.json",
    ):  # fmt: skip
        digest.update((out / part).read_bytes())
    assert manifest["data_hash"] == digest.hexdigest() == summary.data_hash
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_process_pool_gives_the_same_output(messy: Path, tmp_path: Path) -> None:
    serial = run(messy, tmp_path / "serial")
    pooled = run(messy, tmp_path / "pooled", PreprocessConfig(workers=2))
    assert pooled.data_hash == serial.data_hash
    assert pooled.counts == serial.counts


def test_real_grayscale_jpeg_becomes_rgb(shared_data: Path, tmp_path: Path) -> None:
    root = tmp_path / "coco"
    gray = (shared_data / "grayscale" / "000000431848.jpg").read_bytes()
    write_coco(root, "train2017", {"000000431848.jpg": gray}, [])
    write_coco(root, "val2017", {"000000431848.jpg": gray}, [])
    for split in SPLITS:  # the real file is 378x640 (portrait), not the helper's 64x48
        path = root / "annotations" / f"instances_{split}.json"
        coco = json.loads(path.read_text())
        coco["images"][0].update(width=378, height=640)
        path.write_text(json.dumps(coco))
    summary = run(root, tmp_path / "pre")
    assert (
        summary.counts["train2017"]["images_converted"] == 1
        and summary.counts["train2017"]["images_written"] == 1
    )
    row = shard_rows(tmp_path / "pre", "train2017")[1]
    assert (row["width"], row["height"]) == (378, 640)  # not resized
    image = stored_image(row)
    assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (378, 640))
    assert row["image"] != gray


def test_malformed_annotation_files_are_fatal_and_named(messy: Path, tmp_path: Path) -> None:
    ann = messy / "annotations" / "instances_val2017.json"
    ann.write_text('{"images": [], "annotations": [}')
    with pytest.raises(CocoFormatError, match=rf"{ann}: not valid JSON"):
        run(messy, tmp_path / "pre")
    ann.write_text('{"images": [], "categories": []}')
    with pytest.raises(CocoFormatError, match=rf"{ann}: 'annotations' must be a list"):
        run(messy, tmp_path / "pre")
    ann.write_text('{"images": [{"id": 1}], "annotations": [], "categories": []}')
    with pytest.raises(CocoFormatError, match=rf"{ann}: images\[0\]\.file_name must be a string, got None"):
        run(messy, tmp_path / "pre")
    assert not (tmp_path / "pre").exists()


def test_split_without_usable_image_is_fatal_and_leaves_nothing(messy: Path, tmp_path: Path) -> None:
    out = tmp_path / "pre"
    run(messy, out)
    before = (out / "manifest.json").read_bytes()
    shutil.rmtree(messy / "val2017")
    with pytest.raises(
        PreprocessError, match=r"instances_val2017\.json: no usable image in split 'val2017'.*v\.jpg"
    ):
        run(messy, out)
    assert (out / "manifest.json").read_bytes() == before  # the previous output is untouched
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_conflicting_category_names_are_fatal(messy: Path, tmp_path: Path) -> None:
    ann = messy / "annotations" / "instances_val2017.json"
    coco = json.loads(ann.read_text())
    coco["categories"][0]["name"] = "lion"
    ann.write_text(json.dumps(coco))
    with pytest.raises(PreprocessError, match="category id 3 is 'lion', but 'cat'"):
        run(messy, tmp_path / "pre")


def kinds(summary: Any) -> dict[str, list[str]]:
    """Problem kind -> file names, from a run's summary."""
    found: dict[str, list[str]] = {}
    for p in summary.problems:
        found.setdefault(p["kind"], []).append(Path(p["file"]).name)
    return found


def test_16_bit_png_is_scaled_to_8_bit_not_white(tmp_path: Path) -> None:
    """A 16-bit grey PNG (mode I;16) came out pure white: values are scaled by 1/257 (65535 -> 255)."""
    root = tmp_path / "coco"
    write_coco(root, "train2017", {"dark.png": png16(257 * 40), "light.png": png16(257 * 200)}, [])
    write_coco(root, "val2017", {"v.jpg": jpeg("RGB")}, [])
    summary = run(root, tmp_path / "pre")
    assert summary.counts["train2017"]["images_written"] == 2
    assert summary.counts["train2017"]["images_converted"] == 2
    rows = shard_rows(tmp_path / "pre", "train2017")
    for image_id, grey in ((1, 40), (2, 200)):
        image = stored_image(rows[image_id])
        assert image.format == "JPEG" and image.mode == "RGB"
        low, high = zip(*image.getextrema(), strict=True)
        assert grey - 2 <= min(low) and max(high) <= grey + 2, image.getextrema()


def test_header_size_unlike_the_annotation_is_skipped_before_decoding(messy: Path, tmp_path: Path) -> None:
    """A JPEG whose header claims another size than the annotation decodes as a flat grey picture."""
    ok = (messy / "train2017" / "ok.jpg").read_bytes()
    (messy / "train2017" / "ok.jpg").write_bytes(with_header_size(ok, 96, 72))  # listed as 64x48
    summary = run(messy, tmp_path / "pre")
    counts = summary.counts["train2017"]
    assert counts["size_mismatches"] == 1 and counts["images_skipped"] == 4 and counts["images_written"] == 2
    assert kinds(summary)["size_mismatch"] == ["ok.jpg"]
    (message,) = [p["message"] for p in summary.problems if p["kind"] == "size_mismatch"]
    assert "annotation says 64x48, file header says 96x72, skipped" in message
    assert read_index(tmp_path / "pre", "train2017").image_ids.tolist() == [2, 3]


def test_images_over_max_pixels_are_skipped_from_the_header(tmp_path: Path) -> None:
    """preprocess.max_pixels caps an image before it is decoded; PIL's own bomb limit is a skip too."""
    root = tmp_path / "coco"
    small = jpeg("RGB")
    images = {
        "ok.jpg": small,
        "forged.jpg": with_header_size(small, 12000, 12000),  # 144 Mpx claimed: ~430 MB if decoded
        "bomb.jpg": with_header_size(small, 20000, 20000),  # 400 Mpx: PIL refuses it outright
    }
    sizes = {"forged.jpg": (12000, 12000), "bomb.jpg": (20000, 20000)}
    write_coco(root, "train2017", images, [], sizes)
    write_coco(root, "val2017", {"v.jpg": jpeg("RGB")}, [])
    summary = run(root, tmp_path / "pre")
    counts = summary.counts["train2017"]
    assert counts["images_too_large"] == 2 and counts["images_skipped"] == 2 and counts["images_written"] == 1
    assert sorted(kinds(summary)["too_large"]) == ["bomb.jpg", "forged.jpg"]
    messages = {Path(p["file"]).name: p["message"] for p in summary.problems}
    assert (
        "12000x12000 = 144000000 pixels, over preprocess.max_pixels (50000000), skipped"
        in messages["forged.jpg"]
    )

    raised = run(root, tmp_path / "raised", PreprocessConfig(workers=1, max_pixels=10**9))
    assert raised.counts["train2017"]["images_too_large"] == 1  # PIL's limit (~179 Mpx) still holds
    assert "decompression bomb" in {Path(p["file"]).name: p["message"] for p in raised.problems}["bomb.jpg"]

    lowered = run(root, tmp_path / "lowered", PreprocessConfig(workers=1, max_pixels=64 * 48))
    assert lowered.counts["train2017"]["images_written"] == 1  # the cap itself is allowed


def die_on_forged(tasks: list[ImageTask], spec: ImageSpec) -> list[ImageResult]:
    """`prepare_chunk`, except that a worker holding ``forged.jpg`` is killed (as the OOM killer would)."""
    if any(task.file.endswith("forged.jpg") for task in tasks):
        os.kill(os.getpid(), signal.SIGKILL)
    return prepare_chunk(tasks, spec)


def test_a_killed_worker_names_the_images_in_flight_and_how_to_rerun(
    messy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker killed mid-chunk gave a bare BrokenProcessPool traceback."""
    (messy / "train2017" / "forged.jpg").write_bytes(jpeg("RGB"))
    coco = json.loads((messy / "annotations" / "instances_train2017.json").read_text())
    coco["images"].append({"id": 7, "file_name": "forged.jpg", "width": 64, "height": 48})
    (messy / "annotations" / "instances_train2017.json").write_text(json.dumps(coco))
    monkeypatch.setattr(stage, "prepare_chunk", die_on_forged)
    with pytest.raises(PreprocessCrash) as raised:
        run(messy, tmp_path / "pre", PreprocessConfig(workers=2))
    message = str(raised.value)
    assert message.startswith(
        f"{messy / 'annotations' / 'instances_train2017.json'}: a preprocess worker died"
    )
    assert "forged.jpg" in message and "preprocess.workers: 1" in message
    assert not (tmp_path / "pre").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_shards_hold_images_per_shard_rows_in_small_row_groups(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    write_coco(root, "train2017", {f"{i}.jpg": jpeg("RGB", seed=i) for i in range(37)}, [])
    write_coco(root, "val2017", {"v.jpg": jpeg("RGB")}, [])
    run(root, tmp_path / "pre", PreprocessConfig(workers=1, images_per_shard=10))
    index = read_index(tmp_path / "pre", "train2017")
    assert index.shard_files == tuple(f"shard-0000{i}.parquet" for i in range(4))  # ceil(37 / 10)
    split = json.loads((tmp_path / "pre" / "train2017" / "split.json").read_text())
    assert (split["split"], split["images"], split["shards"]) == ("train2017", 37, list(index.shard_files))
    assert index.shards.tolist() == [i // 10 for i in range(37)]
    assert index.rows.tolist() == [i % 10 for i in range(37)]
    first = pq.ParquetFile(tmp_path / "pre" / "train2017" / "shard-00000.parquet")
    assert [first.metadata.row_group(g).num_rows for g in range(first.num_row_groups)] == [10]
    assert first.metadata.row_group(0).column(2).compression == "UNCOMPRESSED"  # image
    assert first.metadata.row_group(0).column(5).compression == "ZSTD"  # boxes
    assert pq.read_metadata(tmp_path / "pre" / "train2017" / "shard-00003.parquet").num_rows == 7


def test_a_failure_while_writing_shards_leaves_no_output(
    messy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shards are written whole or not at all: a crash after the first shard leaves nothing."""
    out = tmp_path / "pre"
    added = []
    original = stage.SplitWriter.add

    def add_then_fail(self: stage.SplitWriter, row: dict[str, Any]) -> None:
        if len(added) == 2:
            raise RuntimeError("disk gone")
        added.append(row["image_id"])
        original(self, row)

    monkeypatch.setattr(stage.SplitWriter, "add", add_then_fail)
    with pytest.raises(RuntimeError, match="disk gone"):
        run(messy, out, PreprocessConfig(workers=1, images_per_shard=1))
    assert added == [1, 2] and not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
