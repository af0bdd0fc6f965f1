"""The search space of stage tune: ``tune.space`` of params.yaml, checked and turned into Ray Tune's.

Each entry names one ``section.key`` of ``train:`` or ``model:`` and how to draw it::

    tune:
      space:
        train.lr: {type: loguniform, low: 0.02, high: 0.2}        # float, log scale, low > 0
        train.weight_decay: {type: uniform, low: 0.0, high: 1.0e-3}
        model.rpn_batch_per_image: {type: choice, values: [64, 128, 256]}
        model.roi_batch_per_image: {type: randint, low: 32, high: 128}   # int, both ends included
        model.anchor_sizes: {type: choice, values: [[16, 32, 64, 128, 256], [32, 64, 128, 256, 512]]}

Conventions:

* A *sample* is ``{"section.key": value}`` with values as the params file holds them (lists for
  list-valued keys); `apply_sample` merges one into the raw params, `best_params_document` turns
  one into a params file (``{"train": {"lr": ...}}``) and `set_param_args` into the
  ``dvc exp run -S`` arguments that apply it.
* List-valued choices reach Ray Tune (and Optuna, whose categorical values must be scalars) as
  their JSON text, e.g. ``"[16, 32, 64, 128, 256]"``; `SearchSpace.decode` turns them back.
* Every problem raises `ConfigError` naming the entry, e.g.
  ``tune.space.train.lrr: unknown key (train keys: batch_size, ...)``. Each candidate value (every
  choice, both ends of a range) is checked by building the whole params with it, so a value the
  training would reject (``model.anchor_sizes`` with 4 sizes for 5 pyramid levels, a negative
  ``train.lr``) fails when the space is read, not hours into the sweep.
"""

from __future__ import annotations

import copy
import json
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from pipeline.config import ConfigError, Params, TrainConfig, params_from_dict
from pipeline.train.preflight import check_train_params
from pipeline.train.schedule import scaled_lr_steps

DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice")
TUNABLE_SECTIONS = ("train", "model")
# Keys a sweep cannot vary, and why (the message of the error that names them).
FIXED_KEYS: dict[str, str] = {
    "model.num_classes": "it must equal the number of categories of the data",
    "train.iterations": "each trial trains tune.iterations iterations",
    "train.checkpoint_every": "each trial checkpoints and evaluates every tune.eval_every iterations",
    "train.log_every": "it changes no result",
    "train.num_workers": "every trial runs on the same resources (tune.max_concurrent_trials sizes the sweep)",
    "train.cpus_per_worker": "every trial runs on the same resources",
    "train.use_gpu": "every trial runs on the same resources",
    "train.experiment": "trials are child runs of the sweep's run in train.experiment",
    "train.max_failures": "it changes no result",
    "train.loader_workers": "it changes no result",
    "train.threads": "it changes no result",
    "train.init_weights": "the driver resolves the starting weights once for the sweep",
}


@dataclass(frozen=True)
class Dimension:
    """One entry of the space: ``key`` (``section.key``) drawn from ``kind`` with its bounds or values."""

    key: str
    kind: str  # loguniform | uniform | randint | choice
    low: float | None = None
    high: float | None = None
    values: tuple[Any, ...] = ()

    @property
    def section(self) -> str:
        return self.key.partition(".")[0]

    @property
    def name(self) -> str:
        return self.key.partition(".")[2]

    def to_tune(self) -> Any:
        """This dimension as a Ray Tune domain (``tune.randint``'s upper end is exclusive: ``high + 1``)."""
        from ray import tune

        if self.kind == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.kind == "uniform":
            return tune.uniform(self.low, self.high)
        if self.kind == "randint":
            return tune.randint(int(self.low), int(self.high) + 1)
        return tune.choice([_encode(v) for v in self.values])

    def decode(self, value: Any) -> Any:
        """A value Tune drew -> the value the params file holds (JSON text back to a list)."""
        if self.kind == "choice" and isinstance(value, str) and any(isinstance(v, list) for v in self.values):
            decoded = json.loads(value)
            return decoded if isinstance(decoded, list) else value
        if self.kind == "randint":
            return int(value)
        if self.kind in ("loguniform", "uniform"):
            return float(value)
        return value

    def describe(self) -> str:
        if self.kind == "choice":
            return f"{self.key}: choice of {list(self.values)}"
        return f"{self.key}: {self.kind} [{self.low:g}, {self.high:g}]"


