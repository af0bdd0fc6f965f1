"""Every stage answers bad config the same way: exit 2, one line naming the key, no traceback."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from tests.params_files import write_params_file

ARGS = {  # every required path, under the test's folder ({tmp})
    "fetch": "--out {tmp}/coco",
    "preprocess": "--coco {tmp}/coco --out {tmp}/pre",
    "train": "--data {tmp}/pre --model-out {tmp}/m.pt --metrics {tmp}/t.json --plots {tmp}/t.csv --storage-path {tmp}/runs",
    "evaluate": "--model {tmp}/m.pt --data {tmp}/pre --metrics {tmp}/e.json --plots {tmp}/e.csv --images {tmp}/pictures",
    "profile": "--model {tmp}/m.pt --metrics {tmp}/p.json --plots {tmp}/p.csv",
    "tune": "--data {tmp}/pre --best-params {tmp}/best.yaml --results {tmp}/tune.csv --storage-path {tmp}/runs",
    "ablate": "--data {tmp}/pre --table {tmp}/a.md --metrics {tmp}/a.json --plots {tmp}/a.csv --work {tmp}/work",
}


@pytest.mark.parametrize("stage", sorted(ARGS))
def test_a_mistyped_key_exits_2_with_one_line(
    stage: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  lrr: 0.1\n")
    argv = ["--params", str(params), *ARGS[stage].format(tmp=tmp_path).split()]
    code = importlib.import_module(f"stages.{stage}").main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"stages.{stage}: error: {params}: train.lrr: unknown key" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"], "nothing may be written"


def test_out_never_deletes_a_users_folder_or_the_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from stages import fetch, preprocess

    tiny = {"data": {"synthetic_train_images": 2, "synthetic_val_images": 2}}
    params = write_params_file(tmp_path / "params.yaml", tiny)
    mine = tmp_path / "some" / "folder" / "of" / "mine"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    assert fetch.main(["--params", str(params), "--out", str(mine)]) == 2
    assert "pass --force" in capsys.readouterr().err and (mine / "notes.txt").read_text() == "mine"

    coco = tmp_path / "coco"
    assert fetch.main(["--params", str(params), "--out", str(coco)]) == 0
    assert fetch.main(["--params", str(params), "--out", str(coco)]) == 0  # its own output: replaced
    before = sorted(p.relative_to(coco) for p in coco.rglob("*"))
    assert preprocess.main(["--params", str(params), "--coco", str(coco), "--out", str(coco)]) == 2
    assert "holds the input" in capsys.readouterr().err
    assert sorted(p.relative_to(coco) for p in coco.rglob("*")) == before
    local = ["--params", str(params), "--local-dir", str(coco), "--out", str(tmp_path)]
    write_params_file(params, {"data": {"source": "local"}})
    assert fetch.main([*local, "--force"]) == 2  # the source inside the output: refused even forced
    assert sorted(p.relative_to(coco) for p in coco.rglob("*")) == before
