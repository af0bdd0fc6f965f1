"""params.yaml -> typed config: defaults, types, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from fpn import ModelConfig
from pipeline.config import ConfigError, Params, load_params, params_from_dict

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_repo_params_load() -> None:
    params = load_params(REPO_ROOT / "params.yaml")
    assert isinstance(params.model, ModelConfig)
    assert params.data.source == "synthetic"


def test_paper_recipe_params_load() -> None:
    params = load_params(REPO_ROOT / "params" / "coco_r50_fpn_1x.yaml")
    assert params.model.backbone == "resnet50" and params.model.min_size == 800
    assert params.train.num_workers * params.train.batch_size == params.train.lr_reference_batch == 16
    assert params.train.lr == 0.02 and params.train.lr_steps == (60000, 80000)


def test_empty_gives_defaults() -> None:
    assert params_from_dict({}) == Params()


def test_lists_become_tuples_and_ints_floats() -> None:
    params = params_from_dict({"model": {"anchor_sizes": [16, 32, 64, 128, 256]}, "train": {"lr": 1}})
    assert params.model.anchor_sizes == (16, 32, 64, 128, 256)
    assert isinstance(params.train.lr, float)


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"trian": {}}, "trian"),
        ({"train": {"lrr": 0.1}}, "train.lrr"),
        ({"train": {"lr": "fast"}}, "train.lr"),
        ({"train": {"num_workers": 1.5}}, "train.num_workers"),
        ({"train": {"use_gpu": "yes"}}, "train.use_gpu"),
        ({"model": {"anchor_sizes": 32}}, "model.anchor_sizes"),
        ({"data": ["x"]}, "data"),
    ],
)
def test_bad_keys_and_types_are_named(raw: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        params_from_dict(raw)


def test_overrides_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: 0.01\n")
    assert load_params(path, {"train.lr": 0.5}).train.lr == 0.5
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "absent.yaml")
    path.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_params(path)


def test_values_are_checked_when_read_and_an_empty_file_is_an_error(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  lr: -1\n")
    with pytest.raises(ConfigError, match=r"params\.yaml: train\.lr: must be > 0, got -1"):
        load_params(params)
    params.write_text("")
    with pytest.raises(ConfigError, match=r"params\.yaml: empty params file"):
        load_params(params)
    params.write_text("evaluate:\n  draw_score_thresh: 2\n")
    with pytest.raises(ConfigError, match=r"params\.yaml: evaluate\.draw_score_thresh: must be in \[0, 1\]"):
        load_params(params)


def test_a_path_that_was_a_param_says_where_it_went(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  storage_path: runs/ray\n")
    with pytest.raises(ConfigError, match=r"train\.storage_path: a path, not a param: give it as --storage-path"):
        load_params(params)
