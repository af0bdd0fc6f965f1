"""tune.space -> a checked search space: distributions, Tune domains, samples back to params, errors naming the key."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ray import tune

from pipeline.config import ConfigError, load_params, params_from_dict
from pipeline.tune.search_space import (
    apply_sample,
    best_params_document,
    parse_space,
    set_param_args,
    trial_train_overrides,
)
from tests.params_files import write_params_file
from tests.train_samples import tiny_params

ANCHORS_A = [16, 32, 64, 128, 256]
ANCHORS_B = [32, 64, 128, 256, 512]
SPACE = {
    "train.lr": {"type": "loguniform", "low": 0.01, "high": 0.2},
    "train.weight_decay": {"type": "uniform", "low": 0.0, "high": 0.001},
    "model.rpn_batch_per_image": {"type": "choice", "values": [64, 128, 256]},
    "model.roi_batch_per_image": {"type": "randint", "low": 16, "high": 64},
    "model.anchor_sizes": {"type": "choice", "values": [ANCHORS_A, ANCHORS_B]},
}


@pytest.fixture
def raw() -> dict:
    return tiny_params()


def test_space_parses_to_tune_domains_and_decodes_back(raw: dict) -> None:
    space = parse_space(SPACE, raw)
    assert space.keys == tuple(SPACE)
    domains = space.to_tune()
    assert isinstance(domains["train.lr"], tune.search.sample.Float)
    assert isinstance(domains["model.roi_batch_per_image"], tune.search.sample.Integer)
    # randint's high is included: Tune's upper end is exclusive.
    assert domains["model.roi_batch_per_image"].upper == 65
    # List choices travel as JSON text (Optuna's categories must be scalars) and come back as lists.
    assert domains["model.anchor_sizes"].categories == ["[16, 32, 64, 128, 256]", "[32, 64, 128, 256, 512]"]
    config = {
        "train.lr": 0.05,
        "train.weight_decay": 1e-4,
        "model.rpn_batch_per_image": 128,
        "model.roi_batch_per_image": 40,
        "model.anchor_sizes": "[32, 64, 128, 256, 512]",
    }
    sample = space.decode(config)
    assert sample["model.anchor_sizes"] == ANCHORS_B
    params = params_from_dict(apply_sample(raw, sample))
    assert params.model.anchor_sizes == tuple(ANCHORS_B) and params.train.lr == 0.05
    assert params.model.roi_batch_per_image == 40
    assert raw["model"]["anchor_sizes"] == [8, 16, 32, 64, 128], "apply_sample must not change its input"
    with pytest.raises(KeyError, match="train.lr"):
        space.decode({})


# fmt: off
@pytest.mark.parametrize(
    ("space", "needle"),
    [
        ({"train.lrr": {"type": "uniform", "low": 0.1, "high": 0.2}}, r"tune\.space\.train\.lrr: unknown key"),
        ({"data.seed": {"type": "choice", "values": [0, 1]}}, r"tune\.space\.data\.seed: section 'data'"),
        ({"lr": {"type": "uniform", "low": 0.1, "high": 0.2}}, r"tune\.space\.lr: expected section\.key"),
        ({"model.num_classes": {"type": "choice", "values": [3, 4]}}, r"model\.num_classes: cannot be tuned.*categories"),
        ({"train.iterations": {"type": "randint", "low": 5, "high": 9}}, r"train\.iterations: cannot be tuned"),
        ({"train.lr": {"type": "normal", "low": 0.1, "high": 0.2}}, r"tune\.space\.train\.lr: type: must be one of"),
        ({"train.lr": {"type": "uniform", "low": 0.2, "high": 0.1}}, r"train\.lr: low must be < high"),
        ({"train.lr": {"type": "loguniform", "low": 0.0, "high": 0.1}}, r"train\.lr: loguniform needs low > 0"),
        ({"train.lr": {"type": "uniform", "low": "a", "high": 0.1}}, r"train\.lr: low: expected a number"),
        ({"train.lr": {"type": "uniform", "low": 0.1, "high": 0.2, "q": 2}}, r"train\.lr: unknown field\(s\) \['q'\]"),
        ({"train.lr": {"type": "uniform", "low": -0.1, "high": 0.2}}, r"train\.lr: value -0\.1 is not valid.*> 0"),
        ({"train.lr": "loguniform"}, r"tune\.space\.train\.lr: expected a mapping"),
        ({"model.rpn_batch_per_image": {"type": "uniform", "low": 64, "high": 256}}, r"is an integer: use type randint"),
        ({"model.roi_batch_per_image": {"type": "randint", "low": 1.5, "high": 9}}, r"randint needs integer"),
        ({"model.roi_batch_per_image": {"type": "choice", "values": []}}, r"values: expected a non-empty list"),
        ({"model.roi_batch_per_image": {"type": "choice", "values": [32, 32]}}, r"values: contains duplicates"),
        ({"model.roi_batch_per_image": {"type": "choice", "values": [32, "many"]}}, r"value 'many' is not valid"),
        ({"model.anchor_sizes": {"type": "choice", "values": [[16, 32]]}}, r"anchor_sizes: value \[16, 32\].*5 RPN levels"),
        ({"model.anchor_sizes": {"type": "uniform", "low": 1, "high": 2}}, r"anchor_sizes is not a number.*choice"),
        ({"model.norm": {"type": "choice", "values": ["gn", "layer"]}}, r"model\.norm: value 'layer' is not valid"),
        ({}, r"tune\.space: empty"),
    ],
)
# fmt: on
def test_bad_spaces_are_named(raw: dict, space: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        parse_space(space, raw)


def test_best_params_file_loads_merged_and_dvc_set_param_lines(raw: dict, tmp_path: Path) -> None:
    sample = {"train.lr": 0.0473, "model.anchor_sizes": ANCHORS_B, "model.roi_batch_per_image": 48}
    document = best_params_document(sample)
    assert document == {"train": {"lr": 0.0473}, "model": {"anchor_sizes": ANCHORS_B, "roi_batch_per_image": 48}}
    base = write_params_file(tmp_path / "params.yaml", raw)
    best = yaml.safe_load(yaml.safe_dump(document))
    merged = load_params(base, {f"{s}.{k}": v for s, keys in best.items() for k, v in keys.items()})
    assert merged.train.lr == 0.0473 and merged.model.anchor_sizes == tuple(ANCHORS_B)
    args = set_param_args(sample)
    assert args == [
        "-S", "train.lr=0.0473", "-S", "model.anchor_sizes=[32, 64, 128, 256, 512]",
        "-S", "model.roi_batch_per_image=48",
    ]  # fmt: skip
    # DVC parses each value as YAML: they read back as the sampled values.
    for flag, pair in zip(args[::2], args[1::2], strict=True):
        key, _, text = pair.partition("=")
        assert flag == "-S" and yaml.safe_load(text) == sample[key]
    assert set_param_args({"train.lr": 0.1}, "params/base.yaml") == ["-S", "params/base.yaml:train.lr=0.1"]


def test_trial_length_scales_the_lr_schedule() -> None:
    train = params_from_dict({"train": {"iterations": 600, "lr_steps": [450, 550], "log_every": 20}}).train
    overrides = trial_train_overrides(train, iterations=300, eval_every=50)
    assert overrides == {
        "iterations": 300, "checkpoint_every": 50, "eval_every": 0, "log_every": 20, "lr_steps": [225, 275]
    }
    # Steps that land at or past the end, or on top of each other, are dropped.
    short = trial_train_overrides(train, iterations=2, eval_every=1)
    assert short["lr_steps"] == [] and short["log_every"] == 1


@pytest.mark.parametrize(
    ("tune_section", "needle"),
    [
        ({"metric": "loss"}, r"tune.metric: must be one of val_ap50, val_ap, train_loss"),
        ({"metric": "train_loss"}, r"tune.mode: train_loss is compared with min"),
        ({"search": "grid"}, r"tune.search: must be optuna or random"),
        ({"eval_every": 100, "grace_period": 50}, r"tune.grace_period: must be in \[eval_every, iterations\]"),
        ({"reduction_factor": 1}, r"tune.reduction_factor: must be >= 2"),
        ({"num_samples": 0}, r"tune: num_samples"),
        ({"spaces": {}}, r"tune\.spaces: unknown key"),
    ],
)
def test_bad_tune_section_is_named(tune_section: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        params_from_dict({"tune": tune_section})


@pytest.mark.skipif(shutil.which("git") is None, reason="dvc exp needs git")
def test_dvc_exp_run_applies_the_set_param_lines(raw: dict, tmp_path: Path) -> None:
    """The documented ``dvc exp run -S ...`` command, run by real DVC in a scratch repository."""
    sample = {"train.lr": 0.0473, "model.anchor_sizes": ANCHORS_B}
    repo = tmp_path / "repo"
    repo.mkdir()
    write_params_file(repo / "params.yaml", raw)
    (repo / "dvc.yaml").write_text(
        "stages:\n  show:\n    cmd: python -c \"import shutil; shutil.copy('params.yaml', 'seen.yaml')\"\n"
        "    params: [train.lr, model.anchor_sizes]\n    outs: [seen.yaml]\n"
    )
    dvc = str(Path(sys.executable).parent / "dvc")

    def run(*command: str) -> None:
        done = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{command}:\n{done.stdout}\n{done.stderr}"

    git = ("git", "-c", "user.name=t", "-c", "user.email=t@localhost")
    run(*git, "init", "-q")
    run(*git, "commit", "-q", "--allow-empty", "-m", "init")
    run(dvc, "init", "-q")
    run(*git, "add", ".")
    run(*git, "commit", "-q", "-m", "pipeline")
    run(dvc, "exp", "run", *set_param_args(sample))
    seen = load_params(repo / "seen.yaml")
    assert seen.train.lr == 0.0473 and seen.model.anchor_sizes == tuple(ANCHORS_B)
    assert seen.model.fpn_channels == raw["model"]["fpn_channels"], "other keys untouched"
