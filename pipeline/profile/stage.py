"""The profile stage's outputs: flat metrics for DVC, the component split as CSV (for
`dvc plots`) and PNG, a table for people, and the same logged to the model's MLflow run.

Metric names (all flat, values numbers; ms = milliseconds, MB = 2**20 bytes):

    <device>.<subject>.bs<b>.{images_per_s, latency_median_ms, latency_p90_ms, cpu_time_median_ms,
                              memory_mb, working_memory_mb, split.<part>_ms}
    <device>.train.<subject>.{images_per_s, step_median_ms, step_p90_ms, cpu_time_median_ms,
                              memory_mb, split.<part>_ms}
    <device>.bs<b>.ours_over_torchvision.{latency, cpu_time, memory}   < 1: ours is better
    <device>.train.ours_over_torchvision.{step_time, cpu_time, memory}
    <device>.bs<b>.fpn_over_single_c4.latency                    the paper: about 1
    <device>.bs<b>.{detections, unmatched, max_box_diff, max_score_diff}
                                    ours vs torchvision, same weights, at score threshold 0

The split CSV has one row per (device, subject, batch size, part): ``row`` (a unique label
for a horizontal bar chart: ``x: ms, y: row``), device, subject, kind, batch_size, part, ms,
share (of the call's total).
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.config import Params
from pipeline.io import atomic_write_bytes
from pipeline.model_file import load_model_file
from pipeline.profile.on_cluster import profile_on_cluster, runs_on_cluster
from pipeline.profile.suite import Measurement, ProfileResult, run_profile
from pipeline.tracking.run import TrackedRun, tracking_uri

MB = 2**20


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def _prefix(m: Measurement) -> str:
    if m.kind == "train_step":
        return f"{m.device}.train.{m.subject}"
    return f"{m.device}.{m.subject}.bs{m.timing.batch_size}"


def flat_metrics(result: ProfileResult) -> dict[str, float]:
    """The metrics JSON's content (see the module docstring for the names)."""
    metrics: dict[str, float] = {}
    for m in result.measurements:
        prefix, t = _prefix(m), m.timing
        step = "step" if m.kind == "train_step" else "latency"
        metrics[f"{prefix}.images_per_s"] = t.images_per_s
        metrics[f"{prefix}.{step}_median_ms"] = t.median_s * 1000
        metrics[f"{prefix}.{step}_p90_ms"] = t.p90_s * 1000
        if t.cpu_seconds:
            metrics[f"{prefix}.cpu_time_median_ms"] = t.cpu_median_s * 1000
        if m.memory_bytes >= 0:
            metrics[f"{prefix}.memory_mb"] = m.memory_bytes / MB
            metrics[f"{prefix}.working_memory_mb"] = m.working_bytes / MB
        for part, seconds in t.split_s().items():
            metrics[f"{prefix}.split.{part}_ms"] = seconds * 1000
    devices = sorted({m.device for m in result.measurements})
    batch_sizes = sorted({m.timing.batch_size for m in result.measurements if m.kind == "inference"})
    for device in devices:
        for b in batch_sizes:
            ours, theirs = (
                result.find(device, "ref_ours", "inference", b),
                result.find(device, "ref_torchvision", "inference", b),
            )
            if ours and theirs:
                key = f"{device}.bs{b}.ours_over_torchvision"
                metrics[f"{key}.latency"] = _ratio(ours.timing.median_s, theirs.timing.median_s)
                metrics[f"{key}.cpu_time"] = _ratio(ours.timing.cpu_median_s, theirs.timing.cpu_median_s)
                if ours.memory_bytes > 0 and theirs.memory_bytes > 0:
                    metrics[f"{key}.memory"] = _ratio(ours.memory_bytes, theirs.memory_bytes)
            fpn, single = (
                result.find(device, "model", "inference", b),
                result.find(device, "single_c4", "inference", b),
            )
            if fpn and single:
                metrics[f"{device}.bs{b}.fpn_over_single_c4.latency"] = _ratio(
                    fpn.timing.median_s, single.timing.median_s
                )
        ours, theirs = (
            result.find(device, "ref_ours", "train_step"),
            result.find(device, "ref_torchvision", "train_step"),
        )
        if ours and theirs:
            metrics[f"{device}.train.ours_over_torchvision.step_time"] = _ratio(
                ours.timing.median_s, theirs.timing.median_s
            )
            metrics[f"{device}.train.ours_over_torchvision.cpu_time"] = _ratio(
                ours.timing.cpu_median_s, theirs.timing.cpu_median_s
            )
            if ours.memory_bytes > 0 and theirs.memory_bytes > 0:
                metrics[f"{device}.train.ours_over_torchvision.memory"] = _ratio(
                    ours.memory_bytes, theirs.memory_bytes
                )
    metrics.update(result.checks)
    return metrics


