"""Stage fetch: a COCO-layout dataset (synthetic, downloaded COCO, or a local copy).

Run (dvc.yaml does this)::

    python -m stages.fetch --params params.yaml --out data/coco

Writes ``<out>/annotations/instances_<split>.json`` and ``<out>/<split>/*.jpg`` for
data.train_split and data.val_split, built beside ``<out>`` and renamed when complete.

* ``data.source: synthetic`` (default): generated shapes, seconds, no network.
* ``data.source: coco``: COCO 2017 from data.base_url; with ``data.max_images: 500`` only the
  first 500 images of each split (one by one, in parallel) instead of the 19 GB zips.
  Interrupted downloads resume from ``<out>.downloads`` on the next run (deleted after success);
  ``--downloads DIR`` names another folder, which is kept as a cache of the zips.
* ``data.source: local``: a COCO-layout folder already on disk, given as ``--local-dir DIR``
  (also list it under the stage's ``deps:`` in dvc.yaml so DVC notices when it changes).

Needs no GPU and no Ray. Exit status 1 with a message naming the URL or file on failure.

Params read: data.{source, base_url, max_images, train_split, val_split, download_workers,
retries, timeout_s, seed, synthetic_train_images, synthetic_val_images, synthetic_width,
synthetic_height, local_link}.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.coco_format import CocoFormatError
from pipeline.config import ConfigError, load_params
from pipeline.fetch.archive import ArchiveError
from pipeline.fetch.coco_source import FetchError
from pipeline.fetch.download import DownloadError
from pipeline.fetch.stage import fetch_dataset
from pipeline.io import OutputError
from stages.cli import FAILED, fail


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.fetch", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file (section data:)")
    parser.add_argument("--out", required=True, help="COCO-layout folder to write, e.g. data/coco")
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace --out even if this stage did not write it (its files are lost)",
    )
    parser.add_argument("--local-dir", help="data.source: local: the COCO-layout folder to copy")
    parser.add_argument(
        "--downloads",
        help="where downloads wait for a resume; kept as a cache (default <out>.downloads, deleted after success)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        params = load_params(args.params)
        summaries = fetch_dataset(
            params.data, args.out, local_dir=args.local_dir, downloads=args.downloads, force=args.force
        )
    except (ConfigError, ArchiveError, CocoFormatError, OutputError) as err:
        return fail("fetch", err)
    except (FetchError, DownloadError) as err:  # the host, not the input: a rerun may succeed
        return fail("fetch", err, FAILED)
    for s in summaries:
        print(
            f"{args.out}: {s.split}: {s.images} images, {s.annotations} annotations, {s.categories} categories"
        )
        if s.missing_files:
            shown = ", ".join(s.missing_files[:5]) + (" ..." if len(s.missing_files) > 5 else "")
            print(
                f"warning: {s.split}: {len(s.missing_files)} listed images are missing ({shown})",
                file=sys.stderr,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
