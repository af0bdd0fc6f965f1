"""`pipeline.storage`: folders and storage URIs told apart; URIs opened as Ray opens them, against a real
S3 server (``moto_server``); the cluster's storage probe and the run lock on a URI."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cluster import NodeChecks, _storage_probe, probe_node
from pipeline.config import ConfigError
from pipeline.storage import (
    filesystem_for,
    is_uri,
    join_location,
    location_exists,
    remove_file,
    resolve_location,
    write_empty_file,
)
from pipeline.train.run_lock import hold_run_lock, lock_path


@pytest.fixture
def s3_env(s3_server, monkeypatch: pytest.MonkeyPatch):
    """This process's environment pointed at the test S3 server (as a user's shell would be)."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return s3_server


@pytest.mark.parametrize(
    ("location", "uri"),
    [("s3://bkt/runs", True), ("gs://b/x", True), ("file:///tmp/x", True), ("runs/ray", False),
     ("/shared/runs", False), ("~/runs", False), ("weird:name/runs", False)],
)  # fmt: skip
def test_is_uri(location: str, uri: bool) -> None:
    assert is_uri(location) is uri


def test_resolve_keeps_uris_and_makes_paths_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_location("s3://bkt/runs/") == "s3://bkt/runs/"
    assert resolve_location("runs/ray") == str(tmp_path / "runs" / "ray")
    assert not Path("s3:").exists(), "a URI never became a folder"


def test_join_keeps_the_scheme() -> None:
    assert join_location("s3://bkt/runs/", "sweep", "train") == "s3://bkt/runs/sweep/train"
    assert join_location("s3://bkt", "x") == "s3://bkt/x"
    assert join_location("/shared/runs", "sweep", "train") == "/shared/runs/sweep/train"


def test_a_uri_is_opened_with_the_endpoint_from_the_environment(s3_env) -> None:
    location = f"s3://{s3_env.bucket}/storage-test/probe"
    assert not location_exists(location)
    write_empty_file(location)
    assert location_exists(location)
    assert location_exists(f"s3://{s3_env.bucket}/storage-test"), "a prefix counts as a folder"
    assert "storage-test/probe" in s3_env.keys("storage-test/"), "written to the server, not elsewhere"
    fs, path = filesystem_for(location)
    assert type(fs).__name__ == "S3FileSystem" and path == f"{s3_env.bucket}/storage-test/probe"
    remove_file(location)
    remove_file(location)  # already gone: nothing
    assert not location_exists(location)
    # pyarrow keeps the emptied "folder" as a marker object, as it does for any S3 delete.
    assert s3_env.keys("storage-test/") == ["storage-test/"]


def test_local_paths_use_the_same_calls(tmp_path: Path) -> None:
    target = str(tmp_path / "probe")
    write_empty_file(target)
    assert location_exists(target)
    remove_file(target)
    assert not location_exists(target)
    fs, path = filesystem_for(str(tmp_path))
    assert type(fs).__name__ == "LocalFileSystem" and path == str(tmp_path)


def test_the_preflight_probe_works_in_a_bucket_and_names_what_a_node_lacks(
    s3_env, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = f"s3://{s3_env.bucket}/preflight-runs"
    with _storage_probe(storage) as probe:
        assert probe.startswith(f"{storage}/.preflight-") and location_exists(probe)
        checks = NodeChecks(files=(), storage=storage, probe=probe, tracking_uri=None, timeout_s=20)
        assert probe_node(checks) == [], "this 'node' sees the driver's probe and can write beside it"
        # A node whose Ray processes lack the endpoint: a closed port stands for an unreachable bucket.
        monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
        (problem,) = probe_node(NodeChecks((), storage, probe, None, timeout_s=2))
        assert f"cannot see {probe}" in problem and "AWS_ENDPOINT_URL" in problem
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env.endpoint)
    assert not [k for k in s3_env.keys("preflight-runs/") if ".preflight-" in k], "the probes are removed"


def test_the_driver_refuses_a_bucket_it_cannot_write(s3_env) -> None:
    refused = pytest.raises(ConfigError, match=r"storage path s3://no-such-bucket/runs: cannot write there")
    with refused, _storage_probe("s3://no-such-bucket/runs"):
        pass


def test_the_run_lock_of_a_uri_is_a_local_file(
    s3_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the project root
    storage = f"s3://{s3_env.bucket}/locked"
    assert lock_path(storage, "fpn-abc") == tmp_path / "runs" / "locks" / "fpn-abc.lock"
    with hold_run_lock(storage, "fpn-abc") as lock:
        assert lock.is_file()
    assert s3_env.keys("locked") == [], "nothing is written into the bucket for the lock"
    assert not (tmp_path / "s3:").exists()
