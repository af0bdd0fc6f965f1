"""pipeline.tracking.registry and pipeline.tracking.pyfunc through a real MLflow tracking server on 127.0.0.1."""

from __future__ import annotations

import io
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from pipeline.inference import predict_images
from pipeline.model_file import load_model_file
from pipeline.tracking.pyfunc import OUTPUT_COLUMNS, load_detector, log_detector
from pipeline.tracking.registry import CHAMPION, register_model
from pipeline.tracking.run import TrackedRun, check_tracking_uri, mlflow_client
from tests.detection_samples import synthetic_preprocessed, tiny_model_file

CATEGORIES = [{"label": 1, "id": 2, "name": "circle"}, {"label": 2, "id": 5, "name": "square"}]


@pytest.fixture
def tracking(mlflow_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)  # for mlflow.pyfunc.load_model("models:/...")
    return check_tracking_uri()


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_file(
        tmp_path_factory.mktemp("model") / "model.pt", CATEGORIES, extra={"git_commit": "abc123"}
    )


def logged_model_uri(tracking: str, model_file: Path) -> str:
    run = TrackedRun.open(tracking, "registry-tests", strict=True)
    info = log_detector(run, model_file)
    run.finish()
    assert info is not None
    return info.model_uri


def register(tracking: str, uri: str, name: str, ap: float, data: str) -> tuple[str, str]:
    registration = register_model(
        mlflow_client(tracking),
        uri,
        name=name,
        metrics={"AP": ap, "AP50": 2 * ap},
        params={"model": {"backbone": "resnet18"}, "evaluate": {"batch_size": 2}},
        data_hash=f"manifest-{data}",
        val_data_hash=data,
        git_commit="abc123",
    )
    return registration.version, registration.decision.status


@pytest.mark.slow  # two registrations / evaluations through the server: ~15-45 s
def test_champion_moves_only_on_better_ap_on_the_same_data(tracking: str, model_file: Path) -> None:
    uri = logged_model_uri(tracking, model_file)
    name = f"fpn-test-{uuid.uuid4().hex[:8]}"
    client = MlflowClient(tracking_uri=tracking, registry_uri=tracking)

    assert register(tracking, uri, name, 0.30, "data-A") == ("1", CHAMPION)
    assert register(tracking, uri, name, 0.20, "data-A") == ("2", "rejected")
    assert register(tracking, uri, name, 0.40, "data-A") == ("3", CHAMPION)
    assert client.get_model_version_by_alias(name, CHAMPION).version == "3"

    v1, v2, v3 = (client.get_model_version(name, str(v)) for v in (1, 2, 3))
    assert v1.tags["status"] == "retired" and v1.tags["retired_by"] == "version 3"
    assert v2.tags["status"] == "rejected" and v2.tags["compared_with"] == "version 1 AP 0.3000"
    assert v2.description.startswith("rejected: AP 0.2000 does not beat champion version 1 AP 0.3000")
    assert v3.tags["compared_with"] == "version 1 AP 0.3000"
    assert v3.tags["metric.AP"] == "0.4" and v3.tags["metric.AP50"] == "0.8"
    assert v3.tags["params.model"] == '{"backbone": "resnet18"}'
    assert (v3.tags["data_hash"], v3.tags["val_data_hash"], v3.tags["git_commit"]) == (
        "manifest-data-A",
        "data-A",
        "abc123",
    )

    # New validation data: APs are not comparable; the first version measured on it takes over ...
    assert register(tracking, uri, name, 0.10, "data-B") == ("4", CHAMPION)
    assert "validation data changed" in client.get_model_version(name, "4").tags["decision"]
    # ... a version on the old data must beat the best on ITS data (version 3), not the champion ...
    assert register(tracking, uri, name, 0.35, "data-A") == ("5", "rejected")
    assert client.get_model_version(name, "5").tags["compared_with"] == "version 3 AP 0.4000"
    # ... and on the champion's data the plain comparison applies again.
    assert register(tracking, uri, name, 0.05, "data-B") == ("6", "rejected")
    assert register(tracking, uri, name, 0.20, "data-B") == ("7", CHAMPION)
    assert client.get_model_version_by_alias(name, CHAMPION).version == "7"


def test_champion_alias_loads_back_with_the_same_detections(
    tracking: str, model_file: Path, tmp_path: Path
) -> None:
    name = f"fpn-test-{uuid.uuid4().hex[:8]}"
    register(tracking, logged_model_uri(tracking, model_file), name, 0.1, "data-A")

    synthetic_preprocessed(tmp_path, images=2)
    files = sorted((tmp_path / "coco" / "val2017").glob("*.jpg"))  # the originals the shards keep
    images = [Image.open(f).convert("RGB") for f in files]
    direct = predict_images(load_model_file(model_file), images)
    registered = load_detector(f"models:/{name}@{CHAMPION}", tracking_uri=tracking)
    assert registered.categories == CATEGORIES and registered.extra == {"git_commit": "abc123"}
    from_registry = predict_images(registered, images)
    for a, b in zip(direct, from_registry, strict=True):
        assert len(a.boxes) > 0
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.scores, b.scores)
        np.testing.assert_array_equal(a.labels, b.labels)

    # The generic pyfunc interface: encoded images in, one row per detection out.
    import pandas as pd

    # dst_path: MLflow otherwise downloads into a temp folder it never removes (45 MB a run).
    (tmp_path / "pyfunc").mkdir()
    pyfunc = mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION}", dst_path=str(tmp_path / "pyfunc"))
    frame = pd.DataFrame({"image": [f.read_bytes() for f in files]})
    rows = pyfunc.predict(frame, params={"score_thresh": 0.0})
    assert list(rows.columns) == OUTPUT_COLUMNS
    first = rows[rows.image_index == 0]
    with Image.open(io.BytesIO(files[0].read_bytes())) as decoded:
        (expected,) = predict_images(registered, [decoded])
    np.testing.assert_allclose(first[["x1", "y1", "x2", "y2"]].to_numpy(), expected.boxes, atol=0.01)
    assert set(first.category_id) <= {2, 5}
