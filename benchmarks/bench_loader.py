"""Training loader throughput: images/s of DetectionDataset + GroupedBatchSampler + collate.

    .venv/bin/python benchmarks/bench_loader.py                        # the synthetic default, built in a temp dir
    .venv/bin/python benchmarks/bench_loader.py --data data/preprocessed --split train2017
    .venv/bin/python benchmarks/bench_loader.py --workers 0 1 2 --images 800

What is timed is a torch DataLoader in training mode (JPEG decode with torchvision.io,
random horizontal flip of the uint8 image, aspect-ratio grouped batches of ``--batch-size``),
iterated until ``--images`` images came out; the first batch (worker start-up) is not
timed. ``--workers 0`` decodes in this process. Prints the machine, then per worker count
images/s and images/s per loader worker (workers 0 counts as one).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from pipeline.cluster import available_cores
from pipeline.config import load_params
from pipeline.dataset import DetectionDataset, GroupedBatchSampler, collate
from pipeline.fetch.synthetic import generate_synthetic
from pipeline.preprocess.stage import preprocess_dataset
from pipeline.profile.timing import machine_description


def images_per_second(dataset: DetectionDataset, workers: int, batch_size: int, images: int) -> float:
    sampler = GroupedBatchSampler(dataset, batch_size, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers)
    seen, epoch, start = 0, 0, None
    while seen < images:
        sampler.set_epoch(epoch)
        for batch, _ in loader:
            if start is None:  # the first batch pays for the workers' start-up: not timed
                start = time.perf_counter()
                continue
            seen += len(batch)
            if seen >= images:
                break
        epoch += 1
    return seen / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--params", default="params.yaml", help="for the synthetic default: data: and preprocess: sections"
    )
    p.add_argument("--data", type=Path, help="a preprocessed folder (default: build the synthetic default)")
    p.add_argument("--split", help="default: data.train_split of --params")
    p.add_argument(
        "--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts to time"
    )
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--images", type=int, default=600, help="images timed per worker count")
    p.add_argument("--threads", type=int, default=1, help="torch threads of this process (workers use 1)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    split = args.split or params.data.train_split
    info = machine_description("cpu")
    info["cores"] = str(available_cores())
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        data = args.data
        if data is None:
            data = Path(tmp) / "pre"
            generate_synthetic(params.data, Path(tmp) / "coco", progress=False)
            preprocess_dataset(
                Path(tmp) / "coco", data, splits=(params.data.train_split, params.data.val_split),
                cfg=params.preprocess, progress=False,
            )  # fmt: skip
        dataset = DetectionDataset(data, split, train=True)
        width, height = dataset.index.widths[0], dataset.index.heights[0]
        print(f"data: {data if args.data else 'synthetic default'} {split}, {len(dataset)} images, "
              f"first {width}x{height}, batch {args.batch_size}")  # fmt: skip
        print(f"{'workers':>7} {'img/s':>8} {'img/s/worker':>13}")
        for workers in args.workers:
            rate = images_per_second(dataset, workers, args.batch_size, args.images)
            print(f"{workers:7d} {rate:8.1f} {rate / max(1, workers):13.1f}")


if __name__ == "__main__":
    main()
