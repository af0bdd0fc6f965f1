"""Stage train's run names: a hash of what defines the run, stable across code changes that
leave the params alone."""

from __future__ import annotations

import dataclasses

import yaml

from fpn import ModelConfig
from pipeline.config import params_from_dict
from pipeline.train.stage import run_name

DATA_HASH = "a" * 64


def test_an_int_min_size_keeps_the_run_name_it_had_before_lists() -> None:
    # Computed before `model.min_size` took lists: an int must keep naming (and resuming) its runs.
    params = params_from_dict(yaml.safe_load("model:\n  min_size: 600\n  max_size: 1000\n"))
    assert run_name(params, DATA_HASH) == "fpn-392f41e19f5f"


def test_a_min_size_list_names_the_run_as_written_in_params_yaml() -> None:
    from_yaml = params_from_dict(yaml.safe_load("model:\n  min_size: [480, 600]\n  max_size: 1000\n"))
    from_code = dataclasses.replace(
        params_from_dict({}), model=ModelConfig(min_size=(480, 600), max_size=1000)
    )
    assert run_name(from_yaml, DATA_HASH) == run_name(from_code, DATA_HASH)
    single = params_from_dict(yaml.safe_load("model:\n  min_size: 600\n  max_size: 1000\n"))
    assert run_name(from_yaml, DATA_HASH) != run_name(single, DATA_HASH)


def test_train_cpu_amp_names_the_run_only_when_set() -> None:
    # Added after run names were pinned: at its default (off, float32 as before) it leaves them.
    base = "model:\n  min_size: 600\n  max_size: 1000\n"
    off = params_from_dict(yaml.safe_load(base + "train:\n  cpu_amp: 'off'\n"))
    assert run_name(off, DATA_HASH) == "fpn-392f41e19f5f"
    auto = params_from_dict(yaml.safe_load(base + "train:\n  cpu_amp: auto\n"))
    assert run_name(auto, DATA_HASH) != run_name(off, DATA_HASH)
