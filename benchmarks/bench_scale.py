"""Data at COCO scale: what fetch, preprocess, the index, the loader, DVC and evaluation cost per size.

    nice -n 10 .venv/bin/python benchmarks/bench_scale.py --out scale.json                  # 1000, 10000, 118287
    nice -n 10 .venv/bin/python benchmarks/bench_scale.py --sizes 1000 10000 --work-dir /tmp/bench-scale

For each size N (train images; val is min(5000, N)) a COCO-shaped dataset
(`benchmarks/coco_shaped.py`: COCO's counts, boxes per image, categories and crowd share, 64x48
pictures) is generated into ``--work-dir`` (kept there and reused by later runs), then:

* fetch: ``python -m stages.fetch --local-dir`` (``data.source: local``) copies it; wall time
  and peak memory.
* preprocess: ``python -m stages.preprocess`` on the copy, at ``--min-size``/``--max-size``
  (default 48/64: the pictures pass through unresized, so what is measured is the per-image and
  per-file cost at COCO's counts, not pixel work; benchmarks/bench_preprocess.py measures that):
  wall time, peak RSS of the stage's main process and of its whole process tree (RSS summed over
  the processes, polled every 0.1 s: shared pages count once per process), files written
  (total, images, shards: ``.parquet``/``.arrow``/... files), and bytes.
* index: ``pipeline.dataset.read_index`` of the train split in a fresh process: seconds, RSS
  growth, and tracemalloc's peak and retained bytes (a second load; tracemalloc slows it).
* loader: a DataLoader over ``DetectionDataset(train=True)`` with the train loop's
  `GroupedBatchSampler` and `collate`, ``--loader-workers`` workers, one epoch (or
  ``--loader-images``): PSS and USS of every worker (psutil ``memory_full_info``) after the first
  batch and at the last one, with the main process's; images/s in all and per worker.
* dvc: a throwaway repository (``dvc init --no-scm``) in the size's folder: ``dvc add`` of the
  preprocessed folder, then ``dvc status`` (best of two).
* eval: against the val split's annotation file, `evaluate_detections` with ``--detections``
  random detections per image (a third near a ground-truth box; categories from the image's own
  plus three others, as a detector's are few per image) and `streaming_proposal_recall` with
  ``--proposals`` proposals per image: seconds and peak RSS growth (polled) of each.

Each measured step runs in its own process. The code depends only on the stage CLIs,
`read_index`, `DetectionDataset` (``len``, ``aspect_ratios``), `GroupedBatchSampler` and `collate`,
so it runs on the loose-JPEG format of today and on a sharded one. Prints the machine, the date
and one markdown table; ``--out`` writes every figure as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import threading
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import psutil
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
# The pipeline/ and stages/ beside this file, not an installed copy (also in the stage subprocesses).
if sys.path[:1] != [str(REPO_ROOT)]:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.coco_shaped import DONE_MARKER, generate_coco_shaped  # noqa: E402

MIB = 2**20
DEFAULT_SIZES = (1000, 10000, 118_287)
MAX_VAL_IMAGES = 5000
TRAIN_SPLIT, VAL_SPLIT = "train2017", "val2017"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
SHARD_SUFFIXES = frozenset({".parquet", ".arrow", ".feather", ".tar", ".tfrecord", ".npy", ".npz", ".lance"})
POLL_S = 0.1


# ----------------------------------------------------------------------------- measuring tools


class PeakMemory:
    """Polls the resident set of process ``pid`` (and of its descendants) until stopped.

    ``main``: the peak RSS of ``pid``; ``tree``: the peak of the RSS summed over ``pid`` and its
    descendants (shared pages count once per process). Polling misses peaks shorter than ``interval``.
    """

    def __init__(self, pid: int, interval: float = POLL_S) -> None:
        self.process = psutil.Process(pid)
        self.interval = interval
        self.main = 0
        self.tree = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        try:
            main = self.process.memory_info().rss
            children = self.process.children(recursive=True)
        except psutil.Error:
            return
        total = main
        for child in children:
            with suppress(psutil.Error):
                total += child.memory_info().rss
        self.main = max(self.main, main)
        self.tree = max(self.tree, total)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _env() -> dict[str, str]:
    """The environment of every subprocess: this checkout first on PYTHONPATH, no Ray cluster."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def run_measured(command: list[str], *, cwd: Path | None = None, log: Path | None = None) -> dict[str, Any]:
    """Run ``command``; return its wall seconds and peak RSS (MiB) of the process and of its tree.

    Raises RuntimeError with the end of its output when it fails. Output goes to ``log`` if given.
    """
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 -- closed below
    try:
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=cwd, env=_env(), stdout=out, stderr=subprocess.STDOUT)
        with PeakMemory(process.pid) as peak:
            code = process.wait()
        seconds = time.perf_counter() - start
    finally:
        if log:
            out.close()
    if code != 0:
        tail = Path(log).read_text()[-2000:] if log else ""
        raise RuntimeError(f"{' '.join(command)} exited {code}:\n{tail}")
    return {"seconds": seconds, "peak_rss_mib": peak.main / MIB, "peak_tree_rss_mib": peak.tree / MIB}


