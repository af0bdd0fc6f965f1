"""benchmarks/bench_loader.py on real COCO JPEGs (coco-mini): its figures, and what its modes put out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from benchmarks.bench_loader import (
    DECODE,
    DECODE_RESIZE,
    AtTrainingSize,
    batch_plan,
    device_batches,
    main,
    resize_to_training_size,
)
from benchmarks.local_coco import fetch_and_preprocess
from fpn.transform import Transform
from pipeline.coco_format import CocoFormatError
from pipeline.dataset import DetectionDataset, collate

MIN_SIZE, MAX_SIZE = 800, 1333
LIMIT = (
    32  # the first images of coco-mini's val2017 annotation file: enough for 16 timed and a start-up batch
)


def at_training_size(image: torch.Tensor) -> bool:
    h, w = image.shape[-2:]
    return (min(h, w) == MIN_SIZE and max(h, w) <= MAX_SIZE) or (
        max(h, w) == MAX_SIZE and min(h, w) <= MIN_SIZE
    )


def test_resize_is_the_models_resize_on_uint8() -> None:
    transform = Transform(
        min_size=MIN_SIZE, max_size=MAX_SIZE, size_divisible=32, image_mean=(0.0,) * 3, image_std=(1.0,) * 3
    )
    generator = torch.Generator().manual_seed(0)
    for height, width in ((48, 64), (64, 48), (30, 100)):  # landscape, portrait, capped by max_size
        image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)
        resized = resize_to_training_size(image, min_size=MIN_SIZE, max_size=MAX_SIZE)
        expected = transform.resize(image.float(), MIN_SIZE)
        assert resized.dtype == torch.uint8 and resized.shape == expected.shape and at_training_size(resized)
        assert (
            resized.float() - expected
        ).abs().max() < 1.5  # the uint8 kernel's fixed-point weights, rounding
        assert (
            transform.resize(resized.float(), MIN_SIZE).shape == resized.shape
        )  # the model leaves it as it is
    # an image without boxes: the empty target stays empty, (0, 4)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "image_id": 1}
    resized, target = AtTrainingSize([(image, empty)], min_size=MIN_SIZE, max_size=MAX_SIZE)[0]
    assert at_training_size(resized) and target["boxes"].shape == (0, 4) and target["image_id"] == 1


def test_bad_coco_folder_is_named(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(CocoFormatError, match="instances_val2017.json"):
        main(["--coco", str(tmp_path / "empty"), "--images", "4", "--workers", "0"])
    with pytest.raises(SystemExit):  # one source of data
        main(["--coco", str(tmp_path), "--data", str(tmp_path)])


def test_coco_mini_figures(shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "loader.json"
    main([
        "--coco", str(shared_data / "coco-mini"), "--coco-split", "val2017", "--coco-limit", str(LIMIT),
        "--images", "16", "--workers", "0", "1", "--out", str(out),
    ])  # fmt: skip
    printed = capsys.readouterr().out
    assert printed.startswith("machine: cpu ") and "date: " in printed and "workers for 40 img/s" in printed
    table = [line.split() for line in printed.splitlines()]
    report = json.loads(out.read_text())
    assert report["images"] == LIMIT and report["min_size"] == MIN_SIZE and report["max_size"] == MAX_SIZE
    rows = {(row["mode"], row["workers"]): row for row in report["rows"]}
    assert {(DECODE, 0), (DECODE, 1), (DECODE_RESIZE, 0), (DECODE_RESIZE, 1)} <= rows.keys()
    for (mode, workers), row in rows.items():
        if workers is None:  # the GPU row, where CUDA is
            continue
        assert row["images"] >= 16 and row["images_per_s"] > 0 and row["images_per_s_per_worker"] > 0, mode
        assert row["workers_for_target"] >= 1 and row["dtypes"] == ["torch.uint8"], mode
        shown = [
            mode, str(workers), f"{row['images_per_s']:.1f}", f"{row['images_per_s_per_worker']:.1f}",
            f"{row['mean_height']:.0f}x{row['mean_width']:.0f}", str(row["workers_for_target"]),
        ]  # fmt: skip
        assert shown in table, printed  # the table shows the JSON's figures
    # coco-mini's images are 640 px at most: the loader's own sizes, then the training size
    assert max(rows[(DECODE, 0)]["mean_height"], rows[(DECODE, 0)]["mean_width"]) <= 640
    assert min(rows[(DECODE_RESIZE, 0)]["mean_height"], rows[(DECODE_RESIZE, 0)]["mean_width"]) >= MIN_SIZE


def test_resized_batches_are_uint8_at_training_size(shared_data: Path, tmp_path: Path) -> None:
    root = fetch_and_preprocess(shared_data / "coco-mini", tmp_path, "val2017", limit=12, progress=False)
    dataset = DetectionDataset(root, "val2017", train=True)
    batches = batch_plan(dataset, 4, 8)
    resized = AtTrainingSize(dataset, min_size=MIN_SIZE, max_size=MAX_SIZE)
    loader = DataLoader(resized, batch_sampler=batches, collate_fn=collate, num_workers=1)
    seen = 0
    # The GPU mode's path, run on the CPU: batched decode_jpeg, flip, the same resize.
    on_device = device_batches(dataset, batches, torch.device("cpu"), min_size=MIN_SIZE, max_size=MAX_SIZE)
    for (images, targets), device_images, batch in zip(loader, on_device, batches, strict=True):
        for image, target, device_image, i in zip(images, targets, device_images, batch, strict=True):
            original = dataset[i][0]
            assert image.dtype == torch.uint8 and at_training_size(image), tuple(image.shape)
            assert torch.equal(device_image, image)
            boxes = target["boxes"]
            h, w = image.shape[-2:]
            assert boxes.shape[1] == 4 and (boxes[:, 2] <= w + 0.01).all() and (boxes[:, 3] <= h + 0.01).all()
            ratio = w / original.shape[-1]
            assert torch.allclose(boxes, dataset[i][1]["boxes"] * ratio, rtol=1e-2, atol=1.0)
            seen += 1
    assert seen == sum(map(len, batches)) >= 8
