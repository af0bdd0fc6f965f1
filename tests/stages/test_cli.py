"""Every stage answers bad config the same way: exit 2, one line naming the key, no traceback."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

ARGS = {
    "fetch": ["--out", "{tmp}/coco"],
    "preprocess": ["--coco", "{tmp}/coco", "--out", "{tmp}/pre"],
    "train": [
        "--data",
        "{tmp}/pre",
        "--model-out",
        "{tmp}/m.pt",
        "--metrics",
        "{tmp}/t.json",
        "--plots",
        "{tmp}/t.csv",
    ],
    "evaluate": [
        "--model",
        "{tmp}/m.pt",
        "--data",
        "{tmp}/pre",
        "--metrics",
        "{tmp}/e.json",
        "--plots",
        "{tmp}/e.csv",
        "--images",
        "{tmp}/pictures",
    ],
    "profile": ["--model", "{tmp}/m.pt", "--metrics", "{tmp}/p.json", "--plots", "{tmp}/p.csv"],
    "tune": ["--data", "{tmp}/pre", "--best-params", "{tmp}/best.yaml", "--results", "{tmp}/tune.csv"],
    "ablate": [
        "--data",
        "{tmp}/pre",
        "--table",
        "{tmp}/a.md",
        "--metrics",
        "{tmp}/a.json",
        "--plots",
        "{tmp}/a.csv",
        "--work",
        "{tmp}/work",
    ],
}


@pytest.mark.parametrize("stage", sorted(ARGS))
def test_a_mistyped_key_exits_2_with_one_line(
    stage: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  lrr: 0.1\n")
    argv = ["--params", str(params), *(a.format(tmp=tmp_path) for a in ARGS[stage])]
    code = importlib.import_module(f"stages.{stage}").main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"stages.{stage}: error: {params}: train.lrr: unknown key" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"], "nothing may be written"