def split_rows(result: ProfileResult) -> Iterator[dict[str, Any]]:
    """One dict per (measurement, part) for the split CSV."""
    for m in result.measurements:
        total = m.timing.median_s
        for part, seconds in m.timing.split_s().items():
            label = f"{m.device} {m.subject} " + (
                "train" if m.kind == "train_step" else f"bs{m.timing.batch_size}"
            )
            yield {
                "row": f"{label}: {part}",
                "device": m.device,
                "subject": m.subject,
                "kind": m.kind,
                "batch_size": m.timing.batch_size,
                "part": part,
                "ms": round(seconds * 1000, 3),
                "share": round(seconds / total, 4) if total > 0 else 0.0,
            }


def write_metrics(result: ProfileResult, path: Path) -> dict[str, float]:
    metrics = flat_metrics(result)
    text = json.dumps(
        {k: (None if v != v else round(v, 6)) for k, v in metrics.items()}, indent=2, sort_keys=True
    )
    atomic_write_bytes(path, (text + "\n").encode())
    return metrics


def write_split_csv(result: ProfileResult, path: Path) -> None:
    buffer = io.StringIO()
    fields = ["row", "device", "subject", "kind", "batch_size", "part", "ms", "share"]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(split_rows(result))
    atomic_write_bytes(path, buffer.getvalue().encode())


