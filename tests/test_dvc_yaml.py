"""dvc.yaml names the code each stage runs: every project module a stage imports is a dep.

A stage whose code changes without DVC noticing would silently keep stale outputs, so the
import graph of each `python -m stages.<name>` is computed here and compared with its deps.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fpn", "pipeline", "stages")


def _module_file(module: str) -> Path | None:
    base = REPO_ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] in PACKAGES)
    return found


def _closure(entry: Path) -> set[Path]:
    seen: set[Path] = set()
    todo = [entry]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo.extend(p for m in _imports(path) if (p := _module_file(m)) is not None)
    return {p.relative_to(REPO_ROOT) for p in seen}


def _covered(file: Path, deps: list[str]) -> bool:
    return any(file == Path(d) or Path(d) in file.parents for d in deps)


# The default pipeline, and the stages off it (tune, ablate) that run from the project root.
STAGES = {
    **yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"],
    **yaml.safe_load((REPO_ROOT / "experiments" / "dvc.yaml").read_text())["stages"],
}


def test_plain_dvc_repro_runs_only_the_default_pipeline() -> None:
    """`dvc repro` reads ./dvc.yaml only: the long tune/ablate runs must not be in it."""
    default = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    assert list(default) == ["fetch", "preprocess", "train", "evaluate", "profile"]
    for name, stage in yaml.safe_load((REPO_ROOT / "experiments" / "dvc.yaml").read_text())["stages"].items():
        assert stage.get("wdir") == "..", f"experiments/dvc.yaml stage {name} must run from the project root"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_cover_the_code_it_imports(name: str) -> None:
    stage = STAGES[name]
    module = stage["cmd"].split("python -m ", 1)[1].split()[0]
    entry = _module_file(module)
    assert entry is not None, f"dvc.yaml stage {name}: {module} not found"
    deps = [d if isinstance(d, str) else next(iter(d)) for d in stage["deps"]]
    missing = sorted(str(f) for f in _closure(entry) if f.name != "__init__.py" and not _covered(f, deps))
    assert not missing, f"dvc.yaml stage {name}: add to deps: {missing}"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_list_only_code_it_imports(name: str) -> None:
    """A code dep the stage never imports reruns it for nothing: every one holds imported code."""
    stage = STAGES[name]
    module = stage["cmd"].split("python -m ", 1)[1].split()[0]
    imported = _closure(_module_file(module))
    deps = [d if isinstance(d, str) else next(iter(d)) for d in stage["deps"]]
    code = [d for d in deps if Path(d).parts[0] in PACKAGES]
    stale = [d for d in code if not any(_covered(f, [d]) for f in imported if f.name != "__init__.py")]
    assert not stale, f"dvc.yaml stage {name}: not imported, remove from deps: {stale}"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_paths_are_on_its_command_line(name: str) -> None:
    stage = STAGES[name]
    outs = [
        next(iter(o)) if isinstance(o, dict) else o
        for key in ("outs", "metrics", "plots")
        for o in stage.get(key, [])
    ]
    for out in outs:
        assert out in stage["cmd"], f"dvc.yaml stage {name}: output {out} is not on its command line"


# Where Ray keeps its runs is a param (section storage:), read by these stages; not a path in dvc.yaml.
RAY_STORAGE_PARAM = {"train": "storage.train", "tune": "storage.tune"}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_ray_storage_comes_from_params_not_the_command_line(name: str) -> None:
    """`dvc repro` honours params.yaml's storage: no stage pins it with --storage-path, and the stage
    that reads it lists it, so changing it runs the stage again."""
    stage = STAGES[name]
    assert "--storage-path" not in stage["cmd"], f"dvc.yaml stage {name}: --storage-path overrides params"
    params = stage.get("params", [])
    if name in RAY_STORAGE_PARAM:
        assert RAY_STORAGE_PARAM[name] in params, f"dvc.yaml stage {name}: list {RAY_STORAGE_PARAM[name]}"
    else:
        assert not any(str(p).startswith("storage") for p in params), (
            f"dvc.yaml stage {name}: reads no storage"
        )
