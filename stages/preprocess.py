"""Stage preprocess: the fetched COCO folder into Parquet shards of original images + an index for training.

Run (dvc.yaml does this)::

    python -m stages.preprocess --params params.yaml --coco data/coco --out data/preprocessed

Verifies every image of data.train_split and data.val_split (one decode), keeps its original
JPEG bytes (converting only what is not an RGB JPEG), clips the boxes (original pixels), maps
COCO category ids to labels 1..K, and writes ``<out>/<split>/{shard-NNNNN.parquet, index.parquet,
split.json}`` (preprocess.images_per_shard images a shard), ``categories.json``, ``report.json``
(problems per file, counts) and ``manifest.json`` (``data_hash``); see `pipeline.preprocess.stage`
and, for the format, `pipeline.dataset`. Images are not resized: the model does that. Runs on
every core (preprocess.workers; 0 = all). As Ray tasks: set ``preprocess.use_ray: true``, on
the cluster at ``RAY_ADDRESS`` (else a local one); images travel to the tasks as bytes and the
code travels with the job, so nodes need no shared filesystem. ``RAY_ADDRESS`` alone does not
move this stage to the cluster; the first log line says where it runs. No GPU needed.

Bad images and annotations are skipped and reported (an image over preprocess.max_pixels or
whose size differs from its annotation's width/height is one); a malformed annotation file or
a split without a usable image exits 2 naming the file. A worker process that dies (killed
for memory, a crash) exits 1 naming the images it may have held and how to rerun.

Params read: data.{train_split, val_split}, model.num_classes (a warning only),
preprocess.{workers, jpeg_quality, max_pixels, images_per_shard, use_ray}.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.cluster import ClusterError
from pipeline.coco_format import CocoFormatError
from pipeline.config import ConfigError, load_params
from pipeline.io import OutputError
from pipeline.preprocess.stage import PreprocessCrash, PreprocessError, preprocess_dataset
from stages.cli import FAILED, fail

SHOWN_PROBLEMS = 10


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.preprocess", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--params", default="params.yaml", help="params file (sections data:, preprocess:, model:)"
    )
    parser.add_argument(
        "--coco", required=True, help="COCO-layout folder written by stage fetch, e.g. data/coco"
    )
    parser.add_argument(
        "--out",
        required=True,
        help="folder to write, e.g. data/preprocessed, or an object-store URI s3://...",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace --out even if this stage did not write it (its files are lost)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        params = load_params(args.params)
        summary = preprocess_dataset(
            args.coco,
            args.out,
            splits=(params.data.train_split, params.data.val_split),
            cfg=params.preprocess,
            force=args.force,
        )
    except (ConfigError, CocoFormatError, PreprocessError, ClusterError, OutputError) as err:
        return fail("preprocess", err)
    except PreprocessCrash as err:
        return fail("preprocess", err, FAILED)
    for problem in summary.problems[:SHOWN_PROBLEMS]:
        print(f"warning: {problem['message']}", file=sys.stderr)
    if len(summary.problems) > SHOWN_PROBLEMS:
        print(
            f"warning: ... {len(summary.problems) - SHOWN_PROBLEMS} more in {args.out}/report.json",
            file=sys.stderr,
        )
    for split, counts in summary.counts.items():
        print(
            f"{args.out}/{split}: {counts['images_written']} images ({counts['images_skipped']} skipped, "
            f"{counts['images_converted']} converted to RGB), {counts['boxes']} boxes, "
            f"{counts['crowd_boxes']} crowd, {counts['boxes_dropped']} dropped"
        )
    print(f"data_hash {summary.data_hash}")
    if params.model.num_classes != summary.num_classes:
        print(
            f"warning: model.num_classes is {params.model.num_classes} but the data has {summary.num_classes} "
            "categories: set model.num_classes to match before training",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