def write_split_png(result: ProfileResult, path: Path) -> None:
    """Stacked horizontal bars, one per measurement, one colour per part."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [m for m in result.measurements if m.timing.parts]
    fig, axes = plt.subplots(
        nrows=2,
        figsize=(10, 1.2 + 0.45 * len(bars)),
        squeeze=False,
        gridspec_kw={
            "height_ratios": [
                max(1, sum(m.kind == "inference" for m in bars)),
                max(1, sum(m.kind == "train_step" for m in bars)),
            ]
        },
    )
    for ax, kind, title in (
        (axes[0][0], "inference", "inference"),
        (axes[1][0], "train_step", "training step"),
    ):
        rows = [m for m in bars if m.kind == kind]
        if not rows:
            ax.set_visible(False)
            continue
        labels = [f"{m.device} {m.subject} bs{m.timing.batch_size}" for m in rows]
        parts = list(rows[0].timing.split_s())
        left = [0.0] * len(rows)
        cmap = plt.get_cmap("tab10")
        for i, part in enumerate(parts):
            widths = [m.timing.split_s().get(part, 0.0) * 1000 for m in rows]
            ax.barh(labels, widths, left=left, label=part, color=cmap(i % 10))
            left = [a + b for a, b in zip(left, widths, strict=True)]
        ax.invert_yaxis()
        ax.set_xlabel("ms (median call, split by part)")
        ax.set_title(title)
        ax.legend(loc="lower right", fontsize="small", ncols=min(4, len(parts)))
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def format_table(result: ProfileResult) -> str:
    """A plain-text table: one line per measurement, then the ratios and notes."""
    machine = ", ".join(f"{k} {v}" for k, v in result.machine.items())
    lines = [f"machine: {machine}"]
    header = (
        f"{'device':6} {'subject':20} {'kind':6} {'bs':>3} {'p50 ms':>9} {'p90 ms':>9} {'cpu ms':>9} "
        f"{'img/s':>8} {'mem MB':>8}  split (ms)"
    )
    lines += [header, "-" * len(header)]
    for m in result.measurements:
        t = m.timing
        memory = f"{m.memory_bytes / MB:8.0f}" if m.memory_bytes >= 0 else f"{'n/a':>8}"
        split = " ".join(f"{part} {ms * 1000:.1f}" for part, ms in t.split_s().items() if ms * 1000 >= 0.05)
        kind = "train" if m.kind == "train_step" else "infer"
        lines.append(
            f"{m.device:6} {m.subject:20} {kind:6} {t.batch_size:3d} {t.median_s * 1000:9.1f} "
            f"{t.p90_s * 1000:9.1f} {t.cpu_median_s * 1000:9.1f} {t.images_per_s:8.2f} {memory}  {split}"
        )
    ratios = {k: v for k, v in flat_metrics(result).items() if "_over_" in k}
    if ratios:
        lines.append("")
        lines += [f"{key}: {value:.3f}" for key, value in sorted(ratios.items())]
    if result.checks:
        lines.append("")
        lines += [f"{key}: {value:g}" for key, value in sorted(result.checks.items())]
    if result.notes:
        lines.append("")
        lines += [f"note: {note}" for note in result.notes]
    return "\n".join(lines)


def log_to_mlflow(
    result: ProfileResult,
    metrics: dict[str, float],
    files: list[Path],
    *,
    run_id: str | None,
    experiment: str,
) -> tuple[bool, str]:
    """Log metrics, tags and ``files`` (artifacts under ``profile/``) to the model's MLflow run.

    Returns (ok, what happened). A model file without ``mlflow_run_id`` is not an error
    (ok, nothing logged); a tracking store that cannot be reached is (`TrackedRun` warns
    instead of raising, so the files are written all the same).
    """
    if not run_id:
        return True, "the model file has no mlflow_run_id: profile not logged to MLflow"
    run = TrackedRun.open(tracking_uri(), experiment, run_id=run_id)
    run.set_tags({f"profile.machine.{k}": v for k, v in result.machine.items()})
    run.log_metrics({k: v for k, v in metrics.items() if v == v}, step=0)
    for path in files:
        run.log_artifact(path, artifact_path="profile")
    run.finish()
    if not run.active:
        return False, f"MLflow run {run_id} at {run.uri}: profile not (fully) logged, see the warning above"
    return True, f"logged to MLflow run {run_id} at {run.uri}"


def run_profile_stage(
    params: Params,
    *,
    model_path: str | Path,
    metrics_path: str | Path,
    plots_path: str | Path,
    png_path: str | Path | None = None,
    track: bool = True,
) -> tuple[ProfileResult, bool]:
    """The profile stage: load the model file, measure, write metrics/CSV/PNG, print the
    table, log to the model's MLflow run. Returns (result, True unless MLflow logging failed).

    Raises `ModelFileError` (model file missing or broken) or `ValueError` (bad settings)
    before anything is written.
    """
    loaded = load_model_file(model_path)  # a broken file fails here, before any Ray work
    if runs_on_cluster(params.profile.where):
        result = profile_on_cluster(Path(model_path).read_bytes(), params)
    else:
        result = run_profile(
            loaded.model, loaded.config, params.profile, train_batch_size=params.train.batch_size
        )
    metrics_path, plots_path = Path(metrics_path), Path(plots_path)
    png_path = Path(png_path) if png_path is not None else plots_path.with_suffix(".png")
    metrics = write_metrics(result, metrics_path)
    write_split_csv(result, plots_path)
    write_split_png(result, png_path)
    table = format_table(result)
    print(table)
    ok = True
    if track:
        with tempfile.TemporaryDirectory() as tmp:
            table_path = Path(tmp) / "profile_table.txt"
            table_path.write_text(table + "\n")
            ok, message = log_to_mlflow(
                result,
                metrics,
                [metrics_path, plots_path, png_path, table_path],
                run_id=loaded.extra.get("mlflow_run_id"),
                experiment=params.train.experiment,
            )
        print(message)
    return result, ok
