"""params.yaml -> typed config: defaults, types, and errors that name the key."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from fpn import ModelConfig
from pipeline.config import ConfigError, Params, load_params, params_from_dict
from tests.params_files import write_params_file

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_repo_params_load() -> None:
    params = load_params(REPO_ROOT / "params.yaml")
    assert isinstance(params.model, ModelConfig)
    assert params.data.source == "synthetic"


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "params").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_params_file_names_every_section(path: Path) -> None:
    assert set(yaml.safe_load(path.read_text())) == {f.name for f in dataclasses.fields(Params)}
    load_params(path)


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


def test_model_min_size_takes_a_yaml_list_for_multi_scale_training() -> None:
    raw = yaml.safe_load("model:\n  min_size: [640, 672, 800]\n  max_size: 1333\n")
    params = params_from_dict(raw)
    assert params.model.min_size == (640, 672, 800) and params.model.test_min_size == 800
    assert params.to_dict()["model"]["min_size"] == raw["model"]["min_size"]  # as written: a list
    assert params_from_dict(yaml.safe_load("model:\n  min_size: 640\n")).to_dict()["model"]["min_size"] == 640


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"trian": {}}, "trian"),
        ({"train": {"lrr": 0.1}}, "train.lrr"),
        ({"train": {"lr": "fast"}}, "train.lr"),
        ({"train": {"num_workers": 1.5}}, "train.num_workers"),
        ({"train": {"use_gpu": "yes"}}, "train.use_gpu"),
        ({"model": {"anchor_sizes": 32}}, "model.anchor_sizes"),
        ({"model": {"min_size": [640, "big"]}}, "model.min_size"),
        ({"model": {"min_size": []}}, "ModelConfig.min_size"),
        ({"data": ["x"]}, "data"),
    ],
)
def test_bad_keys_and_types_are_named(raw: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        params_from_dict(raw)


def test_overrides_and_missing_file(tmp_path: Path) -> None:
    path = write_params_file(tmp_path / "params.yaml", {"train": {"lr": 0.01}})
    assert load_params(path, {"train.lr": 0.5}).train.lr == 0.5
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "absent.yaml")
    path.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_params(path)


def test_values_are_checked_when_read_and_an_empty_file_is_an_error(tmp_path: Path) -> None:
    params = write_params_file(tmp_path / "params.yaml", {"train": {"lr": -1}})
    with pytest.raises(ConfigError, match=r"params\.yaml: train\.lr: must be > 0, got -1"):
        load_params(params)
    params.write_text("")
    with pytest.raises(ConfigError, match=r"params\.yaml: empty params file"):
        load_params(params)
    write_params_file(params, {"evaluate": {"draw_score_thresh": 2}})
    with pytest.raises(ConfigError, match=r"params\.yaml: evaluate\.draw_score_thresh: must be in \[0, 1\]"):
        load_params(params)


def test_a_key_that_moved_says_where_it_went(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  storage_path: runs/ray\n")
    with pytest.raises(ConfigError, match=r"train\.storage_path: moved: it is storage\.train now"):
        load_params(params)


def test_ray_storage_defaults_to_the_local_folders_of_the_repo_params() -> None:
    """The default `dvc repro` keeps Ray's runs where it always did: runs/ray and runs/tune."""
    assert Params().storage == load_params(REPO_ROOT / "params.yaml").storage
    assert (Params().storage.train, Params().storage.tune) == ("runs/ray", "runs/tune")