@dataclass(frozen=True)
class SearchSpace:
    """The checked ``tune.space``: one `Dimension` per key, in the file's order."""

    dimensions: tuple[Dimension, ...]

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(d.key for d in self.dimensions)

    def to_tune(self) -> dict[str, Any]:
        """Ray Tune's ``param_space``: ``{"train.lr": tune.loguniform(...), ...}`` (flat dotted keys)."""
        return {d.key: d.to_tune() for d in self.dimensions}

    def decode(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """A trial's config (as Tune passes it) -> the sample ``{"section.key": value}`` of this space."""
        missing = [d.key for d in self.dimensions if d.key not in config]
        if missing:
            raise KeyError(f"trial config lacks {missing} (has {sorted(config)})")
        return {d.key: d.decode(config[d.key]) for d in self.dimensions}


def _encode(value: Any) -> Any:
    """Scalars as they are; lists as JSON text (Optuna's categorical values must be scalars)."""
    return json.dumps(value) if isinstance(value, (list, tuple)) else value


def _field_types() -> dict[str, dict[str, Any]]:
    """``{"train": {"lr": float, ...}, "model": {...}}``: the declared type of every tunable key."""
    hints = typing.get_type_hints(Params)
    return {section: typing.get_type_hints(hints[section]) for section in TUNABLE_SECTIONS}


def _is_int_field(annotation: Any) -> bool:
    return annotation is int or (
        int in typing.get_args(annotation) and float not in typing.get_args(annotation)
    )


def _number(entry: Mapping[str, Any], name: str, where: str) -> float:
    value = entry.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: {name}: expected a number, got {value!r}")
    return float(value)


def _parse_entry(key: Any, entry: Any, types: dict[str, dict[str, Any]]) -> Dimension:
    where = f"tune.space.{key}"
    if not isinstance(key, str) or key.count(".") != 1:
        raise ConfigError(f"{where}: expected section.key (e.g. train.lr), got {key!r}")
    section, name = key.split(".")
    if section not in TUNABLE_SECTIONS:
        raise ConfigError(
            f"{where}: section {section!r} cannot be tuned (tunable: {', '.join(TUNABLE_SECTIONS)})"
        )
    if name not in types[section]:
        raise ConfigError(f"{where}: unknown key ({section} keys: {', '.join(sorted(types[section]))})")
    if key in FIXED_KEYS:
        raise ConfigError(f"{where}: cannot be tuned: {FIXED_KEYS[key]}")
    if not isinstance(entry, Mapping):
        raise ConfigError(
            f"{where}: expected a mapping like {{type: loguniform, low: ..., high: ...}}, got {entry!r}"
        )
    kind = entry.get("type")
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: type: must be one of {', '.join(DISTRIBUTIONS)}, got {kind!r}")
    allowed = {"type", "values"} if kind == "choice" else {"type", "low", "high"}
    extra = sorted(set(entry) - allowed)
    if extra:
        raise ConfigError(f"{where}: unknown field(s) {extra} for type {kind} (expected {sorted(allowed)})")
    annotation = types[section][name]
    if kind == "choice":
        values = entry.get("values")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: values: expected a non-empty list, got {values!r}")
        encoded = [_encode(v) for v in values]
        if len(set(map(json.dumps, encoded))) != len(encoded):
            raise ConfigError(f"{where}: values: contains duplicates: {values!r}")
        return Dimension(key, kind, values=tuple(values))
    low, high = _number(entry, "low", where), _number(entry, "high", where)
    if not low < high:
        raise ConfigError(f"{where}: low must be < high, got low={low:g}, high={high:g}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: loguniform needs low > 0, got {low:g}")
    if typing.get_origin(annotation) is tuple or annotation in (str, bool):
        raise ConfigError(f"{where}: {key} is not a number ({annotation}): use type choice")
    if kind == "randint":
        if low != int(low) or high != int(high):
            raise ConfigError(f"{where}: randint needs integer low and high, got {low:g} and {high:g}")
    elif _is_int_field(annotation):
        raise ConfigError(f"{where}: {key} is an integer: use type randint or choice, not {kind}")
    return Dimension(key, kind, low=low, high=high)


def apply_sample(raw: Mapping[str, Any], sample: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of the raw params dict with ``{"section.key": value}`` set."""
    merged = copy.deepcopy(dict(raw))
    for dotted, value in sample.items():
        section, _, name = dotted.partition(".")
        merged.setdefault(section, {})
        merged[section] = dict(merged[section] or {})
        merged[section][name] = copy.deepcopy(value)
    return merged


def _check_value(raw: Mapping[str, Any], key: str, value: Any) -> None:
    """Build the whole params with ``key = value`` (types, model validation, train preflight)."""
    where = f"tune.space.{key}"
    try:
        params = params_from_dict(apply_sample(raw, {key: value}), where="params")
        check_train_params(params)
    except ConfigError as err:
        raise ConfigError(f"{where}: value {value!r} is not valid: {err}") from None


def parse_space(space: Mapping[str, Any], raw: Mapping[str, Any]) -> SearchSpace:
    """Check ``tune.space`` against the params it will vary (``raw``: the params file as a dict).

    Raises `ConfigError` naming the first bad entry; an empty space is an error too.
    """
    if not isinstance(space, Mapping) or not space:
        raise ConfigError(
            "tune.space: empty: name at least one section.key to search (see pipeline/tune/search_space.py)"
        )
    types = _field_types()
    dimensions = tuple(_parse_entry(key, entry, types) for key, entry in space.items())
    for dim in dimensions:
        candidates = dim.values if dim.kind == "choice" else (dim.low, dim.high)
        for value in candidates:
            if dim.kind == "randint":
                value = int(value)
            _check_value(raw, dim.key, value)
    return SearchSpace(dimensions)


def best_params_document(sample: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"train.lr": 0.05}`` -> ``{"train": {"lr": 0.05}}`` (what a params file holds)."""
    nested: dict[str, dict[str, Any]] = {}
    for dotted, value in sample.items():
        section, _, name = dotted.partition(".")
        nested.setdefault(section, {})[name] = list(value) if isinstance(value, tuple) else value
    return nested


def _yaml_value(value: Any) -> str:
    """One value as YAML flow text (what ``dvc exp run -S key=value`` parses)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def set_param_args(sample: Mapping[str, Any], params_file: str = "params.yaml") -> list[str]:
    """``dvc exp run`` arguments that apply ``sample`` to ``params_file``: ``["-S", "train.lr=0.05", ...]``."""
    prefix = "" if params_file == "params.yaml" else f"{params_file}:"
    args: list[str] = []
    for key, value in sample.items():
        args += ["-S", f"{prefix}{key}={_yaml_value(list(value) if isinstance(value, tuple) else value)}"]
    return args


def trial_train_overrides(train: TrainConfig, *, iterations: int, eval_every: int) -> dict[str, Any]:
    """What a trial changes in ``train:`` besides the sample: its length and its evaluation points.

    The trial's validation is the sweep's (every ``tune.eval_every``, `pipeline.tune.stage.Sweep`),
    so ``train.eval_every`` is turned off (0) in the trial's params.

    The lr steps shrink with the run (``lr_steps * iterations / train.iterations``), so a short
    trial follows the same schedule shape as the full training it stands for.
    """
    steps = list(scaled_lr_steps(train, iterations))  # a list, as params files hold it
    return {
        "iterations": iterations,
        "checkpoint_every": eval_every,
        "eval_every": 0,
        "log_every": min(train.log_every, eval_every),
        "lr_steps": steps,
    }
