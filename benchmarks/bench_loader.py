"""Training loader throughput: images/s of DetectionDataset + GroupedBatchSampler + collate, per loader worker.

    .venv/bin/python benchmarks/bench_loader.py                        # the synthetic default, built in a temp dir
    .venv/bin/python benchmarks/bench_loader.py --data data/preprocessed --split train2017
    .venv/bin/python benchmarks/bench_loader.py --coco ../shared/data/coco-mini --coco-split val2017 \\
        --workers 0 1 2 --images 400 --out loader.json          # real COCO JPEGs at their real sizes

``--coco DIR`` is a COCO-layout folder (``annotations/instances_<split>.json``, ``<split>/*.jpg``):
its ``--coco-split`` goes through stage fetch's local source and stage preprocess into a temp
dir (`benchmarks.local_coco`, as benchmarks/coco_fidelity.py does), and the loader is timed on
those shards; ``--coco-limit N`` keeps the first N images of the annotation file. Small splits
are repeated epoch after epoch until ``--images`` images came out.

Modes, each timed per ``--workers`` count (``0`` decodes in this process and counts as one):

* ``decode``: the training loader as it is: JPEG bytes read from the shards, decoded with
  torchvision.io, random horizontal flip, uint8 at the original size, aspect-ratio grouped
  batches of ``--batch-size``. The model's transform resizes on the training device.
* ``decode+resize``: the same, plus the model's resize to the training size (``--min-size`` /
  ``--max-size``, 800/1333 by default) done in the loader worker on the uint8 image
  (`resize_to_training_size`): what moving the resize to a CPU loader would cost.
* ``gpu decode+resize`` (only where ``torch.cuda.is_available()``): each batch's raw JPEG bytes
  read from the shards in this process, decoded together by ``decode_jpeg(device="cuda")``
  (nvJPEG), flipped and resized on the GPU.

The batches are one plan over as many epochs as needed, run through one DataLoader, so workers
start once; the first batch (worker start-up, nvJPEG's) is not timed. Prints the machine, its
load average, the date, and a table: images/s, images/s per loader worker, the mean size of the
images that came out, and how many workers at that rate feed one GPU at ``--target`` images/s
(40 by default): ceil(target / per-worker rate). ``--out FILE`` writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as tvf

REPO_ROOT = Path(__file__).resolve().parents[1]
# The fpn/, pipeline/ and benchmarks/ beside this file, not an installed copy.
if sys.path[:1] != [str(REPO_ROOT)]:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.local_coco import fetch_and_preprocess  # noqa: E402
from fpn import ModelConfig  # noqa: E402
from fpn.boxes import scale_boxes  # noqa: E402
from pipeline.cluster import available_cores  # noqa: E402
from pipeline.config import load_params  # noqa: E402
from pipeline.dataset import DetectionDataset, GroupedBatchSampler, collate  # noqa: E402
from pipeline.fetch.synthetic import generate_synthetic  # noqa: E402
from pipeline.preprocess.stage import preprocess_dataset  # noqa: E402
from pipeline.profile.timing import machine_description  # noqa: E402

DECODE, DECODE_RESIZE, GPU = "decode", "decode+resize", "gpu decode+resize"


def resize_to_training_size(image: Tensor, *, min_size: int, max_size: int) -> Tensor:
    """(3, h, w) uint8 -> (3, h', w') uint8: the model's resize, done before it gets the image.

    Same size as `fpn.transform.Transform.resize` (each side times ``min(min_size / shorter,
    max_size / longer)``, floored; tests/benchmarks/test_bench_loader.py holds the two equal),
    same bilinear interpolation (align_corners False, no antialias); the model then finds the
    image at size and leaves it. It resizes the normalised float image; bilinear is linear, so
    this differs from it only by the uint8 kernel's fixed-point weights and rounding (under 1
    level on coco-mini, 1.001 on noise).

    torchvision's v2 ``resize`` runs torch's native uint8 bilinear kernel on the CPU (AVX2) and
    gives a channels-last strided result, which the model takes as it is. On the 2-core dev
    machine (AMD EPYC, 1 thread) a 640x480 COCO image to 1066x800 took 0.9 ms this way, 13-17 ms as
    float ``F.interpolate`` + round, 2.3 ms as ``F.interpolate`` on contiguous uint8, and 4.4 ms
    with ``.contiguous()`` after it. On CUDA, v2 interpolates in float and rounds back.
    """
    height, width = image.shape[-2:]
    factor = min(min_size / min(height, width), max_size / max(height, width))
    return tvf.resize(image, [math.floor(height * factor), math.floor(width * factor)], antialias=False)


class AtTrainingSize(Dataset):
    """``dataset``'s items with the image resized by `resize_to_training_size` and the boxes
    scaled with it, in whichever process (loader worker) reads the item."""

    def __init__(self, dataset: DetectionDataset, *, min_size: int, max_size: int) -> None:
        self.dataset = dataset
        self.min_size = min_size
        self.max_size = max_size

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Any]]:
        image, target = self.dataset[i]
        resized = resize_to_training_size(image, min_size=self.min_size, max_size=self.max_size)
        boxes = scale_boxes(target["boxes"], tuple(image.shape[-2:]), tuple(resized.shape[-2:]))
        return resized, {**target, "boxes": boxes}


@dataclass(frozen=True)
class Timing:
    """One timed run: ``images`` images (after the untimed first batch) in ``seconds``."""

    mode: str
    workers: int | None  # None: no loader worker (the GPU mode reads bytes in this process)
    images: int
    seconds: float
    mean_height: float
    mean_width: float
    dtypes: tuple[str, ...]

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds

    @property
    def images_per_s_per_worker(self) -> float | None:
        return None if self.workers is None else self.images_per_s / max(1, self.workers)

    def workers_for(self, target: float) -> int | None:
        """Loader workers at this per-worker rate that make ``target`` images/s."""
        per_worker = self.images_per_s_per_worker
        return None if per_worker is None else math.ceil(target / per_worker)


def batch_plan(dataset: DetectionDataset, batch_size: int, images: int) -> list[list[int]]:
    """Aspect-ratio grouped batches (`GroupedBatchSampler`, shuffled per epoch) of as many epochs
    as it takes for ``images`` images after the first batch, which is not timed."""
    sampler = GroupedBatchSampler(dataset, batch_size, shuffle=True, seed=0)
    if len(sampler) == 0:
        raise ValueError("the dataset has no image")
    batches: list[list[int]] = []
    timed, epoch = 0, 0
    while True:
        sampler.set_epoch(epoch)
        for batch in sampler:
            timed += len(batch) if batches else 0
            batches.append(list(batch))
            if timed >= images:
                return batches
        epoch += 1


def time_batches(
    mode: str, workers: int | None, batches: Iterable[list[Tensor]], sync: Callable[[], None]
) -> Timing:
    """Time ``batches`` (lists of images) from the second on; ``sync`` waits for the device."""
    iterator = iter(batches)
    next(iterator)  # worker start-up, first decoder call: not timed
    sync()
    count, heights, widths, dtypes = 0, 0, 0, set()
    start = time.perf_counter()
    for images in iterator:
        count += len(images)
        heights += sum(image.shape[-2] for image in images)
        widths += sum(image.shape[-1] for image in images)
        dtypes.update(str(image.dtype) for image in images)
    sync()
    seconds = time.perf_counter() - start
    return Timing(mode, workers, count, seconds, heights / count, widths / count, tuple(sorted(dtypes)))


def time_loader(dataset: Dataset, batches: list[list[int]], workers: int, mode: str) -> Timing:
    """The training DataLoader over ``batches`` with ``workers`` worker processes (0: in this one)."""
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=workers)
    return time_batches(mode, workers, (images for images, _ in loader), lambda: None)


def device_batches(
    dataset: DetectionDataset, batches: list[list[int]], device: torch.device, *, min_size: int, max_size: int
) -> Iterable[list[Tensor]]:
    """Per batch: the raw JPEG bytes read from the shards here, decoded together on ``device``
    (nvJPEG on CUDA), flipped as the dataset flips them, resized by `resize_to_training_size`."""
    index, reader = dataset.index, dataset.reader
    for batch in batches:
        data = [
            torch.frombuffer(bytearray(reader.row(int(index.shards[i]), int(index.rows[i]))["image"]), dtype=torch.uint8)
            for i in batch
        ]  # fmt: skip
        decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        yield [
            resize_to_training_size(image.flip(-1) if dataset.flips(i) else image, min_size=min_size, max_size=max_size)
            for i, image in zip(batch, decoded, strict=True)
        ]  # fmt: skip


def time_device_decode(
    dataset: DetectionDataset, batches: list[list[int]], device: torch.device, *, min_size: int, max_size: int
) -> Timing:
    """`device_batches` timed, on CUDA up to the last kernel's end."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    images = device_batches(dataset, batches, device, min_size=min_size, max_size=max_size)
    return time_batches(GPU if device.type == "cuda" else f"{device.type} decode+resize", None, images, sync)