def run_child(kind: str, *args: str) -> dict[str, Any]:
    """This script's ``--child kind args`` in a fresh process; its last stdout line as JSON."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", kind, *args]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"child {kind} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def count_files(root: Path) -> dict[str, Any]:
    """Files under ``root`` (os.walk, every depth): total, images, shard files, bytes, count by suffix."""
    suffixes: Counter[str] = Counter()
    total_bytes = 0
    for folder, _, files in os.walk(root):
        for name in files:
            suffixes[Path(name).suffix.lower() or "(none)"] += 1
            total_bytes += os.stat(os.path.join(folder, name)).st_size
    return {
        "files": sum(suffixes.values()),
        "image_files": sum(n for s, n in suffixes.items() if s in IMAGE_SUFFIXES),
        "shard_files": sum(n for s, n in suffixes.items() if s in SHARD_SUFFIXES),
        "bytes": total_bytes,
        "by_suffix": dict(sorted(suffixes.items())),
    }


def machine() -> dict[str, Any]:
    """CPU model (/proc/cpuinfo), usable cores, RAM, OS, Python and the key library versions."""
    from pipeline.profile.timing import cpu_model

    cpu = cpu_model()
    import numpy
    import torch

    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
    }


# ----------------------------------------------------------------------------- children (fresh processes)


def child_index(root: str, split: str) -> dict[str, Any]:
    """read_index's cost in this fresh process: seconds and RSS/USS growth, then tracemalloc's figures."""
    from pipeline.dataset import read_index

    process = psutil.Process()
    gc.collect()
    before = process.memory_full_info()
    start = time.perf_counter()
    index = read_index(root, split)
    seconds = time.perf_counter() - start
    gc.collect()
    after = process.memory_full_info()
    # The index's own arrays (a SplitIndex's numpy columns; 0 for a format without them).
    fields = getattr(index, "__dataclass_fields__", {})
    arrays_bytes = sum(getattr(getattr(index, name), "nbytes", 0) for name in fields)
    del index
    gc.collect()
    # A second read: what one more index costs once the libraries (pyarrow's pools) are loaded.
    again = process.memory_full_info()
    second = read_index(root, split)
    gc.collect()
    second_growth = (process.memory_full_info().rss - again.rss) / MIB
    del second
    gc.collect()
    tracemalloc.start()
    index = read_index(root, split)
    retained, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "seconds": seconds,
        "rss_growth_mib": (after.rss - before.rss) / MIB,
        "uss_growth_mib": (after.uss - before.uss) / MIB,
        "second_read_rss_growth_mib": second_growth,
        "arrays_mib": arrays_bytes / MIB,
        "tracemalloc_retained_mib": retained / MIB,
        "tracemalloc_peak_mib": peak / MIB,
        "type": type(index).__name__,
    }


def _optional(figures: dict[str, Any], key: str) -> str:
    """``figures[key]`` to one decimal, or "-" for a run of an older version that did not measure it."""
    value = figures.get(key)
    return "-" if value is None else f"{value:.1f}"


def _worker_memory(parent: psutil.Process) -> list[dict[str, float]]:
    """PSS/USS/RSS (MiB) of the DataLoader workers: the children running this same command line."""
    own = parent.cmdline()
    out = []
    for child in parent.children():
        try:
            if child.cmdline() != own:  # e.g. multiprocessing's resource tracker
                continue
            info = child.memory_full_info()
        except psutil.Error:
            continue
        out.append(
            {
                "pid": child.pid,
                "pss_mib": info.pss / MIB,
                "uss_mib": info.uss / MIB,
                "rss_mib": info.rss / MIB,
            }
        )
    return out


def _process_memory(process: psutil.Process) -> dict[str, float]:
    info = process.memory_full_info()
    return {"pss_mib": info.pss / MIB, "uss_mib": info.uss / MIB, "rss_mib": info.rss / MIB}


def child_loader(root: str, split: str, workers: int, batch_size: int, max_images: int) -> dict[str, Any]:
    """One epoch (or ``max_images``) of the training DataLoader; worker memory at its start and end."""
    import torch
    from torch.utils.data import DataLoader

    from pipeline.dataset import DetectionDataset, GroupedBatchSampler, collate

    torch.set_num_threads(1)
    process = psutil.Process()
    start = time.perf_counter()
    dataset = DetectionDataset(root, split, train=True, seed=0)
    sampler = GroupedBatchSampler(dataset, batch_size, shuffle=True, seed=0)
    dataset_seconds = time.perf_counter() - start
    main_before = _process_memory(process)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers)
    batches = len(sampler)
    if batches < 2:
        raise ValueError(f"{root}/{split}: {len(dataset)} images make {batches} batch(es); need 2 to measure")
    if max_images:
        batches = min(batches, max(2, -(-max_images // batch_size)))
    iterator = iter(loader)
    images, _ = next(iterator)  # the workers are up and have decoded their first batches
    start = time.perf_counter()
    at_start = {"workers": _worker_memory(process), "main": _process_memory(process)}
    seen = 0
    for _ in range(batches - 2):
        images, _ = next(iterator)
        seen += len(images)
    at_end = {"workers": _worker_memory(process), "main": _process_memory(process)}
    images, _ = next(iterator)  # the last batch: the workers are still alive above
    seen += len(images)
    seconds = time.perf_counter() - start
    del iterator
    return {
        "dataset_images": len(dataset),
        "dataset_seconds": dataset_seconds,
        "main_before_loader": main_before,
        "batches": batches,
        "images_timed": seen,
        "seconds": seconds,
        "images_per_s": seen / seconds,
        "images_per_s_per_worker": seen / seconds / max(1, workers),
        "start": at_start,
        "end": at_end,
    }


@contextmanager
def _peak_growth() -> Iterator[dict[str, float]]:
    """Yields a dict filled on exit with ``seconds`` and ``peak_rss_growth_mib`` (polled) of the block."""
    gc.collect()
    result: dict[str, float] = {}
    base = psutil.Process().memory_info().rss
    start = time.perf_counter()
    with PeakMemory(os.getpid(), interval=0.05) as peak:
        yield result
    result["seconds"] = time.perf_counter() - start
    result["peak_rss_growth_mib"] = max(0, peak.main - base) / MIB


def child_eval(annotation_file: str, detections: int, proposals: int, seed: int) -> dict[str, Any]:
    """evaluate_detections and streaming_proposal_recall on random results over the file's images."""
    import numpy as np

    from pipeline.evaluate.coco_eval import evaluate_detections, load_ground_truth, streaming_proposal_recall

    gt = load_ground_truth(annotation_file)
    image_ids = sorted(gt.getImgIds())
    categories = np.asarray(gt.getCatIds())
    rng = np.random.default_rng(seed)

    def random_boxes(rng: np.random.Generator, image_id: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(count, 4) xywh boxes in the image, a third near its ground truth; and the gt index or -1."""
        image = gt.imgs[image_id]
        width, height = image["width"], image["height"]
        truth = np.asarray([a["bbox"] for a in gt.imgToAnns[image_id]], dtype=np.float64).reshape(-1, 4)
        near = count // 3 if len(truth) else 0
        source = rng.integers(len(truth), size=near) if near else np.zeros(0, dtype=np.int64)
        jitter = truth[source] + rng.normal(0, 0.1, size=(near, 4)) * truth[source][:, [2, 3, 2, 3]]
        wh = np.exp(rng.uniform(np.log(2), np.log([width, height]), size=(count - near, 2)))
        xy = rng.uniform(0, 1, size=(count - near, 2)) * ([width, height] - wh)
        boxes = np.concatenate([jitter, np.concatenate([xy, wh], axis=1)])
        boxes[:, 2:] = np.maximum(boxes[:, 2:], 0.5)
        return boxes, np.concatenate([source, np.full(count - near, -1)])

    results = []
    for image_id in image_ids:
        boxes, source = random_boxes(rng, image_id, detections)
        own = [a["category_id"] for a in gt.imgToAnns[image_id]]
        choices = np.asarray(sorted(set(own) | set(rng.choice(categories, 3).tolist())))
        cats = np.where(source >= 0, np.asarray(own + [0])[source], rng.choice(choices, detections))
        scores = rng.random(detections)
        results.extend(
            {"image_id": image_id, "category_id": int(c), "bbox": b.tolist(), "score": float(s)}
            for b, c, s in zip(boxes, cats, scores, strict=True)
        )
    with _peak_growth() as detection_cost:
        metrics = evaluate_detections(gt, results).metrics
    del results

    def proposal_stream() -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        stream = np.random.default_rng(seed + 1)
        for image_id in image_ids:
            boxes, _ = random_boxes(stream, image_id, proposals)
            yield image_id, boxes, stream.random(proposals)

    with _peak_growth() as proposal_cost:
        recall = streaming_proposal_recall(gt, proposal_stream())
    return {
        "images": len(image_ids),
        "ground_truth_boxes": len(gt.anns),
        "detections_per_image": detections,
        "proposals_per_image": proposals,
        "detections": {**detection_cost, "AP": metrics["AP"]},
        "proposals": {**proposal_cost, "AR1k": recall["AR1k"]},
    }


CHILDREN: dict[str, Callable[..., dict[str, Any]]] = {
    "index": lambda root, split: child_index(root, split),
    "loader": lambda root, split, workers, batch, images: child_loader(
        root, split, int(workers), int(batch), int(images)
    ),
    "eval": lambda ann, dets, props, seed: child_eval(ann, int(dets), int(props), int(seed)),
}


# ----------------------------------------------------------------------------- one size


def dataset_for(work_dir: Path, train: int, val: int, seed: int, workers: int) -> tuple[Path, float | None]:
    """The generated COCO-shaped folder for ``(train, val, seed)`` (cached); seconds if made now."""
    folder = work_dir / "coco-shaped" / f"train{train}-val{val}-seed{seed}"
    if (folder / DONE_MARKER).is_file():
        return folder, None
    start = time.perf_counter()
    generate_coco_shaped(
        folder, train_images=train, val_images=val, seed=seed, train_split=TRAIN_SPLIT,
        val_split=VAL_SPLIT, workers=workers,
    )  # fmt: skip
    return folder, time.perf_counter() - start


def write_params(path: Path, args: argparse.Namespace) -> None:
    """The project's params.yaml with data.source local, the benchmark's model size and workers."""
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    raw["data"].update(source="local", max_images=None, train_split=TRAIN_SPLIT, val_split=VAL_SPLIT)
    raw["model"].update(min_size=args.min_size, max_size=args.max_size, num_classes=80)
    raw.setdefault("preprocess", {}).update(workers=args.preprocess_workers, use_ray=False)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def dvc_timings(repo: Path, target: str, log: Path) -> dict[str, Any]:
    """``dvc add target`` then ``dvc status`` (best of two) in a fresh ``dvc init --no-scm`` repo."""
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run(["rm", "-rf", str(repo / ".dvc"), str(repo / f"{target}.dvc")], check=True)
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=repo, env=_env(), check=True)
    add = run_measured([*dvc, "add", "-q", target], cwd=repo, log=log)
    status = [run_measured([*dvc, "status", "-q"], cwd=repo, log=log) for _ in range(2)]
    cache = count_files(repo / ".dvc" / "cache")
    return {
        "add_seconds": add["seconds"],
        "add_peak_rss_mib": add["peak_tree_rss_mib"],
        "status_seconds": min(s["seconds"] for s in status),
        "status_seconds_first": status[0]["seconds"],
        "cache_files": cache["files"],
    }


def measure_size(size: int, args: argparse.Namespace) -> dict[str, Any]:
    val = min(MAX_VAL_IMAGES, size)
    print(f"== {size} train + {val} val images", flush=True)
    source, generate_seconds = dataset_for(args.work_dir, size, val, args.seed, args.generate_workers)
    run = args.work_dir / f"size-{size}"
    run.mkdir(parents=True, exist_ok=True)
    params = run / "params.yaml"
    write_params(params, args)
    coco, pre = run / "coco", run / "preprocessed"
    startup = run_measured([sys.executable, "-m", "stages.preprocess", "--help"])
    fetch = run_measured(
        [sys.executable, "-m", "stages.fetch", "--params", str(params), "--out", str(coco),
         "--local-dir", str(source), "--force"], log=run / "fetch.log",
    )  # fmt: skip
    print(f"   fetch {fetch['seconds']:.1f} s", flush=True)
    preprocess = run_measured(
        [sys.executable, "-m", "stages.preprocess", "--params", str(params), "--coco", str(coco),
         "--out", str(pre), "--force"], log=run / "preprocess.log",
    )  # fmt: skip
    preprocess["images_per_s"] = (size + val) / preprocess["seconds"]
    print(f"   preprocess {preprocess['seconds']:.1f} s", flush=True)
    result: dict[str, Any] = {
        "train_images": size,
        "val_images": val,
        "generate_seconds": generate_seconds,
        "annotations": sum(json.loads((source / DONE_MARKER).read_text())["annotations"].values()),
        "annotation_json_bytes": (source / "annotations" / f"instances_{TRAIN_SPLIT}.json").stat().st_size,
        "stage_startup_seconds": startup["seconds"],
        "fetch": fetch,
        "preprocess": preprocess,
        "output": count_files(pre),
        "index": run_child("index", str(pre), TRAIN_SPLIT),
    }
    print(f"   index {result['index']['rss_growth_mib']:.0f} MiB", flush=True)
    result["loader"] = run_child(
        "loader",
        str(pre),
        TRAIN_SPLIT,
        str(args.loader_workers),
        str(args.batch_size),
        str(args.loader_images),
    )
    print(f"   loader {result['loader']['images_per_s']:.0f} img/s", flush=True)
    if not args.skip_dvc:
        result["dvc"] = dvc_timings(run, pre.name, run / "dvc.log")
        print(f"   dvc status {result['dvc']['status_seconds']:.1f} s", flush=True)
    result["eval"] = run_child(
        "eval", str(coco / "annotations" / f"instances_{VAL_SPLIT}.json"),
        str(args.detections), str(args.proposals), str(args.seed),
    )  # fmt: skip
    print(f"   eval {result['eval']['detections']['seconds']:.1f} s", flush=True)
    return result


# ----------------------------------------------------------------------------- report


def _workers_summary(side: dict[str, Any], key: str) -> str:
    values = [w[key] for w in side["workers"]]
    return f"{sum(values) / len(values):.0f} ({min(values):.0f}-{max(values):.0f})" if values else "-"


def table(report: dict[str, Any]) -> str:
    """One markdown table: a row per measurement, a column per size."""
    sizes = report["sizes"]
    rows: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("val images", lambda r: f"{r['val_images']}"),
        ("annotations (train + val), boxes per image", lambda r: f"{r['annotations'] / (r['train_images'] + r['val_images']):.2f}"),
        ("annotation JSON, train, MB", lambda r: f"{r['annotation_json_bytes'] / 1e6:.0f}"),
        ("stage start-up (`--help`): wall s", lambda r: f"{r['stage_startup_seconds']:.1f}"),
        ("fetch (local copy): wall s", lambda r: f"{r['fetch']['seconds']:.1f}"),
        ("fetch: peak RSS MiB", lambda r: f"{r['fetch']['peak_rss_mib']:.0f}"),
        ("preprocess: wall s", lambda r: f"{r['preprocess']['seconds']:.1f}"),
        ("preprocess: images/s", lambda r: f"{r['preprocess']['images_per_s']:.0f}"),
        ("preprocess: peak RSS MiB, main process", lambda r: f"{r['preprocess']['peak_rss_mib']:.0f}"),
        ("preprocess: peak RSS MiB, process tree", lambda r: f"{r['preprocess']['peak_tree_rss_mib']:.0f}"),
        ("output: files", lambda r: f"{r['output']['files']}"),
        ("output: image files", lambda r: f"{r['output']['image_files']}"),
        ("output: shard files", lambda r: f"{r['output']['shard_files']}"),
        ("output: MB (apparent)", lambda r: f"{r['output']['bytes'] / 1e6:.0f}"),
        ("train index load: s", lambda r: f"{r['index']['seconds']:.2f}"),
        ("train index: RSS growth MiB (first read: libraries included)",
         lambda r: f"{r['index']['rss_growth_mib']:.1f}"),
        ("train index: RSS growth MiB of a second read", lambda r: _optional(r["index"], "second_read_rss_growth_mib")),
        ("train index: numpy arrays MiB", lambda r: _optional(r["index"], "arrays_mib")),
        ("train index: tracemalloc retained / peak MiB",
         lambda r: f"{r['index']['tracemalloc_retained_mib']:.1f} / {r['index']['tracemalloc_peak_mib']:.1f}"),
        ("loader: images/s (all workers)", lambda r: f"{r['loader']['images_per_s']:.0f}"),
        ("loader: images/s per worker", lambda r: f"{r['loader']['images_per_s_per_worker']:.0f}"),
        ("loader: images timed", lambda r: f"{r['loader']['images_timed']}"),
        ("loader worker PSS MiB, start: mean (min-max)", lambda r: _workers_summary(r["loader"]["start"], "pss_mib")),
        ("loader worker PSS MiB, end", lambda r: _workers_summary(r["loader"]["end"], "pss_mib")),
        ("loader worker USS MiB, start", lambda r: _workers_summary(r["loader"]["start"], "uss_mib")),
        ("loader worker USS MiB, end", lambda r: _workers_summary(r["loader"]["end"], "uss_mib")),
        ("loader main process PSS MiB, start / end",
         lambda r: f"{r['loader']['start']['main']['pss_mib']:.0f} / {r['loader']['end']['main']['pss_mib']:.0f}"),
        ("dvc add: s", lambda r: f"{r['dvc']['add_seconds']:.1f}" if "dvc" in r else "-"),
        ("dvc status: s", lambda r: f"{r['dvc']['status_seconds']:.1f}" if "dvc" in r else "-"),
        ("eval images", lambda r: f"{r['eval']['images']}"),
        ("eval detections (COCOeval): s", lambda r: f"{r['eval']['detections']['seconds']:.1f}"),
        ("eval detections: peak RSS growth MiB", lambda r: f"{r['eval']['detections']['peak_rss_growth_mib']:.0f}"),
        ("eval proposals (streaming): s", lambda r: f"{r['eval']['proposals']['seconds']:.1f}"),
        ("eval proposals: peak RSS growth MiB", lambda r: f"{r['eval']['proposals']['peak_rss_growth_mib']:.0f}"),
    ]  # fmt: skip
    lines = [
        "| train images | " + " | ".join(f"{r['train_images']:,}" for r in sizes) + " |",
        "|---|" + "---:|" * len(sizes),
    ]
    lines += [f"| {name} | " + " | ".join(cell(r) for r in sizes) + " |" for name, cell in rows]
    return "\n".join(lines)


def header(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    return (
        f"machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, {m['os']}, Python {m['python']}, "
        f"torch {m['torch']}\ndate: {report['date']}\nsettings: model size {s['min_size']}/{s['max_size']}, "
        f"preprocess workers {s['preprocess_workers'] or 'all'}, loader {s['loader_workers']} workers x batch "
        f"{s['batch_size']}, eval {s['detections']} detections + {s['proposals']} proposals per image"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/bench_scale.py", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), help="train image counts")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/bench-scale"), help="data and outputs (kept)")
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-size", type=int, default=48, help="model.min_size for preprocess (default 48)")
    p.add_argument("--max-size", type=int, default=64, help="model.max_size for preprocess (default 64)")
    p.add_argument("--preprocess-workers", type=int, default=0, help="preprocess.workers (0 = all cores)")
    p.add_argument("--generate-workers", type=int, default=0, help="generator processes (0 = all cores)")
    p.add_argument("--loader-workers", type=int, default=4, help="DataLoader workers (default 4)")
    p.add_argument("--batch-size", type=int, default=4, help="images per batch (default 4)")
    p.add_argument(
        "--loader-images", type=int, default=0, help="stop the epoch after this many (0: a whole epoch)"
    )
    p.add_argument("--detections", type=int, default=100, help="detections per val image (default 100)")
    p.add_argument("--proposals", type=int, default=1000, help="proposals per val image (default 1000)")
    p.add_argument("--skip-dvc", action="store_true", help="leave out dvc add / dvc status")
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    args, rest = p.parse_known_args(argv)
    if args.child:
        print(json.dumps(CHILDREN[args.child](*rest)))
        return 0
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    if min(args.sizes) < 1:
        p.error("--sizes must be >= 1")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "machine": machine(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])],
        "settings": {k: v for k, v in vars(args).items() if k not in ("child", "work_dir", "out", "sizes")}
        | {"work_dir": str(args.work_dir)},
        "sizes": [],
    }
    for size in args.sizes:
        result = measure_size(size, args)
        report["sizes"].append(result)
        if args.out:  # after every size: a long run that stops later keeps what it measured
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(header(report))
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
