"""A real S3 server for the tests: ``moto_server`` (from ``moto[server]``) on 127.0.0.1.

`start_s3_server(log_dir)` runs ``moto_server`` as a subprocess on a free port, waits until it
answers HTTP (polled against a deadline), creates one bucket with boto3 and returns an
`S3Server`: its ``endpoint``, ``bucket`` and ``env``, the variables every S3 client here reads
(boto3, s3fs under ``dvc``, pyarrow under Ray): ``AWS_ENDPOINT_URL``, test credentials and a
region. Clients get them only through the environment, as a user's would. `S3Server.stop`
terminates the server by its PID. The session fixture ``s3_server`` (tests/conftest.py) skips
when moto is not installed (``pip install -e ".[dev]"`` brings it).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.ports import free_port

START_TIMEOUT_S = 60
BUCKET = "fpn-test"  # S3 bucket names need at least 3 characters


def moto_server_command() -> str | None:
    """The ``moto_server`` executable beside this Python, or None when moto[server] is missing."""
    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("flask") is None:
        return None
    beside = Path(sys.executable).parent / "moto_server"
    return str(beside) if beside.is_file() else shutil.which("moto_server")


@dataclass
class S3Server:
    """A running ``moto_server``: where it listens, its bucket, and the environment clients need."""

    endpoint: str  # http://127.0.0.1:<port>
    bucket: str
    process: subprocess.Popen = field(repr=False)

    @property
    def env(self) -> dict[str, str]:
        """What every S3 client needs: endpoint, credentials (moto accepts any), region."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self) -> Any:
        """A boto3 S3 client for this server (explicit arguments: this process's environment may lack ``env``)."""
        import boto3

        env = self.env
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_DEFAULT_REGION"],
        )

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key in the bucket under ``prefix``, sorted."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

    def read(self, key: str) -> bytes:
        return self.client().get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def stop(self) -> None:
        """Terminate the server (SIGKILL after 10 s)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True  # an S3 error document is an answer
    except OSError:
        return False


def start_s3_server(log_dir: Path, *, bucket: str = BUCKET) -> S3Server:
    """Start ``moto_server`` on 127.0.0.1 at a free port with ``bucket`` created; its log in ``log_dir``."""
    command = moto_server_command()
    if command is None:
        raise RuntimeError('moto_server is not installed: pip install "moto[server]"')
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log_path = log_dir / "moto_server.log"
    # Its own environment: no AWS_* of the caller's (a real profile or endpoint) reaches the server.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [command, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env
        )
    server = S3Server(endpoint=endpoint, bucket=bucket, process=process)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _answers(endpoint):
        if process.poll() is not None or time.monotonic() > deadline:
            server.stop()
            text = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(
                f"moto_server did not answer at {endpoint} within {START_TIMEOUT_S} s:\n{text}"
            )
        time.sleep(0.2)
    server.client().create_bucket(Bucket=bucket)
    return server
