"""python -m stages.predict: from a model file and from the registry's champion."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from PIL import Image

from pipeline.tracking.pyfunc import MODEL_NAME, log_detector
from pipeline.tracking.registry import register_model
from pipeline.tracking.run import TrackedRun, mlflow_client
from stages import predict
from tests.detection_samples import read_categories, synthetic_preprocessed, tiny_model_file
from tests.image_files import with_header_size


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A tiny model for the synthetic classes, two original synthetic images (200x160) and a greyscale one."""
    tmp = tmp_path_factory.mktemp("predict")
    root = synthetic_preprocessed(tmp, images=2)
    model = tiny_model_file(tmp / "model.pt", read_categories(root))
    images = sorted((tmp / "coco" / "val2017").glob("*.jpg"))
    grey = tmp / "grey.png"
    Image.open(images[0]).convert("L").resize((90, 120)).save(grey)
    return model, [*images, grey]


def test_predict_from_a_model_file(inputs: tuple[Path, list[Path]], tmp_path: Path) -> None:
    model, images = inputs
    subprocess.run(
        [sys.executable, "-m", "stages.predict", "--model", str(model), "--out", str(tmp_path / "out"),
         "--score-thresh", "0", *map(str, images)],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    report = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert [entry["file"] for entry in report["images"]] == list(map(str, images))
    assert (report["images"][-1]["width"], report["images"][-1]["height"]) == (90, 120)
    for entry in report["images"]:
        assert (tmp_path / "out" / f"{Path(entry['file']).stem}.jpg").is_file()
        assert entry["detections"], "a random model with score threshold 0 still detects"
        for det in entry["detections"]:
            x1, y1, x2, y2 = det["bbox_xyxy"]
            assert 0 <= x1 <= x2 <= entry["width"] and 0 <= y1 <= y2 <= entry["height"]  # original pixels
            assert (det["category_id"], det["category_name"]) in {
                (2, "circle"),
                (5, "square"),
                (9, "triangle"),
            }
    with Image.open(tmp_path / "out" / "grey.jpg") as drawn:
        assert drawn.size == (90, 120) and drawn.mode == "RGB"


def test_predict_from_the_registry_matches_the_file(
    inputs: tuple[Path, list[Path]], tmp_path: Path, mlflow_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, images = inputs
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    name = f"fpn-test-{uuid.uuid4().hex[:8]}"
    run = TrackedRun.open(mlflow_server, "predict-tests", strict=True)
    info = log_detector(run, model)
    run.finish()
    assert info is not None
    register_model(
        mlflow_client(mlflow_server),
        info.model_uri,
        name=name,
        metrics={"AP": 0.1},
        params={},
        data_hash=None,
        val_data_hash="d",
        git_commit=None,
    )

    assert (
        predict.main(
            [
                "--model",
                str(model),
                "--out",
                str(tmp_path / "file"),
                "--score-thresh",
                "0.0",
                *map(str, images),
            ]
        )
        == 0
    )
    champion = f"models:/{name}@champion"
    assert (
        predict.main(
            ["--model", champion, "--out", str(tmp_path / "reg"), "--score-thresh", "0.0", *map(str, images)]
        )
        == 0
    )
    # The run's pyfunc by name, as a runs:/ URI.
    by_run = f"runs:/{run.run_id}/{MODEL_NAME}"
    assert (
        predict.main(
            ["--model", by_run, "--out", str(tmp_path / "run"), "--score-thresh", "0.0", *map(str, images)]
        )
        == 0
    )
    from_file = json.loads((tmp_path / "file" / "detections.json").read_text())
    from_registry = json.loads((tmp_path / "reg" / "detections.json").read_text())
    from_run = json.loads((tmp_path / "run" / "detections.json").read_text())
    assert from_registry["model"] == champion
    assert from_registry["images"] == from_file["images"] == from_run["images"]


def test_bad_model_and_image_get_clear_errors(
    inputs: tuple[Path, list[Path]], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    model, images = inputs
    assert predict.main(["--model", str(tmp_path / "none.pt"), "--out", str(tmp_path), str(images[0])]) == 2
    assert f"{tmp_path / 'none.pt'}: model file not found" in capsys.readouterr().err
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    assert predict.main(["--model", str(model), "--out", str(tmp_path / "out"), str(broken)]) == 2
    assert f"{broken}: cannot read image" in capsys.readouterr().err


def test_a_missing_second_image_fails_before_anything_is_written(
    inputs: tuple[Path, list[Path]], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The first picture used to be written, then a traceback, and no detections.json."""
    model, images = inputs
    out = tmp_path / "out"
    assert predict.main(["--model", str(model), "--out", str(out), str(images[0]), str(tmp_path / "gone.jpg")]) == 2
    err = capsys.readouterr().err
    assert err == f"stages.predict: error: {tmp_path / 'gone.jpg'}: image not found\n"
    assert not out.exists()


def test_a_decompression_bomb_exits_2_naming_the_file(
    inputs: tuple[Path, list[Path]], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A JPEG claiming 20000x20000 (400 Mpx) raised PIL's DecompressionBombError as a traceback."""
    model, images = inputs
    bomb = tmp_path / "bomb.jpg"
    bomb.write_bytes(with_header_size(images[0].read_bytes(), 20000, 20000))
    out = tmp_path / "out"
    assert predict.main(["--model", str(model), "--out", str(out), str(images[0]), str(bomb)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"stages.predict: error: {bomb}: too large to decode (Image size (400000000 pixels)")
    assert err.count("\n") == 1
    assert not out.exists()


def test_an_image_that_fails_to_decode_late_leaves_no_partial_output(
    inputs: tuple[Path, list[Path]], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A truncated file has a good header: it fails at decoding, after the first image was detected."""
    model, images = inputs
    truncated = tmp_path / "truncated.jpg"
    data = images[1].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert predict.main(["--model", str(model), "--out", str(out), str(images[0]), str(truncated)]) == 2
    assert f"stages.predict: error: {truncated}: cannot read image" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"], "nothing written, the user's file kept"
