"""python -m stages.predict: from a model file and from the registry's champion, whose code is checked."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from PIL import Image

from pipeline.tracking.code_hash import CODE_SHA256_TAG
from pipeline.tracking.pyfunc import (
    MODEL_NAME,
    UnsafeModelError,
    load_detector,
    log_detector,
    project_code_sha256,
)
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
    assert (
        predict.main(["--model", str(model), "--out", str(out), str(images[0]), str(tmp_path / "gone.jpg")])
        == 2
    )
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
    assert err.startswith(
        f"stages.predict: error: {bomb}: too large to decode (Image size (400000000 pixels)"
    )
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


def test_registry_model_code_is_checked_against_its_recorded_hash(
    inputs: tuple[Path, list[Path]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    """A registered model whose copied code was changed in the artifact store is refused before any
    of its code runs, naming the URI and the changed file; the untouched one loads; a pinned hash is
    checked instead of the recorded one; --trust-model-code skips the check (and runs what is there)."""
    model, images = inputs
    monkeypatch.chdir(tmp_path)  # a SQLite store keeps its artifacts in ./mlruns
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    client = mlflow_client(store)
    run = TrackedRun.open(store, "trust", strict=True)
    info = log_detector(run, model)
    run.finish()
    assert info is not None
    register_model(client, info.model_uri, name="fpn-trust", metrics={"AP": 0.1}, params={},
                   data_hash=None, val_data_hash="d", git_commit=None)  # fmt: skip
    recorded = client.get_model_version("fpn-trust", "1").tags[CODE_SHA256_TAG]
    assert recorded == client.get_run(run.run_id).data.tags[CODE_SHA256_TAG] == project_code_sha256()
    champion, by_run = "models:/fpn-trust@champion", f"runs:/{run.run_id}/{MODEL_NAME}"

    def predict_args(uri: str, *extra: str) -> list[str]:
        return ["--model", uri, "--out", str(tmp_path / "out"), "--score-thresh", "0", *extra, str(images[0])]

    # Untouched: loads with the recorded hash, and with the same hash pinned; another pin is refused.
    assert predict.main(predict_args(champion)) == 0
    assert load_detector(champion, expect_code_sha256=recorded).categories
    with pytest.raises(
        UnsafeModelError, match=rf"^{re.escape(champion)}: refused to load: its code does not"
    ):
        load_detector(champion, expect_code_sha256="0" * 64)

    # Tampered: one line added to a copied code file in the artifact store.
    folder = Path(client.get_model_version_download_uri("fpn-trust", "1").removeprefix("file://"))
    with (folder / "code" / "pipeline" / "inference.py").open("a") as handle:
        handle.write("\nprint('not the code that was logged')\n")
    capsys.readouterr()
    for uri in (champion, by_run):
        assert predict.main(predict_args(uri)) == 2
        err = capsys.readouterr().err
        assert f"{uri}: refused to load: its code does not match" in err, err
        assert f"expected {recorded}" in err and "changed pipeline/inference.py" in err, err
    assert predict.main(predict_args(champion, "--expect-code-sha256", recorded)) == 2
    assert "changed pipeline/inference.py" in capsys.readouterr().err

    # The models-from-code file itself changed: refused before it runs; trusted, it runs.
    marker = tmp_path / "ran"
    with (folder / "model_code.py").open("a") as handle:
        handle.write(f"\nopen({str(marker)!r}, 'w').write('ran')\n")
    with pytest.raises(UnsafeModelError, match="changed model_code.py"):
        load_detector(champion)
    assert not marker.exists(), "the tampered code ran before the check"
    assert predict.main(predict_args(champion, "--trust-model-code")) == 0
    assert marker.read_text() == "ran", "--trust-model-code loads whatever code the store holds"

    # No recorded hash: refused, saying how to pin one or trust it.
    client.delete_model_version_tag("fpn-trust", "1", CODE_SHA256_TAG)
    with pytest.raises(
        UnsafeModelError,
        match=r"no code hash is recorded for it \(no tag code_sha256 on model version fpn-trust/1\)",
    ):
        load_detector(champion)
