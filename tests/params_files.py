"""Params files written by tests: `pipeline.config.load_params` wants every section in a file.

Tests give only the sections they care about; `write_params_file` writes each other section
as an empty mapping (``tune: {}``), which is how a params file says "this section's defaults"
explicitly. `pipeline.config.params_from_dict` (no file) still takes partial dicts.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import Params

SECTIONS = tuple(field.name for field in dataclasses.fields(Params))


def with_every_section(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with an empty mapping for each section it lacks, in `Params` order (``raw``'s own first)."""
    return {**raw, **{section: {} for section in SECTIONS if section not in raw}}


def write_params_file(path: Path, raw: dict[str, Any]) -> Path:
    """Write ``raw`` (plus every section it lacks, empty) as YAML to ``path``; return ``path``."""
    path.write_text(yaml.safe_dump(with_every_section(raw), sort_keys=False))
    return path