@pytest.mark.parametrize(
    "location", ["runs/ray", "/shared/runs/ray", "s3://bkt/runs/ray", "s3://bkt", "gs://b/p", "file:///tmp/r"]
)
def test_ray_storage_takes_a_folder_or_a_uri(location: str) -> None:
    assert params_from_dict({"storage": {"train": location, "tune": location}}).storage.train == location


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "expected a folder or a URI"),
        (" runs/ray", "without surrounding spaces"),
        ("s3://", r"expected a folder or <scheme>://<bucket>/<prefix>"),
        ("s3:///runs", r"expected a folder or <scheme>://<bucket>/<prefix>"),
        ("http://host/runs", "with a scheme of s3, gs"),
        ("s3:/bkt/runs", r"looks like a URI with one slash: write s3://"),
        (None, "expected a string, got None"),
        (["runs"], "expected a string"),
    ],
)
@pytest.mark.parametrize("key", ["train", "tune"])
def test_a_bad_ray_storage_is_an_error_naming_the_key(
    key: str, value: object, message: str, tmp_path: Path
) -> None:
    params = write_params_file(tmp_path / "params.yaml", {"storage": {key: value}})
    with pytest.raises(ConfigError, match=rf"params\.yaml: storage\.{key}: .*{message}"):
        load_params(params)
    with pytest.raises(
        ConfigError, match=r"storage\.trian: unknown key \(known: ablate, data, train, tune\)"
    ):
        params_from_dict({"storage": {"trian": "runs/ray"}})


def test_a_params_file_must_name_every_section(tmp_path: Path) -> None:
    """A forgotten section would silently be the COCO recipe (ResNet-50, 800 px, 90k iterations)."""
    path = tmp_path / "params.yaml"
    path.write_text("data:\n  seed: 1\ntrain:\n  lr: 0.01\nmodel: {}\n")
    with pytest.raises(
        ConfigError, match=r"params\.yaml: missing section\(s\) preprocess, evaluate, profile, tune, ablate"
    ):
        load_params(path)
    path.write_text("".join(f"{f.name}:\n" for f in dataclasses.fields(Params)))  # present, empty: defaults
    assert load_params(path) == Params()
    assert params_from_dict({"train": {"lr": 0.01}}).train.lr == 0.01, "dicts (tests) may stay partial"


def _float_keys() -> list[tuple[str, str, typing.Any]]:
    """Every ``(section, key, type)`` holding floats: ``float``, ``float | None``, tuples of floats."""
    keys = []
    for section in dataclasses.fields(Params):
        for name, hint in typing.get_type_hints(section.default_factory).items():
            if hint is float or float in typing.get_args(hint):
                keys.append((section.name, name, hint))
    return keys


def _with_last(hint: typing.Any, value: float) -> typing.Any:
    """``value``, or a list of valid floats ending in ``value`` when ``hint`` is a tuple type."""
    if typing.get_origin(hint) is not tuple:
        return value
    args = typing.get_args(hint)
    return [1.0] * (0 if args[-1] is Ellipsis else len(args) - 1) + [value]


@pytest.mark.parametrize(
    ("section", "key", "hint"), _float_keys(), ids=lambda v: v if isinstance(v, str) else ""
)
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")], ids=["inf", "-inf", "nan"])
def test_every_float_param_refuses_non_finite_values(
    section: str, key: str, hint: typing.Any, value: float
) -> None:
    with pytest.raises(ConfigError, match=rf"{section}\.{key}(\[\d+\])?: expected a finite number"):
        params_from_dict({section: {key: _with_last(hint, value)}})


def test_yaml_inf_is_refused_when_the_file_is_read(tmp_path: Path) -> None:
    path = write_params_file(tmp_path / "params.yaml", {"train": {"lr": 0.01}})
    path.write_text(path.read_text().replace("lr: 0.01", "lr: .inf"))
    with pytest.raises(ConfigError, match=r"params\.yaml: train\.lr: expected a finite number, got inf"):
        load_params(path)


def test_lr_steps_must_come_before_the_last_iteration() -> None:
    assert params_from_dict({"train": {"iterations": 100, "lr_steps": [50, 99]}}).train.lr_steps == (50, 99)
    with pytest.raises(
        ConfigError, match=r"train\.lr_steps: must be < train\.iterations \(100\), got \[50, 100\]"
    ):
        params_from_dict({"train": {"iterations": 100, "lr_steps": [50, 100]}})


def test_preprocess_max_pixels_must_be_positive() -> None:
    assert params_from_dict({}).preprocess.max_pixels == 50_000_000
    with pytest.raises(ConfigError, match=r"preprocess\.max_pixels: must be >= 1, got 0"):
        params_from_dict({"preprocess": {"max_pixels": 0}})
