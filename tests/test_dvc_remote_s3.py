"""A DVC remote on S3, for real: stages fetch and preprocess reproduced, `dvc push` to a
``moto_server`` bucket, `git clone` + `dvc pull` elsewhere, and the clone is up to date (same
files, `dvc status` clean, `dvc repro` runs nothing).

The remote is configured as the README says (``dvc remote add -d``, ``dvc remote modify ...
endpointurl``); the credentials come only from the environment.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.dvc_repo import GIT, fresh_repo, run

pytestmark = pytest.mark.slow


def tree_digest(root: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root``."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_push_to_s3_then_clone_and_pull_is_up_to_date(s3_server, tmp_path: Path) -> None:
    repo, env = fresh_repo(tmp_path / "repo")
    # Credentials from the environment; the endpoint from the remote's config (not AWS_ENDPOINT_URL),
    # as a user with a real bucket elsewhere would set it.
    env = {k: v for k, v in env.items() if not k.startswith("AWS_")}
    env.update({k: v for k, v in s3_server.env.items() if k != "AWS_ENDPOINT_URL"})
    remote = f"s3://{s3_server.bucket}/dvc-remote-test"

    run(["dvc", "repro", "preprocess"], repo, env)
    run(["dvc", "remote", "add", "-d", "storage", remote], repo, env)
    run(["dvc", "remote", "modify", "storage", "endpointurl", s3_server.endpoint], repo, env)
    run([*GIT, "add", "-A"], repo, env)
    run([*GIT, "commit", "-qm", "data through preprocess; S3 remote"], repo, env)
    assert "endpointurl" in (repo / ".dvc" / "config").read_text()
    assert "testing" not in (repo / ".dvc" / "config").read_text(), "no credentials in the config"

    # The stages through preprocess only (the copied dvc.lock still holds train's outputs of the
    # project's own params, never built here): `dvc pull`, `status` and `repro` of all would stumble on them.
    pushed = run(["dvc", "push", "--with-deps", "preprocess"], repo, env)
    assert "pushed" in pushed, pushed
    keys = s3_server.keys("dvc-remote-test/")
    assert keys and all(k.startswith("dvc-remote-test/files/md5/") for k in keys), keys[:5]
    in_sync = run(["dvc", "status", "-c", "--with-deps", "preprocess"], repo, env)
    assert "Cache and remote 'storage' are in sync" in in_sync, in_sync

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)
    assert not (clone / "data" / "preprocessed").exists(), "data comes only from the remote"
    run(["dvc", "pull", "--with-deps", "preprocess"], clone, env)
    for folder in ("data/coco", "data/preprocessed"):
        assert tree_digest(clone / folder) == tree_digest(repo / folder), folder
    assert tree_digest(clone / "data/preprocessed"), "the pulled folder is not empty"

    status = run(["dvc", "status", "--with-deps", "preprocess"], clone, env)
    assert "Data and pipelines are up to date." in status, status
    repro = run(["dvc", "repro", "preprocess"], clone, env)
    assert "Running stage" not in repro and "Data and pipelines are up to date." in repro, repro
