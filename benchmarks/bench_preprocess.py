"""Preprocessing throughput (images/s) of stage preprocess's machinery, per worker count.

    .venv/bin/python benchmarks/bench_preprocess.py        # the synthetic default
    .venv/bin/python benchmarks/bench_preprocess.py --coco ../shared/data/coco-mini
    .venv/bin/python benchmarks/bench_preprocess.py --workers 1 2 --repeat 3

Without ``--coco`` the synthetic default (data section of ``--params``) is generated into a
temporary folder first (not timed). Each run preprocesses both splits into a temporary
folder: one verifying decode per image, RGB JPEG conversion of the others, shard/index/report/
manifest writing and the data hash, all timed (process
start-up and imports are not). Prints the machine, then per worker count the best and
median images/s over ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import PIL
from PIL import features

from pipeline.cluster import available_cores
from pipeline.config import load_params
from pipeline.fetch.synthetic import generate_synthetic
from pipeline.preprocess.stage import preprocess_dataset
from pipeline.profile.timing import machine_description


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--params", default="params.yaml", help="data: and preprocess: sections (defaults)")
    p.add_argument("--coco", type=Path, help="a COCO-layout folder (default: generate the synthetic set)")
    p.add_argument(
        "--workers", type=int, nargs="+", default=[1, available_cores()], help="process counts to time"
    )
    p.add_argument("--repeat", type=int, default=2, help="timed runs per worker count")
    args = p.parse_args()
    params = load_params(args.params)
    splits = (params.data.train_split, params.data.val_split)
    info = machine_description("cpu")
    info.update(
        cores=str(available_cores()),
        pillow=PIL.__version__,
        libjpeg_turbo=str(features.check_feature("libjpeg_turbo")),
    )
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    with tempfile.TemporaryDirectory(prefix="bench-preprocess-") as tmp:
        coco = args.coco
        if coco is None:
            coco = Path(tmp) / "coco"
            generate_synthetic(params.data, coco, progress=False)
        name = "synthetic default" if args.coco is None else str(args.coco)
        print(f"data: {name}, splits {list(splits)}, {params.preprocess.images_per_shard} images per shard")
        print(f"{'workers':>7} {'images':>7} {'best img/s':>11} {'median img/s':>13} {'img/s/worker':>13}")
        for workers in args.workers:
            cfg = dataclasses.replace(params.preprocess, workers=workers, use_ray=False)
            rates = []
            for _ in range(args.repeat):
                start = time.perf_counter()
                summary = preprocess_dataset(
                    coco,
                    Path(tmp) / "out",
                    splits=splits,
                    cfg=cfg,
                    progress=False,
                )
                seconds = time.perf_counter() - start
                images = sum(c["images_written"] for c in summary.counts.values())
                rates.append(images / seconds)
            best = max(rates)
            print(
                f"{workers:7d} {images:7d} {best:11.1f} {statistics.median(rates):13.1f} {best / workers:13.1f}"
            )


if __name__ == "__main__":
    main()
