"""`pipeline.data_staging` (``storage.data``: a local --data folder copied once for a cluster's
workers) and `pipeline.storage.local_copies` (outputs written to a URI), against a real S3
server (``moto_server``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.data_staging import staged_data
from pipeline.dataset import DetectionDataset, read_categories, read_data_hash
from pipeline.storage import local_copies, read_location
from tests.train_samples import tiny_data


@pytest.fixture
def s3_env(s3_server, monkeypatch: pytest.MonkeyPatch):
    """This process's environment pointed at the test S3 server (as a user's shell would be)."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return s3_server


def test_a_local_folder_is_copied_once_under_its_data_hash(s3_env, tmp_path: Path) -> None:
    data = tiny_data(tmp_path / "data", train_images=4, val_images=2)
    storage = f"s3://{s3_env.bucket}/staging-test"
    data_hash = read_data_hash(data)

    staged = staged_data(str(data), storage, progress=False)

    assert staged == f"{storage}/{data_hash}"
    keys = s3_env.keys(f"staging-test/{data_hash}/")
    local = sorted(p.relative_to(data).as_posix() for p in data.rglob("*") if p.is_file())
    assert [k.split(f"{data_hash}/", 1)[1] for k in keys] == local
    # The copy reads as the folder does: same hash, categories and items.
    assert read_data_hash(staged) == data_hash and read_categories(staged) == read_categories(data)
    copy, folder = (
        DetectionDataset(staged, "train2017", train=False),
        DetectionDataset(str(data), "train2017", train=False),
    )
    assert len(copy) == len(folder) == 4
    assert all(
        (copy[i][0] == folder[i][0]).all() and (copy[i][1]["boxes"] == folder[i][1]["boxes"]).all()
        for i in range(4)
    )

    # A second run finds the copy complete (manifest.json, written last) and uploads nothing.
    marker = f"staging-test/{data_hash}/train2017/index.parquet"
    s3_env.client().put_object(Bucket=s3_env.bucket, Key=marker, Body=b"left as it was")
    assert staged_data(str(data), storage, progress=False) == staged
    assert s3_env.read(marker) == b"left as it was", "nothing was copied again"


def test_no_storage_or_a_uri_is_read_where_it_is(tmp_path: Path) -> None:
    assert staged_data(str(tmp_path / "anything"), None) == str(tmp_path / "anything")
    assert staged_data("s3://bucket/data", "s3://elsewhere/data") == "s3://bucket/data"


def test_a_folder_as_storage_gets_the_copy_renamed_into_place(tmp_path: Path) -> None:
    data = tiny_data(tmp_path / "data", train_images=4, val_images=2)
    staged = staged_data(str(data), str(tmp_path / "nfs"), progress=False)
    assert staged == str(tmp_path / "nfs" / read_data_hash(data))
    assert sorted(p.name for p in (tmp_path / "nfs").iterdir()) == [read_data_hash(data)], "no temporary left"
    assert read_location(f"{staged}/manifest.json") == (data / "manifest.json").read_bytes()


def test_outputs_at_a_uri_are_uploaded_whole_after_the_block(s3_env, tmp_path: Path) -> None:
    uri = f"s3://{s3_env.bucket}/outputs-test/model.pt"
    local = tmp_path / "metrics.json"
    with local_copies([uri, local]) as (model_file, metrics_file):
        assert model_file.name == "model.pt" and metrics_file == local
        model_file.write_bytes(b"weights")
        metrics_file.write_text("{}")
        assert s3_env.keys("outputs-test/") == [], "nothing is uploaded before the block ends"
    assert s3_env.read("outputs-test/model.pt") == b"weights" and local.read_text() == "{}"
    assert not model_file.exists(), "the temporary copy is removed"

    with (
        pytest.raises(RuntimeError),
        local_copies([f"s3://{s3_env.bucket}/outputs-test/other.pt"]) as (other,),
    ):
        other.write_bytes(b"half")
        raise RuntimeError("training failed")
    assert s3_env.keys("outputs-test/") == ["outputs-test/model.pt"], "a failed block uploads nothing"
