"""The ablation table in the layout of the FPN paper's Tables 1-3, and its DVC outputs.

Rows are variants (``ablate.variants`` order); columns are the RPN's proposal recall (Table 1:
AR100, AR1k, ARs1k, ARm1k, ARl1k), the detector's COCO AP (Tables 2-3: AP, AP50, APs, APm,
APl), then training images/s and test ms/image (forward pass only). Three files, all written
atomically and depending only on the variants' results (so a rerun that reuses every kept
result rewrites them byte for byte):

* markdown (``--table``): the table in percent with one decimal, as the paper prints it, the
  settings shared by every row, and per row the Ray Train run and MLflow run it came from;
* metrics JSON (``--metrics``, DVC metrics): ``{variant: {AR100: ..., AP: ..., ...}}`` as
  fractions (COCO's -1 where the validation set has no object of that size);
* plots CSV (``--plots``, DVC plots): one row per variant, the same columns as fractions.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from pipeline.ablate.stage import DETECTION_KEYS, RPN_KEYS, TIMING_KEYS, AblationRun, VariantResult
from pipeline.io import atomic_write_text

# What each variant is, in the words of the paper's tables.
PYRAMID_DESCRIPTION = {
    "single_c4": "single scale, C4",
    "single_c5": "single scale, C5",
    "fpn": "FPN: top-down + lateral",
    "bottom_up": "bottom-up pyramid, no top-down",
    "top_down_no_lateral": "top-down, no lateral",
    "p2_only": "FPN features, P2 only",
}
TABLE_COLUMNS = (*RPN_KEYS, *DETECTION_KEYS)
METRIC_KEYS = (*RPN_KEYS, *DETECTION_KEYS, "AP75", *TIMING_KEYS, "iterations")
CSV_COLUMNS = ("variant", *RPN_KEYS, *DETECTION_KEYS, *TIMING_KEYS)


def _levels(levels: list[int], prefix: str) -> str:
    return f"{prefix}{levels[0]}" if len(levels) == 1 else f"{prefix}{levels[0]}-{prefix}{levels[-1]}"


def _features(result: VariantResult) -> str:
    """``C4 / C4`` or ``P2-P6 / P2-P5``: the maps the RPN / the RoI head use."""
    prefix = "C" if result.variant.startswith("single_") else "P"
    return f"{_levels(result.rpn_levels, prefix)} / {_levels(result.roi_levels, prefix)}"


def _percent(value: float) -> str:
    return "n/a" if value < 0 else f"{100.0 * value:.1f}"


def markdown_table(run: AblationRun) -> str:
    """The table and its settings as markdown (see the module docstring)."""
    first = run.variants[0].params
    m, t = first.model, first.train
    lines = [
        "# FPN ablations: RPN proposal recall (Table 1) and Faster R-CNN AP (Tables 2-3)",
        "",
        f"Every row: {m.backbone}, norm {m.norm}, d={m.fpn_channels}, images {m.describe_sizes()}, "
        f"{t.iterations} iterations x {t.batch_size * t.num_workers} images (lr {t.lr:g} per "
        f"{t.lr_reference_batch}, steps {list(t.lr_steps)}), seed {t.seed}; data hash {run.data_hash[:12]}, "
        f"{int(run.results[0].metrics['num_val_images'])} validation images. Proposal recall is class-agnostic "
        f"AR over IoU .50:.95 at 100 / 1000 proposals per image; AP is COCO's (IoU .50:.95), in percent.",
        "",
        "| variant | features (RPN / RoI) | anchors | "
        + " | ".join(TABLE_COLUMNS)
        + " | train img/s | test ms/img |",
        "|---|---|---|" + "---:|" * (len(TABLE_COLUMNS) + 2),
    ]
    for result in run.results:
        cells = [
            f"{result.variant} ({PYRAMID_DESCRIPTION.get(result.variant, result.variant)})",
            _features(result),
            ",".join(str(s) for s in result.anchor_sizes),
            *(_percent(result.metrics[key]) for key in TABLE_COLUMNS),
            f"{result.metrics['train_images_per_s']:.2f}",
            f"{result.metrics['test_ms_per_image']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        (
            f"Timings: {run.parallel} variants trained side by side, sharing the machine"
            if run.parallel > 1
            else "Timings: one variant at a time"
        )
        + f"; train img/s over the optimizer steps; test ms/img is the forward pass per image "
        f"(batches of {first.evaluate.batch_size}). Kept results keep the timings of the run that made them.",
        "",
        "Runs (Ray Train run name = hash of model + train params + data; MLflow run tagged variant=<name>):",
        "",
    ]
    lines += [f"- {r.variant}: Ray Train `{r.run_name}`, MLflow run `{r.mlflow_run_id}`" for r in run.results]
    return "\n".join(lines) + "\n"


def metrics_json(run: AblationRun) -> str:
    """``{variant: {key: value}}`` for ``dvc metrics show`` (fractions; -1: no ground truth of that size)."""
    nested = {r.variant: {key: r.metrics[key] for key in METRIC_KEYS} for r in run.results}
    return json.dumps(nested, indent=2) + "\n"


def plots_csv(run: AblationRun) -> str:
    """``variant, AR100, ..., APl, train_images_per_s, test_ms_per_image``: one row per variant."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in run.results:
        writer.writerow([r.variant, *(f"{r.metrics[key]:.6g}" for key in CSV_COLUMNS[1:])])
    return buffer.getvalue()


def write_report(run: AblationRun, *, table: Path, metrics: Path, plots: Path) -> None:
    """Write the three outputs (each atomically)."""
    atomic_write_text(Path(table), markdown_table(run))
    atomic_write_text(Path(metrics), metrics_json(run))
    atomic_write_text(Path(plots), plots_csv(run))