def report_table(timings: list[Timing], target: float) -> str:
    """The printed table: one row per mode and worker count."""
    lines = [
        f"{'mode':<18} {'workers':>7} {'img/s':>8} {'img/s/worker':>13} {'mean input HxW':>15} "
        f"{f'workers for {target:g} img/s':>22}"
    ]
    for t in timings:
        per_worker, needed = t.images_per_s_per_worker, t.workers_for(target)
        size = f"{t.mean_height:.0f}x{t.mean_width:.0f}"
        lines.append(
            f"{t.mode:<18} {'-' if t.workers is None else t.workers:>7} {t.images_per_s:8.1f} "
            f"{'-' if per_worker is None else f'{per_worker:.1f}':>13} {size:>15} {'-' if needed is None else needed:>22}"
        )  # fmt: skip
    return "\n".join(lines)


def prepared_data(args: argparse.Namespace, tmp: Path) -> tuple[Path, str, str]:
    """The preprocessed folder to time, its split and how to name it: ``--data``, ``--coco`` or synthetic."""
    if args.data is not None:
        return args.data, args.split or load_params(args.params).data.train_split, str(args.data)
    if args.coco is not None:
        root = fetch_and_preprocess(
            args.coco.resolve(), tmp, args.coco_split, limit=args.coco_limit, progress=False
        )
        return root, args.coco_split, f"{args.coco} {args.coco_split} (fetch --local-dir + preprocess)"
    params = load_params(args.params)
    generate_synthetic(params.data, tmp / "coco", progress=False)
    preprocess_dataset(
        tmp / "coco", tmp / "pre", splits=(params.data.train_split, params.data.val_split),
        cfg=params.preprocess, progress=False,
    )  # fmt: skip
    return tmp / "pre", args.split or params.data.train_split, "synthetic default"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = ModelConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--params", default="params.yaml", help="for the synthetic default: data: and preprocess: sections"
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--data", type=Path, help="a preprocessed folder (default: build the synthetic default)"
    )
    source.add_argument(
        "--coco", type=Path, help="a COCO-layout folder: fetch + preprocess --coco-split of it"
    )
    p.add_argument("--split", help="of --data; default: data.train_split of --params")
    p.add_argument("--coco-split", default="val2017", help="the split of --coco to time")
    p.add_argument("--coco-limit", type=int, help="only the first N images of --coco's annotation file")
    p.add_argument(
        "--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts to time"
    )
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--images", type=int, default=600, help="images timed per mode and worker count")
    p.add_argument("--min-size", type=int, default=defaults.min_size, help="training size of decode+resize")
    p.add_argument("--max-size", type=int, default=defaults.max_size, help="training size of decode+resize")
    p.add_argument("--target", type=float, default=40.0, help="images/s one GPU takes")
    p.add_argument("--threads", type=int, default=1, help="torch threads of this process (workers use 1)")
    p.add_argument("--out", type=Path, help="write the figures here as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    info = machine_description("cuda" if cuda else "cpu")
    info["cores"] = str(available_cores())
    load = os.getloadavg()
    date = datetime.datetime.now().isoformat(timespec="minutes")
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1/5/15 min); date: {date}")
    sizes = {"min_size": args.min_size, "max_size": args.max_size}
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        root, split, name = prepared_data(args, Path(tmp))
        dataset = DetectionDataset(root, split, train=True)
        batches = batch_plan(dataset, args.batch_size, args.images)
        print(f"data: {name}, {len(dataset)} images, batch {args.batch_size}, {args.images} images timed per row "
              f"after one untimed batch; decode+resize to {args.min_size}/{args.max_size}")  # fmt: skip
        timings: list[Timing] = []
        resized = AtTrainingSize(dataset, **sizes)
        for mode, data in ((DECODE, dataset), (DECODE_RESIZE, resized)):
            for workers in args.workers:
                timings.append(time_loader(data, batches, workers, mode))
        if cuda:
            timings.append(time_device_decode(dataset, batches, torch.device("cuda"), **sizes))
    print(report_table(timings, args.target))
    if not cuda:
        print(f"({GPU}: no CUDA device here)")
    if args.out:
        rows = [
            {**asdict(t), "images_per_s": t.images_per_s, "images_per_s_per_worker": t.images_per_s_per_worker,
             "workers_for_target": t.workers_for(args.target)}
            for t in timings
        ]  # fmt: skip
        report = {
            "machine": info, "load_average": list(load), "date": date, "data": name, "images": len(dataset),
            "batch_size": args.batch_size, **sizes, "target_images_per_s": args.target, "rows": rows,
        }  # fmt: skip
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
