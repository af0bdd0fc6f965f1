"""Ablation machinery without training: variant params, anchors per pyramid, kept results, the table.

The end-to-end run (training, evaluation, MLflow, resuming) is tests/stages/test_ablate.py.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from fpn import ModelConfig, build_detector
from fpn.config import PYRAMIDS, RPN_LEVELS
from pipeline.ablate.report import CSV_COLUMNS, markdown_table, metrics_json, plots_csv
from pipeline.ablate.stage import (
    RESULT_FILE,
    AblationRun,
    VariantResult,
    ablation_schedule,
    plan_variants,
    read_kept_result,
    run_ablation,
    variant_anchor_sizes,
    variant_params,
)
from pipeline.config import ConfigError, TrainConfig, params_from_dict
from pipeline.dataset import DatasetError

DATA_HASH = "ab" * 32
BASE = {
    "model": {
        "backbone": "resnet18",
        "norm": "gn",
        "fpn_channels": 32,
        "anchor_sizes": [16, 32, 64, 128, 256],
    },
    "train": {"iterations": 600, "lr_steps": [450, 550], "warmup_iters": 50, "seed": 3, "experiment": "fpn"},
    "ablate": {"variants": ["fpn", "single_c5", "p2_only"], "iterations": 150, "experiment": "abl"},
}


@pytest.mark.parametrize(
    ("sizes", "pyramid", "expected"),
    [
        ((16, 32, 64, 128, 256), "fpn", (16, 32, 64, 128, 256)),
        ((16, 32, 64, 128, 256), "single_c4", (16, 32, 64, 128, 256)),  # all sizes on C4
        ((16, 32, 64, 128, 256), "p2_only", (16, 32, 64, 128, 256)),
        ((32, 128, 512), "bottom_up", (32, 64, 128, 256, 512)),  # geometric, one per level
        ((20, 40, 320), "fpn", (20, 40, 80, 160, 320)),
        ((32,), "top_down_no_lateral", (32, 64, 128, 256, 512)),
        ((32, 64), "single_c5", (32, 64)),
    ],
)
def test_anchor_sizes_fit_each_pyramid(
    sizes: tuple[int, ...], pyramid: str, expected: tuple[int, ...]
) -> None:
    assert variant_anchor_sizes(sizes, pyramid) == expected


@pytest.mark.parametrize(
    "sizes", [(32,), (24, 96, 384), (16, 32, 64, 128, 256), (8, 16, 32, 64, 128, 256, 512)]
)
@pytest.mark.parametrize("pyramid", PYRAMIDS)
def test_every_pyramid_gets_a_valid_model_from_any_anchor_list(sizes: tuple[int, ...], pyramid: str) -> None:
    adapted = variant_anchor_sizes(sizes, pyramid)
    cfg = ModelConfig(backbone="resnet18", pyramid=pyramid, anchor_sizes=adapted)  # validates
    assert len(adapted) in (len(RPN_LEVELS[pyramid]), len(sizes))
    assert min(adapted) == min(sizes) and (len(sizes) == 1 or max(adapted) == max(sizes))
    assert list(adapted) == sorted(adapted)
    assert cfg.pyramid == pyramid


def test_single_scale_variant_builds_and_has_all_anchors_on_its_level() -> None:
    params = variant_params(params_from_dict(BASE), "single_c5")
    model = build_detector(params.model)
    assert model.rpn.anchor_generator.num_anchors_per_location() == {5: 15}  # 5 sizes x 3 ratios


def test_shorter_schedule_keeps_the_shape_of_the_lr_curve() -> None:
    train = TrainConfig(iterations=600, lr_steps=(450, 550), warmup_iters=100, lr=0.04, grad_clip_norm=10.0)
    short = ablation_schedule(train, 150)
    assert (short.iterations, short.lr_steps, short.warmup_iters) == (150, (112, 138), 25)
    assert (short.lr, short.grad_clip_norm) == (0.04, 10.0)
    assert ablation_schedule(train, None) is train
    tiny = ablation_schedule(train, 4)  # steps that collapse or reach the end are dropped
    assert tiny.lr_steps == (3,) and tiny.warmup_iters == 1
    assert ablation_schedule(TrainConfig(iterations=600, warmup_iters=0, lr_steps=()), 150).warmup_iters == 0


def test_variants_differ_only_in_pyramid_anchors_and_schedule() -> None:
    params = params_from_dict(BASE)
    variants = plan_variants(params, DATA_HASH)
    assert [v.name for v in variants] == ["fpn", "single_c5", "p2_only"]
    assert len({v.run_name for v in variants}) == 3, "each variant trains its own run"
    assert plan_variants(params, DATA_HASH) == variants, "run names are a function of params + data"
    assert plan_variants(params, "cd" * 32)[0].run_name != variants[0].run_name
    for v in variants:
        assert v.params.model.pyramid == v.name
        assert v.params.train.iterations == 150 and v.params.train.lr_steps == (112, 138)
        assert v.params.train.warmup_iters == 12  # 50 x 150/600
        assert v.params.train.seed == 3 and v.params.train.experiment == "abl"
        assert v.params.model.fpn_channels == 32 and v.params.data == params.data
        assert v.folder(Path("/w")) == Path("/w") / v.name / v.run_name


@pytest.mark.parametrize(
    ("ablate", "needle"),
    [
        ({"variants": ["fpn", "c4"]}, "ablate.variants: unknown pyramid 'c4'"),
        ({"variants": ["fpn", "fpn"]}, "each pyramid at most once"),
        ({"variants": []}, "at least one"),
        ({"parallel": 0}, "parallel: must be >= 1"),
        ({"iterations": 0}, "iterations: must be >= 1"),
        ({"paralel": 2}, "ablate.paralel: unknown key"),
    ],
)
def test_bad_ablate_section_names_the_key(ablate: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        params_from_dict({"ablate": ablate})


def result_for(name: str, run: str, ap: float, ars: float = -1.0) -> VariantResult:
    metrics = {
        "AR100": 0.41, "AR1k": 0.5, "ARs1k": ars, "ARm1k": 0.6, "ARl1k": 0.7,
        "AP": ap, "AP50": 0.6, "APs": 0.1, "APm": 0.3, "APl": -1.0, "AP75": 0.2,
        "train_images_per_s": 3.456, "test_ms_per_image": 123.44, "iterations": 150.0, "train_time_s": 10.0,
        "num_val_images": 100.0,
    }  # fmt: skip
    return VariantResult(
        variant=name, run_name=run, mlflow_run_id=f"mlflow-{name}", metrics=metrics,
        anchor_sizes=[16, 32, 64, 128, 256], rpn_levels=list(RPN_LEVELS[name]),
        roi_levels=[5] if name == "single_c5" else [2, 3, 4, 5],
    )  # fmt: skip


def test_kept_result_is_reused_only_when_it_matches(tmp_path: Path) -> None:
    variant = plan_variants(params_from_dict(BASE), DATA_HASH)[0]
    assert read_kept_result(variant, tmp_path) is None
    folder = variant.folder(tmp_path)
    folder.mkdir(parents=True)
    (folder / RESULT_FILE).write_text('{"version": 1, "variant": "fpn", "metr')  # a torn write
    assert read_kept_result(variant, tmp_path) is None
    (folder / RESULT_FILE).write_text(json.dumps(result_for("fpn", "other-run", 0.3).to_dict()))
    assert read_kept_result(variant, tmp_path) is None
    good = result_for("fpn", variant.run_name, 0.3)
    (folder / RESULT_FILE).write_text(json.dumps(good.to_dict()))
    kept = read_kept_result(variant, tmp_path)
    assert kept == good and kept.reused


def test_table_layout_and_outputs() -> None:
    params = params_from_dict(BASE)
    variants = plan_variants(params, DATA_HASH)[:2]
    results = [
        result_for("fpn", variants[0].run_name, 0.3456, ars=0.25),
        result_for("single_c5", variants[1].run_name, 0.1),
    ]
    run = AblationRun(variants=variants, results=results, data_hash=DATA_HASH, parallel=2, wall_time_s=5.0)

    lines = markdown_table(run).splitlines()
    rows = [line for line in lines if line.startswith("| ")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    assert header == ["variant", "features (RPN / RoI)", "anchors", "AR100", "AR1k", "ARs1k", "ARm1k", "ARl1k",
                      "AP", "AP50", "APs", "APm", "APl", "train img/s", "test ms/img"]  # fmt: skip
    fpn_row = [c.strip() for c in rows[1].strip("|").split("|")]
    c5_row = [c.strip() for c in rows[2].strip("|").split("|")]
    assert len(rows) == 3 and len(fpn_row) == len(header) == len(c5_row)
    assert fpn_row[0].startswith("fpn") and fpn_row[1] == "P2-P6 / P2-P5"
    assert c5_row[0].startswith("single_c5") and c5_row[1] == "C5 / C5"
    assert fpn_row[header.index("AP")] == "34.6" and fpn_row[header.index("ARs1k")] == "25.0"
    assert c5_row[header.index("ARs1k")] == "n/a", "COCO's -1 (no ground truth) is not a number to compare"
    assert fpn_row[-2:] == ["3.46", "123.4"]
    assert "MLflow run `mlflow-fpn`" in markdown_table(run)
    assert any(line.startswith("Timings: 2 variants trained side by side") for line in lines)

    nested = json.loads(metrics_json(run))
    assert list(nested) == ["fpn", "single_c5"] and nested["fpn"]["AP"] == 0.3456
    assert nested["single_c5"]["ARs1k"] == -1.0
    table = list(csv.reader(io.StringIO(plots_csv(run))))
    assert tuple(table[0]) == CSV_COLUMNS and [r[0] for r in table[1:]] == ["fpn", "single_c5"]


def test_missing_data_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="manifest.json"):
        run_ablation(params_from_dict(BASE), tmp_path / "nowhere", tmp_path / "work")
